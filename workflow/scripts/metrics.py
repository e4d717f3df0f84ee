from histoflow.logs import first_log, log_to
from histoflow.metrics import write_metrics

# binary: roc/pr/calibration outputs; other targets: params target + plots (metrics.smk)
with log_to(first_log(snakemake)):
    write_metrics(
        predictions=dict(snakemake.params.predictions),
        metrics_json=snakemake.output.json,
        metrics_tsv=snakemake.output.tsv,
        roc_png=snakemake.output.get("roc"),
        pr_png=snakemake.output.get("pr"),
        calibration_png=snakemake.output.get("calibration"),
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        strategy=snakemake.params.strategy,
        external={c: dict(m) for c, m in dict(snakemake.params.external).items()},
        external_tsvs=dict(snakemake.params.external_tsvs),
        target=snakemake.params.get("target"),
        plots=snakemake.params.get("plots"),
    )
