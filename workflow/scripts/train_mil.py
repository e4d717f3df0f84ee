from histoflow.logs import first_log, log_to
from histoflow.mil.train import train_fold

with log_to(first_log(snakemake)):
    train_fold(
        splits_tsv=snakemake.input.splits,
        feature_paths=list(snakemake.params.features),
        model_name=snakemake.wildcards.model,
        fold=int(snakemake.wildcards.fold),
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        encoder=snakemake.params.encoder,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        out_predictions=snakemake.output.predictions,
        out_tile_scores=snakemake.output.tile_scores,
        threads=snakemake.threads,
        target=snakemake.params.target,
    )
