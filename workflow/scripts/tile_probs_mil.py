from histoflow.logs import first_log, log_to
from histoflow.tile_probs import mil_tile_probs

with log_to(first_log(snakemake)):
    mil_tile_probs(snakemake.input.scores, int(snakemake.wildcards.fold), snakemake.output.probs)
