"""Training, early stopping, scoring and collection of MIL models, one (model, fold) per job.

One bag (slide) per optimisation step, as in the MIL papers: bags differ in size by orders of
magnitude and padding them into batches wastes memory. Huge slides are capped at
``max_tiles_per_slide`` random tiles per step (a fresh subset every epoch, which also acts as
augmentation); validation and inference always see the full bag.

The task comes from :class:`histoflow.targets.Target` (config ``target:``): binary (one logit,
BCE; the historic outputs), multi-class (one logit per class, cross-entropy), regression (one
value, MSE/Huber on the training slides' standardised value) or survival. Survival is the one
task a single bag cannot carry: the Cox partial likelihood compares a bag's risk with the risks
of every bag still at risk at its event time, so each optimisation step takes a batch of
``target.survival_batch`` bags (a fresh random batch each step, all bags once per epoch), runs
them one by one (bags of different sizes are never padded), and applies the Cox loss to the
batch's risks; the risk set of an event is the batch's bags with a later or equal time. Larger
batches give risk sets closer to the cohort's (a batch of the whole training set is the exact
partial likelihood); validation loss is the Cox loss over all validation bags at once.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from ..devices import resolve_device
from ..config import defaults_from_schema
from ..errors import InputError
from ..targets import UNSUPPORTED_MIL, Target, cox_loss
from . import MODELS, MILModel, build_model
from .data import feature_dim, load_bags

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("slide_id", "patient_id", "label", "y", "prob", "fold", "role", "n_tiles")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "lr")
BINARY = Target(classes=("negative", "positive"), positive_label="positive")  # the historic task
TILE_SCORE_COLUMNS = ("slide_id", "x", "y", "col", "row", "size0", "target_mpp", "fold", "role", "attention", "instance_prob")


@dataclass(frozen=True)
@defaults_from_schema("mil")
class MILSettings:
    models: tuple[str, ...]
    encoder: str | None
    epochs: int
    lr: float
    weight_decay: float
    patience: int
    min_epochs: int
    monitor: str  # loss | auc (validation metric for early stopping) | none (train all epochs, keep the last)
    max_tiles_per_slide: int
    hidden_dim: int
    dropout: float
    balance: str  # weights | sampler
    topk_weight: float  # weight of the top-k instance loss added to each bag's loss (0 = off)
    topk: int  # tiles whose instance logits are averaged for the top-k instance loss
    tile_dropout: float  # share of a training bag's tiles dropped at random each step
    feature_noise: float  # SD of Gaussian noise added to training tiles, in units of each feature's SD
    bag_center: bool  # subtract each bag's own mean feature before the model (training and inference)
    device: str
    gpu: int
    threads: int
    clam_sb: dict = field(default_factory=dict)
    transmil: dict = field(default_factory=dict)
    dsmil: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "MILSettings":
        section = dict(section or {})
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in section.items() if k in known}
        if "models" in values:
            values["models"] = tuple(values["models"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name in self.models:
            if name not in MODELS:
                raise InputError(f"config key 'mil.models': unknown model {name!r}; choose from {', '.join(MODELS)}")
        if self.balance not in ("weights", "sampler"):
            raise InputError(f"config key 'mil.balance': {self.balance!r} is not weights or sampler")
        if self.monitor not in ("loss", "auc", "none"):
            raise InputError(f"config key 'mil.monitor': {self.monitor!r} is not loss, auc or none")

    def model_options(self, name: str) -> dict[str, Any]:
        return dict(getattr(self, name, {}) or {})


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    """Seed python/numpy/torch, ask torch for deterministic kernels, return a seeded generator."""
    # cuBLAS is only deterministic with a fixed workspace; must be set before the first CUDA matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # warn_only: a few CUDA kernels have no deterministic variant; on CPU everything here has one
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.Generator().manual_seed(seed)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present (e.g. a tiny validation set)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    keep = ~np.isnan(np.asarray(score, dtype=float))
    if len(np.unique(y[keep])) < 2:
        return float("nan")
    return float(roc_auc_score(y[keep], np.asarray(score)[keep]))


@dataclass
class FitResult:
    model: MILModel
    history: pd.DataFrame
    best_epoch: int


def history_columns(target: Target | None = None) -> list[str]:
    """history.tsv columns: the validation metric is named after the task's (val_auc binary)."""
    target = target or BINARY
    if target.binary:
        return list(HISTORY_COLUMNS)
    return ["epoch", "train_loss", "val_loss", f"val_{target.primary_metric}", "lr"]


