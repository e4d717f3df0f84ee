from histoflow.features import extract_slide_features
from histoflow.logs import first_log, log_to

# a batch job (extract_features_batch, generated in batches.smk) runs this script for each slide;
# stain and ssl_checkpoint are optional inputs: an empty list or one file
with log_to(first_log(snakemake)):
    extract_slide_features(
        slide_json=snakemake.input.slide,
        tiles_path=snakemake.input.tiles,
        out_path=snakemake.output.features,
        encoder_name=snakemake.params.encoder_name,
        settings=snakemake.params.settings,
        tiling_mpp=snakemake.params.tiling_mpp,
        stain_json=(list(snakemake.input.stain) or [None])[0],
        ssl_checkpoint=(list(snakemake.input.ssl_checkpoint) or [None])[0],
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        on_error=snakemake.params.on_error,
    )
