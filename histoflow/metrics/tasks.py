"""Multi-class, survival and regression targets (histoflow.targets): one model's metrics, the
comparison of models (paired patient bootstrap) and the same on an external cohort.

Same counting rules as the binary path: each test slide once (kfold: its out-of-fold prediction; holdout: the mean of the
fold models' outputs), patient-bootstrap CIs, fold mean +- SD. No threshold is chosen:
multi-class predicts the argmax (threshold_source "argmax"); survival risk groups split at the
median risk of each fold's *training* slides (never test ones)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .settings import MetricsSettings


def target_of_predictions(frame: pd.DataFrame, base=None):
    """The Target a prediction table was written for (class order from its prob_<class> columns)."""
    from dataclasses import replace

    from ..targets import Target

    base = base or Target()
    if "risk" in frame.columns:
        return replace(base, type="survival", classes=(), positive_label=None) if base.type != "survival" else base
    if "value" in frame.columns:
        return replace(base, type="regression", classes=(), positive_label=None) if base.type != "regression" else base
    classes = tuple(c[len("prob_"):] for c in frame.columns if c.startswith("prob_"))
    if classes:
        return replace(base, type="classification", classes=classes, positive_label=None)
    return base


def _metrics_of(task, frame: pd.DataFrame, horizons=()) -> dict[str, float]:
    from .. import targets as T

    if task.multiclass:
        return T.multiclass_metrics(frame["y"].to_numpy(int), frame[task.score_columns].to_numpy(float), task.classes)
    if task.type == "survival":
        return T.survival_metrics(frame["time"].to_numpy(float), frame["event"].to_numpy(int), frame["risk"].to_numpy(float),
                                  horizons)
    return T.regression_metrics(frame["y"].to_numpy(float), frame["value"].to_numpy(float))


def primary_score(task, frame: pd.DataFrame) -> float:
    """The task's headline metric (auc_macro, c_index, r2) of a prediction table's scored rows."""
    cols = task.score_columns
    frame = frame[frame[cols].notna().all(axis=1)]
    if frame.empty:
        return float("nan")
    return float(_metrics_of(task, frame).get(task.primary_metric, float("nan")))


def _risk_cutoffs(predictions: pd.DataFrame) -> dict[int, float]:
    """Per fold: the median out-of-sample-free risk of that fold's *training* slides (the risk
    groups' cut-off, never chosen on test slides)."""
    train = predictions[(predictions["role"] == "train") & predictions["risk"].notna()]
    return {int(f): float(g["risk"].median()) for f, g in train.groupby("fold")}


def _train_horizons(predictions: pd.DataFrame) -> tuple[list[float], str]:
    """Uno's c horizon when target.horizons is empty: per fold the median event time of that
    fold's *training* slides, averaged over the folds (like the risk cut-off, never chosen on
    the slides it judges); no horizon when no training slide has an event."""
    train = predictions[(predictions["role"] == "train") & (predictions["event"] == 1)]
    medians = [float(g.drop_duplicates("slide_id")["time"].median()) for _, g in train.groupby("fold")]
    if not medians:
        return [], "none: no training slide has an event (target.horizons empty)"
    return ([float(np.round(np.mean(medians), 6))],
            "mean over folds of the median event time of each fold's training slides (target.horizons empty)")


