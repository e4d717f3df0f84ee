from histoflow.logs import first_log, log_to
from histoflow.patch_classifier import train_patch_classifier

with log_to(first_log(snakemake)):
    train_patch_classifier(
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        feature_paths=list(snakemake.params.features),
        label_paths=list(snakemake.params.labels),
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        model_out=snakemake.output.model,
        metrics_out=snakemake.output.metrics,
    )
