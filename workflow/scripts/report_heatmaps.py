from histoflow.gallery import copy_gallery
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    copy_gallery(list(snakemake.params.pngs), snakemake.output.gallery)
