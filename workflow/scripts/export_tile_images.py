from histoflow.logs import first_log, log_to
from histoflow.tiling import export_tile_images

with log_to(first_log(snakemake)):
    export_tile_images(
        slide_json=snakemake.input.slide,
        tiles_path=snakemake.input.tiles,
        out_dir=snakemake.output.images,
        image_format=snakemake.params.image_format,
    )
