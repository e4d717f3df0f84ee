"""Performance metrics (checklist item 11): slide-level metrics at a threshold chosen on
validation data, calibration, patient-level bootstrap confidence intervals, fold summaries and
DeLong's test for paired ROC curves. Pure functions on arrays; plots and files at the edges.

Each slide counts once: with ``kfold`` every slide is a test slide of exactly one fold (its
out-of-fold prediction); with ``holdout`` the same test slides are scored by each of the k fold
models and a slide's test prediction is the mean of the k probabilities (an ensemble), so
``n_slides``, the bootstrap and DeLong see unique slides and patients.

Thresholds come from validation predictions only, never from training or test ones: per fold
where that fold's validation holds at least ``min_val_per_class`` slides of each class
(``fold_validation``), else from the validation predictions of all folds pooled
(``pooled_validation``), else (no two-class validation at all, or ``threshold_method: fixed``)
``fixed_threshold`` (``fixed``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .config import defaults_from_schema

METRIC_NAMES = ("auc", "balanced_accuracy", "accuracy", "f1", "sensitivity", "specificity",
                "ppv", "npv", "brier", "ece")


@dataclass(frozen=True)
@defaults_from_schema("metrics")
class MetricsSettings:
    n_bootstrap: int
    ci: float
    threshold_method: str  # youden | f1 | fixed
    fixed_threshold: float
    ece_bins: int
    min_val_per_class: int  # a fold's own threshold needs this many val slides per class
    seed: int = 1337

    @classmethod
    def from_config(cls, metrics: dict | None, seed: int = 1337) -> "MetricsSettings":
        metrics = dict(metrics or {})
        known = {k: metrics[k] for k in ("n_bootstrap", "ci", "threshold_method", "fixed_threshold", "ece_bins",
                                         "min_val_per_class") if k in metrics}
        return cls(seed=seed, **known)

    @property
    def ci_method(self) -> str:
        return f"patient bootstrap (percentile), n_bootstrap={self.n_bootstrap}, ci={self.ci}, seed={self.seed}"


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with tie correction; NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum over bins of |accuracy - confidence| x share."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, ece_bins: int = 10) -> dict[str, float]:
    """All slide-level metrics of probabilities ``p`` against 0/1 truth ``y`` at ``threshold``."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    ppv = _safe_div(tp, tp + fp)
    return {
        "auc": roc_auc(y, p),
        "balanced_accuracy": float(np.nanmean([sens, spec])) if not (np.isnan(sens) and np.isnan(spec)) else float("nan"),
        "accuracy": _safe_div(tp + tn, len(y)),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": _safe_div(tn, tn + fn),
        "brier": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
        "ece": expected_calibration_error(y, p, ece_bins),
    }


