from histoflow.bundle import write_mil_bundle
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    write_mil_bundle(
        model_name=f"mil-{snakemake.wildcards.model}",
        checkpoint_paths=list(snakemake.input.checkpoints),
        prediction_paths=list(snakemake.input.predictions),
        feature_paths=list(snakemake.params.features),
        encoder=snakemake.params.encoder,
        settings=dict(snakemake.params.settings),
        target=dict(snakemake.params.target),
        metrics_settings=dict(snakemake.params.metrics),
        seed=snakemake.params.seed,
        stain_json=snakemake.input.stain[0] if snakemake.input.stain else None,
        out_json=snakemake.output.bundle,
    )