def _as_tensor(features: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(features)).to(device=device, dtype=torch.float32)


@torch.inference_mode()
def predict_logits(model: MILModel, bags: Sequence[np.ndarray], device: torch.device | str = "cpu") -> np.ndarray:
    """Slide outputs on full bags (NaN for an empty bag): [n], or [n, classes] for multi-class."""
    device = torch.device(device)
    model.eval()
    n_out = getattr(model, "n_out", 1)
    out = np.full(len(bags), np.nan) if n_out == 1 else np.full((len(bags), n_out), np.nan)
    for i, bag in enumerate(bags):
        if len(bag):
            value = model(_as_tensor(bag, device)).double().cpu()
            out[i] = float(value) if n_out == 1 else value.numpy()
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - np.nanmax(logits, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def predict_proba(model: MILModel, bags: Sequence[np.ndarray], device: torch.device | str = "cpu") -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-predict_logits(model, bags, device)))


@torch.inference_mode()
def tile_scores(model: MILModel, bag: np.ndarray, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(attention summing to 1, instance probability in [0, 1]) per tile of a full bag."""
    if not len(bag):
        return np.zeros(0), np.zeros(0)
    model.eval()
    scores = model.tile_scores(_as_tensor(bag, torch.device(device)))
    att = scores.attention.double().cpu().numpy()
    # multi-class: instance_prob is [n, classes]
    return att / max(att.sum(), 1e-300), scores.instance_prob.double().clamp(0, 1).cpu().numpy()


def feature_stats(bags: Sequence[np.ndarray], center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every tile of ``bags`` (streamed in float64); ``center``:
    of the tiles after each bag's own mean is moved onto the overall mean (mil.bag_center)."""
    total, sq, n = 0.0, 0.0, 0
    if center:
        overall = sum(np.asarray(b, dtype=np.float64).sum(0) for b in bags) / sum(len(b) for b in bags)
    for bag in bags:
        b = np.asarray(bag, dtype=np.float64)
        if center:
            b = b - b.mean(0) + overall
        total = total + b.sum(0)
        sq = sq + np.square(b).sum(0)
        n += len(b)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)


def check_model_target(model_name: str, target: Target) -> None:
    """InputError when a MIL model is not defined for the target type (config validation)."""
    why = UNSUPPORTED_MIL.get((target.type, model_name))
    if why:
        raise InputError(f"config key 'mil.models': {model_name} does not support target.type {target.type}: {why}; "
                         "drop it from mil.models")


def _validation(model: MILModel, target: Target, val_bags, val_y, device) -> tuple[float, float]:
    """(validation loss, validation metric) of the current model: binary AUC, multi-class macro
    AUC, survival Harrell's c, regression R^2 (of the standardised value)."""
    from .. import targets as T

    out = predict_logits(model, val_bags, device)
    if target.binary:
        val_loss = float(F.binary_cross_entropy_with_logits(torch.tensor(out), torch.tensor(val_y, dtype=torch.float64)))
        return val_loss, roc_auc(val_y, out)
    if target.multiclass:
        val_loss = float(F.cross_entropy(torch.tensor(out), torch.tensor(val_y, dtype=torch.long)))
        m = T.multiclass_metrics(val_y, softmax(out), target.classes)
        return val_loss, m["auc_macro"]
    if target.type == "survival":
        val_loss = float(cox_loss(torch.tensor(out), torch.tensor(val_y[:, 0]), torch.tensor(val_y[:, 1])))
        return val_loss, T.harrell_c(val_y[:, 0], val_y[:, 1], out)
    val_loss = float(target.bag_loss()(torch.tensor(out), torch.tensor(val_y, dtype=torch.float64)))
    return val_loss, T.regression_metrics(val_y, out)["r2"]


