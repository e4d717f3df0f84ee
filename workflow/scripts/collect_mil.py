from histoflow.logs import first_log, log_to
from histoflow.mil.train import collect_model

with log_to(first_log(snakemake)):
    collect_model(
        model_name=snakemake.wildcards.model,
        prediction_paths=list(snakemake.input.predictions),
        history_paths=list(snakemake.input.histories),
        out_predictions=snakemake.output.predictions,
        out_curves=snakemake.output.curves,
        out_summary=snakemake.output.summary,
    )
