from histoflow.logs import first_log, log_to
from histoflow.tiling import export_tile_images

# a batch job (export_tile_images_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    export_tile_images(
        slide_json=snakemake.input.slide,
        tiles_path=snakemake.input.tiles,
        out_dir=snakemake.output.images,
        image_format=snakemake.params.image_format,
    )