def topk_instance_loss(model: MILModel, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The task loss of the mean of the ``k`` largest instance logits (per class for
    multi-class): a positive slide must hold k clearly positive tiles, a negative slide none.
    An instance-level signal for attention models (mi-Net / DSMIL's max stream, CLAM's top-k),
    which small lesions need: the bag loss alone is dominated by the 97-99 % benign tiles."""
    logits = model.instance_logits(x)
    top = torch.topk(logits, min(int(k), logits.shape[0]), dim=0).values.mean(0)
    if model.n_out > 1:
        return F.cross_entropy(top[None], y.reshape(1).long())
    return F.binary_cross_entropy_with_logits(top, y)


def augment_bag(bag: torch.Tensor, settings: "MILSettings", feature_std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training-time bag augmentation: drop a random ``tile_dropout`` share of the tiles (at least
    one is kept) and add Gaussian noise of ``feature_noise`` feature SDs (seeded generator)."""
    if settings.tile_dropout > 0 and bag.shape[0] > 1:
        keep = torch.rand(bag.shape[0], generator=gen) >= settings.tile_dropout
        if not bool(keep.any()):
            keep[torch.randint(bag.shape[0], (1,), generator=gen)] = True
        bag = bag[keep.to(bag.device)]
    if settings.feature_noise > 0:
        noise = torch.randn(bag.shape, generator=gen).to(bag.device)
        bag = bag + settings.feature_noise * feature_std.to(bag.device) * noise
    return bag


def _cox_informative(y: np.ndarray) -> bool:
    """Whether survival rows [n, 2] (time, event) give a Cox partial likelihood that depends on
    the risks: some event has another row still at risk (time >= its time)."""
    y = np.asarray(y, dtype=float).reshape(-1, 2)
    t, e = y[:, 0], y[:, 1] == 1
    return bool(any(((t >= t[i]).sum() > 1) for i in np.flatnonzero(e)))


def fit(model_name: str, train_bags: Sequence[np.ndarray], train_y: Sequence[int],
        val_bags: Sequence[np.ndarray], val_y: Sequence[int], settings: MILSettings, seed: int,
        device: str | torch.device = "cpu", progress: bool = True, target: Target | None = None) -> FitResult:
    """Train one model; keep the weights of the best validation epoch (early stopping).

    ``train_y``/``val_y``: 0/1 (binary), class index (multi-class), standardised value
    (regression) or [n, 2] (time, event) rows (survival). Without a validation set (survival: or
    one whose Cox loss cannot change, no event with a bag still at risk) the last epoch is kept.
    Deterministic for a seed on CPU.
    """
    from tqdm.auto import tqdm

    target = target or BINARY
    check_model_target(model_name, target)
    survival = target.type == "survival"
    ydtype = np.int64 if target.type == "classification" else np.float64
    device = torch.device(device)
    keep = [i for i, b in enumerate(train_bags) if len(b)]
    train_bags = [train_bags[i] for i in keep]
    train_y = np.asarray(train_y, dtype=ydtype)[keep]
    if target.type == "classification" and len(np.unique(train_y)) < 2:
        raise InputError("MIL training set holds one class only; use fewer folds (split.k) or add patients")
    if survival and train_y[:, 1].sum() == 0:
        raise InputError("MIL training set holds no event (target.event_column all 0); use fewer folds (split.k) or add patients")
    vkeep = [i for i, b in enumerate(val_bags) if len(b)]
    val_bags = [val_bags[i] for i in vkeep]
    val_y = np.asarray(val_y, dtype=ydtype)[vkeep]
    if survival and len(val_bags) and not _cox_informative(val_y):
        # no event with a later-or-equal time beside it: the validation Cox loss is 0 at every
        # epoch, and early stopping on it would keep the first epoch's weights
        log.warning("survival validation set (%d bags) has no event with a comparable bag: no early stopping, "
                    "the last epoch is kept", len(val_bags))
        val_bags, val_y = [], val_y[:0]

    gen = seed_everything(seed)
    dim = int(np.asarray(train_bags[0]).shape[1])
    model = build_model(model_name, dim, settings.hidden_dim, settings.dropout, settings.model_options(model_name),
                        n_out=target.n_out)
    if not target.binary and not survival:
        model.task_loss = target.bag_loss()
    model.set_feature_stats(*feature_stats(train_bags, center=settings.bag_center))
    model.bag_center.fill_(float(settings.bag_center))
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batch = max(1, min(target.survival_batch, len(train_bags))) if survival else 1
    steps = settings.epochs * int(math.ceil(len(train_bags) / batch))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1), eta_min=settings.lr * 0.01)

    n_classes = max(target.n_out, 2)
    if target.type == "classification":
        counts = np.bincount(train_y, minlength=n_classes).astype(float)
        # class weighting: each class contributes an equal share of the loss; sampler: of the steps
        with np.errstate(divide="ignore"):
            class_weight = (np.where(counts > 0, counts.sum() / (n_classes * counts), 0.0)
                            if settings.balance == "weights" else np.ones(n_classes))
            sample_weight = torch.tensor(np.where(counts > 0, 1.0 / counts, 0.0)[train_y], dtype=torch.double)
    else:  # no classes to balance: plain weights, uniform sampling
        class_weight, sample_weight = None, torch.ones(len(train_bags), dtype=torch.double)

    rows, best_state, best_key, best_epoch, stale = [], None, None, 0, 0
    epochs = tqdm(range(1, settings.epochs + 1), desc=f"train {model_name}", unit="epoch", disable=not progress)
    for epoch in epochs:
        model.train()
        if settings.balance == "sampler" and target.type == "classification":
            order = torch.multinomial(sample_weight, len(train_bags), replacement=True, generator=gen)
        else:
            order = torch.randperm(len(train_bags), generator=gen)
        losses = []

        def bag_tensor(i: int) -> torch.Tensor:
            bag = train_bags[i]
            if len(bag) > settings.max_tiles_per_slide:
                pick = torch.randperm(len(bag), generator=gen)[: settings.max_tiles_per_slide].sort().values.numpy()
                bag = np.asarray(bag)[pick]
            return augment_bag(_as_tensor(bag, device), settings, model.feature_std, gen)

        if survival:
            order_list = order.tolist()
            for start in range(0, len(order_list), batch):
                idx = order_list[start:start + batch]
                heads = [model.training_heads(bag_tensor(i)) for i in idx]
                times = torch.tensor(train_y[idx, 0], device=device)
                events = torch.tensor(train_y[idx, 1], device=device)
                loss = torch.stack([cox_loss(torch.stack([h[k] for h in heads]), times, events)
                                    for k in range(len(heads[0]))]).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                losses.append(float(loss.detach().cpu()))
        else:
            for i in order.tolist():
                x = bag_tensor(i)
                if target.binary or target.type == "regression":
                    y = torch.tensor(float(train_y[i]), device=device)
                else:
                    y = torch.tensor(int(train_y[i]), device=device)
                w = torch.tensor(float(class_weight[train_y[i]]) if class_weight is not None else 1.0, device=device)
                loss, _ = model.training_loss(x, y, w)
                if settings.topk_weight > 0 and target.type == "classification":
                    loss = loss + settings.topk_weight * w * topk_instance_loss(model, x, y, settings.topk)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                losses.append(float(loss.detach().cpu()))
        val_loss, val_auc = float("nan"), float("nan")
        if len(val_bags):
            val_loss, val_auc = _validation(model, target, val_bags, val_y, device)
        rows.append((epoch, float(np.mean(losses)), val_loss, val_auc, optimiser.param_groups[0]["lr"]))
        epochs.set_postfix(train_loss=f"{rows[-1][1]:.3f}", val_loss=f"{val_loss:.3f}", val_auc=f"{val_auc:.3f}")
        if not len(val_bags) or settings.monitor == "none":
            continue
        # lower is better; AUC ties (frequent on small validation sets) are broken by the loss
        use_auc = settings.monitor == "auc" and not np.isnan(val_auc)
        key = (-val_auc, val_loss) if use_auc else (val_loss,)
        if best_key is None or key < best_key:
            best_key, best_epoch, stale = key, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= settings.patience and epoch >= settings.min_epochs:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(rows)
    model.eval()
    history = pd.DataFrame(rows, columns=history_columns(target))
    return FitResult(model=model, history=history, best_epoch=best_epoch)


