from histoflow.features import write_features_qc
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    write_features_qc(paths=list(snakemake.params.features), out_path=snakemake.output.table)