def choose_threshold(y: np.ndarray, p: np.ndarray, method: str = "youden", fixed: float = 0.5) -> float:
    """Operating point chosen on validation data (never on the test set).

    ``youden`` maximises sensitivity + specificity - 1, ``f1`` maximises F1; ties go to the
    threshold nearest 0.5. Falls back to ``fixed`` when validation data has one class only.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if method == "fixed" or len(np.unique(y)) < 2:
        return float(fixed)
    candidates = np.unique(p)
    best, best_score = float(fixed), -np.inf
    for t in candidates:
        m = binary_metrics(y, p, t)
        score = (m["sensitivity"] + m["specificity"] - 1) if method == "youden" else m["f1"]
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_score = float(t), score
    return best


def bootstrap_ci(y: np.ndarray, p: np.ndarray, patients: np.ndarray, threshold: float,
                 n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
                 ece_bins: int = 10) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric, resampling *patients* with replacement (their slides are
    correlated, so resampling slides would understate the uncertainty)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    patients = np.asarray(patients)
    uniq, inverse = np.unique(patients, return_inverse=True)
    members = [np.nonzero(inverse == i)[0] for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in METRIC_NAMES}
    for _ in range(n_bootstrap):
        chosen = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[i] for i in chosen])
        m = binary_metrics(y[idx], p[idx], threshold, ece_bins)
        for name in METRIC_NAMES:
            draws[name].append(m[name])
    alpha = (1 - ci) / 2
    out = {}
    for name, values in draws.items():
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]
        out[name] = (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))) if len(values) else (float("nan"), float("nan"))
    return out


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x)


def delong_test(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[float, float, float]:
    """DeLong's test for two correlated ROC AUCs on the same cases (fast form of Sun & Xu 2014).

    Returns (auc1 - auc2, z, two-sided p-value)."""
    y = np.asarray(y).astype(bool)
    preds = np.vstack([np.asarray(p1, dtype=float), np.asarray(p2, dtype=float)])
    pos, neg = preds[:, y], preds[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    tx = np.vstack([_midrank(r) for r in pos])
    ty = np.vstack([_midrank(r) for r in neg])
    tz = np.vstack([_midrank(r) for r in preds[:, np.r_[np.nonzero(y)[0], np.nonzero(~y)[0]]]])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 0:
        return diff, 0.0 if diff == 0 else float("inf"), 1.0 if diff == 0 else 0.0
    z = diff / np.sqrt(var)
    return diff, float(z), float(2 * stats.norm.sf(abs(z)))


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


def plot_curves(results: dict[str, dict], roc_png: str, pr_png: str, calibration_png: str, ece_bins: int = 10) -> None:
    """ROC, precision-recall and calibration (reliability) plots of every model's out-of-fold predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    from .io import atomic_path

    figs = {name: plt.subplots(figsize=(5.5, 5)) for name in ("roc", "pr", "cal")}
    for model, res in results.items():
        oof = res["oof"]
        y, p = oof["y"].to_numpy(), oof["prob"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        figs["roc"][1].plot(fpr, tpr, label=f"{model} (AUC {res['pooled']['auc']:.3f})")
        prec, rec, _ = precision_recall_curve(y, p)
        figs["pr"][1].plot(rec, prec, label=model)
        bins = np.minimum((p * ece_bins).astype(int), ece_bins - 1)
        xs = [p[bins == b].mean() for b in range(ece_bins) if (bins == b).any()]
        ys = [y[bins == b].mean() for b in range(ece_bins) if (bins == b).any()]
        figs["cal"][1].plot(xs, ys, marker="o", label=f"{model} (ECE {res['pooled']['ece']:.3f})")
    labels = {"roc": ("False positive rate", "True positive rate", "ROC (out-of-fold test slides)"),
              "pr": ("Recall", "Precision", "Precision-recall"),
              "cal": ("Mean predicted probability", "Fraction positive", "Calibration")}
    for key, path in (("roc", roc_png), ("pr", pr_png), ("cal", calibration_png)):
        fig, ax = figs[key]
        if key in ("roc", "cal"):
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        xl, yl, title = labels[key]
        ax.set(xlabel=xl, ylabel=yl, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right" if key != "pr" else "lower left")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


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
    from .io import write_json, write_tsv
    from .logs import get_logger

    if isinstance(target, dict):  # the rule's params: {target, positive_label, labels}
        from .targets import Target
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
    get_logger(__name__).info("best model %s (AUC %.3f)", payload["best_model"], table.loc[0, "auc"])


# ---------------------------------------------------------------------------------------------
# Multi-class, survival and regression targets (histoflow.targets). Same counting rules as the
# binary path: each test slide once (kfold: its out-of-fold prediction; holdout: the mean of the
# fold models' outputs), patient-bootstrap CIs, fold mean +- SD. No threshold is chosen:
# multi-class predicts the argmax (threshold_source "argmax"); survival risk groups split at the
# median risk of each fold's *training* slides (never test ones).

def target_of_predictions(frame: pd.DataFrame, base=None):
    """The Target a prediction table was written for (class order from its prob_<class> columns)."""
    from dataclasses import replace

    from .targets import Target

    base = base or Target()
    if "risk" in frame.columns:
        return replace(base, type="survival", classes=(), positive_label=None) if base.type != "survival" else base
    if "value" in frame.columns:
        return replace(base, type="regression", classes=(), positive_label=None) if base.type != "regression" else base
    classes = tuple(c[len("prob_"):] for c in frame.columns if c.startswith("prob_"))
    if classes:
        return replace(base, type="classification", classes=classes, positive_label=None)
    return base


def _score_columns(task) -> list[str]:
    return task.score_columns


def _metrics_of(task, frame: pd.DataFrame, horizons=()) -> dict[str, float]:
    from . import targets as T

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
    from . import targets as T

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
    from . import targets as T

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


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    from .io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_target(task, results: dict[str, dict], best: str, plots: dict[str, str]) -> None:
    """Multi-class: one-vs-rest ROC per class, PR per class, top-class calibration, confusion
    matrix; survival: Kaplan-Meier by risk group; regression: predicted vs true scatter (best model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import targets as T

    res = results[best]
    oof = res["oof"]
    if task.multiclass:
        from sklearn.metrics import precision_recall_curve, roc_curve

        y, prob = oof["y"].to_numpy(int), oof[task.score_columns].to_numpy(float)
        for key in ("roc", "pr"):
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for k, c in enumerate(task.classes):
                if len(np.unique(y == k)) < 2:
                    continue
                if key == "roc":
                    fpr, tpr, _ = roc_curve(y == k, prob[:, k])
                    ax.plot(fpr, tpr, label=f"{c} (AUC {res['pooled'][f'auc_{c}']:.3f})")
                else:
                    pr, rc, _ = precision_recall_curve(y == k, prob[:, k])
                    ax.plot(rc, pr, label=c)
            if key == "roc":
                ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set(xlabel="False positive rate" if key == "roc" else "Recall", ylabel="True positive rate" if key == "roc" else "Precision",
                   title=f"{best}: one-vs-rest {'ROC' if key == 'roc' else 'precision-recall'}", xlim=(0, 1), ylim=(0, 1.02))
            ax.legend(fontsize=7)
            _save(fig, plots[key])
        fig, ax = plt.subplots(figsize=(5.5, 5))
        conf, hit = prob.max(1), (prob.argmax(1) == y).astype(float)
        bins = np.minimum((conf * 10).astype(int), 9)
        xs = [conf[bins == b].mean() for b in range(10) if (bins == b).any()]
        ys = [hit[bins == b].mean() for b in range(10) if (bins == b).any()]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.plot(xs, ys, marker="o", label=best)
        ax.set(xlabel="Top-class probability", ylabel="Accuracy", title="Calibration (top class)", xlim=(0, 1), ylim=(0, 1.02))
        _save(fig, plots["calibration"])
        m = np.asarray(res["confusion"]["matrix"])
        fig, ax = plt.subplots(figsize=(1.2 * len(task.classes) + 2.5, 1.2 * len(task.classes) + 2))
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center")
        ax.set(xticks=range(len(task.classes)), yticks=range(len(task.classes)), xticklabels=task.classes,
               yticklabels=task.classes, xlabel="predicted (argmax)", ylabel="true", title=f"{best}: confusion matrix")
        _save(fig, plots["confusion_png"])
    elif task.type == "survival":
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for grp, colour in (("low", "tab:blue"), ("high", "tab:red")):
            part = oof[oof["risk_group"] == grp]
            if part.empty:
                continue
            t, s = T.kaplan_meier(part["time"], part["event"])
            ax.step(np.r_[0, t], np.r_[1, s], where="post", color=colour, label=f"{grp} risk (n={len(part)})")
            cens = part[part["event"] == 0]
            ax.plot(cens["time"], np.interp(cens["time"], np.r_[0, t], np.r_[1, s]), "|", color=colour)
        p = res["risk_groups"]["logrank_p"]
        ax.set(xlabel="time", ylabel="survival", ylim=(0, 1.02),
               title=f"{best}: Kaplan-Meier by risk group (log-rank p={p:.3g})")
        ax.legend(fontsize=8)
        _save(fig, plots["km"])
    else:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.scatter(oof["y"], oof["value"], s=18)
        lo, hi = float(min(oof["y"].min(), oof["value"].min())), float(max(oof["y"].max(), oof["value"].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        pooled = res["pooled"]
        ax.set(xlabel="true value", ylabel="predicted value",
               title=f"{best}: r={pooled['pearson_r']:.2f}, R²={pooled['r2']:.2f}, MAE={pooled['mae']:.3g}")
        _save(fig, plots["scatter"])


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
    from .io import write_json, write_tsv
    from .logs import get_logger

    cfg = MetricsSettings.from_config(settings, seed)
    results = {}
    for model, paths in predictions.items():
        table = load_predictions(paths, required=("slide_id", "patient_id", "y", "fold", "role", *task.score_columns))
        results[model] = evaluate_target_model(table, target_of_predictions(table, task), cfg, strategy)
    table = compare_target_models(results, task, cfg)
    best = str(table.loc[0, "model"])
    skip = ("oof",)
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
    get_logger(__name__).info("best model %s (%s %.3f)", best, task.primary_metric, table.loc[0, task.primary_metric])
    return payload
