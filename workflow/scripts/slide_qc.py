from histoflow.logs import first_log, log_to
from histoflow.slide_qc import write_slide_metadata

# a batch job (qc_slide_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    write_slide_metadata(
        slide_id=snakemake.wildcards.slide_id,
        manifest_path=snakemake.input.manifest,
        out_path=snakemake.output.slide,
        sheet_mpp=snakemake.params.sheet_mpp,
        default_mpp=snakemake.params.default_mpp,
        on_error=snakemake.params.on_error,
        tile_check=snakemake.params.tile_check,
    )
