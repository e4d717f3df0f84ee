"""Rule `metrics`: prediction tables in, metrics.json (each number with how it was obtained),
the comparison TSV and the plots out."""

from __future__ import annotations

import pandas as pd

from .binary import compare_models, evaluate_external, evaluate_model
from .plots import plot_curves, plot_target
from .settings import MetricsSettings
from .tasks import compare_target_models, evaluate_target_external, evaluate_target_model, target_of_predictions


def load_predictions(paths: list[str], required=("slide_id", "patient_id", "y", "prob", "fold", "role")) -> pd.DataFrame:
    """Concatenate prediction tables (slide_id, patient_id, y, prob, fold, role)."""
    frames = [pd.read_csv(p, sep="\t", dtype={"slide_id": str, "patient_id": str}) for p in paths]
    table = pd.concat(frames, ignore_index=True)
    missing = set(required) - set(table.columns)
    if missing:
        raise ValueError(f"prediction tables {paths[:1]}... lack columns {sorted(missing)}")
    return table


def load_external_predictions(path: str) -> pd.DataFrame:
    """An external cohort's per-(slide, fold model) table (histoflow.bundle.predict_external);
    slides without a usable bag (QC-skipped, no tissue) have no probability and are reported."""
    table = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "label": str})
    return table[["slide_id", "patient_id", "y", "prob", "fold", "role"]]


def _model_record(res: dict, cfg: MetricsSettings) -> dict:
    return {"pooled": res["pooled"], "ci": {k: list(v) for k, v in res["ci"].items()},
            "ci_method": cfg.ci_method,
            "fold_mean_sd": {k: list(v) for k, v in res["fold_mean_sd"].items()},
            "folds": res["folds"], "n_slides": res["n_slides"], "n_patients": res["n_patients"],
            "n_test_slides_without_prediction": res["n_test_slides_without_prediction"],
            "strategy": res["strategy"], "threshold": res["threshold"],
            "threshold_source": res["threshold_source"],
            "threshold_pooled_validation": res["threshold_pooled_validation"], "method": res["method"]}


def write_metrics(predictions: dict[str, list[str]], metrics_json: str, metrics_tsv: str, roc_png: str,
                  pr_png: str, calibration_png: str, settings: dict | None, seed: int,
                  strategy: str | None = None, external: dict[str, dict[str, str]] | None = None,
                  external_tsvs: dict[str, str] | None = None, target=None, plots: dict | None = None) -> None:
    """Rule `metrics`: every model (MIL and feature-based) in one comparison table, with CIs,
    fold spread, DeLong tests and plots. ``strategy``: config split.strategy (None: inferred).
    ``target``: a non-binary :class:`histoflow.targets.Target` goes to write_target_metrics."""
    from ..io import write_json, write_tsv
    from ..logs import get_logger

    if isinstance(target, dict):  # the rule's params: {target, positive_label, labels}
        from ..targets import Target
        target = Target.from_config(target, labels=target.get("labels"))
    if target is not None and not target.binary:
        plots = dict(plots or {})
        plots.setdefault("roc", roc_png)
        plots.setdefault("pr", pr_png)
        plots.setdefault("calibration", calibration_png)
        write_target_metrics(predictions, target, metrics_json, metrics_tsv, plots, settings, seed, strategy,
                             external=external, external_tsvs=external_tsvs)
        return
    cfg = MetricsSettings.from_config(settings, seed)
    results = {model: evaluate_model(load_predictions(paths), cfg, strategy) for model, paths in predictions.items()}
    table = compare_models(results)
    payload = {
        "settings": {"n_bootstrap": cfg.n_bootstrap, "ci": cfg.ci, "threshold_method": cfg.threshold_method,
                     "fixed_threshold": cfg.fixed_threshold, "min_val_per_class": cfg.min_val_per_class,
                     "resampling_unit": "patient", "ci_method": cfg.ci_method, "seed": cfg.seed,
                     "strategy": strategy or sorted({res["strategy"] for res in results.values()})[0]},
        "best_model": str(table.loc[0, "model"]),
        "models": {model: _model_record(res, cfg) for model, res in results.items()},
        "comparison": table.to_dict("records"),
    }
    # external cohorts (config `external`): {cohort: {model: predictions.tsv}}, each model at its
    # development threshold; one comparison table per cohort (external_tsvs)
    if external:
        payload["external"] = {}
        for cohort, per_model in external.items():
            ext_results = {model: evaluate_external(load_predictions(predictions[model]),
                                                    load_external_predictions(path), cfg)
                           for model, path in per_model.items()}
            payload["external"][cohort] = {model: _model_record(res, cfg) for model, res in ext_results.items()}
            if external_tsvs and cohort in external_tsvs:
                write_tsv(external_tsvs[cohort], compare_models(ext_results))
    write_json(metrics_json, payload)
    write_tsv(metrics_tsv, table)
    plot_curves(results, roc_png, pr_png, calibration_png, cfg.ece_bins)
    get_logger("histoflow.metrics").info("best model %s (AUC %.3f)", payload["best_model"], table.loc[0, "auc"])


