# Stage: MLflow audit trail. Jobs write files only; one job at the end logs them (see
# histoflow/mlflow.py for why), so parallel or SLURM jobs can never lose or corrupt a log.


rule mlflow_init:
    output:
        store=out("mlflow/store.json"),
    params:
        outdir=outdir_of("mlflow/store.json"),
        config=config,
    log:
        log_path("mlflow_init", "mlflow_init"),
    conda:
        "../../envs/mlflow.yaml"
    script:
        "../scripts/mlflow_init.py"


rule mlflow_log:
    input:
        store=out("mlflow/store.json"),
        metrics=out("metrics/metrics.json"),
        checklist=out("checklist.md"),
    output:
        status=out("mlflow/logged.json"),
    params:
        outdir=outdir_of("mlflow/logged.json"),
        config=config,
        samples=config["samples"],
        force=False,
    log:
        log_path("mlflow_log", "mlflow_log"),
    conda:
        "../../envs/mlflow.yaml"
    script:
        "../scripts/mlflow_log.py"


# `snakemake mlflow_sync`: log results that could not reach the tracking server earlier
# (no output, so it runs whenever asked; a result already logged is not logged twice).
rule mlflow_sync:
    input:
        metrics=out("metrics/metrics.json"),
        checklist=out("checklist.md"),
    params:
        outdir=outdir_of("metrics/metrics.json"),
        config=config,
        samples=config["samples"],
        force=False,
    log:
        log_path("mlflow_sync", "mlflow_sync"),
    conda:
        "../../envs/mlflow.yaml"
    script:
        "../scripts/mlflow_log.py"


rule mlflow:
    input:
        stage_targets("mlflow"),
