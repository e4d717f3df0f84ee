from histoflow.crossfit import mil_job_fold
from histoflow.logs import first_log, log_to
from histoflow.mil.train import train_fold
from histoflow.mlflow import SystemMetrics

# rules train_mil (outer fold {fold}) and train_mil_inner (inner fold {inner} of outer fold {fold})
fold, seed, inner = mil_job_fold(snakemake.wildcards, snakemake.params.seed)
# mlflow.system_metrics: CPU/memory/GPU of an outer fold's job, sampled to a file that mlflow_log
# logs later (read from the config, not params, so switching it on does not retrain finished folds)
sampling = (snakemake.config.get("mlflow") or {}).get("system_metrics", False) and not inner
with log_to(first_log(snakemake)), SystemMetrics.beside(snakemake.output.checkpoint, sampling):
    train_fold(
        splits_tsv=snakemake.input.splits,
        feature_paths=list(snakemake.params.features),
        model_name=snakemake.wildcards.model,
        fold=fold,
        settings=snakemake.params.settings,
        seed=seed,
        encoder=snakemake.params.encoder,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        out_predictions=snakemake.output.predictions,
        out_tile_scores=snakemake.output.tile_scores,
        threads=snakemake.threads,
        target=snakemake.params.target,
    )
