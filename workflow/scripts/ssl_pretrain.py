from histoflow.logs import first_log, log_to
from histoflow.ssl import run_ssl_pretrain

with log_to(first_log(snakemake)):
    run_ssl_pretrain(
        slide_jsons=list(snakemake.params.slides),
        tiles_paths=list(snakemake.params.tiles),
        checkpoint=snakemake.output.checkpoint,
        curve_tsv=snakemake.output.curve,
        curve_png=snakemake.output.plot,
        settings=snakemake.params.settings,
        arch=snakemake.wildcards.arch,
        seed=snakemake.params.seed,
        default_mpp=snakemake.params.default_mpp,
        threads=snakemake.threads,
        splits_tsv=snakemake.params.splits_tsv,
        stain_hed_jitter=snakemake.params.stain_hed_jitter,
    )