# ---------------------------------------------------------------------------------------------
# I/O edges: one (model, fold) job, and the per-model collection.

def fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def save_checkpoint(path: str | os.PathLike, result: FitResult, model_name: str, settings: MILSettings,
                    extra: dict[str, Any]) -> None:
    from ..io import atomic_path

    payload = {
        "model": model_name,
        "in_dim": result.model.in_dim,
        "hidden_dim": settings.hidden_dim,
        "dropout": settings.dropout,
        "options": settings.model_options(model_name),
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "best_epoch": result.best_epoch,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        **extra,
    }
    with atomic_path(path) as tmp:
        # through a handle: saved to a path, torch names the archive's records after the (random)
        # temporary file name, and reruns would not be byte-identical
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[MILModel, dict[str, Any]]:
    """The trained model (eval mode) and the checkpoint's metadata (fold, encoder, seed, ...)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    model = build_model(payload["model"], payload["in_dim"], payload["hidden_dim"], payload["dropout"], payload["options"],
                        n_out=int(payload.get("n_out", 1)))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta


def train_fold(splits_tsv: str | os.PathLike, feature_paths: Sequence[str | os.PathLike], model_name: str, fold: int,
               settings: dict[str, Any] | MILSettings, seed: int, encoder: str,
               out_checkpoint: str | os.PathLike, out_history: str | os.PathLike,
               out_predictions: str | os.PathLike, out_tile_scores: str | os.PathLike,
               threads: int = 1, target: dict[str, Any] | Target | None = None) -> pd.DataFrame:
    """Train ``model_name`` on fold ``fold`` and score every slide of the cohort with it.

    Writes the checkpoint, history.tsv, predictions.tsv (all slides, with their role in this
    fold) and tile_scores.parquet (all tiles of all slides); returns the predictions.
    ``target``: a Target, or ``{"target": config target, "positive_label": ...}`` (None: binary;
    class names come from the labels of splits.tsv, the same in every job).
    """
    from tqdm.auto import tqdm

    from ..io import write_parquet, write_tsv
    from ..split import read_splits

    if not isinstance(settings, MILSettings):
        settings = MILSettings.from_config(settings)
    fold = int(fold)
    splits = read_splits(splits_tsv)
    if not isinstance(target, Target):
        target = Target.from_config(target or {"target": {"type": "classification"}, "positive_label": None},
                                    labels=splits["label"]) if target else None
    part = splits[splits["fold"] == fold].reset_index(drop=True)
    if part.empty:
        raise InputError(f"fold {fold} is not in {splits_tsv}; regenerate it with `snakemake split` (split.k changed?)")
    seed_everything(seed, threads)
    bags = load_bags(feature_paths, dtype="float16")
    missing = [s for s in part["slide_id"] if s not in bags]
    if missing:
        raise InputError(f"slide {missing[0]!r} is in {splits_tsv} but has no features file; re-run `snakemake split features`")
    feature_dim(bags)
    device = torch.device(resolve_device(settings.device, "mil.device"))

    task = target or BINARY
    check_model_target(model_name, task)
    y_mean, y_std = 0.0, 1.0
    if task.type == "regression":  # standardised on this fold's training slides only
        train_values = part.loc[part["role"] == "train", "y"].astype(float)
        y_mean, y_std = float(train_values.mean()), float(train_values.std(ddof=0)) or 1.0

    def select(role: str) -> tuple[list[np.ndarray], np.ndarray]:
        rows = part[part["role"] == role]
        if task.type == "survival":
            y = rows[["time", "event"]].to_numpy(dtype=float)
        elif task.type == "regression":
            y = (rows["y"].to_numpy(dtype=float) - y_mean) / y_std
        else:
            y = rows["y"].to_numpy()
        return [bags[s].features for s in rows["slide_id"]], y

    empty = [s for s in part["slide_id"] if not len(bags[s])]
    if empty:
        log.warning("%d slide(s) without tiles (skipped upstream) are left out of training: %s", len(empty), ", ".join(empty[:10]))
    train_x, train_y = select("train")
    val_x, val_y = select("val")
    log.info("fold %d %s: %d train / %d val bags, device %s", fold, model_name, len(train_x), len(val_x), device)
    result = fit(model_name, train_x, train_y, val_x, val_y, settings, fold_seed(seed, fold), device, target=task)
    log.info("best epoch %d of %d", result.best_epoch, len(result.history))

    all_bags = [bags[s].features for s in part["slide_id"]]
    predictions = part[["slide_id", "patient_id", "label", "y"]].copy()
    if task.binary:
        predictions["prob"] = predict_proba(result.model, all_bags, device)
    else:
        out = predict_logits(result.model, all_bags, device)
        if task.multiclass:
            prob = softmax(out)
            predictions["pred"] = np.where(np.isnan(prob).any(1), -1, np.nan_to_num(prob).argmax(1))
            for k, name in enumerate(task.classes):
                predictions[f"prob_{name}"] = prob[:, k]
        elif task.type == "survival":
            predictions["time"], predictions["event"] = part["time"].to_numpy(float), part["event"].to_numpy(int)
            predictions["risk"] = out
        else:
            predictions["value"] = out * y_std + y_mean
    predictions["fold"] = fold
    predictions["role"] = part["role"]
    predictions["n_tiles"] = [len(bags[s]) for s in part["slide_id"]]
    predictions = predictions[prediction_columns(task)]

    frames = []
    for slide_id, role in tqdm(list(zip(part["slide_id"], part["role"])), desc="tile scores", unit="slide"):
        bag = bags[slide_id]
        att, inst = tile_scores(result.model, bag.features, device)
        frame = pd.DataFrame({c: bag.coords[c].to_numpy() for c in ("slide_id", "x", "y", "col", "row", "size0", "target_mpp")})
        frame["slide_id"] = slide_id
        frame["fold"], frame["role"] = fold, role
        if inst.ndim == 2:
            # multi-class: one tile score per class; instance_prob is the largest (heatmaps of
            # "evidence of any class"), the per-class maps are instance_prob_<k> (k: class index)
            for k in range(inst.shape[1]):
                frame[f"instance_prob_{k}"] = inst[:, k].astype("float32")
            inst = inst.max(1) if len(inst) else np.zeros(0)
        frame["attention"], frame["instance_prob"] = att, inst
        frames.append(frame)
    extra_cols = [f"instance_prob_{k}" for k in range(task.n_out)] if task.multiclass else []
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TILE_SCORE_COLUMNS) + extra_cols)
    scores = scores.astype({"slide_id": str, "x": "int64", "y": "int64", "col": "int32", "row": "int32", "size0": "int32",
                            "target_mpp": "float64", "fold": "int32", "role": str, "attention": "float32",
                            "instance_prob": "float32", **{c: "float32" for c in extra_cols}})[list(TILE_SCORE_COLUMNS) + extra_cols]

    test = predictions[predictions["role"] == "test"]
    if task.binary:
        test_score = roc_auc(test["y"].to_numpy(), test["prob"].to_numpy())
        extra = {"test_auc": test_score}
    else:
        from ..metrics import primary_score
        test_score = primary_score(task, test)
        extra = {f"test_{task.primary_metric}": test_score, "n_out": task.n_out, "target": task.describe(),
                 "y_mean": y_mean, "y_std": y_std}
    log.info("fold %d %s: test %s %.3f", fold, model_name, task.primary_metric, test_score)
    save_checkpoint(out_checkpoint, result, model_name, settings,
                    {"fold": fold, "seed": int(seed), "encoder": encoder, **extra})
    write_tsv(out_history, result.history)
    write_tsv(out_predictions, predictions)
    meta = {"histoflow.model": model_name, "histoflow.fold": str(fold), "histoflow.encoder": encoder}
    if not task.binary:
        meta["histoflow.target"] = task.kind
        if task.multiclass:
            meta["histoflow.classes"] = "\t".join(task.classes)
    write_parquet(out_tile_scores, scores, metadata=meta)
    return predictions


def prediction_columns(target: Target | None = None) -> list[str]:
    """predictions.tsv columns of a task (binary: PREDICTION_COLUMNS, as before)."""
    target = target or BINARY
    if target.binary:
        return list(PREDICTION_COLUMNS)
    head = ["slide_id", "patient_id", "label", "y"]
    if target.multiclass:
        head += ["pred"] + target.score_columns
    elif target.type == "survival":
        head += ["time", "event", "risk"]
    else:
        head += ["value"]
    return head + ["fold", "role", "n_tiles"]


def plot_curves(histories: dict[int, pd.DataFrame], title: str, out_png: str | os.PathLike) -> None:
    """Loss (train solid, validation dashed) and validation AUC per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    # the 4th history column is the validation metric (val_auc, val_auc_macro, val_c_index, val_r2)
    metric = next(iter(histories.values())).columns[3] if histories else "val_auc"
    colours = plt.get_cmap("tab10")
    for i, (fold, hist) in enumerate(sorted(histories.items())):
        c = colours(i % 10)
        ax_loss.plot(hist["epoch"], hist["train_loss"], color=c, label=f"fold {fold} train")
        ax_loss.plot(hist["epoch"], hist["val_loss"], color=c, linestyle="--", label=f"fold {fold} val")
        ax_auc.plot(hist["epoch"], hist[metric], color=c, label=f"fold {fold}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    word = "AUC" if metric == "val_auc" else metric[len("val_"):]
    ax_auc.set(xlabel="epoch", ylabel=f"validation {word}", ylim=(0, 1.02) if metric != "val_r2" else None,
               title=f"{title}: validation {word}")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_auc.legend(fontsize=7)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def collect_model(model_name: str, prediction_paths: Sequence[str | os.PathLike], history_paths: Sequence[str | os.PathLike],
                  out_predictions: str | os.PathLike, out_curves: str | os.PathLike,
                  out_summary: str | os.PathLike) -> pd.DataFrame:
    """Out-of-fold predictions (test rows of every fold), training curves and AUC summary of one model."""
    from ..io import write_json, write_tsv

    preds = pd.concat([pd.read_csv(p, sep="\t", dtype={"slide_id": str, "patient_id": str, "label": str})
                       for p in prediction_paths], ignore_index=True)
    oof = preds[preds["role"] == "test"].sort_values(["fold", "slide_id"]).reset_index(drop=True)
    # history paths come in fold order (the rule expands fold=0..K-1)
    histories = {i: pd.read_csv(p, sep="\t") for i, p in enumerate(history_paths)}
    if "prob" not in oof.columns:  # multi-class, survival, regression: the task's own score
        from ..metrics import primary_score, target_of_predictions

        task = target_of_predictions(oof)
        name = task.primary_metric
        per_fold = {str(f): primary_score(task, g) for f, g in oof.groupby("fold")}
        summary = {"model": model_name, "target": task.kind, "n_folds": len(prediction_paths), "n_test_rows": int(len(oof)),
                   "n_test_slides": int(oof["slide_id"].nunique()), f"{name}_pooled": primary_score(task, oof),
                   f"{name}_per_fold": per_fold,
                   f"{name}_fold_mean": float(np.nanmean(list(per_fold.values()))) if per_fold else float("nan"),
                   "epochs_run": {str(f): int(len(h)) for f, h in histories.items()}}
        write_tsv(out_predictions, oof)
        plot_curves(histories, model_name, out_curves)
        write_json(out_summary, summary)
        log.info("%s: out-of-fold %s %.3f over %d test slides", model_name, name, summary[f"{name}_pooled"],
                 summary["n_test_slides"])
        return oof
    per_fold = {str(f): roc_auc(g["y"].to_numpy(), g["prob"].to_numpy()) for f, g in oof.groupby("fold")}
    # holdout: every fold scores the same test slides; the ensemble is their mean probability
    mean_prob = oof.groupby(["slide_id", "y"], as_index=False)["prob"].mean()
    summary = {
        "model": model_name,
        "n_folds": len(prediction_paths),
        "n_test_rows": int(len(oof)),
        "n_test_slides": int(oof["slide_id"].nunique()),
        "auc_pooled": roc_auc(oof["y"].to_numpy(), oof["prob"].to_numpy()),
        "auc_per_fold": per_fold,
        "auc_fold_mean": float(np.nanmean(list(per_fold.values()))) if per_fold else float("nan"),
        "auc_mean_prob": roc_auc(mean_prob["y"].to_numpy(), mean_prob["prob"].to_numpy()),
        "epochs_run": {str(f): int(len(h)) for f, h in histories.items()},
    }
    write_tsv(out_predictions, oof)
    plot_curves(histories, model_name, out_curves)
    write_json(out_summary, summary)
    log.info("%s: out-of-fold AUC %.3f over %d test slides", model_name, summary["auc_pooled"], summary["n_test_slides"])
    return oof
