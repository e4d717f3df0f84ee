from histoflow.lesions import summarize_lesions
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    summarize_lesions(
        slide_jsons=list(snakemake.params.records),
        source=snakemake.wildcards.source,
        settings=snakemake.params.settings,
        out_metrics=snakemake.output.metrics,
        out_tsv=snakemake.output.per_slide,
        out_png=snakemake.output.froc,
    )