def evaluate_target_model(predictions: pd.DataFrame, task, settings: MetricsSettings, strategy: str | None = None) -> dict:
    """Metrics of one multi-class / survival / regression model, each test slide once."""
    from .. import targets as T

    predictions = predictions.copy()
    predictions["fold"] = predictions["fold"].astype(int)
    cols = task.score_columns
    test_rows = predictions[predictions["role"] == "test"]
    if test_rows.empty:
        raise ValueError("no test-role predictions: nothing to evaluate")
    scored = test_rows[cols].notna().all(axis=1)
    unscored = sorted(set(test_rows.loc[~scored, "slide_id"]) - set(test_rows.loc[scored, "slide_id"]))
    test_rows = test_rows[scored].sort_values("fold", kind="stable")
    rows_per_slide = test_rows.groupby("slide_id").size()
    if strategy is None:
        strategy = "kfold" if int(rows_per_slide.max()) == 1 else "holdout"
    if strategy == "kfold" and (rows_per_slide > 1).any():
        dup = rows_per_slide[rows_per_slide > 1]
        raise ValueError(f"split.strategy kfold, but slide {dup.index[0]!r} is a test slide in {int(dup.iloc[0])} folds")
    keys = ["slide_id", "patient_id", "y"] + (["time", "event"] if task.type == "survival" else [])
    cutoffs = _risk_cutoffs(predictions) if task.type == "survival" else {}
    if strategy == "kfold":
        slides = test_rows.assign(n_models=1).reset_index(drop=True)
        if task.type == "survival":
            slides["cutoff"] = [cutoffs.get(int(f), np.nan) for f in slides["fold"]]
        test_prediction = "out-of-fold: each slide's prediction by the model of the one fold in which it is a test slide"
    else:
        agg = {c: (c, "mean") for c in cols}
        slides = (test_rows.groupby(keys, sort=True).agg(n_models=("fold", "nunique"), **agg).reset_index().assign(fold=-1))
        if task.type == "survival":
            slides["cutoff"] = float(np.mean(list(cutoffs.values()))) if cutoffs else np.nan
        test_prediction = (f"holdout ensemble: each test slide's output is the mean of the {int(slides['n_models'].max())} "
                           "fold models' outputs")
    n_slides, n_patients = int(slides["slide_id"].nunique()), int(slides["patient_id"].nunique())
    assert n_slides == len(slides), "a slide counted twice"
    horizons = list(task.horizons)
    horizon_source = "target.horizons"
    if task.type == "survival" and not horizons:
        horizons, horizon_source = _train_horizons(predictions)
    pooled = _metrics_of(task, slides, horizons)
    patients = slides["patient_id"].to_numpy()
    ci, _ = T.patient_bootstrap(lambda idx: _metrics_of(task, slides.iloc[idx], horizons), patients,
                                settings.n_bootstrap, settings.ci, settings.seed)
    folds = []
    for fold, part in test_rows.groupby("fold", sort=True):
        folds.append({"fold": int(fold), "n_test": int(len(part)), **_metrics_of(task, part, horizons)})
    fold_frame = pd.DataFrame(folds)
    names = list(pooled)
    across = {n: (float(fold_frame[n].mean()), float(fold_frame[n].std(ddof=1)) if len(fold_frame) > 1 else 0.0) for n in names}
    extra: dict = {}
    method = {"test_prediction": test_prediction, "ci": settings.ci_method,
              "fold_mean_sd": f"mean and SD over the {len(folds)} folds' test metrics",
              "counts": "n_slides / n_patients: unique test slides / patients with a prediction"}
    if task.multiclass:
        pred = slides[cols].to_numpy(float).argmax(1)
        extra["confusion"] = {"classes": list(task.classes), "rows": "true class", "columns": "predicted class (argmax)",
                              "matrix": T.confusion(slides["y"].to_numpy(int), pred, task.n_out).tolist()}
        extra["threshold_source"] = "argmax"
        method["threshold"] = "none: the predicted class is the argmax of the class probabilities"
        method["auc_macro"] = "mean over classes of the one-vs-rest ROC AUC (classes with test slides on both sides)"
    elif task.type == "survival":
        group = slides["risk"].to_numpy(float) > slides["cutoff"].to_numpy(float)
        chi2, p = T.logrank(slides["time"], slides["event"], group)
        extra["risk_groups"] = {"n_high": int(group.sum()), "n_low": int((~group).sum()), "logrank_chi2": chi2, "logrank_p": p,
                                "cutoff": "median risk of each fold's training slides (holdout: mean of the folds' medians)"}
        extra["horizons"] = horizons
        extra["threshold_source"] = "train_median_risk"
        method["c_index"] = "Harrell's concordance (risk ties 1/2, time ties not comparable)"
        method["uno_c"] = (f"Uno's c-index truncated at each horizon (censoring KM from the test slides); horizons: "
                           f"{horizon_source}")
        slides["risk_group"] = np.where(group, "high", "low")
    else:
        extra["threshold_source"] = "none"
        method["r2"] = "1 - SS_res / SS_tot of the test slides (values on the label's scale)"
    keep = ["slide_id", "patient_id", "y"] + (["time", "event"] if task.type == "survival" else []) + cols + \
        ["fold", "n_models"] + (["cutoff", "risk_group"] if task.type == "survival" else [])
    return {"pooled": pooled, "ci": ci, "folds": folds, "fold_mean_sd": across, "n_slides": n_slides,
            "n_patients": n_patients, "strategy": strategy, "n_test_slides_without_prediction": len(unscored),
            "method": method, "oof": slides[keep].reset_index(drop=True), **extra}


