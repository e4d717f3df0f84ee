from histoflow.logs import first_log, log_to
from histoflow.tile_probs import write_sources_json

with log_to(first_log(snakemake)):
    write_sources_json(
        snakemake.output.sources,
        sources=list(snakemake.params.sources),
        reason=snakemake.params.reason,
        has_annotations=snakemake.params.has_annotations,
        mil_models=list(snakemake.params.mil_models),
    )
