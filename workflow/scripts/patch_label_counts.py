from histoflow.logs import first_log, log_to
from histoflow.patch_labels import count_labels

with log_to(first_log(snakemake)):
    count_labels(list(snakemake.params.labels), snakemake.output.counts)
