# Stage: metrics. Every model, MIL and feature-based, in one comparison table with patient-level
# bootstrap CIs, fold mean ± SD and DeLong tests; ROC, PR and calibration plots. The per-fold
# tables carry every role: thresholds come from the val rows, metrics from the test rows (each
# slide once; holdout: the mean of the fold models).


if TARGET.binary:

    rule metrics:
        input:
            [p for paths in model_predictions().values() for p in paths],
            # external cohorts (config `external`, models.smk): each bundled model on each cohort
            [p for per_model in external_predictions().values() for p in per_model.values()],
        output:
            json=out("metrics/metrics.json"),
            tsv=report(out("metrics/metrics.tsv"), caption="../report/metrics.rst", category="11. Metrics"),
            roc=report(out("metrics/roc.png"), caption="../report/roc.rst", category="11. Metrics"),
            pr=report(out("metrics/pr.png"), caption="../report/pr.rst", category="11. Metrics"),
            calibration=report(out("metrics/calibration.png"), caption="../report/calibration.rst", category="11. Metrics"),
            # one comparison table per external cohort, a report section each
            **{f"external_{c}": report(out(f"metrics/external/{c}.tsv"), caption="../report/external.rst",
                                       category="11. Metrics", subcategory=f"external cohort {c}") for c in EXTERNAL},
        params:
            predictions=model_predictions(),
            settings=config["metrics"],
            seed=config["seed"],
            strategy=config["split"]["strategy"],
            external=external_predictions(),
            external_tsvs={c: out(f"metrics/external/{c}.tsv") for c in EXTERNAL},
        log:
            log_path("metrics", "metrics"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/metrics.py"

else:
    # multi-class, survival, regression: the task's own plots (histoflow.metrics.plot_target)
    TARGET_PLOTS = {"multiclass": {"roc": "roc.png", "pr": "pr.png", "calibration": "calibration.png",
                                   "confusion_tsv": "confusion.tsv", "confusion_png": "confusion.png"},
                    "survival": {"km": "km.png"}, "regression": {"scatter": "scatter.png"}}[TARGET.kind]

    rule metrics:
        input:
            [p for paths in model_predictions().values() for p in paths],
            [p for per_model in external_predictions().values() for p in per_model.values()],
        output:
            json=out("metrics/metrics.json"),
            tsv=report(out("metrics/metrics.tsv"), caption="../report/metrics.rst", category="11. Metrics"),
            plots=[report(out(f"metrics/{name}"), caption="../report/target_plots.rst", category="11. Metrics")
                   for name in TARGET_PLOTS.values()],
            **{f"external_{c}": report(out(f"metrics/external/{c}.tsv"), caption="../report/external.rst",
                                       category="11. Metrics", subcategory=f"external cohort {c}") for c in EXTERNAL},
        params:
            predictions=model_predictions(),
            settings=config["metrics"],
            seed=config["seed"],
            strategy=config["split"]["strategy"],
            target=TARGET_PARAMS,
            plots={key: out(f"metrics/{name}") for key, name in TARGET_PLOTS.items()},
            external=external_predictions(),
            external_tsvs={c: out(f"metrics/external/{c}.tsv") for c in EXTERNAL},
        log:
            log_path("metrics", "metrics"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/metrics.py"

