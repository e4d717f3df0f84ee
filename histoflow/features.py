"""Batched tile feature extraction: tiles table -> one Parquet of encoder features per slide.

Reading hides behind compute: a torch DataLoader whose workers each own an OpenSlide handle
read tiles (sorted by position, for the slide cache), resize, stain-normalise, and hand uint8
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

from .config import defaults_from_schema
from .errors import InputError, SlideError

log = logging.getLogger("histoflow.features")

COORD_COLUMNS = ("slide_id", "x", "y", "target_mpp", "tile_px", "size0", "col", "row")
COORD_TYPES = {"slide_id": "string", "x": "int64", "y": "int64", "target_mpp": "float64",
               "tile_px": "int32", "size0": "int32", "col": "int32", "row": "int32"}
FEATURE_METADATA = ("histoflow.encoder", "histoflow.dim", "histoflow.dtype", "histoflow.input_size",
                    "histoflow.stain_method", "histoflow.tta", "histoflow.mpp", "histoflow.n_tiles",
                    "histoflow.dropped_tiles", "histoflow.dropped_decode", "histoflow.dropped_nonfinite",
                    "histoflow.encoder_weights", "histoflow.status", "histoflow.reason",
                    "histoflow.max_failed_tile_fraction", "histoflow.slide_id")
MPP_TOL = 1e-3  # relative: 0.5 and 0.5000001 are the same resolution


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
        if settings.dtype not in ("float16", "float32"):
            raise InputError(f"config key 'features.dtype': {settings.dtype!r} is not float16 or float32")
        return settings


def check_feature_mpp(mpp: float, tiling_mpp: Sequence[float]) -> None:
    """features.mpp must be one of tiling.mpp (features are computed on existing tiles)."""
    if not any(math.isclose(mpp, m, rel_tol=MPP_TOL) for m in tiling_mpp):
        raise InputError(f"config key 'features.mpp': {mpp} µm/px is not tiled; add it to 'tiling.mpp' "
                         f"(now {list(tiling_mpp)}) or set features.mpp to one of them")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"config key 'features.device': {device!r} but no CUDA GPU is visible here; "
                         "use 'auto' or 'cpu', or run on a GPU node (features.gpu: 1)")
    return device


# --------------------------------------------------------------------------- tiles and reading


def load_tiles(path: str | os.PathLike, mpp: float) -> pd.DataFrame:
    """Tiles at ``mpp`` from a tiles table, sorted by (level, y, x) so reads walk the slide."""
    frame = pd.read_parquet(path)
    if len(frame) == 0:
        return frame
    keep = np.isclose(frame["target_mpp"].to_numpy(float), mpp, rtol=MPP_TOL, atol=0)
    frame = frame.loc[keep]
    return frame.sort_values(["read_level", "y", "x"], kind="stable").reset_index(drop=True)


class JpegTiles:
    """Direct access to the JPEG tiles of a TIFF-based pyramid (generic TIFF, SVS, ...).

    A tile request that coincides with one stored JPEG tile (same level, aligned, same size,
    inside the image) is served by decoding that tile's bytes with PIL: no OpenSlide region
    assembly, no ARGB -> RGBA -> RGB conversions (about 2x faster than ``read_region``).
    Levels are matched to TIFF pages by size; ``None`` is returned for anything else, and the
    caller falls back to OpenSlide.
    """

    def __init__(self, path: str, level_dimensions, level_downsamples):
        import tifffile

        self._file = open(path, "rb")
        self._fd = self._file.fileno()
        self.levels: dict[int, dict] = {}
        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if getattr(p, "is_tiled", False) and p.compression == 7
                     and p.samplesperpixel == 3 and p.planarconfig == 1 and p.bitspersample == 8]
            for level, (w, h) in enumerate(level_dimensions):
                page = next((p for p in pages if (p.imagewidth, p.imagelength) == (w, h)), None)
                if page is None:
                    continue
                tables = page.jpegtables or b""
                self.levels[level] = dict(
                    width=w, height=h, tw=page.tilewidth, th=page.tilelength, ds=float(level_downsamples[level]),
                    ntx=-(-w // page.tilewidth), offsets=np.asarray(page.dataoffsets, np.int64),
                    counts=np.asarray(page.databytecounts, np.int64),
                    prefix=tables[:-2] if tables.endswith(b"\xff\xd9") else b"")

    def read(self, x: int, y: int, level: int, w: int, h: int):
        import io

        from PIL import Image

        lv = self.levels.get(level)
        if lv is None or w != lv["tw"] or h != lv["th"]:
            return None
        lx, ly = x / lv["ds"], y / lv["ds"]
        if lx != int(lx) or ly != int(ly):
            return None
        lx, ly = int(lx), int(ly)
        if lx % w or ly % h or lx + w > lv["width"] or ly + h > lv["height"]:
            return None
        i = (ly // h) * lv["ntx"] + lx // w
        if lv["counts"][i] == 0:  # sparse TIFF: tile not scanned
            return None
        data = os.pread(self._fd, int(lv["counts"][i]), int(lv["offsets"][i]))
        if lv["prefix"]:  # abbreviated stream: splice the shared tables in after SOI
            data = lv["prefix"] + data[2:]
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == "RGB" and img.size == (w, h) else None

    def close(self) -> None:
        self._file.close()


class TileReader:
    """Reads tiles of one slide as uint8 RGB; one instance (one OpenSlide handle) per process.

    ``read`` takes a tiles-table row (x, y, read_level, read_w, read_h, tile_px); the region is
    read at ``read_level`` and resized to ``out_px`` (default: the row's ``tile_px``) with
    PIL's ``reduce`` for integer factors (box filter, fast) and Lanczos otherwise (as
    ``histoflow.tiling.read_tile``). Transparent (unscanned) pixels become white.
    Aligned requests on JPEG-tiled TIFF pyramids take the ``JpegTiles`` fast path, enabled only
    after it reproduced OpenSlide's pixels on a probe tile of the slide.
    """

    def __init__(self, path: str | os.PathLike, slide_id: str = "?", out_px: int | None = None,
                 fast_jpeg: bool = True, colour_fix: str | None = None):
        self.path = str(path)
        self.slide_id = slide_id
        self.out_px = out_px
        # a slide QC found in the wrong colour space is read through OpenSlide and converted
        self.colour_fix = colour_fix
        self.fast_jpeg = fast_jpeg and not colour_fix
        self._slide = None
        self._jpeg: JpegTiles | None | bool = None  # None: not tried yet; False: not available

    @property
    def slide(self):
        if self._slide is None:
            from .slide import open_slide

            self._slide = open_slide(self.path, self.slide_id, self.colour_fix)
        return self._slide

    @property
    def jpeg(self) -> JpegTiles | None:
        if self._jpeg is None:
            self._jpeg = self._open_jpeg() or False
        return self._jpeg or None

    def _open_jpeg(self) -> JpegTiles | None:
        if not self.fast_jpeg:
            return None
        try:
            tiles = JpegTiles(self.path, self.slide.level_dimensions, self.slide.level_downsamples)
        except Exception:  # noqa: BLE001 - not a TIFF, or one tifffile cannot parse: OpenSlide only
            return None
        for level, lv in sorted(tiles.levels.items()):
            # probe the tile at the image centre: same pixels as OpenSlide, or no fast path
            tx = (lv["width"] // 2 // lv["tw"]) * lv["tw"]
            ty = (lv["height"] // 2 // lv["th"]) * lv["th"]
            x0, y0 = int(round(tx * lv["ds"])), int(round(ty * lv["ds"]))
            try:
                fast = tiles.read(x0, y0, level, lv["tw"], lv["th"])
                ref = self._read_openslide(x0, y0, level, lv["tw"], lv["th"])
            except Exception:  # noqa: BLE001
                fast = None
            if fast is None or np.abs(np.asarray(fast, np.int16) - np.asarray(ref, np.int16)).max() > 2:
                tiles.levels.pop(level)
        if not tiles.levels:
            tiles.close()
            return None
        return tiles

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._jpeg:
            self._jpeg.close()
        self._jpeg = None

    def _read_openslide(self, x: int, y: int, level: int, w: int, h: int):
        from PIL import Image

        img = self.slide.read_region((int(x), int(y)), int(level), (int(w), int(h)))
        if img.getchannel("A").getextrema()[0] < 255:
            # OpenSlide gives alpha 0 outside the scanned area: composite on white
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            return bg
        return img.convert("RGB")

    def read_pil(self, x: int, y: int, level: int, w: int, h: int, out_px: int):
        from PIL import Image

        img = self.jpeg.read(x, y, level, w, h) if self.jpeg is not None else None
        if img is None:
            img = self._read_openslide(x, y, level, w, h)
        if img.size != (out_px, out_px):
            fx, fy = img.size[0] / out_px, img.size[1] / out_px
            if fx == fy and fx == int(fx) and fx > 1:
                img = img.reduce(int(fx))
            else:
                img = img.resize((out_px, out_px), Image.LANCZOS)
        return img

    def read(self, row) -> np.ndarray:
        out_px = int(self.out_px or row["tile_px"])
        return np.asarray(self.read_pil(row["x"], row["y"], row["read_level"], row["read_w"],
                                        row["read_h"], out_px))

    def reset(self) -> None:
        # an OpenSlide handle is unusable after a read error, and a forked worker must not share
        # its parent's: (re)open lazily on the next read
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the handle is already broken
            self._slide, self._jpeg = None, None


class TileDataset:
    """torch-style map dataset: index -> (uint8 tensor 3 x S x S, index, ok flag).

    Each tile is read as in the tiles table (``read_w x read_h`` at ``read_level`` -> ``tile_px``),
    then prepared for the encoder as timm does: resized to ``input_size / crop_pct`` with the
    encoder's interpolation, centre-cropped to ``input_size``, then stain-normalised.
    """

    def __init__(self, slide_path: str, slide_id: str, tiles: pd.DataFrame, input_size: int,
                 normalizer=None, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 colour_fix: str | None = None):
        cols = ["x", "y", "read_level", "read_w", "read_h", "tile_px"]
        self.coords = tiles[cols].to_numpy(np.int64) if len(tiles) else np.zeros((0, 6), np.int64)
        self.input_size = int(input_size)
        self.resize_px = int(math.floor(input_size / crop_pct)) if crop_pct < 1 else self.input_size
        self.interpolation = interpolation
        self.normalizer = normalizer
        self.reader = TileReader(slide_path, slide_id, colour_fix=colour_fix)

    def __len__(self) -> int:
        return len(self.coords)

    def prepare(self, img) -> np.ndarray:
        """A tile (PIL RGB, tile_px) -> uint8 H x W x 3 at the encoder's input size."""
        from PIL import Image

        if img.size != (self.resize_px, self.resize_px):
            resample = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                        "lanczos": Image.LANCZOS}.get(self.interpolation, Image.BILINEAR)
            img = img.resize((self.resize_px, self.resize_px), resample)
        if self.resize_px != self.input_size:
            off = (self.resize_px - self.input_size) // 2
            img = img.crop((off, off, off + self.input_size, off + self.input_size))
        arr = np.asarray(img)
        if self.normalizer is not None and self.normalizer.method != "none":
            arr = self.normalizer.apply(arr)
        return arr

    def __getitem__(self, i: int):
        import torch

        x, y, level, w, h, tile_px = (int(v) for v in self.coords[i])
        try:
            arr = self.prepare(self.reader.read_pil(x, y, level, w, h, tile_px))
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), i, True
        except SlideError:
            raise  # the slide itself cannot be opened: not a per-tile problem
        except Exception as err:  # noqa: BLE001 - a corrupt tile is dropped and counted, not fatal
            log.warning("slide %r: tile at (%d, %d) level %d failed to decode: %s", self.reader.slide_id,
                        x, y, level, err)
            self.reader.reset()
            return torch.zeros((3, self.input_size, self.input_size), dtype=torch.uint8), i, False


