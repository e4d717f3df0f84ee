"""Batched tile feature extraction: tiles table -> one Parquet of encoder features per slide.

Reading hides behind compute: a torch DataLoader whose workers share one slide reader
(:func:`histoflow.wsi.open_slide`, made in the parent; each worker reopens its own file
handles) read tiles (sorted by position, for the tile caches), resize, stain-normalise, and hand uint8
tensors (4x less inter-process traffic than float) to the main process, which normalises the
batch and runs the encoder under ``torch.inference_mode`` (pinned memory, channels_last and
autocast on GPU). Optional test-time augmentation averages the 8 flips/90° rotations.

Output schema (``features/{encoder_slug}/{slide_id}.parquet``): the tile coordinate columns
``slide_id, x, y, target_mpp, tile_px, size0, col, row`` and ``feature`` (fixed-size list of
float16/float32, length = encoder dim); schema metadata ``histoflow.*`` (see FEATURE_METADATA).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd

from .devices import resolve_device
from .config import defaults_from_schema
from .errors import InputError, SlideError
from .tiles_table import load_tiles  # noqa: F401 - the features step's tiles (and stain's)
from .wsi import open_slide, same_mpp

log = logging.getLogger("histoflow.features")

COORD_COLUMNS = ("slide_id", "x", "y", "target_mpp", "tile_px", "size0", "col", "row")
COORD_TYPES = {"slide_id": "string", "x": "int64", "y": "int64", "target_mpp": "float64",
               "tile_px": "int32", "size0": "int32", "col": "int32", "row": "int32"}
FEATURE_METADATA = ("histoflow.encoder", "histoflow.dim", "histoflow.dtype", "histoflow.input_size",
                    "histoflow.stain_method", "histoflow.tta", "histoflow.mpp", "histoflow.n_tiles",
                    "histoflow.dropped_tiles", "histoflow.dropped_decode", "histoflow.dropped_nonfinite",
                    "histoflow.encoder_weights", "histoflow.status", "histoflow.reason",
                    "histoflow.max_failed_tile_fraction", "histoflow.slide_id", "histoflow.autocast")


class EncoderLike(Protocol):
    """What ``histoflow.encoders.LoadedEncoder`` provides."""

    model: Any
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    name: str


@dataclass(frozen=True)
@defaults_from_schema("features")
class FeatureSettings:
    """Config section ``features``."""

    encoders: tuple[str, ...]
    mpp: float
    batch_size: int
    num_workers: int
    dtype: str
    tta: bool
    device: str
    gpu: int
    weights_dir: str | None
    allow_random_weights: bool
    trust_local_code: bool  # a local: TorchScript encoder is code: load it only when true
    max_failed_tile_fraction: float
    cpu_autocast: str  # none | bfloat16: opt-in, changes the features' numerics
    cpu_channels_last: bool  # CPU convolutions in channels_last (summation order changes)

    @classmethod
    def from_config(cls, section: dict | None, tiling_mpp: Sequence[float] | None = None) -> "FeatureSettings":
        section = dict(section or {})
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in section.items() if k in known}
        if "encoders" in kw:
            kw["encoders"] = tuple(kw["encoders"])
        settings = cls(**kw)
        if tiling_mpp is not None:
            check_feature_mpp(settings.mpp, tiling_mpp)
        if settings.cpu_autocast not in ("none", "bfloat16"):
            raise InputError(f"config key 'features.cpu_autocast': {settings.cpu_autocast!r} is not none or bfloat16")
        if settings.dtype not in ("float16", "float32"):
            raise InputError(f"config key 'features.dtype': {settings.dtype!r} is not float16 or float32")
        return settings


def check_feature_mpp(mpp: float, tiling_mpp: Sequence[float]) -> None:
    """features.mpp must be one of tiling.mpp (features are computed on existing tiles)."""
    if not any(same_mpp(mpp, m) for m in tiling_mpp):
        raise InputError(f"config key 'features.mpp': {mpp} µm/px is not tiled; add it to 'tiling.mpp' "
                         f"(now {list(tiling_mpp)}) or set features.mpp to one of them")


def plan_threads(threads: int, num_workers: int, device: str) -> tuple[int, int]:
    """(torch threads, reader worker processes) of a features job granted ``threads`` cores.

    The rule asks ``features.num_workers + 1`` threads; the job uses exactly what it is given
    (torch threads + reader processes = ``threads``), never more:

    * GPU: the model runs on the GPU and tiles are the work: up to ``num_workers`` readers,
      the rest (at least 1) for the main process.
    * CPU: the forward pass is the ceiling (reading is ~2-5 % of it), so readers get one core
      per 8 (at most ``num_workers``) and torch the rest; with fewer than 8 cores tiles are read
      in the main process between batches (``num_workers`` 0), all cores run the model.
    """
    threads = max(1, int(threads))
    wanted = max(0, int(num_workers))
    if str(device).startswith("cuda"):
        workers = min(wanted, threads - 1)
    else:
        workers = min(wanted, threads // 8)
    return threads - workers, workers


# --------------------------------------------------------------------------- tiles and reading


class TileDataset:
    """torch-style map dataset: index -> (uint8 tensor 3 x S x S, index, ok flag).

    Each tile is read as in the tiles table (``read_w x read_h`` at ``read_level`` -> ``tile_px``),
    then prepared for the encoder as timm does: resized to ``input_size / crop_pct`` with the
    encoder's interpolation, centre-cropped to ``input_size``, then stain-normalised.
    """

    def __init__(self, slide_path: str, slide_id: str, tiles: pd.DataFrame, input_size: int,
                 normalizer=None, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 colour_fix: str | None = None, record: dict | None = None):
        cols = ["x", "y", "read_level", "read_w", "read_h", "tile_px"]
        self.coords = tiles[cols].to_numpy(np.int64) if len(tiles) else np.zeros((0, 6), np.int64)
        self.input_size = int(input_size)
        self.resize_px = int(math.floor(input_size / crop_pct)) if crop_pct < 1 else self.input_size
        self.interpolation = interpolation
        self.normalizer = normalizer
        self.slide_id = slide_id
        # one reader, made here in the parent: the file is parsed and its levels checked once,
        # and every forked worker inherits that (it only reopens its file handles)
        self.reader = open_slide(slide_path, slide_id, colour_fix, record=record)
        if hasattr(self.reader, "prepare") and len(self.coords):
            self.reader.prepare(np.unique(self.coords[:, 2]))

    def __len__(self) -> int:
        return len(self.coords)

    def prepare(self, tile: np.ndarray) -> np.ndarray:
        """A tile (uint8 RGB, tile_px) -> uint8 H x W x 3 at the encoder's input size."""
        from PIL import Image

        if tile.shape[:2] == (self.resize_px, self.resize_px) and self.resize_px == self.input_size:
            img = None
        else:
            img = Image.fromarray(tile)

        if img is not None and img.size != (self.resize_px, self.resize_px):
            resample = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                        "lanczos": Image.LANCZOS}.get(self.interpolation, Image.BILINEAR)
            img = img.resize((self.resize_px, self.resize_px), resample)
        if img is not None and self.resize_px != self.input_size:
            off = (self.resize_px - self.input_size) // 2
            img = img.crop((off, off, off + self.input_size, off + self.input_size))
        arr = tile if img is None else np.asarray(img)
        if self.normalizer is not None and self.normalizer.method != "none":
            arr = self.normalizer.apply(arr)
        return arr

    def __getitem__(self, i: int):
        import torch

        x, y, level, w, h, tile_px = (int(v) for v in self.coords[i])
        row = {"x": x, "y": y, "read_level": level, "read_w": w, "read_h": h, "tile_px": tile_px}
        try:
            arr = self.prepare(self.reader.read_tile(row))
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), i, True
        except SlideError:
            raise  # the slide itself cannot be opened: not a per-tile problem
        except Exception as err:  # noqa: BLE001 - a corrupt tile is dropped and counted, not fatal
            log.warning("slide %r: tile at (%d, %d) level %d failed to decode: %s", self.slide_id,
                        x, y, level, err)
            self.reader.reset()
            return torch.zeros((3, self.input_size, self.input_size), dtype=torch.uint8), i, False


