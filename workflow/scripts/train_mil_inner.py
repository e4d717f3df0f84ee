from histoflow.crossfit import inner_seed
from histoflow.logs import first_log, log_to
from histoflow.mil.train import train_fold

# inner fold j of outer fold k: train_fold on the inner split table (its `fold` = j), with a seed
# of its own so inner models differ from the outer ones
with log_to(first_log(snakemake)):
    train_fold(
        splits_tsv=snakemake.input.splits,
        feature_paths=list(snakemake.params.features),
        model_name=snakemake.wildcards.model,
        fold=int(snakemake.wildcards.inner),
        settings=snakemake.params.settings,
        seed=inner_seed(snakemake.params.seed, int(snakemake.wildcards.fold)),
        encoder=snakemake.params.encoder,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        out_predictions=snakemake.output.predictions,
        out_tile_scores=snakemake.output.tile_scores,
        threads=snakemake.threads,
        target=snakemake.params.target,
    )
