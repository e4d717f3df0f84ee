"""What a run predicts (config ``target:``): the task definition every stage shares.

One :class:`Target` says how sheet rows become training targets (``encode``), how the split is
stratified (``strata``), how many outputs a slide model has (``n_out``), its loss (``bag_loss``;
survival: ``cox_loss`` over a batch of bags), the prediction columns it writes, and the metrics
of its predictions (``evaluate``, with patient-bootstrap CIs). Types:

* ``classification``: the sheet's ``label``. ``target.classes: null`` (the default) is today's
  binary task, ``positive_label`` against every other label (outputs unchanged: ``prob``);
  ``classes: sheet`` makes one class per distinct label (sorted), a list fixes the order. Multi-
  class (3+): softmax / cross-entropy, predictions ``prob_<class>`` + ``pred`` (argmax;
  threshold_source ``argmax``). ``y`` is the class index in the written class order.
* ``survival``: sheet columns ``target.time_column`` and ``target.event_column`` (1 = event,
  0 = censored). Models output one risk (higher = earlier event), trained with the negative
  Cox partial log-likelihood (Breslow ties) over batches of bags. ``y`` is the event.
* ``regression``: a numeric ``label``; MSE or Huber loss on the standardised value (mean/SD of
  the training slides). ``y`` is the value; predictions ``value``.

The survival metrics (Harrell's and Uno's c-index, Kaplan-Meier, log-rank) are implemented
here, tested against hand-computed examples (and against scikit-survival's, which the survival
slide models use, in tests/test_targets.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError

TARGET_TYPES = ("classification", "survival", "regression")
LOSSES = {"classification": ("auto", "ce"), "survival": ("auto", "cox"), "regression": ("auto", "mse", "huber")}
# MIL models per target type that are refused, and why (config validation says it in one line)
UNSUPPORTED_MIL = {
    ("survival", "clam_sb"): "CLAM's instance clustering loss pseudo-labels tiles as evidence of a slide's class; "
                             "a survival target has no classes",
    ("regression", "clam_sb"): "CLAM's instance clustering loss pseudo-labels tiles as evidence of a slide's class; "
                               "a regression target has no classes",
}


@dataclass(frozen=True)
class Target:
    type: str = "classification"
    classes: tuple[str, ...] = ()          # written order; binary: (negative, positive_label)
    positive_label: str | None = None      # binary only
    time_column: str = "time"
    event_column: str = "event"
    loss: str = "auto"
    huber_delta: float = 1.0
    horizons: tuple[float, ...] = ()       # survival: Uno's c / time-dependent AUC at these times
    survival_batch: int = 32               # bags per Cox step (risk set = the batch)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any] | None, labels: Sequence[Any] | None = None) -> "Target":
        """From the whole config (``target:`` and ``positive_label``) and the sheet's labels."""
        config = dict(config or {})
        section = dict(config.get("target") or {})
        kind = section.get("type", "classification")
        if kind not in TARGET_TYPES:
            raise InputError(f"config key 'target.type': {kind!r} is not one of {', '.join(TARGET_TYPES)}")
        loss = section.get("loss", "auto") or "auto"
        if loss not in LOSSES[kind]:
            raise InputError(f"config key 'target.loss': {loss!r} is not a loss for {kind} (choose from {', '.join(LOSSES[kind])})")
        common = dict(type=kind, loss=loss, huber_delta=float(section.get("huber_delta", 1.0)),
                      time_column=str(section.get("time_column", "time")), event_column=str(section.get("event_column", "event")),
                      horizons=tuple(float(h) for h in (section.get("horizons") or ())),
                      survival_batch=int(section.get("survival_batch", 32)))
        if kind != "classification":
            return cls(**common)
        spec = section.get("classes")
        positive = str(config.get("positive_label", "tumor"))
        seen = sorted({str(v) for v in labels}) if labels is not None else []
        if spec is None:
            negatives = [v for v in seen if v != positive]
            return cls(classes=("+".join(negatives) or "other", positive), positive_label=positive, **common)
        if spec == "sheet":
            classes = tuple(seen)
        elif isinstance(spec, (list, tuple)):
            classes = tuple(str(c) for c in spec)
            extra = sorted(set(seen) - set(classes))
            if extra:
                raise InputError(f"config key 'target.classes': the sheet has label {extra[0]!r}, not among {list(classes)}; "
                                 "add it to target.classes or drop those slides")
        else:
            raise InputError(f"config key 'target.classes': {spec!r} is not null, 'sheet' or a list of labels")
        if labels is not None and len(classes) < 2:
            raise InputError(f"config key 'target.classes': need 2 or more classes, the sheet has {seen}")
        if len(classes) == 2:  # two named classes: the binary task, positive = the second
            return cls(classes=classes, positive_label=classes[1], **common)
        return cls(classes=classes, **common)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def binary(self) -> bool:
        return self.type == "classification" and self.positive_label is not None

    @property
    def multiclass(self) -> bool:
        return self.type == "classification" and self.positive_label is None

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.multiclass else 1

    @property
    def kind(self) -> str:
        """binary | multiclass | survival | regression."""
        return "binary" if self.binary else "multiclass" if self.multiclass else self.type

    @property
    def loss_name(self) -> str:
        if self.type == "classification":
            return "binary cross-entropy" if self.binary else "cross-entropy (softmax)"
        if self.type == "survival":
            return f"negative Cox partial log-likelihood (Breslow ties), risk sets within batches of {self.survival_batch} bags"
        return f"Huber (delta {self.huber_delta}) on the standardised value" if self.loss == "huber" else \
            "mean squared error on the standardised value"

    @property
    def primary_metric(self) -> str:
        return {"binary": "auc", "multiclass": "auc_macro", "survival": "c_index", "regression": "r2"}[self.kind]

    @property
    def score_columns(self) -> list[str]:
        """Prediction columns of the model's output."""
        if self.binary:
            return ["prob"]
        if self.multiclass:
            return [f"prob_{c}" for c in self.classes]
        return ["risk"] if self.type == "survival" else ["value"]

    def describe(self) -> dict[str, Any]:
        out = {"type": self.type, "kind": self.kind, "loss": self.loss_name, "primary_metric": self.primary_metric}
        if self.type == "classification":
            out["classes"] = list(self.classes)
            if self.binary:
                out["positive_label"] = self.positive_label
        if self.type == "survival":
            out.update(time_column=self.time_column, event_column=self.event_column, horizons=list(self.horizons))
        return out

    # -- sheet rows -> targets -------------------------------------------------------------
    def encode(self, samples: pd.DataFrame) -> pd.DataFrame:
        """Columns ``y`` (+ ``time``, ``event`` for survival) for every sheet row; InputError
        naming the slide and the field for a value that cannot be used."""
        ids = samples["slide_id"].astype(str).to_numpy()
        out = pd.DataFrame(index=samples.index)
        if self.binary:
            out["y"] = (samples["label"].astype(str) == str(self.positive_label)).astype(np.int64)
            return out
        if self.multiclass:
            index = {c: i for i, c in enumerate(self.classes)}
            lab = samples["label"].astype(str)
            bad = ~lab.isin(list(index))
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(f"slide {ids[i]!r}: label {lab.iloc[i]!r} is not one of target.classes {list(self.classes)}")
            out["y"] = lab.map(index).astype(np.int64)
            return out
        if self.type == "regression":
            value = pd.to_numeric(samples["label"], errors="coerce")
            bad = ~np.isfinite(value.to_numpy(dtype=float))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"slide {ids[i]!r}: label {samples['label'].iloc[i]!r} is not a number "
                                 "(target.type regression needs a numeric label)")
            out["y"] = value.astype(float)
            return out
        for col in (self.time_column, self.event_column):
            if col not in samples.columns:
                raise InputError(f"samples sheet has no column {col!r} (target.{'time' if col == self.time_column else 'event'}_column); "
                                 "add it or point the config key at the right column")
        time = pd.to_numeric(samples[self.time_column], errors="coerce").to_numpy(dtype=float)
        event = pd.to_numeric(samples[self.event_column], errors="coerce").to_numpy(dtype=float)
        bad_t = ~(np.isfinite(time) & (time >= 0))
        if bad_t.any():
            i = int(np.flatnonzero(bad_t)[0])
            raise InputError(f"slide {ids[i]!r}: {self.time_column} {samples[self.time_column].iloc[i]!r} is not a time >= 0")
        bad_e = ~np.isin(event, (0.0, 1.0))
        if bad_e.any():
            i = int(np.flatnonzero(bad_e)[0])
            raise InputError(f"slide {ids[i]!r}: {self.event_column} {samples[self.event_column].iloc[i]!r} is not 1 (event) or 0 (censored)")
        out["y"] = event.astype(np.int64)
        out["time"] = time
        out["event"] = event.astype(np.int64)
        return out

    def strata(self, y: np.ndarray) -> tuple[np.ndarray, int]:
        """Stratum per row for the split (class; event/censored; regression: value tertile)."""
        y = np.asarray(y)
        if self.type == "classification":
            return y.astype(np.int64), max(self.n_out, 2)
        if self.type == "survival":
            return y.astype(np.int64), 2
        if len(y) < 3:
            return np.zeros(len(y), np.int64), 1
        cuts = np.quantile(y.astype(float), [1 / 3, 2 / 3])
        return np.searchsorted(cuts, y.astype(float), side="right").astype(np.int64), 3

    def stratum_of_patient(self, values: pd.Series) -> Any:
        """A patient's stratum from its slides' strata: positive/event if any, else the majority."""
        if self.binary or self.type == "survival":
            return values.max()
        return values.mode().iloc[0]

    # -- losses ----------------------------------------------------------------------------------
    def bag_loss(self) -> Callable:
        """(output, target) -> loss of one bag, for classification and regression."""
        import torch
        from torch.nn import functional as F

        if self.binary:
            return F.binary_cross_entropy_with_logits
        if self.multiclass:
            return lambda out, y: F.cross_entropy(out.reshape(1, -1), y.reshape(1).long())
        if self.type == "regression":
            if self.loss == "huber":
                return lambda out, y: F.huber_loss(out, y, delta=self.huber_delta)
            return F.mse_loss
        def _no(out, y):  # pragma: no cover - survival uses cox_loss on batches
            raise TypeError("survival is trained with cox_loss over a batch of bags")
        return _no


