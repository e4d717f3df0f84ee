from histoflow.batches import run_slide_batch
from histoflow.logs import first_log, log_to

# one job, many slides: the per-slide rule's own script for each (see histoflow/batches.py); the
# scripts sit beside this one
with log_to(first_log(snakemake)):
    run_slide_batch(
        rule=snakemake.params.rule,
        script=f"{snakemake.scriptdir}/{snakemake.params.script}",
        jobs=snakemake.params.jobs,
        manifest_path=snakemake.output.manifest,
        log_path=snakemake.log[0],
        threads=snakemake.threads,
    )
