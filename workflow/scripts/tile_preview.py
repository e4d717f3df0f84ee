from histoflow.logs import first_log, log_to
from histoflow.tiling import write_tile_preview

with log_to(first_log(snakemake)):
    write_tile_preview(
        slide_json=snakemake.input.slide,
        tiles_path=snakemake.input.tiles,
        overlay_jpg=snakemake.input.overlay,
        out_path=snakemake.output.preview,
    )