def check_target_config(config: dict[str, Any], samples: pd.DataFrame | None = None) -> Target:
    """The run's Target, after the checks that can be made before any job: every sheet row
    encodes (numeric label, time/event columns) and every MIL model supports the type (the
    slide classifiers have an estimator for every type). InputError (one line) otherwise."""
    labels = samples["label"] if samples is not None else None
    target = Target.from_config(config, labels=labels)
    if samples is not None and not target.binary:
        target.encode(samples.reset_index(drop=True))
    for model in (config.get("mil") or {}).get("models") or ():
        why = UNSUPPORTED_MIL.get((target.type, model))
        if why:
            raise InputError(f"config key 'mil.models': {model} does not support target.type {target.type}: {why}; "
                             "drop it from mil.models")
    return target


def cox_loss(risk, time, event):
    """Negative Cox partial log-likelihood (Breslow's ties) of a batch, mean over its events.

    risk [n] (higher = earlier event), time [n], event [n] (1/0). The risk set of an event at t
    is every bag of the batch with time >= t, so a batch needs events *and* later times to carry
    signal; 0 (with a gradient of 0) when the batch has no event."""
    import torch

    order = torch.argsort(time, descending=True)
    r, e, t = risk[order], event[order].to(risk.dtype), time[order]
    # log-sum-exp of the risks of every bag still at risk (time >= t_i): cumulative over the
    # descending times, taking the last index of each tied time (Breslow)
    cum = torch.logcumsumexp(r, dim=0)
    t_np = t.detach().cpu().numpy()
    last = np.searchsorted(-t_np, -t_np, side="right") - 1
    denom = cum[torch.as_tensor(last, device=risk.device)]
    n_events = e.sum()
    if float(n_events) == 0:
        return (risk * 0).sum()
    return -((r - denom) * e).sum() / n_events


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions on arrays.

