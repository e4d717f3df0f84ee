"""Self-supervised pretraining of a small tile encoder on the cohort's own tiles (SimCLR).

Why: the workflow must run end to end offline, with no pretrained weights at all, and a
cohort-specific encoder is a useful baseline against ImageNet / foundation-model features.
The encoder is a compact ResNet (``resnet-tiny`` / ``resnet-small``; ``resnet18`` for GPUs)
trained on tiles downscaled to ``image_px`` with the NT-Xent loss (Chen et al. 2020).

Views: random resized crop, flips and 90-degree rotations (one affine ``grid_sample`` per batch),
HED stain jitter (Tellez et al. 2018; the same transform as :func:`histoflow.stain.hed_jitter`,
batched in torch), brightness/contrast/saturation jitter, random greyscale and Gaussian blur.
Colour is a nuisance in H&E (stain and scanner vary), so the views push the encoder towards
texture and morphology: nuclear density, size and shape.

Everything is seeded (numpy, torch, tile sampling, augmentations): the same config and seed give
bit-identical checkpoints on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .wsi.levels import same_mpp_mask

from .config import defaults_from_schema
from .errors import InputError
from .io import atomic_path, read_json, write_tsv
from .logs import get_logger

log = get_logger(__name__)

CHECKPOINT_FORMAT = "histoflow-ssl/1"
# Compact ResNets (BasicBlocks): channel widths and blocks per stage.
ARCHS: dict[str, dict[str, Any]] = {
    "resnet-tiny": {"widths": (16, 32, 64, 128), "blocks": (1, 1, 1, 1)},
    "resnet-small": {"widths": (32, 64, 128, 256), "blocks": (1, 1, 1, 1)},
    "resnet18": {"torchvision": "resnet18"},
}


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
@defaults_from_schema("ssl")
class SSLSettings:
    arch: str
    method: str
    epochs: int
    batch_size: int
    max_tiles: int
    image_px: int
    mpp: float | None  # tiles at this target_mpp; None = features.mpp
    crop_px: int | None  # training views: crops of this side at the tile's resolution; None = image_px
    lr: float
    weight_decay: float
    temperature: float
    proj_dim: int
    crop_scale_min: float
    hed_sigma: float = 0.05           # config null = stain.augment.hed_jitter (one stain-jitter knob)
    seed: int | None  # None = the workflow's global seed
    device: str
    fit_on: str  # all | train_only (histoflow.split.slides_to_fit)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, stain_hed_jitter: float | None = None,
                    **overrides: Any) -> "SSLSettings":
        """Settings from the ``ssl:`` config section; unknown keys (threads, gpu: rule-level) ignored.
        ``hed_sigma: null`` takes ``stain_hed_jitter`` (config ``stain.augment.hed_jitter``)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(section or {}).items() if k in known}
        if values.get("hed_sigma") is None:
            values.pop("hed_sigma", None)
            if stain_hed_jitter is not None:
                values["hed_sigma"] = float(stain_hed_jitter)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"config key 'ssl.arch': {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.method != "simclr":
            raise InputError(f"config key 'ssl.method': {self.method!r} is not supported (use simclr)")
        if self.image_px < 32:
            raise InputError(f"config key 'ssl.image_px': {self.image_px} is too small (use >= 32)")
        if self.crop_px is not None and not 32 <= self.crop_px <= self.image_px:
            raise InputError(f"config key 'ssl.crop_px': {self.crop_px} must be between 32 and ssl.image_px "
                             f"({self.image_px}), or null (views of the whole tile)")
        if self.batch_size < 2:
            raise InputError("config key 'ssl.batch_size': needs at least 2 (contrastive pairs)")
        if self.fit_on not in ("all", "train_only"):
            raise InputError(f"config key 'ssl.fit_on': {self.fit_on!r} is not one of all, train_only")


def checkpoint_path(outdir: str | os.PathLike, arch: str) -> Path:
    """Where the ``ssl_pretrain`` rule writes ``ssl:<arch>`` (what ``load_encoder`` is given)."""
    return Path(outdir) / "ssl" / arch / "encoder.pt"


# ---------------------------------------------------------------------------------------------
# Architectures