def compare_target_models(results: dict[str, dict], task, settings: MetricsSettings) -> pd.DataFrame:
    """One row per model; paired patient-bootstrap test of the best model (primary metric)
    against each other one on the slides both scored (DeLong's test is for binary AUCs)."""
    from .. import targets as T

    primary = task.primary_metric
    best = max(results, key=lambda k: np.nan_to_num(results[k]["pooled"][primary], nan=-np.inf))
    best_oof = results[best]["oof"].set_index("slide_id")
    rows = []
    for name, res in results.items():
        row = {"model": name, "n_slides": res["n_slides"], "n_patients": res["n_patients"],
               "threshold_source": res.get("threshold_source")}
        for metric in res["pooled"]:
            lo, hi = res["ci"].get(metric, (float("nan"), float("nan")))
            mean, sd = res["fold_mean_sd"][metric]
            row.update({metric: res["pooled"][metric], f"{metric}_ci_low": lo, f"{metric}_ci_high": hi,
                        f"{metric}_fold_mean": mean, f"{metric}_fold_sd": sd})
        if name == best:
            row.update(paired_vs_best="(best)", paired_diff=0.0, paired_p=float("nan"), paired_n_slides=res["n_slides"])
        else:
            other = res["oof"].set_index("slide_id")
            common = best_oof.index.intersection(other.index)
            a, b = best_oof.loc[common].reset_index(), other.loc[common].reset_index()
            diff, p = T.paired_bootstrap_test(lambda idx: _metrics_of(task, a.iloc[idx], [])[primary],
                                              lambda idx: _metrics_of(task, b.iloc[idx], [])[primary],
                                              a["patient_id"].to_numpy(), settings.n_bootstrap, settings.seed)
            row.update(paired_vs_best=best, paired_diff=diff, paired_p=p, paired_n_slides=int(len(common)))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(primary, ascending=False, na_position="last").reset_index(drop=True)


def evaluate_target_external(development: pd.DataFrame, external: pd.DataFrame, task, settings: MetricsSettings,
                             horizons=None) -> dict:
    """One multi-class / survival / regression model on an external cohort, with the same
    metrics and CIs as on the development test slides: each external slide's output is the mean
    of the development fold models' outputs; survival risk groups split at the development
    folds' training-slide medians (their mean, as the bundle records). Nothing is fitted on the
    external slides: the development rows used are the training rows of the risk cut-off only.
    ``horizons``: survival, the development metrics' horizons (Uno's c at the same times)."""
    from dataclasses import replace

    if task.type == "survival" and horizons and not task.horizons:
        task = replace(task, horizons=tuple(horizons))
    ext = external.assign(role="test")
    ext = ext[ext["status"] == "ok"] if "status" in ext.columns else ext
    if ext.empty:
        raise ValueError("no external predictions: nothing to evaluate")
    dev_train = development[development["role"] == "train"] if task.type == "survival" else development.iloc[0:0]
    table = pd.concat([dev_train, ext[[c for c in ext.columns if c in development.columns]]], ignore_index=True)
    res = evaluate_target_model(table, task, settings, "holdout")
    res["method"]["test_prediction"] = ("external cohort: each slide's output is the mean of the "
                                        f"{int(res['oof']['n_models'].max())} development fold models' outputs")
    if task.type == "survival":
        res["risk_groups"]["cutoff"] += " of the development run (never fitted on external slides)"
        if horizons and not external.empty:
            res["method"]["uno_c"] += " (the development metrics' horizons)"
    return res