def _target_record(res: dict, cfg: MetricsSettings) -> dict:
    return {**{k: v for k, v in res.items() if k != "oof"},
            "ci": {k: list(v) for k, v in res["ci"].items()},
            "fold_mean_sd": {k: list(v) for k, v in res["fold_mean_sd"].items()}, "ci_method": cfg.ci_method}


def write_target_metrics(predictions: dict[str, list[str]], task, metrics_json: str, metrics_tsv: str,
                         plots: dict[str, str], settings: dict | None, seed: int, strategy: str | None = None,
                         external: dict[str, dict[str, str]] | None = None,
                         external_tsvs: dict[str, str] | None = None) -> dict:
    """Rule `metrics` for multi-class, survival and regression targets; ``external``:
    {cohort: {model: predictions.tsv}} of the bundled models on external cohorts
    (metrics.json external.<cohort>.<model>, a comparison table per cohort)."""
    from ..io import write_json, write_tsv
    from ..logs import get_logger

    cfg = MetricsSettings.from_config(settings, seed)
    results = {}
    for model, paths in predictions.items():
        table = load_predictions(paths, required=("slide_id", "patient_id", "y", "fold", "role", *task.score_columns))
        results[model] = evaluate_target_model(table, target_of_predictions(table, task), cfg, strategy)
    table = compare_target_models(results, task, cfg)
    best = str(table.loc[0, "model"])
    payload = {
        "settings": {"n_bootstrap": cfg.n_bootstrap, "ci": cfg.ci, "resampling_unit": "patient", "ci_method": cfg.ci_method,
                     "seed": cfg.seed, "strategy": strategy or sorted({r["strategy"] for r in results.values()})[0],
                     "model_comparison": "paired patient bootstrap of the primary metric, best model vs each other "
                                         "(two-sided p = 2 x the smaller share of resampled differences on one side of 0)"},
        "target": task.describe(),
        "primary_metric": task.primary_metric,
        "best_model": best,
        "models": {m: _target_record(r, cfg) for m, r in results.items()},
        "comparison": table.to_dict("records"),
    }
    if external:
        payload["external"] = {}
        for cohort, per_model in external.items():
            ext_results = {}
            for model, path in per_model.items():
                dev = load_predictions(predictions[model], required=("slide_id", "patient_id", "y", "fold", "role",
                                                                     *task.score_columns))
                ext = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "label": str})
                ext_results[model] = evaluate_target_external(dev, ext, target_of_predictions(dev, task), cfg,
                                                              horizons=results[model].get("horizons"))
            payload["external"][cohort] = {m: _target_record(r, cfg) for m, r in ext_results.items()}
            if external_tsvs and cohort in external_tsvs:
                write_tsv(external_tsvs[cohort], compare_target_models(ext_results, task, cfg))
    write_json(metrics_json, payload)
    write_tsv(metrics_tsv, table)
    if task.multiclass and "confusion_tsv" in plots:
        m = results[best]["confusion"]["matrix"]
        write_tsv(plots["confusion_tsv"], pd.DataFrame(m, columns=[f"pred_{c}" for c in task.classes])
                  .assign(true=list(task.classes))[["true"] + [f"pred_{c}" for c in task.classes]])
    plot_target(task, results, best, plots)
    get_logger("histoflow.metrics").info("best model %s (%s %.3f)", best, task.primary_metric, table.loc[0, task.primary_metric])
    return payload

