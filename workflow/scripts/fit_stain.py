from histoflow.logs import first_log, log_to
from histoflow.stain import fit_stain_for_cohort

# fit_on: train_only adds splits.tsv as an input (a one-item list); absent or empty otherwise
splits = getattr(snakemake.input, "splits", None)
splits_tsv = splits if isinstance(splits, str) else (str(splits[0]) if splits else None)

with log_to(first_log(snakemake)):
    fit_stain_for_cohort(
        slide_jsons=list(snakemake.params.slides),
        tile_tables=list(snakemake.params.tiles),
        out_json=snakemake.output.stain,
        out_png=snakemake.output.reference,
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        mpp=snakemake.params.mpp,
        splits_tsv=splits_tsv,
    )