def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance: over pairs (i, j) with t_i < t_j and an event at t_i, the share in
    which i has the higher risk (risk ties count 1/2). Pairs tied in time are not comparable."""
    t, e, r = (np.asarray(a, dtype=float) for a in (time, event, risk))
    comparable = (t[:, None] < t[None, :]) & (e[:, None] == 1)
    n = comparable.sum()
    if n == 0:
        return float("nan")
    conc = ((r[:, None] > r[None, :]) & comparable).sum() + 0.5 * ((r[:, None] == r[None, :]) & comparable).sum()
    return float(conc / n)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct event times, survival just after each), the product-limit estimator."""
    t, e = np.asarray(time, dtype=float), np.asarray(event, dtype=int)
    times = np.unique(t[e == 1])
    surv, s = [], 1.0
    for u in times:
        at_risk = (t >= u).sum()
        d = ((t == u) & (e == 1)).sum()
        s *= 1.0 - d / at_risk
        surv.append(s)
    return times, np.asarray(surv)


def _step(times: np.ndarray, values: np.ndarray, at: np.ndarray, left: bool) -> np.ndarray:
    """Step function value (1 before the first time); ``left``: the limit just before ``at``."""
    if not len(times):
        return np.ones(len(np.atleast_1d(at)))
    idx = np.searchsorted(times, at, side="left" if left else "right") - 1
    return np.where(idx >= 0, values[np.maximum(idx, 0)], 1.0)


def uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tau: float | None = None,
          train_time: np.ndarray | None = None, train_event: np.ndarray | None = None) -> float:
    """Uno's c-index (Uno et al. 2011): Harrell's pairs weighted by 1/G(t_i-)^2, G the Kaplan-
    Meier estimate of the censoring distribution (of ``train_*``, default the same data), over
    events before ``tau`` (default: the last time). Unbiased for the concordance under random
    censoring, where Harrell's depends on the censoring pattern."""
    t, e, r = (np.asarray(a, dtype=float) for a in (time, event, risk))
    gt = t if train_time is None else np.asarray(train_time, float)
    ge = e if train_event is None else np.asarray(train_event, float)
    c_times, c_surv = kaplan_meier(gt, 1 - ge)     # censoring is the "event" of G
    tau = float(t.max()) if tau is None else float(tau)
    g = _step(c_times, c_surv, t, left=True)
    w = np.where((e == 1) & (t < tau) & (g > 0), 1.0 / np.maximum(g, 1e-12) ** 2, 0.0)
    comparable = (t[:, None] < t[None, :]) * w[:, None]
    den = comparable.sum()
    if den == 0:
        return float("nan")
    num = (comparable * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))).sum()
    return float(num / den)


def logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test: (chi-square with 1 df, p-value)."""
    t, e, g = np.asarray(time, float), np.asarray(event, int), np.asarray(group).astype(bool)
    if g.all() or (~g).all():
        return float("nan"), float("nan")
    o_minus_e, var = 0.0, 0.0
    for u in np.unique(t[e == 1]):
        at = t >= u
        n, n1 = at.sum(), (at & g).sum()
        d = ((t == u) & (e == 1)).sum()
        d1 = ((t == u) & (e == 1) & g).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if var <= 0:
        return float("nan"), float("nan")
    chi2 = o_minus_e**2 / var
    return float(chi2), float(stats.chi2.sf(chi2, 1))


def one_vs_rest_auc(y: np.ndarray, score: np.ndarray) -> float:
    from .metrics import roc_auc

    return roc_auc(y, score)


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Macro one-vs-rest AUC (over classes present with both sides), per-class AUC, and at the
    argmax: balanced accuracy (mean per-class recall), accuracy, macro F1."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=float)
    pred = prob.argmax(1) if len(prob) else np.zeros(0, int)
    out: dict[str, float] = {}
    aucs, recalls, f1s = [], [], []
    for k, name in enumerate(classes):
        a = one_vs_rest_auc(y == k, prob[:, k])
        out[f"auc_{name}"] = a
        if not np.isnan(a):
            aucs.append(a)
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        if tp + fn:
            recalls.append(tp / (tp + fn))
            f1s.append(2 * tp / (2 * tp + fp + fn))
    out["auc_macro"] = float(np.mean(aucs)) if aucs else float("nan")
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")
    out["accuracy"] = float((pred == y).mean()) if len(y) else float("nan")
    out["f1_macro"] = float(np.mean(f1s)) if f1s else float("nan")
    return {"auc_macro": out.pop("auc_macro"), **out}


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(y, int), np.asarray(pred, int)), 1)
    return m


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizons: Sequence[float]) -> dict[str, float]:
    out = {"c_index": harrell_c(time, event, risk)}
    for h in horizons:
        out[f"uno_c_at_{h:g}"] = uno_c(time, event, risk, tau=h)   # MLflow metric names allow no "@"
    return out


def regression_metrics(y: np.ndarray, value: np.ndarray) -> dict[str, float]:
    y, v = np.asarray(y, float), np.asarray(value, float)
    if len(y) < 2:
        return {k: float("nan") for k in ("pearson_r", "spearman_rho", "mae", "rmse", "r2")}
    const = np.ptp(y) == 0 or np.ptp(v) == 0
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"pearson_r": float("nan") if const else float(stats.pearsonr(y, v)[0]),
            "spearman_rho": float("nan") if const else float(stats.spearmanr(y, v)[0]),
            "mae": float(np.abs(y - v).mean()), "rmse": float(np.sqrt(((y - v) ** 2).mean())),
            "r2": float(1 - ((y - v) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")}


def patient_bootstrap(fn: Callable[[np.ndarray], dict[str, float]], patients: np.ndarray, n_bootstrap: int,
                      ci: float, seed: int) -> tuple[dict[str, tuple[float, float]], list[dict[str, float]]]:
    """Percentile CIs of every metric ``fn(row_indices)`` returns, resampling patients with
    replacement (their slides are correlated). Also returns the draws (for paired tests)."""
    uniq, inverse = np.unique(np.asarray(patients), return_inverse=True)
    members = [np.nonzero(inverse == i)[0] for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        chosen = rng.integers(0, len(uniq), len(uniq))
        draws.append(fn(np.concatenate([members[i] for i in chosen])))
    alpha = (1 - ci) / 2
    out = {}
    for name in (draws[0] if draws else {}):
        v = np.asarray([d[name] for d in draws], dtype=float)
        v = v[~np.isnan(v)]
        out[name] = (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (float("nan"), float("nan"))
    return out, draws


def paired_bootstrap_test(fn_a: Callable, fn_b: Callable, patients: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float]:
    """(metric(a) - metric(b), two-sided p) from the same patient resamples of both models: p is
    twice the smaller share of resampled differences on either side of 0 (the DeLong stand-in
    for metrics without a closed-form variance)."""
    uniq, inverse = np.unique(np.asarray(patients), return_inverse=True)
    members = [np.nonzero(inverse == i)[0] for i in range(len(uniq))]
    idx_all = np.arange(len(inverse))
    diff = float(fn_a(idx_all) - fn_b(idx_all))
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(n_bootstrap):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        d.append(fn_a(idx) - fn_b(idx))
    d = np.asarray(d, float)
    d = d[~np.isnan(d)]
    if not len(d):
        return diff, float("nan")
    p = 2 * min((d <= 0).mean(), (d >= 0).mean())
    return diff, float(min(1.0, p))


def permutation_null(metric: Callable[[np.ndarray], float], n: int, n_perm: int = 1000, seed: int = 0) -> np.ndarray:
    """The metric under random orderings of the predictions (``metric(permutation)``): the null a
    test's margin is stated from."""
    rng = np.random.default_rng(seed)
    return np.asarray([metric(rng.permutation(n)) for _ in range(n_perm)], dtype=float)


__all__ = ["Target", "TARGET_TYPES", "UNSUPPORTED_MIL", "cox_loss", "harrell_c", "uno_c", "kaplan_meier", "logrank",
           "multiclass_metrics", "survival_metrics", "regression_metrics", "patient_bootstrap",
           "paired_bootstrap_test", "permutation_null", "confusion"]
