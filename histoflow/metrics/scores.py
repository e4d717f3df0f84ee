"""Binary scores of arrays: ROC AUC, calibration error, the metrics at a threshold, the
threshold chosen on validation predictions, patient-bootstrap CIs and DeLong's test. Pure
functions of numpy arrays; no tables, no files."""

from __future__ import annotations

import numpy as np
from scipy import stats

METRIC_NAMES = ("auc", "balanced_accuracy", "accuracy", "f1", "sensitivity", "specificity",
                "ppv", "npv", "brier", "ece")


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

