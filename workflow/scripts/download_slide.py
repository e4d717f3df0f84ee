from histoflow.download import download_slide
from histoflow.logs import first_log, log_to

# a batch job (download_slide_batch, generated in batches.smk) runs this script for each slide
with log_to(first_log(snakemake)):
    download_slide(
        slide_id=snakemake.wildcards.slide_id,
        source=snakemake.params.source,
        dest_dir=snakemake.params.dest_dir,
        manifest_path=snakemake.output.manifest,
        md5=snakemake.params.md5,
        settings=snakemake.params.settings,
        on_error=snakemake.params.on_error,
    )
