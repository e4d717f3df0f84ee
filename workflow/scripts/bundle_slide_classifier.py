from histoflow.logs import first_log, log_to
from histoflow.slide_bundle import write_slide_classifier_bundle

with log_to(first_log(snakemake)):
    write_slide_classifier_bundle(
        model_name=f"{snakemake.wildcards.clf}@{snakemake.wildcards.source}",
        classifier=snakemake.wildcards.clf,
        source=snakemake.wildcards.source,
        model_paths=list(snakemake.input.models),
        prediction_paths=[snakemake.input.predictions],
        features_table=snakemake.input.table,
        source_models=list(snakemake.input.source_models),
        mil_bundle=snakemake.input.mil_bundle[0] if snakemake.input.mil_bundle else None,
        feature_paths=list(snakemake.params.features),
        encoder=snakemake.params.encoder,
        settings=dict(snakemake.params.settings),
        slide_feature_settings=dict(snakemake.params.slide_features),
        target=dict(snakemake.params.target),
        metrics_settings=dict(snakemake.params.metrics),
        seed=snakemake.params.seed,
        stain_json=snakemake.input.stain[0] if snakemake.input.stain else None,
        out_json=snakemake.output.bundle,
    )
