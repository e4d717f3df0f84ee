from histoflow.logs import first_log, log_to
from histoflow.tissue import detect_tissue_for_slide

# a batch job (detect_tissue_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    detect_tissue_for_slide(
        slide_json=snakemake.input.slide,
        mask_png=snakemake.output.mask,
        geojson_path=snakemake.output.geojson,
        overlay_path=snakemake.output.overlay,
        stats_json=snakemake.output.stats,
        settings=snakemake.params.settings,
        on_error=snakemake.params.on_error,
        threads=snakemake.threads,
    )