def build_backbone(arch: str, **kwargs: Any):
    """An untrained backbone mapping ``N x 3 x S x S`` to ``N x dim`` (global average pooling)."""
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    if arch not in ARCHS:
        raise InputError(f"ssl arch {arch!r} is not one of {', '.join(ARCHS)} (ssl:<arch> in features.encoders)")
    spec = {**ARCHS[arch], **kwargs}
    if "torchvision" in spec:
        from torchvision import models

        net = getattr(models, spec["torchvision"])(weights=None)
        net.fc = nn.Identity()
        return net

    widths, blocks = tuple(spec["widths"]), tuple(spec["blocks"])
    # Stem: one stride-2 3x3 conv (small inputs: no 7x7 + max-pool as in ImageNet ResNets).
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    in_ch = widths[0]
    for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or in_ch != width:
            down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
        layers.append(BasicBlock(in_ch, width, stride=stride, downsample=down))
        layers.extend(BasicBlock(width, width) for _ in range(n_blocks - 1))
        in_ch = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.dim = in_ch  # type: ignore[attr-defined]
    del torch
    return net


def backbone_dim(net, image_px: int = 64) -> int:
    import torch

    with torch.no_grad():
        was = net.training
        net.eval()
        dim = int(net(torch.zeros(1, 3, image_px, image_px)).shape[1])
        net.train(was)
    return dim


# ---------------------------------------------------------------------------------------------
# Augmentations (batched torch: one call per batch, on the training device)


def _hed_matrices(device, dtype):
    import torch
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    return (torch.as_tensor(hed_from_rgb, device=device, dtype=dtype),
            torch.as_tensor(rgb_from_hed, device=device, dtype=dtype))


def hed_jitter_batch(x, a, b):
    """HED stain jitter of ``x`` (N x 3 x H x W in [0, 1]): each HED channel c -> c * a + b with
    per-image ``a``, ``b`` (N x 3), ``b`` in optical-density units. The same transform as
    :func:`histoflow.stain.hed_jitter` (scikit-image's Ruifrok-Johnston deconvolution, whose HED
    values are OD / ln(1e6): the shift is rescaled, else 0.05 would add 0.7 OD)."""
    import torch

    hed_from_rgb, rgb_from_hed = _hed_matrices(x.device, x.dtype)
    log_adjust = math.log(1e-6)
    rgb = x.clamp(min=1e-6).permute(0, 2, 3, 1)                      # N H W 3
    hed = ((torch.log(rgb) / log_adjust) @ hed_from_rgb).clamp(min=0)
    hed = hed * a[:, None, None, :] + b[:, None, None, :] / -log_adjust
    out = torch.exp(-(hed * -log_adjust) @ rgb_from_hed).clamp(0, 1)
    return out.permute(0, 3, 1, 2).contiguous()


def _geometry(n: int, gen, scale_min: float, device, window: float = 1.0):
    """Affine matrices (N x 2 x 3) for a random resized crop + flip + 90-degree rotation.
    ``window`` < 1: the crop is that fraction of the tile's side before the random scale (a
    crop at the tile's own resolution when the output is ``window`` times the input's side)."""
    import torch

    area = torch.empty(n).uniform_(scale_min, 1.0, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_r)
    w = (torch.sqrt(area * ratio) * window).clamp(max=1.0)
    h = (torch.sqrt(area / ratio) * window).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    angle = k.float() * (math.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
    # in = centre + diag(w, h) @ R @ diag(flip, 1) @ out  (normalised [-1, 1] coordinates)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * cos * flip
    theta[:, 0, 1] = -w * sin
    theta[:, 1, 0] = h * sin * flip
    theta[:, 1, 1] = h * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta.to(device)


def _blur(x, sigma):
    """Per-image Gaussian blur (sigma: N; 0 = none) as one grouped separable convolution."""
    import torch
    import torch.nn.functional as F

    n, c, hgt, wid = x.shape
    radius = 3
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    k = torch.where((sigma.to(x.device) > 0)[:, None], k, (t[None, :] == 0).to(x.dtype))
    k = k.repeat_interleave(c, dim=0)                                 # (N*C) x K
    flat = x.reshape(1, n * c, hgt, wid)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, hgt, wid)


