"""Tile-level tumour classifier on frozen features, trained per fold on annotated tiles.

Train-role slides' labelled tiles fit the model; val-role tiles drive early stopping (MLP) and
Platt calibration; test-role slides are never read for training. Targets may be hard labels,
label-smoothed, or soft (the tile's lesion overlap fraction).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import defaults_from_schema
from .errors import InputError
from .io import write_json, write_parquet
from .tile_probs import to_tile_prob_table

log = logging.getLogger("histoflow.patch_classifier")

JOIN_KEYS = ["x", "y", "target_mpp"]


@dataclass(frozen=True)
@defaults_from_schema("patch_classifier")
class PatchClassifierSettings:
    model: str  # logreg | mlp
    label_smoothing: float  # targets become y*(1-e) + e/2
    soft_labels: bool  # target = lesion overlap fraction (ambiguous tiles included)
    max_tiles_per_slide: int | None
    # informed sampling: share of each train slide's max_tiles_per_slide sample taken from tiles on
    # lesions (overlap > 0); None = uniform. Train-role slides only: val/test tiles are never sampled.
    lesion_share: float | None
    balance: bool  # weight classes equally (lesion tiles are rare)
    calibrate: bool  # Platt scaling on val tiles
    C: float  # logreg inverse L2 strength
    hidden_dim: int
    dropout: float
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int

    @classmethod
    def from_config(cls, cfg: dict | None) -> "PatchClassifierSettings":
        cfg = {k: v for k, v in (cfg or {}).items() if k in cls.__dataclass_fields__}
        s = cls(**cfg)
        if s.model not in ("logreg", "mlp"):
            raise InputError(f"config patch_classifier.model: {s.model!r} is not logreg or mlp")
        if not 0.0 <= s.label_smoothing < 1.0:
            raise InputError("config patch_classifier.label_smoothing must be in [0, 1)")
        if s.lesion_share is not None and not 0.0 <= float(s.lesion_share) <= 1.0:
            raise InputError(f"config patch_classifier.lesion_share: {s.lesion_share} must be in [0, 1] or null")
        return s


def seed_everything(seed: int, with_torch: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if with_torch:  # importing torch costs seconds; logreg does not need it
        import torch

        torch.manual_seed(seed)


def read_features(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """(coords, float32 [n, dim]); histoflow.features.read_features when the stage provides it."""
    try:
        from .features import read_features as _rf  # type: ignore[attr-defined]
        return _rf(path)
    except ImportError:
        pass
    table = pq.read_table(path)
    coords = table.drop_columns(["feature"]).to_pandas()
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size if hasattr(col.type, "list_size") else 0
    if len(col) == 0:
        return coords, np.zeros((0, max(dim, 0)), dtype=np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return coords, np.asarray(flat, dtype=np.float32).reshape(len(col), -1)


def targets_for(labels: pd.DataFrame, settings: PatchClassifierSettings) -> tuple[np.ndarray, np.ndarray]:
    """(mask of tiles used, training target in [0, 1]) from patch labels."""
    lab = labels["label"].to_numpy()
    overlap = labels["overlap"].to_numpy(dtype=np.float64)
    if settings.soft_labels:
        use = (lab != -1) | np.isfinite(overlap)
        target = np.where(lab == 1, np.maximum(overlap, 0.0), 0.0)
        target = np.where((lab == -1) & np.isfinite(overlap), overlap, target)
        target = np.where(lab == 1, np.where(np.isfinite(overlap), overlap, 1.0), target)
    else:
        use = lab != -1
        target = (lab == 1).astype(np.float64)
    eps = settings.label_smoothing
    target = target * (1.0 - eps) + eps / 2.0
    return use, target


@dataclass
class TileSet:
    X: np.ndarray            # float32 [n, dim]
    y: np.ndarray            # hard labels {0, 1} (target >= 0.5)
    target: np.ndarray       # training target in [0, 1]
    slide_id: np.ndarray

    @property
    def n(self) -> int:
        return len(self.y)


def assemble(slide_ids: list[str], features: dict[str, str], labels: dict[str, str],
             settings: PatchClassifierSettings, rng: np.random.Generator, subsample: bool = True) -> TileSet:
    """Labelled tiles of ``slide_ids``: features joined to patch labels on (x, y, target_mpp).

    ``subsample`` (train-role slides only): at most ``max_tiles_per_slide`` tiles per slide, a
    seeded sample, with ``lesion_share`` of it from tiles on lesions when set (the only place
    annotations choose tiles). Without it (val/test slides) every labelled tile is kept and no
    annotation information chooses any tile."""
    from .tiling import sample_indices

    Xs, ys, ts, ss = [], [], [], []
    for sid in slide_ids:
        if sid not in features or sid not in labels:
            continue
        coords, X = read_features(features[sid])
        if not len(coords):
            continue
        lab = pq.read_table(labels[sid]).to_pandas()
        merged = coords[JOIN_KEYS].reset_index().merge(lab[JOIN_KEYS + ["label", "overlap"]], on=JOIN_KEYS, how="inner")
        use, target = targets_for(merged, settings)
        idx = merged["index"].to_numpy()[use]
        target = target[use]
        hard = (merged["label"].to_numpy()[use] == 1).astype(np.int8)
        if subsample and settings.max_tiles_per_slide and len(idx) > settings.max_tiles_per_slide:
            if settings.lesion_share is None:
                keep = np.sort(rng.choice(len(idx), settings.max_tiles_per_slide, replace=False))
            else:
                overlap = merged["overlap"].to_numpy(dtype=np.float64)[use]
                on_lesion = np.nan_to_num(overlap, nan=0.0) > 0
                keep = sample_indices(len(idx), settings.max_tiles_per_slide, rng, on_lesion,
                                      float(settings.lesion_share))
            idx, target, hard = idx[keep], target[keep], hard[keep]
        Xs.append(X[idx]); ys.append(hard); ts.append(target); ss.append(np.full(len(idx), sid, dtype=object))
    if not Xs:
        return TileSet(np.zeros((0, 0), np.float32), np.zeros(0, np.int8), np.zeros(0), np.zeros(0, dtype=object))
    return TileSet(np.concatenate(Xs).astype(np.float32), np.concatenate(ys), np.concatenate(ts), np.concatenate(ss))


# --- models ----------------------------------------------------------------------------------

@dataclass
class PatchClassifier:
    """A fitted tile classifier: standardisation + logreg/MLP + optional Platt calibration."""

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    params: dict[str, Any]                      # logreg: coef/intercept; mlp: state_dict (numpy)
    platt: tuple[float, float] = (1.0, 0.0)     # calibrated logit = a * logit + b
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float32) - self.mean) / self.scale
        if self.kind == "logreg":
            return Z @ self.params["coef"] + self.params["intercept"]
        import torch

        net = _mlp(Z.shape[1], self.params["hidden_dim"], 0.0)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in self.params["state_dict"].items()})
        net.eval()
        with torch.no_grad():
            return net(torch.from_numpy(Z.astype(np.float32))).squeeze(1).numpy().astype(np.float64)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, dtype=np.float32)
        a, b = self.platt
        return (1.0 / (1.0 + np.exp(-(a * self.logits(X) + b)))).astype(np.float32)


def _mlp(dim: int, hidden: int, dropout: float):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


def _class_weights(y: np.ndarray, balance: bool) -> np.ndarray:
    w = np.ones(len(y), dtype=np.float64)
    if balance:
        pos = max(int((y == 1).sum()), 1)
        neg = max(int((y == 0).sum()), 1)
        w[y == 1] = len(y) / (2.0 * pos)
        w[y == 0] = len(y) / (2.0 * neg)
    return w


def fit_logreg(Z: np.ndarray, train: TileSet, settings: PatchClassifierSettings, seed: int) -> dict[str, Any]:
    """L2 logistic regression on standardised features. Soft targets t are fitted exactly by
    duplicating each tile as a positive with weight t and a negative with weight 1 - t."""
    from sklearn.linear_model import LogisticRegression

    w = _class_weights(train.y, settings.balance)
    t = train.target
    X2 = np.concatenate([Z, Z])
    y2 = np.concatenate([np.ones(len(t)), np.zeros(len(t))])
    w2 = np.concatenate([w * t, w * (1.0 - t)])
    keep = w2 > 0
    clf = LogisticRegression(C=settings.C, max_iter=2000, random_state=seed)
    clf.fit(X2[keep], y2[keep], sample_weight=w2[keep])
    return {"coef": clf.coef_[0].astype(np.float64), "intercept": float(clf.intercept_[0])}


def fit_mlp(Z: np.ndarray, train: TileSet, Zval: np.ndarray | None, val: TileSet | None,
            settings: PatchClassifierSettings, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Small MLP (BCE on soft targets), early-stopped on the val loss (train loss without val)."""
    import torch
    import torch.nn.functional as F

    seed_everything(seed)
    net = _mlp(Z.shape[1], settings.hidden_dim, settings.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    Xt = torch.from_numpy(Z.astype(np.float32))
    tt = torch.from_numpy(train.target.astype(np.float32))
    wt = torch.from_numpy(_class_weights(train.y, settings.balance).astype(np.float32))
    has_val = Zval is not None and val is not None and val.n > 0
    if has_val:
        Xv = torch.from_numpy(Zval.astype(np.float32))
        tv = torch.from_numpy(val.target.astype(np.float32))
        wv = torch.from_numpy(_class_weights(val.y, settings.balance).astype(np.float32))
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, bad = np.inf, None, 0, 0
    history = []
    from tqdm import tqdm

    for epoch in tqdm(range(settings.epochs), desc="patch MLP", unit="epoch"):
        net.train()
        order = torch.randperm(len(Xt), generator=gen)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            b = order[start:start + settings.batch_size]
            loss = F.binary_cross_entropy_with_logits(net(Xt[b]).squeeze(1), tt[b], weight=wt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        net.eval()
        with torch.no_grad():
            if has_val:
                monitor = float(F.binary_cross_entropy_with_logits(net(Xv).squeeze(1), tv, weight=wv))
            else:
                monitor = total / len(Xt)
        history.append(monitor)
        if monitor < best - 1e-5:
            best, best_epoch, bad = monitor, epoch, 0
            best_state = {k: v.detach().clone().numpy() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= settings.patience:
                break
    params = {"state_dict": best_state, "hidden_dim": settings.hidden_dim}
    return params, {"best_epoch": best_epoch, "epochs_run": len(history), "monitor": "val_loss" if has_val else "train_loss",
                    "best_loss": best}


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Calibration p = sigmoid(a * logit + b) fitted on val tiles (Platt 1999).

    Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) keep the fit finite when
    the val tiles are perfectly separated, which small val sets often are: unsmoothed, the slope
    runs off to ~1e2 and every tile saturates at 0 or 1, destroying the ranking that heatmaps,
    lesions and AP need. Identity when val is one-class or the fit would invert the ranking.
    """
    from scipy.optimize import minimize

    y = np.asarray(y).astype(float).ravel()
    z = np.asarray(logits, dtype=float).ravel()
    n_pos, n_neg = float((y > 0.5).sum()), float((y <= 0.5).sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        f = ab[0] * z + ab[1]
        # log(1 + e^f) - t f, stable for large |f|
        value = np.sum(np.logaddexp(0.0, f) - t * f)
        r = 1.0 / (1.0 + np.exp(-f)) - t
        return float(value), np.array([np.sum(r * z), np.sum(r)])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in res.x)
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
        return 1.0, 0.0
    return a, b


def fit_patch_classifier(train: TileSet, val: TileSet | None, settings: PatchClassifierSettings, seed: int) -> PatchClassifier:
    if train.n == 0 or len(np.unique(train.y)) < 2:
        raise InputError(f"patch classifier: the train slides have {int((train.y == 1).sum())} positive and "
                         f"{int((train.y == 0).sum())} negative labelled tiles; it needs both (annotate tumour "
                         "slides in the sheet's `annotations` column, or use tile_probs.sources: mil-<model>)")
    seed_everything(seed, with_torch=settings.model == "mlp")
    mean = train.X.mean(axis=0)
    scale = train.X.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
    Z = (train.X - mean) / scale
    Zval = (val.X - mean) / scale if val is not None and val.n else None
    info: dict[str, Any] = {}
    if settings.model == "logreg":
        params = fit_logreg(Z, train, settings, seed)
    else:
        params, info = fit_mlp(Z, train, Zval, val, settings, seed)
    model = PatchClassifier(kind=settings.model, mean=mean.astype(np.float32), scale=scale, params=params, info=info)
    if settings.calibrate and val is not None and val.n:
        model.platt = fit_platt(model.logits(val.X), val.y)
    return model


def tile_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Tile-level AUC, average precision, accuracy, balanced accuracy, Brier at threshold 0.5."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

    out: dict[str, Any] = {"n_tiles": int(len(y)), "n_positive": int((y == 1).sum()), "n_negative": int((y == 0).sum())}
    if len(y) == 0:
        return out
    pred = (p >= 0.5).astype(int)
    out["accuracy"] = float((pred == y).mean())
    out["brier"] = float(np.mean((p - y) ** 2))
    if len(np.unique(y)) == 2:
        out["auc"] = float(roc_auc_score(y, p))
        out["average_precision"] = float(average_precision_score(y, p))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    else:
        out["auc"] = None  # undefined with one class; reported as not available
    return out


def _by_stem(paths) -> dict[str, str]:
    return {Path(p).stem: str(p) for p in paths}


def _fold_roles(splits_path: str | os.PathLike, fold: int) -> pd.DataFrame:
    splits = pd.read_csv(splits_path, sep="\t", dtype={"slide_id": str})
    sub = splits[splits["fold"].astype(int) == int(fold)]
    if sub.empty:
        raise InputError(f"{str(splits_path)!r} has no rows for fold {fold}; check split.k")
    return sub


def train_patch_classifier(splits_path: str | os.PathLike, fold: int, feature_paths: list[str], label_paths: list[str],
                           settings: dict | PatchClassifierSettings, seed: int, model_out: str | os.PathLike,
                           metrics_out: str | os.PathLike) -> dict[str, Any]:
    """Rule entry point: fit on the fold's train slides, report tile metrics on train/val/test."""
    settings = settings if isinstance(settings, PatchClassifierSettings) else PatchClassifierSettings.from_config(settings)
    roles = _fold_roles(splits_path, fold)
    feats, labels = _by_stem(feature_paths), _by_stem(label_paths)
    rng = np.random.default_rng(seed + int(fold))
    slides = {r: sorted(roles.loc[roles["role"] == r, "slide_id"]) for r in ("train", "val", "test")}
    train = assemble(slides["train"], feats, labels, settings, rng)
    val = assemble(slides["val"], feats, labels, settings, rng, subsample=False)
    log.info("fold %s: %d train tiles (%d positive) from %d slides, %d val tiles", fold, train.n, int(train.y.sum()),
             len(slides["train"]), val.n)
    model = fit_patch_classifier(train, val, settings, seed + int(fold))
    model.info.update({"fold": int(fold), "train_slides": slides["train"], "seed": seed, "settings": asdict(settings)})
    save_patch_classifier(model, model_out)
    metrics: dict[str, Any] = {"fold": int(fold), "model": settings.model, "settings": asdict(settings),
                               "slides": dict(slides),
                               "training": {k: model.info[k] for k in ("best_epoch", "epochs_run", "monitor", "best_loss")
                                            if k in model.info},
                               "platt": list(model.platt)}
    for role, ts in (("train", train), ("val", val)):
        metrics[role] = tile_metrics(ts.y, model.predict_proba(ts.X))
    test = assemble(slides["test"], feats, labels, settings, rng, subsample=False)
    metrics["test"] = tile_metrics(test.y, model.predict_proba(test.X))
    write_json(metrics_out, metrics)
    log.info("fold %s: test tile AUC %s", fold, metrics["test"].get("auc"))
    return metrics


MODEL_FORMAT = "histoflow.patch_classifier/1"


def save_patch_classifier(model: PatchClassifier, path: str | os.PathLike) -> None:
    """Write the model as data, never code: a safetensors file (arrays: ``mean``, ``scale``, the
    logreg ``coef``/``intercept`` or the MLP's state dict as ``state_dict.<name>``) whose header
    metadata holds the kind, Platt calibration and info as JSON. Loading it runs nothing (a pickle
    or joblib file would run whatever it was made to)."""
    import json

    from safetensors.numpy import save

    from .io import _json_default, atomic_path

    arrays = {"mean": np.asarray(model.mean, np.float32), "scale": np.asarray(model.scale, np.float32)}
    meta = {"format": MODEL_FORMAT, "kind": model.kind, "platt": json.dumps([float(v) for v in model.platt]),
            "info": json.dumps(model.info, sort_keys=True, default=_json_default)}
    if model.kind == "logreg":
        arrays["coef"] = np.asarray(model.params["coef"], np.float64)
        arrays["intercept"] = np.asarray([model.params["intercept"]], np.float64)
    else:
        arrays.update({f"state_dict.{k}": np.ascontiguousarray(v) for k, v in model.params["state_dict"].items()})
        meta["hidden_dim"] = str(int(model.params["hidden_dim"]))
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(arrays, metadata=meta))


def load_patch_classifier(path: str | os.PathLike) -> PatchClassifier:
    """The model :func:`save_patch_classifier` wrote (data only: nothing in the file is executed)."""
    import json

    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = Path(path).read_bytes()
    try:
        arrays = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as err:
        raise InputError(f"{str(path)!r} is not a histoflow patch classifier (safetensors): {err}; "
                         "retrain it (older model.joblib files are not loaded: a pickle can run code)") from None
    if meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{str(path)!r} is not a {MODEL_FORMAT} file; retrain the patch classifier")
    kind = meta["kind"]
    if kind == "logreg":
        params: dict[str, Any] = {"coef": arrays["coef"], "intercept": float(arrays["intercept"][0])}
    else:
        params = {"state_dict": {k[len("state_dict."):]: v for k, v in arrays.items() if k.startswith("state_dict.")},
                  "hidden_dim": int(meta["hidden_dim"])}
    a, b = json.loads(meta["platt"])
    return PatchClassifier(kind=kind, mean=arrays["mean"], scale=arrays["scale"], params=params,
                           platt=(float(a), float(b)), info=json.loads(meta["info"]))


def predict_tile_probs(model_path: str | os.PathLike, splits_path: str | os.PathLike, fold: int,
                       feature_paths: list[str], out_path: str | os.PathLike) -> pd.DataFrame:
    """``tile_probs/patch_classifier/fold{k}.parquet``: every tile of every slide, scored by the
    fold's classifier, with the slide's role in that fold."""
    from tqdm import tqdm

    model = load_patch_classifier(model_path)
    roles = _fold_roles(splits_path, fold).set_index("slide_id")["role"].to_dict()
    frames = []
    for path in tqdm(feature_paths, desc=f"tile probs fold {fold}", unit="slide"):
        sid = Path(path).stem
        coords, X = read_features(path)
        if not len(coords):
            continue
        coords = coords.copy()
        coords["slide_id"] = sid
        coords["fold"] = int(fold)
        coords["role"] = roles.get(sid, "none")
        coords["prob"] = model.predict_proba(X)
        frames.append(coords)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_parquet(out_path, to_tile_prob_table(frame), metadata={"histoflow.source": "patch_classifier"})
    return frame
