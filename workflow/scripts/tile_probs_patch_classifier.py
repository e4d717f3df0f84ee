from histoflow.logs import first_log, log_to
from histoflow.patch_classifier import predict_tile_probs

with log_to(first_log(snakemake)):
    predict_tile_probs(
        model_path=snakemake.input.model,
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        feature_paths=list(snakemake.params.features),
        out_path=snakemake.output.probs,
    )
