"""Binary targets: one model's slide-level metrics from its long predictions table (each test
slide once, at a threshold chosen on validation predictions only), the comparison of models
(DeLong against the best) and the same on an external cohort."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from .scores import METRIC_NAMES, binary_metrics, bootstrap_ci, choose_threshold, delong_test
from .settings import MetricsSettings

THRESHOLD_SOURCES = ("fold_validation", "pooled_validation", "fixed")
THRESHOLD_WORDS = {"pooled_validation": "pooled validation predictions of all folds",
                   "fold_validation": "each fold's own validation slides",
                   "fold_validation+pooled_validation": "own validation where large enough, else pooled validation",
                   "fixed": "fixed threshold (no two-class validation predictions)"}


def _class_counts(frame: pd.DataFrame) -> tuple[int, int]:
    y = frame["y"].astype(int)
    return int((y == 1).sum()), int((y == 0).sum())


def choose_thresholds(predictions: pd.DataFrame, settings: MetricsSettings) -> tuple[dict[int, dict], dict]:
    """The decision threshold of each fold and the pooled one, each with where it came from.

    Only ``val``-role predictions are read (never train, never test). Pooled: the validation
    predictions of all folds together (each made by the model of the fold in which that slide
    was held out for validation). A fold gets its own threshold only where its validation has at
    least ``min_val_per_class`` slides of each class (a threshold on one or two patients is
    noise); otherwise it uses the pooled one. No two-class validation anywhere: ``fixed``.
    Returns ({fold: info}, pooled info); info = {threshold, threshold_source, n_val_pos, n_val_neg}.
    """
    scored = predictions[predictions["prob"].notna()]
    val = scored[scored["role"] == "val"]
    pos, neg = _class_counts(val)
    if settings.threshold_method == "fixed" or pos == 0 or neg == 0:
        pooled = {"threshold": float(settings.fixed_threshold), "threshold_source": "fixed", "n_val_pos": pos, "n_val_neg": neg}
    else:
        pooled = {"threshold": choose_threshold(val["y"].to_numpy(), val["prob"].to_numpy(), settings.threshold_method,
                                                settings.fixed_threshold),
                  "threshold_source": "pooled_validation", "n_val_pos": pos, "n_val_neg": neg}
    if pooled["threshold_source"] == "pooled_validation" and min(pos, neg) < settings.min_val_per_class:
        logging.getLogger("histoflow.metrics").warning(
            "the threshold rests on %d positive / %d negative validation predictions (all folds pooled): "
            "fewer than metrics.min_val_per_class=%d of a class, so it is a rough operating point", pos, neg,
            settings.min_val_per_class)
    per_fold = {}
    for fold in sorted(int(f) for f in predictions["fold"].unique()):
        fold_val = val[val["fold"] == fold]
        fpos, fneg = _class_counts(fold_val)
        if settings.threshold_method != "fixed" and min(fpos, fneg) >= max(1, settings.min_val_per_class):
            per_fold[fold] = {"threshold": choose_threshold(fold_val["y"].to_numpy(), fold_val["prob"].to_numpy(),
                                                            settings.threshold_method, settings.fixed_threshold),
                              "threshold_source": "fold_validation", "n_val_pos": fpos, "n_val_neg": fneg}
        else:
            per_fold[fold] = dict(pooled)
    return per_fold, pooled


def _source_name(sources) -> str:
    """One name per model: a single source, or e.g. ``fold_validation+pooled_validation``."""
    present = set(sources)
    return "+".join(s for s in THRESHOLD_SOURCES if s in present)


def evaluate_model(predictions: pd.DataFrame, settings: MetricsSettings, strategy: str | None = None) -> dict:
    """Metrics of one model from its long predictions table (slide_id, patient_id, y, prob, fold,
    role), each test slide counted once.

    ``strategy`` (split.strategy; None = inferred: one test row per slide is kfold):
    ``kfold``: every slide's out-of-fold test prediction at its fold's threshold (a slide that is
    test in two folds is an error); ``holdout``: per test slide the mean probability of the k fold
    models, at the pooled validation threshold. Per fold: that fold's test slides at its
    threshold (the spread over folds). CIs: patient bootstrap on the unique test slides."""
    predictions = predictions.copy()
    predictions["fold"] = predictions["fold"].astype(int)
    per_fold_t, pooled_t = choose_thresholds(predictions, settings)
    test_rows = predictions[predictions["role"] == "test"]
    if test_rows.empty:
        raise ValueError("no test-role predictions: nothing to evaluate")
    # a slide without tiles has no probability: it is reported, not scored
    unscored = sorted(set(test_rows.loc[test_rows["prob"].isna(), "slide_id"]) - set(test_rows.loc[test_rows["prob"].notna(), "slide_id"]))
    test_rows = test_rows[test_rows["prob"].notna()].sort_values("fold", kind="stable")
    if test_rows.empty:
        raise ValueError("no test-role prediction has a probability: nothing to evaluate")
    rows_per_slide = test_rows.groupby("slide_id").size()
    if strategy is None:
        strategy = "kfold" if int(rows_per_slide.max()) == 1 else "holdout"
    # split.strategy sheet: a fixed test set (the sheet's) scored by every fold model, as holdout
    strategy = "holdout" if strategy == "sheet" else strategy
    if strategy == "kfold":
        dup = rows_per_slide[rows_per_slide > 1]
        if len(dup):
            raise ValueError(f"split.strategy kfold, but slide {dup.index[0]!r} is a test slide in {int(dup.iloc[0])} folds; "
                             "each slide must be tested once (regenerate splits/splits.tsv)")
    elif strategy != "holdout":
        raise ValueError(f"unknown split strategy {strategy!r}; use kfold or holdout")
    folds = []
    for fold, part in test_rows.groupby("fold", sort=True):
        t = per_fold_t[int(fold)]
        m = binary_metrics(part["y"].to_numpy(), part["prob"].to_numpy(), t["threshold"], settings.ece_bins)
        folds.append({"fold": int(fold), "threshold": t["threshold"], "threshold_source": t["threshold_source"],
                      "n_val_pos": t["n_val_pos"], "n_val_neg": t["n_val_neg"], "n_test": int(len(part)), **m})
    if strategy == "kfold":
        slides = test_rows.assign(threshold=[per_fold_t[int(f)]["threshold"] for f in test_rows["fold"]], n_models=1)
        used = [per_fold_t[f["fold"]] for f in folds]
        source = _source_name(t["threshold_source"] for t in used)
        values = [t["threshold"] for t in used]
        threshold: float | list[float] = values[0] if len(set(values)) == 1 else values
        test_prediction = "out-of-fold: each slide's prediction by the model of the one fold in which it is a test slide"
    else:
        labels = test_rows.groupby("slide_id")["y"].nunique()
        if (labels > 1).any():
            raise ValueError(f"slide {labels[labels > 1].index[0]!r} has different labels in different folds")
        # holdout: every fold model scores the same test slides; one prediction per slide, their mean
        slides = (test_rows.groupby("slide_id", sort=True)
                  .agg(patient_id=("patient_id", "first"), y=("y", "first"), prob=("prob", "mean"), n_models=("fold", "nunique"))
                  .reset_index().assign(fold=-1, threshold=pooled_t["threshold"]))
        source, threshold = pooled_t["threshold_source"], pooled_t["threshold"]
        test_prediction = (f"holdout ensemble: each test slide's probability is the mean of the {int(slides['n_models'].max())} "
                           "fold models' probabilities")
    y = slides["y"].to_numpy().astype(int)
    # each slide is judged at its own fold's threshold: compare prob - threshold against 0
    margin = slides["prob"].to_numpy(dtype=float)
    cut = slides["threshold"].to_numpy(dtype=float)
    pred_at = (margin >= cut).astype(float)
    summary = binary_metrics(y, margin, 0.5, settings.ece_bins)
    thresholded = binary_metrics(y, pred_at, 0.5, settings.ece_bins)
    for name in ("balanced_accuracy", "accuracy", "f1", "sensitivity", "specificity", "ppv", "npv"):
        summary[name] = thresholded[name]
    patients = slides["patient_id"].to_numpy()
    shifted = np.clip(margin - cut + 0.5, 0, 1)
    ci = bootstrap_ci(y, shifted, patients, 0.5, settings.n_bootstrap, settings.ci, settings.seed, settings.ece_bins)
    # AUC, Brier and ECE CIs must use the raw probabilities, not the threshold-shifted ones
    raw_ci = bootstrap_ci(y, margin, patients, 0.5, settings.n_bootstrap, settings.ci, settings.seed, settings.ece_bins)
    for name in ("auc", "brier", "ece"):
        ci[name] = raw_ci[name]
    fold_frame = pd.DataFrame(folds)
    across = {name: (float(fold_frame[name].mean()), float(fold_frame[name].std(ddof=1)) if len(fold_frame) > 1 else 0.0)
              for name in METRIC_NAMES}
    n_slides, n_patients = int(slides["slide_id"].nunique()), int(slides["patient_id"].nunique())
    assert n_slides == len(slides), "a slide counted twice"  # the property every number below rests on
    method = {
        "test_prediction": test_prediction,
        "threshold": {"fold_validation": f"chosen ({settings.threshold_method}) per fold on that fold's validation slides "
                                         f"(>= {settings.min_val_per_class} of each class)",
                      "pooled_validation": f"chosen ({settings.threshold_method}) on the validation predictions of all folds pooled",
                      "fixed": f"fixed_threshold {settings.fixed_threshold} (no two-class validation predictions, or "
                               "threshold_method fixed)"}[source] if "+" not in source else
                     f"chosen ({settings.threshold_method}) per fold where its validation has >= {settings.min_val_per_class} "
                     "slides of each class, elsewhere on the validation predictions of all folds pooled",
        "ci": settings.ci_method,
        "fold_mean_sd": f"mean and SD over the {len(folds)} folds' test metrics (each fold at its own threshold)",
        "counts": "n_slides / n_patients: unique test slides / patients with a prediction",
    }
    return {"pooled": summary, "ci": ci, "folds": folds, "fold_mean_sd": across,
            "n_slides": n_slides, "n_patients": n_patients, "strategy": strategy,
            "threshold": threshold, "threshold_source": source, "threshold_pooled_validation": pooled_t,
            "n_test_slides_without_prediction": len(unscored), "method": method,
            "oof": slides[["slide_id", "patient_id", "y", "prob", "fold", "threshold", "n_models"]].reset_index(drop=True)}


def compare_models(results: dict[str, dict]) -> pd.DataFrame:
    """One comparison row per model; DeLong test of the best-AUC model against each other one on
    the (unique) slides both scored."""
    rows = []
    best = max(results, key=lambda k: np.nan_to_num(results[k]["pooled"]["auc"], nan=-1))
    best_oof = results[best]["oof"].set_index("slide_id")
    for name, res in results.items():
        threshold = res.get("threshold")
        row = {"model": name, "n_slides": res["n_slides"], "n_patients": res["n_patients"],
               "threshold": json.dumps(threshold) if isinstance(threshold, list) else threshold,
               "threshold_source": res.get("threshold_source")}
        for metric in METRIC_NAMES:
            lo, hi = res["ci"][metric]
            mean, sd = res["fold_mean_sd"][metric]
            row[metric] = res["pooled"][metric]
            row[f"{metric}_ci_low"] = lo
            row[f"{metric}_ci_high"] = hi
            row[f"{metric}_fold_mean"] = mean
            row[f"{metric}_fold_sd"] = sd
        if name == best:
            row.update(delong_vs_best="(best)", delong_auc_diff=0.0, delong_p=float("nan"), delong_n_slides=res["n_slides"])
        else:
            other = res["oof"].set_index("slide_id")
            common = best_oof.index.intersection(other.index)
            diff, _z, pval = delong_test(best_oof.loc[common, "y"].to_numpy(), best_oof.loc[common, "prob"].to_numpy(),
                                         other.loc[common, "prob"].to_numpy())
            row.update(delong_vs_best=best, delong_auc_diff=diff, delong_p=pval, delong_n_slides=int(len(common)))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("auc", ascending=False, na_position="last").reset_index(drop=True)


def evaluate_external(development: pd.DataFrame, external: pd.DataFrame, settings: MetricsSettings) -> dict:
    """Metrics of one model on an external cohort, the same as evaluate_model's: ``development``
    is the model's long prediction table (its val rows give the threshold, exactly as for the
    development test set's ensemble: pooled over the folds' validation predictions, or fixed);
    ``external`` has one row per (external slide, fold model), role ``external``. Each slide's
    probability is the mean of the fold models'; nothing is fitted on the external slides."""
    dev_val = development[development["role"] == "val"]
    ext = external.assign(role="test")
    if ext.empty:
        raise ValueError("no external predictions: nothing to evaluate")
    res = evaluate_model(pd.concat([dev_val, ext], ignore_index=True), settings, "holdout")
    res["method"]["test_prediction"] = ("external cohort: each slide's probability is the mean of the "
                                        f"{int(res['oof']['n_models'].max())} development fold models' probabilities")
    res["method"]["threshold"] += " of the development run (never fitted on external slides)"
    return res

