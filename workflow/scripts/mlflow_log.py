from histoflow.logs import first_log, log_to
from histoflow.mlflow import log_workflow

with log_to(first_log(snakemake)):
    log_workflow(
        outdir=snakemake.params.outdir,
        config=dict(snakemake.params.config),
        samples_path=snakemake.params.samples,
        status_json=snakemake.output.status if snakemake.output else f"{snakemake.params.outdir}/mlflow/synced.json",
        force=snakemake.params.force,
    )
