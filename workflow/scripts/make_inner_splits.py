from histoflow.crossfit import write_inner_splits
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    write_inner_splits(
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        n_inner=int(snakemake.params.n_inner),
        seed=int(snakemake.params.seed),
        out_path=snakemake.output.splits,
    )
