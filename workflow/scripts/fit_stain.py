from histoflow.logs import first_log, log_to
from histoflow.stain import fit_stain_for_cohort

with log_to(first_log(snakemake)):
    fit_stain_for_cohort(
        slide_jsons=list(snakemake.params.slides),
        tile_tables=list(snakemake.params.tiles),
        out_json=snakemake.output.stain,
        out_png=snakemake.output.reference,
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        mpp=snakemake.params.mpp,
        splits_tsv=snakemake.params.splits_tsv,
    )