def _worker_init(worker_id: int) -> None:
    import torch

    # each worker owns its file handles (an OpenSlide handle is not fork/thread safe to share;
    # the parsed index is inherited) and one compute thread: the main process's threads do the
    # model's work
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    info.dataset.reader.reset()


def make_loader(dataset: TileDataset, batch_size: int, num_workers: int, pin_memory: bool = False):
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None)


# --------------------------------------------------------------------------- inference


def d4_views(batch):
    """The 8 flips/90° rotations of an N x C x H x W batch (the dihedral group D4)."""
    import torch

    views = []
    for k in range(4):
        rot = torch.rot90(batch, k, dims=(2, 3))
        views += [rot, torch.flip(rot, dims=(3,))]
    return views


def _to_model_input(batch_uint8, mean, std, device: str, channels_last: bool = False):
    """uint8 N x 3 x S x S (pinned on GPU runs) -> normalised float on ``device`` (copy queued,
    not awaited: the GPU converts while the host fetches the next batch)."""
    import torch

    x = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
    x = (x - mean) / std
    if channels_last or device.startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast_for(device: str, cpu_autocast: str = "none") -> str:
    """The forward pass's autocast dtype: float16 on CUDA; on CPU bfloat16 only when asked
    (features.cpu_autocast, numerics change), else none (float32)."""
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_autocast == "bfloat16" else "none"


