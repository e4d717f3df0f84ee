from histoflow.crossfit import crossfit_patch_classifier
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    crossfit_patch_classifier(
        inner_splits_path=snakemake.input.splits,
        feature_paths=list(snakemake.params.features),
        label_paths=list(snakemake.params.labels),
        settings=snakemake.params.settings,
        seed=int(snakemake.params.seed),
        out_path=snakemake.output.probs,
        metrics_out=snakemake.output.metrics,
    )
