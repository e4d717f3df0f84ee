from histoflow.logs import first_log, log_to
from histoflow.slide_qc import write_qc_table

with log_to(first_log(snakemake)):
    write_qc_table(
        slide_jsons=list(snakemake.params.slides),
        tissue_jsons=list(snakemake.params.tissue),
        tile_tables=list(snakemake.params.tiles),
        out_path=snakemake.output.table,
        privacy=snakemake.params.privacy,
    )