def augment(x, gen, settings: SSLSettings):
    """One random view of a batch ``x`` (N x 3 x H x W float in [0, 1]): H x W out, or
    ``settings.crop_px`` square crops at the input's resolution (random scale as usual)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    dev = x.device
    out_px = settings.crop_px or x.shape[-1]
    theta = _geometry(n, gen, settings.crop_scale_min, dev, window=out_px / x.shape[-1])
    grid = F.affine_grid(theta, [n, x.shape[1], out_px, out_px], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    sig = settings.hed_sigma
    a = torch.empty(n, 3).uniform_(1 - sig, 1 + sig, generator=gen).to(dev)
    b = torch.empty(n, 3).uniform_(-sig, sig, generator=gen).to(dev)
    x = hed_jitter_batch(x, a, b)

    apply = (torch.rand(n, generator=gen) < 0.8).float()
    bright = 1 + apply * torch.empty(n).uniform_(-0.3, 0.3, generator=gen)
    contrast = 1 + apply * torch.empty(n).uniform_(-0.3, 0.3, generator=gen)
    satur = 1 + apply * torch.empty(n).uniform_(-0.3, 0.3, generator=gen)
    grey_p = (torch.rand(n, generator=gen) < 0.2).to(dev)
    sigma = torch.where(torch.rand(n, generator=gen) < 0.5, torch.empty(n).uniform_(0.1, 1.5, generator=gen),
                        torch.zeros(n))
    weights = torch.tensor([0.299, 0.587, 0.114], device=dev)[None, :, None, None]
    x = x * bright.to(dev)[:, None, None, None]
    grey = (x * weights).sum(1, keepdim=True)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast.to(dev)[:, None, None, None] + mean
    grey = (x * weights).sum(1, keepdim=True)
    x = grey + (x - grey) * satur.to(dev)[:, None, None, None]
    x = torch.where(grey_p[:, None, None, None], grey.expand_as(x), x)
    x = _blur(x.clamp(0, 1), sigma)
    return x


# ---------------------------------------------------------------------------------------------
# Training (pure: arrays in, model + history out)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalised-temperature cross-entropy over the 2N views of a batch."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch and force deterministic kernels for the block, then restore."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def channel_stats(tiles: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 tiles (N x H x W x 3) in [0, 1], computed in chunks."""
    total = np.zeros(3)
    sq = np.zeros(3)
    count = 0
    for start in range(0, len(tiles), 256):
        chunk = tiles[start:start + 256].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        sq += (chunk ** 2).sum(axis=(0, 1, 2))
        count += chunk.shape[0] * chunk.shape[1] * chunk.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-6))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def pretrain(tiles: np.ndarray, settings: SSLSettings, seed: int, *, device: str | None = None,
             progress: bool = True):
    """Train ``settings.arch`` with SimCLR on ``tiles`` (N x S x S x 3 uint8, S = ``image_px``;
    views of ``crop_px`` when set: the encoder is fully convolutional, so features are still
    taken on the whole S-px tile).

    Returns ``(backbone in eval mode on CPU, history DataFrame, (mean, std))``. History columns:
    ``epoch, loss, lr, pos_cosine`` (mean cosine of the two views' embeddings), ``feature_std``
    (std of L2-normalised backbone features x sqrt(dim): ~1 healthy, -> 0 collapse),
    ``seconds, tiles_per_s``.
    """
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from torch import nn
    from tqdm import tqdm

    from .devices import resolve_device

    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be N x S x S x 3 uint8, got {tiles.shape} {tiles.dtype}")
    n = len(tiles)
    if n < 2:
        raise InputError(f"ssl_pretrain has {n} tile(s) to learn from; it needs at least 2 "
                         "(check tiling.min_tissue_fraction, ssl.mpp and that slides were not all skipped)")
    dev = resolve_device(device or settings.device)
    mean, std = channel_stats(tiles)
    batch = min(settings.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total_steps = steps_per_epoch * settings.epochs
    with deterministic(seed):
        gen = torch.Generator().manual_seed(seed)
        backbone = build_backbone(settings.arch)
        dim = backbone_dim(backbone, settings.image_px)
        head = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                             nn.Linear(dim, settings.proj_dim))
        backbone.to(dev).train()
        head.to(dev).train()
        params = list(backbone.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = max(1, min(steps_per_epoch, total_steps // 10))

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay
            if step < warmup:
                return settings.lr * (step + 1) / warmup
            progress_ = (step - warmup) / max(1, total_steps - warmup)
            return settings.lr * 0.5 * (1 + math.cos(math.pi * progress_))

        data = torch.from_numpy(tiles)  # uint8 N H W 3, converted per batch to bound memory
        m_t = torch.tensor(mean, device=dev)[None, :, None, None]
        s_t = torch.tensor(std, device=dev)[None, :, None, None]
        rows = []
        step = 0
        bar = tqdm(total=total_steps, desc=f"ssl {settings.arch}", disable=not progress, mininterval=5)
        for epoch in range(1, settings.epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen)
            losses, pos, fstd = [], [], []
            for i in range(steps_per_epoch):
                idx = order[i * batch:(i + 1) * batch]
                x = data[idx].to(dev).permute(0, 3, 1, 2).float().div_(255.0)
                v1 = (augment(x, gen, settings) - m_t) / s_t
                v2 = (augment(x, gen, settings) - m_t) / s_t
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                f1, f2 = backbone(v1), backbone(v2)
                loss = nt_xent(head(f1), head(f2), settings.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    pos.append(F.cosine_similarity(f1, f2).mean().item())
                    fstd.append((F.normalize(f1, dim=1).std(dim=0).mean() * math.sqrt(dim)).item())
                losses.append(loss.item())
                step += 1
                bar.update(1)
            secs = time.perf_counter() - t0
            rows.append({"epoch": epoch, "loss": float(np.mean(losses)), "lr": lr_at(step - 1),
                         "pos_cosine": float(np.mean(pos)), "feature_std": float(np.mean(fstd)),
                         "seconds": secs, "tiles_per_s": steps_per_epoch * batch / max(secs, 1e-9)})
            log.info("epoch %d/%d loss %.4f pos_cos %.3f feat_std %.3f (%.1fs)", epoch, settings.epochs,
                     rows[-1]["loss"], rows[-1]["pos_cosine"], rows[-1]["feature_std"], secs)
        bar.close()
    backbone.cpu().eval()
    return backbone, pd.DataFrame(rows), (mean, std)


def embed(backbone, tiles: np.ndarray, mean, std, batch_size: int = 256):
    """Features of uint8 tiles (N x S x S x 3) with a trained backbone (for probes and tests)."""
    import torch

    m_t = torch.tensor(mean)[None, :, None, None]
    s_t = torch.tensor(std)[None, :, None, None]
    out = []
    backbone.eval()
    with torch.inference_mode():
        for start in range(0, len(tiles), batch_size):
            x = torch.from_numpy(tiles[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
            out.append(backbone((x - m_t) / s_t))
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# Choosing and reading tiles (I/O edge)


def choose_tiles(tables: Sequence[Any], max_tiles: int, mpp: float, seed: int):
    """Up to ``max_tiles`` tiles at ``mpp``, shared as evenly as possible between slides (a
    slide with few tiles gives its unused share to the others), sampled with ``seed``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    pools = []
    for table in tables:
        if table is None or len(table) == 0:
            continue
        sel = table[same_mpp_mask(table["target_mpp"].astype(float), mpp)]
        if len(sel):
            pools.append(sel.reset_index(drop=True))
    pools.sort(key=lambda t: (len(t), str(t["slide_id"].iloc[0])))
    chosen = []
    remaining = int(max_tiles)
    for i, pool in enumerate(pools):
        share = remaining // (len(pools) - i)
        take = min(len(pool), share)
        idx = np.sort(rng.choice(len(pool), size=take, replace=False)) if take < len(pool) else np.arange(len(pool))
        chosen.append(pool.iloc[idx])
        remaining -= take
    if not chosen:
        return pd.DataFrame()
    return pd.concat(chosen, ignore_index=True).sort_values(["slide_id", "y", "x"], kind="stable").reset_index(drop=True)


def read_training_tiles(chosen, slide_paths: Mapping[str, str], image_px: int, progress: bool = True,
                        colour_fixes: Mapping[str, str | None] | None = None) -> np.ndarray:
    """Read the chosen tiles (:meth:`histoflow.wsi.SlideReader.read_tile`) downscaled to ``image_px``: memory is
    ``n x image_px^2 x 3`` bytes, never a whole slide."""
    from PIL import Image
    from tqdm import tqdm

    from .wsi import open_slide

    out = np.zeros((len(chosen), image_px, image_px, 3), dtype=np.uint8)
    bar = tqdm(total=len(chosen), desc="ssl tiles", disable=not progress, mininterval=5)
    pos = 0
    for slide_id, group in chosen.groupby("slide_id", sort=True):
        slide = open_slide(slide_paths[slide_id], slide_id, (colour_fixes or {}).get(slide_id))
        try:
            for row in group.to_dict("records"):
                rgb = slide.read_tile(row)
                if rgb.shape[0] != image_px:
                    rgb = np.asarray(Image.fromarray(rgb).resize((image_px, image_px), Image.Resampling.BOX))
                out[pos] = rgb
                pos += 1
                bar.update(1)
        finally:
            slide.close()
    bar.close()
    return out


def save_encoder(path: str | os.PathLike, backbone, settings: SSLSettings, mean, std, seed: int,
                 extra: Mapping[str, Any] | None = None) -> None:
    """The checkpoint ``load_encoder('ssl:<arch>', ssl_checkpoint=path)`` reads (weights_only-safe:
    tensors, numbers, strings, lists and dicts only)."""
    import torch

    obj = {"format": CHECKPOINT_FORMAT, "arch": settings.arch, "arch_kwargs": {},
           "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
           "input_size": int(settings.image_px), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
           "method": settings.method, "epochs": int(settings.epochs), "seed": int(seed),
           "settings": {f.name: getattr(settings, f.name) for f in fields(settings)}}
    obj.update(dict(extra or {}))
    with atomic_path(path) as tmp:
        # through a handle: saved to a path, torch names the archive's records after the (random)
        # temporary file name, and reruns would not be byte-identical
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)


def plot_curve(history, path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(history["epoch"], history["loss"], marker="o")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("NT-Xent loss")
    ax[0].set_title(title)
    ax[1].plot(history["epoch"], history["pos_cosine"], marker="o", label="positive-pair cosine")
    ax[1].plot(history["epoch"], history["feature_std"], marker="s", label="feature spread (collapse -> 0)")
    ax[1].set_xlabel("epoch")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def run_ssl_pretrain(slide_jsons: Sequence[str], tiles_paths: Sequence[str], checkpoint: str, curve_tsv: str,
                     curve_png: str, settings: Mapping[str, Any], arch: str, seed: int,
                     default_mpp: float, threads: int = 1, splits_tsv: str | None = None,
                     stain_hed_jitter: float | None = None) -> dict[str, Any]:
    """The ``ssl_pretrain`` rule: choose tiles across the cohort, read them, train, write the
    checkpoint, the training curve (TSV + PNG). Skipped slides contribute no tiles.

    ``ssl.fit_on: all`` trains on every slide, test slides included (no label is read: the usual
    transductive protocol of self-supervised pretraining, stated in the checklist); ``train_only``
    only on the slides that are train-role in every fold of ``splits_tsv``."""
    import torch

    from .split import slides_to_fit
    from .tiling import read_tiles_table

    cfg = SSLSettings.from_config(settings, stain_hed_jitter=stain_hed_jitter, arch=arch)
    allowed = slides_to_fit(cfg.fit_on, splits_tsv, "ssl.fit_on")
    seed = int(cfg.seed if cfg.seed is not None else seed)
    mpp = float(cfg.mpp if cfg.mpp is not None else default_mpp)
    torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    tiles_by_id = {Path(tp).name[:-len(".parquet")]: tp for tp in tiles_paths}
    paths, fixes, tables = {}, {}, []
    for sj in sorted(slide_jsons):
        info = read_json(sj)
        if info.get("status") != "ok" or info["slide_id"] not in tiles_by_id:
            log.info("%s: skipped slide, no tiles for ssl", info.get("slide_id"))
            continue
        if allowed is not None and info["slide_id"] not in allowed:
            continue   # ssl.fit_on: train_only: a validation/test slide is never seen
        paths[info["slide_id"]] = info["path"]
        fixes[info["slide_id"]] = info.get("colour_fix")
        tables.append(read_tiles_table(tiles_by_id[info["slide_id"]]))
    chosen = choose_tiles(tables, cfg.max_tiles, mpp, seed)
    if len(chosen) < 2:
        available = sorted({float(m) for t in tables for m in t["target_mpp"].unique()}) if tables else []
        raise InputError(f"ssl_pretrain found {len(chosen)} tile(s) at {mpp} µm/px (tiles exist at {available}); "
                         "set ssl.mpp (or features.mpp) to one of tiling.mpp")
    log.info("ssl: %d tiles from %d slides at %g µm/px, %s px, views %s px (fit_on: %s)", len(chosen),
             chosen["slide_id"].nunique(), mpp, cfg.image_px, cfg.crop_px or cfg.image_px, cfg.fit_on)
    tiles = read_training_tiles(chosen, paths, cfg.image_px, colour_fixes=fixes)
    t_read = time.perf_counter() - t0
    backbone, history, (mean, std) = pretrain(tiles, cfg, seed)
    history["read_seconds"] = t_read
    # what the encoder saw, for the checklist (items 3 and 6) without loading the checkpoint
    history["fit_on"] = cfg.fit_on
    history["n_fit_slides"] = int(chosen["slide_id"].nunique())
    history["hed_sigma"] = float(cfg.hed_sigma)
    save_encoder(checkpoint, backbone, cfg, mean, std, seed,
                 extra={"n_tiles": int(len(chosen)), "n_slides": int(chosen["slide_id"].nunique()), "tile_mpp": mpp,
                        "fit_on": cfg.fit_on})
    write_tsv(curve_tsv, history)
    plot_curve(history, curve_png, f"SimCLR ssl:{cfg.arch} ({len(chosen)} tiles)")
    total = time.perf_counter() - t0
    log.info("ssl: done in %.1fs (reading %.1fs), final loss %.4f", total, t_read, history["loss"].iloc[-1])
    return {"n_tiles": len(chosen), "seconds": total, "final_loss": float(history["loss"].iloc[-1])}