def _worker_init(worker_id: int) -> None:
    import torch

    # each worker owns its OpenSlide handle (handles are not fork/thread safe to share) and
    # one compute thread: the main process's threads do the model's work
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


def embed_batch(model, batch_uint8, mean, std, device: str, tta: bool = False):
    """uint8 N x 3 x S x S -> float32 N x dim (on CPU), normalised with the encoder's mean/std."""
    import torch

    on_gpu = device.startswith("cuda")
    x = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
    x = (x - mean) / std
    if on_gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16, enabled=on_gpu):
        if tta:
            out = torch.stack([model(v).float() for v in d4_views(x)]).mean(0)
        else:
            out = model(x).float()
    return out.reshape(out.shape[0], -1).cpu()


def extract_features(dataset: TileDataset, encoder: EncoderLike, batch_size: int = 64,
                     num_workers: int = 2, device: str = "cpu", tta: bool = False,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features of every tile of ``dataset``: (float32 [n, dim], ok bool [n]).

    Rows whose tile failed to decode are zeros with ok False.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(dataset)
    feats = np.zeros((n, encoder.dim), np.float32)
    ok = np.zeros(n, bool)
    if n == 0:
        return feats, ok
    model = encoder.model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(encoder.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.startswith("cuda"))
    with torch.inference_mode(), tqdm(total=n, desc=f"{dataset.reader.slide_id} {encoder.name}",
                                      unit="tile", disable=not progress, mininterval=5) as bar:
        for images, idx, good in loader:
            out = embed_batch(model, images, mean, std, device, tta).numpy()
            if out.shape[1] != encoder.dim:
                raise InputError(f"encoder {encoder.name!r} returned {out.shape[1]} features, declared dim "
                                 f"{encoder.dim}; fix the encoder definition")
            idx = idx.numpy()
            feats[idx] = out
            ok[idx] = good.numpy()
            bar.update(len(idx))
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
    device = resolve_device(cfg.device)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))
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
    if len(tiles) == 0:
        why = "skipped" if meta_slide.get("status") != "ok" else f"has no tiles at {cfg.mpp} µm/px"
        warnings.warn(f"slide {slide_id!r} {why}: writing an empty features table", stacklevel=2)
        log.warning("slide %r %s: writing an empty features table", slide_id, why)
        feats, ok = np.zeros((0, encoder.dim), np.float32), np.zeros(0, bool)
    else:
        dataset = TileDataset(meta_slide["path"], slide_id, tiles, encoder.input_size, normalizer,
                              getattr(encoder, "interpolation", "bilinear"), getattr(encoder, "crop_pct", 1.0),
                              colour_fix=meta_slide.get("colour_fix"))
        feats, ok = extract_features(dataset, encoder, cfg.batch_size, cfg.num_workers, device, cfg.tta)
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
    }
    write_parquet(out_path, table, metadata)
    elapsed = time.perf_counter() - t0
    log.info("slide %r: %d tiles -> %s features (%s, dim %d) in %.1f s (%.1f tiles/s) on %s", slide_id,
             int(keep.sum()), encoder_name, cfg.dtype, encoder.dim, elapsed, len(tiles) / max(elapsed, 1e-9), device)
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
