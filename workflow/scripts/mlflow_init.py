from histoflow.logs import first_log, log_to
from histoflow.mlflow import init_store

with log_to(first_log(snakemake)):
    init_store(outdir=snakemake.params.outdir, config=dict(snakemake.params.config), out_json=snakemake.output.store)