def _forward(model, x, device: str, tta: bool, cpu_autocast: str = "none"):
    import torch

    mode = autocast_for(device, cpu_autocast)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float16
    with torch.autocast(kind, dtype=dtype, enabled=mode != "none"):
        if tta:
            out = torch.stack([model(v).float() for v in d4_views(x)]).mean(0)
        else:
            out = model(x).float()
    return out.reshape(out.shape[0], -1)


def embed_batch(model, batch_uint8, mean, std, device: str, tta: bool = False, cpu_autocast: str = "none"):
    """uint8 N x 3 x S x S -> float32 N x dim (on CPU), normalised with the encoder's mean/std."""
    return _forward(model, _to_model_input(batch_uint8, mean, std, device), device, tta, cpu_autocast).cpu()


class _Pending:
    """One batch in flight: its features copied back to (pinned) host memory asynchronously;
    ``result()`` waits for that copy only (on CPU everything is already done)."""

    def __init__(self, out, idx, good, device: str):
        import torch

        self.idx, self.good, self.event = idx, good, None
        if device.startswith("cuda"):
            self.out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.out.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.out = out

    def result(self):
        if self.event is not None:
            self.event.synchronize()
        return self.out.numpy(), self.idx.numpy(), self.good.numpy()


def extract_features(dataset: TileDataset, encoder: EncoderLike, batch_size: int = 64,
                     num_workers: int = 2, device: str = "cpu", tta: bool = False,
                     progress: bool = True, stats: dict | None = None,
                     cpu_autocast: str = "none", cpu_channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features of every tile of ``dataset``: (float32 [n, dim], ok bool [n]).

    Rows whose tile failed to decode are zeros with ok False. On a GPU one batch is always
    queued behind the one computing: while batch k runs, the host takes batch k+1 from the
    readers, queues its copy and forward, and only then waits for batch k's features, so the
    model never waits for the host. ``stats`` (a dict) receives where the time went:
    ``first_batch_s`` (call -> first batch ready), ``wait_s`` (waiting for tiles after that), ``model_s``
    (normalisation + forward + copy back), ``tiles``.
    """
    import torch
    from tqdm.auto import tqdm

    t_call = time.perf_counter()
    n = len(dataset)
    feats = np.zeros((n, encoder.dim), np.float32)
    ok = np.zeros(n, bool)
    timing = {"first_batch_s": 0.0, "wait_s": 0.0, "model_s": 0.0, "tiles": n}
    if n == 0:
        if stats is not None:
            stats.update(timing)
        return feats, ok
    model = encoder.model.eval().to(device)
    # channels_last: oneDNN's fast convolution layout on CPU (1.4x for resnet50-trunc here,
    # docs/benchmarks.md "cpu_modes"), and the tensor-core layout on GPU
    channels_last = device.startswith("cuda") or bool(cpu_channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(encoder.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.startswith("cuda"))

    def collect(pending: _Pending, bar) -> None:
        out, idx, good = pending.result()
        if out.shape[1] != encoder.dim:
            raise InputError(f"encoder {encoder.name!r} returned {out.shape[1]} features, declared dim "
                             f"{encoder.dim}; fix the encoder definition")
        feats[idx] = out
        ok[idx] = good
        bar.update(len(idx))

    pending: _Pending | None = None
    with torch.inference_mode(), tqdm(total=n, desc=f"{dataset.slide_id} {encoder.name}",
                                      unit="tile", disable=not progress, mininterval=5) as bar:
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            if batch is not None and not timing["first_batch_s"]:
                timing["first_batch_s"] = t1 - t_call     # start-up, not the feature phase
            else:
                timing["wait_s"] += t1 - t0
            if batch is None:
                break
            images, idx, good = batch
            x = _to_model_input(images, mean, std, device, channels_last)
            current = _Pending(_forward(model, x, device, tta, cpu_autocast), idx, good, device)
            if pending is not None:   # the previous batch's features: ready by now or soon
                collect(pending, bar)
            pending = current
            timing["model_s"] += time.perf_counter() - t1
        if pending is not None:
            t2 = time.perf_counter()
            collect(pending, bar)
            timing["model_s"] += time.perf_counter() - t2
    if stats is not None:
        stats.update(timing)
    return feats, ok


# --------------------------------------------------------------------------- tables


def feature_table(coords: pd.DataFrame, feats: np.ndarray, dtype: str = "float16"):
    """pyarrow Table: coordinate columns + ``feature`` fixed_size_list<dtype>[dim]."""
    import pyarrow as pa

    dim = int(feats.shape[1])
    arrays, fields = [], []
    for col in COORD_COLUMNS:
        typ = getattr(pa, COORD_TYPES[col])()
        values = coords[col].to_numpy() if col in coords and len(coords) else np.array([], dtype=object)
        arrays.append(pa.array(values, type=typ) if len(coords) else pa.array([], type=typ))
        fields.append(pa.field(col, typ))
    flat = np.ascontiguousarray(feats.astype(dtype, copy=False)).reshape(-1)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), dim))
    fields.append(pa.field("feature", pa.list_(value_type, dim)))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_features(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """(coordinate DataFrame, float32 ndarray [n, dim]) of a features Parquet.

    Vectorised: the list column's flat values become one array (no per-row Python)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    column = table.column("feature").combine_chunks()
    dim = int(column.type.list_size)
    flat = column.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    feats = flat.astype(np.float32, copy=False).reshape(-1, dim)
    coords = table.drop_columns(["feature"]).to_pandas()
    coords.attrs.update(meta)
    return coords, feats


def read_feature_metadata(path: str | os.PathLike) -> dict[str, str]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"histoflow.")}


