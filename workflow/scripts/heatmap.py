from histoflow.heatmaps import heatmap_for_slide
from histoflow.logs import first_log, log_to

# a batch job (heatmap_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    heatmap_for_slide(
        slide_id=snakemake.wildcards.slide_id,
        source=snakemake.wildcards.source,
        prob_paths=list(snakemake.input.probs),
        slide_json=snakemake.input.slide,
        tissue_json=snakemake.input.tissue_stats,
        tissue_png=snakemake.input.tissue_mask,
        out_png=snakemake.output.png,
        out_geojson=snakemake.output.geojson,
        settings=snakemake.params.settings,
    )
