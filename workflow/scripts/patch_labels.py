from histoflow.logs import first_log, log_to
from histoflow.patch_labels import patch_labels_for_slide

# a batch job (patch_labels_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    patch_labels_for_slide(
        slide_id=snakemake.wildcards.slide_id,
        tiles_path=snakemake.input.tiles,
        slide_json=snakemake.input.slide,
        annotations=snakemake.params.annotations,
        slide_label=snakemake.params.label,
        positive_label=snakemake.params.positive_label,
        settings=snakemake.params.settings,
        out_path=snakemake.output.labels,
    )
