from histoflow.logs import first_log, log_to
from histoflow.tiling import tile_slide_with_preview

# a batch job (tile_slide_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    tile_slide_with_preview(
        slide_json=snakemake.input.slide,
        mask_png=snakemake.input.mask,
        tissue_json=snakemake.input.stats,
        overlay_jpg=snakemake.input.overlay,
        out_path=snakemake.output.tiles,
        preview_path=snakemake.output.preview,
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        on_error=snakemake.params.on_error,
    )
