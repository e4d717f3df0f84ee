from histoflow.logs import first_log, log_to
from histoflow.slide_features import write_slide_features

with log_to(first_log(snakemake)):
    write_slide_features(
        tile_prob_paths=list(snakemake.input.tile_probs),
        splits_path=snakemake.input.splits,
        slide_jsons=list(snakemake.params.slides),
        out_path=snakemake.output.table,
        settings=snakemake.params.settings,
        source=snakemake.wildcards.source,
        crossfit_paths=list(snakemake.input.crossfit),
    )
