from histoflow.checklist import write_checklist
from histoflow.logs import first_log, log_to

# the config comes from snakemake.config, not params (the report shows params); the output
# folder is the checklist's own folder ({outdir}/checklist.md)
with log_to(first_log(snakemake)):
    write_checklist(
        outdir=None,
        config=dict(snakemake.config),
        samples_path=snakemake.config["samples"],
        out_path=snakemake.output.checklist,
    )
