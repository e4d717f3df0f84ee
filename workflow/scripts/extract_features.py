from histoflow.features import extract_slide_features
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    stain = list(snakemake.input.stain)
    ssl_checkpoint = list(snakemake.input.ssl_checkpoint)
    extract_slide_features(
        slide_json=snakemake.input.slide,
        tiles_path=snakemake.input.tiles,
        out_path=snakemake.output.features,
        encoder_name=snakemake.params.encoder_name,
        settings=snakemake.params.settings,
        tiling_mpp=snakemake.params.tiling_mpp,
        stain_json=stain[0] if stain else None,
        ssl_checkpoint=ssl_checkpoint[0] if ssl_checkpoint else None,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
