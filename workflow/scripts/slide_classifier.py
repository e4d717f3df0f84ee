from histoflow.logs import first_log, log_to
from histoflow.slide_classifier import write_slide_classifier

with log_to(first_log(snakemake)):
    write_slide_classifier(
        features_path=snakemake.input.table,
        predictions_path=snakemake.output.predictions,
        importances_path=snakemake.output.importances,
        name=snakemake.wildcards.clf,
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        target=snakemake.params.target,
        model_paths=list(snakemake.output.models),
    )