# --------------------------------------------------------------------------- rule entry point


@functools.lru_cache(maxsize=1)
def _loaded_encoder(name: str, ssl_checkpoint: str | None, checkpoint_stamp: int | None, device: str,
                    weights_dir: str | None, allow_random_weights: bool, trust_local_code: bool = False):
    """The encoder, loaded once per process: a batch job (slides_per_job > 1) extracts many
    slides with one load. The caller seeds torch first, so random weights are the same either way;
    `checkpoint_stamp` (the checkpoint's mtime) makes a retrained SSL checkpoint load anew."""
    from .encoders import load_encoder

    return load_encoder(name, ssl_checkpoint=ssl_checkpoint, device=device, weights_dir=weights_dir,
                        allow_random_weights=allow_random_weights, trust_local_code=trust_local_code)


def extract_slide_features(slide_json: str, tiles_path: str, out_path: str, encoder_name: str,
                           settings: dict, tiling_mpp: Sequence[float], stain_json: str | None = None,
                           ssl_checkpoint: str | None = None, seed: int = 0, threads: int = 1,
                           encoder: EncoderLike | None = None, on_error: str = "fail") -> dict[str, str]:
    """Rule ``features``: features of one slide's tiles at ``features.mpp`` for one encoder.

    A skipped slide or one without tiles gives an empty table (full schema) and a warning.
    Tiles that fail to read (or give non-finite features) are dropped and counted; more than
    ``features.max_failed_tile_fraction`` of them fails the slide with one line (``on_error:
    fail``, nothing written) or gives an empty table whose metadata says skipped and why
    (``on_error: skip``).
    ``encoder`` may be passed in (tests, notebooks); otherwise it is loaded by name.
    Returns the schema metadata written.
    """
    import random

    import torch

    from .io import read_json, write_parquet
    from .stain import load_normalizer

    cfg = FeatureSettings.from_config(settings, tiling_mpp)
    device = resolve_device(cfg.device, "features.device")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch_threads, workers = plan_threads(threads, cfg.num_workers, device)
    torch.set_num_threads(torch_threads)
    meta_slide = read_json(slide_json)
    slide_id = meta_slide.get("slide_id", os.path.basename(tiles_path).rsplit(".", 1)[0])
    normalizer = load_normalizer(stain_json)
    if encoder is None:
        checkpoint_stamp = os.stat(ssl_checkpoint).st_mtime_ns if ssl_checkpoint else None
        encoder = _loaded_encoder(encoder_name, ssl_checkpoint, checkpoint_stamp, device, cfg.weights_dir,
                                  cfg.allow_random_weights, cfg.trust_local_code)
        # the same RNG state after a fresh or a cached load (a batch job reuses the encoder)
        torch.manual_seed(seed)
    tiles = load_tiles(tiles_path, cfg.mpp) if meta_slide.get("status") == "ok" else pd.DataFrame()
    t0 = time.perf_counter()
    timing: dict = {}
    if len(tiles) == 0:
        why = "skipped" if meta_slide.get("status") != "ok" else f"has no tiles at {cfg.mpp} µm/px"
        warnings.warn(f"slide {slide_id!r} {why}: writing an empty features table", stacklevel=2)
        log.warning("slide %r %s: writing an empty features table", slide_id, why)
        feats, ok = np.zeros((0, encoder.dim), np.float32), np.zeros(0, bool)
    else:
        dataset = TileDataset(meta_slide["path"], slide_id, tiles, encoder.input_size, normalizer,
                              getattr(encoder, "interpolation", "bilinear"), getattr(encoder, "crop_pct", 1.0),
                              colour_fix=meta_slide.get("colour_fix"), record=meta_slide)
        feats, ok = extract_features(dataset, encoder, cfg.batch_size, workers, device, cfg.tta, stats=timing,
                                     cpu_autocast=cfg.cpu_autocast, cpu_channels_last=cfg.cpu_channels_last)
    # cast first: float16 overflows to inf for |x| > 65504, which must be caught too
    with np.errstate(over="ignore", invalid="ignore"):
        out = feats.astype(cfg.dtype)
    finite = np.isfinite(out).all(axis=1)
    n_decode = int((~ok).sum())
    n_nonfinite = int((ok & ~finite).sum())
    keep = ok & finite
    if n_decode or n_nonfinite:
        log.warning("slide %r: dropped %d tile(s) that failed to decode and %d with non-finite features",
                    slide_id, n_decode, n_nonfinite)
    status, reason = ("ok", "") if meta_slide.get("status") == "ok" else ("skipped", "skipped upstream")
    n_failed = n_decode + n_nonfinite
    if len(tiles) and n_failed > cfg.max_failed_tile_fraction * len(tiles):
        err = SlideError(slide_id, f"{n_failed} of {len(tiles)} tiles failed ({n_decode} to read, {n_nonfinite} with "
                                   f"non-finite features), more than features.max_failed_tile_fraction "
                                   f"{cfg.max_failed_tile_fraction:g}; the file is corrupt: re-download it, or set "
                                   "on_error: skip")
        if on_error != "skip":
            raise err
        log.error("%s; skipped (on_error: skip)", err)
        status, reason, keep = "skipped", str(err), np.zeros(len(tiles), bool)
    table = feature_table(tiles.loc[keep] if len(tiles) else tiles, out[keep], cfg.dtype)
    metadata = {
        "histoflow.encoder": encoder_name, "histoflow.dim": str(encoder.dim), "histoflow.dtype": cfg.dtype,
        "histoflow.input_size": str(encoder.input_size), "histoflow.stain_method": normalizer.method,
        "histoflow.tta": str(bool(cfg.tta)).lower(), "histoflow.mpp": str(cfg.mpp),
        "histoflow.n_tiles": str(len(tiles)), "histoflow.dropped_tiles": str(n_decode + n_nonfinite),
        "histoflow.dropped_decode": str(n_decode), "histoflow.dropped_nonfinite": str(n_nonfinite),
        "histoflow.encoder_weights": str(getattr(encoder, "weights_source", "")),
        "histoflow.status": status, "histoflow.reason": reason,
        "histoflow.max_failed_tile_fraction": f"{cfg.max_failed_tile_fraction:g}",
        "histoflow.slide_id": str(slide_id),
        "histoflow.autocast": autocast_for(device, cfg.cpu_autocast),
    }
    write_parquet(out_path, table, metadata)
    elapsed = time.perf_counter() - t0
    log.info("slide %r: %d tiles -> %s features (%s, dim %d) in %.1f s (%.1f tiles/s) on %s", slide_id,
             int(keep.sum()), encoder_name, cfg.dtype, encoder.dim, elapsed, len(tiles) / max(elapsed, 1e-9), device)
    if timing.get("tiles"):
        # where the time went (benchmarks/peers.py reads this line): the feature phase is
        # first batch -> last features; waiting = the model idle for tiles
        phase = timing["wait_s"] + timing["model_s"]
        log.info("slide %r: feature phase %d tiles in %.2f s (%.2f tiles/s): model %.2f s, waiting for tiles "
                 "%.2f s, first batch after %.2f s; %d torch thread(s), %d reader(s)", slide_id, timing["tiles"],
                 phase, timing["tiles"] / max(phase, 1e-9), timing["model_s"], timing["wait_s"],
                 timing["first_batch_s"], torch_threads, workers)
    return metadata


