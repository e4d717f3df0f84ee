from histoflow.batches import run_slide_batch
from histoflow.logs import first_log, log_to

# one job, many slides: the per-slide step of rule `params.rule` for each (see histoflow/batches.py)
with log_to(first_log(snakemake)):
    run_slide_batch(
        rule=snakemake.params.rule,
        jobs=snakemake.params.jobs,
        manifest_path=snakemake.output.manifest,
        log_path=snakemake.log[0],
        threads=snakemake.threads,
    )
