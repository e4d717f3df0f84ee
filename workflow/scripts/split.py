from histoflow.logs import first_log, log_to
from histoflow.split import write_splits

with log_to(first_log(snakemake)):
    write_splits(
        samples=snakemake.params.samples,
        settings=snakemake.params.settings,
        positive_label=snakemake.params.positive_label,
        seed=snakemake.params.seed,
        target=snakemake.params.target,
        out_tsv=snakemake.output.splits,
        out_json=snakemake.output.summary,
    )