FEATURES_QC_COLUMNS = ["slide_id", "encoder", "status", "reason", "n_tiles", "failed_tiles", "failed_decode",
                       "failed_nonfinite", "failed_fraction"]


def features_qc_rows(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per features file (slide x encoder): the tiles in, how many failed (to read, or
    with non-finite features), the fraction, and the slide's features status and reason."""
    rows = []
    for path in paths:
        meta = read_feature_metadata(path)
        n = int(meta.get("histoflow.n_tiles", 0) or 0)
        failed = int(meta.get("histoflow.dropped_tiles", 0) or 0)
        rows.append({"slide_id": meta.get("histoflow.slide_id") or os.path.basename(str(path))[: -len(".parquet")],
                     "encoder": meta.get("histoflow.encoder", ""), "status": meta.get("histoflow.status", "ok"),
                     "reason": meta.get("histoflow.reason", "").replace("\t", " ").replace("\n", " "),
                     "n_tiles": n, "failed_tiles": failed,
                     "failed_decode": int(meta.get("histoflow.dropped_decode", 0) or 0),
                     "failed_nonfinite": int(meta.get("histoflow.dropped_nonfinite", 0) or 0),
                     "failed_fraction": failed / n if n else 0.0})
    frame = pd.DataFrame(rows, columns=FEATURES_QC_COLUMNS)
    return frame.sort_values(["slide_id", "encoder"], kind="stable").reset_index(drop=True)


def write_features_qc(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> pd.DataFrame:
    """Rule ``features_qc``: qc/features.tsv, the failed-tile counts of every slide and encoder."""
    from .io import write_tsv

    frame = features_qc_rows(paths)
    write_tsv(out_path, frame)
    log.info("features qc: %d file(s), %d failed tile(s), %d slide(s) skipped", len(frame),
             int(frame["failed_tiles"].sum()) if len(frame) else 0, int((frame["status"] != "ok").sum()) if len(frame) else 0)
    return frame
