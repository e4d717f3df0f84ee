from histoflow.crossfit import crossfit_mil
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    crossfit_mil(
        inner_splits_path=snakemake.input.splits,
        tile_score_paths=list(snakemake.input.tile_scores),
        out_path=snakemake.output.probs,
        source=f"mil-{snakemake.wildcards.model}",
    )
