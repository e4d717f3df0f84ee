from histoflow.logs import first_log, log_to
from histoflow.metrics import write_metrics

with log_to(first_log(snakemake)):
    if "plots" in snakemake.params.keys():  # multi-class, survival, regression (histoflow.targets)
        from histoflow.metrics import write_target_metrics
        from histoflow.targets import Target

        params = dict(snakemake.params.target)
        write_target_metrics(
            predictions=dict(snakemake.params.predictions),
            task=Target.from_config(params, labels=params.get("labels")),
            metrics_json=snakemake.output.json,
            metrics_tsv=snakemake.output.tsv,
            plots=dict(snakemake.params.plots),
            settings=snakemake.params.settings,
            seed=snakemake.params.seed,
            strategy=snakemake.params.strategy,
        )
    else:
        write_metrics(
            predictions=dict(snakemake.params.predictions),
            metrics_json=snakemake.output.json,
            metrics_tsv=snakemake.output.tsv,
            roc_png=snakemake.output.roc,
            pr_png=snakemake.output.pr,
            calibration_png=snakemake.output.calibration,
            settings=snakemake.params.settings,
            seed=snakemake.params.seed,
            strategy=snakemake.params.strategy,
        )
