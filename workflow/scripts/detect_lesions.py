from histoflow.lesions import lesions_for_slide
from histoflow.logs import first_log, log_to

# a batch job (detect_lesions_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    lesions_for_slide(
        slide_id=snakemake.wildcards.slide_id,
        source=snakemake.wildcards.source,
        prob_paths=list(snakemake.input.probs),
        slide_json=snakemake.input.slide,
        annotations=snakemake.params.annotations,
        slide_label=snakemake.params.label,
        positive_label=snakemake.params.positive_label,
        cohort_has_annotations=snakemake.params.cohort_has_annotations,
        settings=snakemake.params.settings,
        label_settings=snakemake.params.label_settings,
        out_geojson=snakemake.output.geojson,
        out_json=snakemake.output.record,
    )
