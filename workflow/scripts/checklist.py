from histoflow.checklist import write_checklist
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    write_checklist(
        outdir=snakemake.params.outdir,
        config=dict(snakemake.params.config),
        samples_path=snakemake.params.samples,
        out_path=snakemake.output.checklist,
    )
