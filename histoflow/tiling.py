"""Tiling: a grid of square tiles at one or several µm/px over the tissue of a slide.

Only metadata is needed to tile: the slide JSON (size, levels, µm/px) and the tissue mask (a
low-resolution PNG). The slide itself is opened only to export tile images or, later, by the
feature extractor through :meth:`histoflow.wsi.SlideReader.read_tile`. Memory is therefore bounded by the mask size,
whatever the slide size.

Geometry (all coordinates at level 0):
  * ``size0 = round(tile_px * target_mpp / mpp_x)``: tile side at level 0.
  * ``stride0 = round((tile_px - overlap_px) * target_mpp / mpp_x)``: grid step.
  * Tile ``(col, row)`` has top-left ``(col * stride0, row * stride0)``; only tiles lying
    entirely inside the slide are made.
  * Tiles are read from the coarsest level that is at least as fine as ``target_mpp``
    (:func:`histoflow.wsi.best_level_for_mpp`), ``read_w x read_h`` px at that level, then
    downscaled to ``tile_px`` (never upscaled beyond :data:`histoflow.wsi.MPP_TOLERANCE`).

``tissue_fraction`` is the exact area fraction of the tile covered by the mask (bilinear
interpolation of the mask's integral image is exact for a piecewise-constant mask), computed for
all tiles at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import defaults_from_schema, section_defaults
from .errors import InputError, SlideError
from .io import read_grey_png, read_json
from .logs import get_logger
from .tiles_table import (TILE_COLUMNS, _column, _repeated_string, empty_tiles_table, read_tiles_table,  # noqa: F401
                          tiles_schema, write_tiles_table)
from .tile_preview import preview_canvas, write_tile_preview, _read_overlay_or_none
from .wsi import MPP_TOLERANCE, best_level_for_mpp, open_slide, same_mpp

log = get_logger(__name__)

IMAGE_FORMATS = {"jpeg": ".jpg", "png": ".png"}


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
@defaults_from_schema("tiling")
class TilingSettings:
    mpp: tuple[float, ...]
    tile_px: int
    overlap_px: int
    min_tissue_fraction: float
    # the cap is a seeded sample over tissue tiles only: bag tiles never depend on annotations
    # (lesion-aware sampling is patch_classifier.lesion_share, on each fold's train slides)
    max_tiles_per_slide: int | None
    export_images: str

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "TilingSettings":
        cfg = {**section_defaults("tiling"), **dict(cfg or {})}   # a key left out: the schema's default
        mpp = cfg["mpp"]
        mpp = tuple(float(m) for m in (mpp if isinstance(mpp, (list, tuple)) else [mpp]))
        settings = cls(
            mpp=mpp,
            tile_px=int(cfg["tile_px"]),
            overlap_px=int(cfg["overlap_px"]),
            min_tissue_fraction=float(cfg["min_tissue_fraction"]),
            max_tiles_per_slide=None if cfg["max_tiles_per_slide"] is None else int(cfg["max_tiles_per_slide"]),
            export_images=str(cfg["export_images"]),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if not self.mpp or any(m <= 0 for m in self.mpp):
            raise InputError(f"config key 'tiling.mpp': {list(self.mpp)} must be a non-empty list of positive µm/px, e.g. [0.5]")
        if any(same_mpp(a, b) for i, a in enumerate(self.mpp) for b in self.mpp[i + 1:]):
            raise InputError(f"config key 'tiling.mpp': {list(self.mpp)} lists a resolution twice (µm/px within "
                             f"{MPP_TOLERANCE:.0%} are one resolution); give each µm/px once")
        if self.tile_px < 1:
            raise InputError(f"config key 'tiling.tile_px': {self.tile_px} must be >= 1 (e.g. 224 or 256)")
        if not 0 <= self.overlap_px < self.tile_px:
            raise InputError(f"config key 'tiling.overlap_px': {self.overlap_px} must be >= 0 and smaller than "
                             f"tiling.tile_px ({self.tile_px})")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise InputError(f"config key 'tiling.min_tissue_fraction': {self.min_tissue_fraction} must be in [0, 1]")
        if self.max_tiles_per_slide is not None and self.max_tiles_per_slide < 1:
            raise InputError(f"config key 'tiling.max_tiles_per_slide': {self.max_tiles_per_slide} must be >= 1 or null")
        if self.export_images not in ("none", *IMAGE_FORMATS):
            raise InputError(f"config key 'tiling.export_images': {self.export_images!r} must be none, jpeg or png")


# --------------------------------------------------------------------------------------------
# Grid geometry (pure)


@dataclass(frozen=True)
class GridSpec:
    target_mpp: float
    tile_px: int
    level: int            # pyramid level read
    downsample: float     # level-0 px per px of that level
    size0_x: int          # tile side at level 0
    size0_y: int
    stride0_x: int        # grid step at level 0
    stride0_y: int
    read_w: int           # px read at `level` before resizing to tile_px
    read_h: int
    n_cols: int
    n_rows: int

    @property
    def n_tiles(self) -> int:
        return self.n_cols * self.n_rows


def grid_spec(width: int, height: int, mpp_x: float, mpp_y: float, level_downsamples, target_mpp: float,
              tile_px: int, overlap_px: int = 0, slide_id: str = "?") -> GridSpec:
    """The tile grid of one resolution. Raises SlideError when ``target_mpp`` is finer than the
    slide's level 0 (that would need upsampling, which invents detail)."""
    if target_mpp < mpp_x * (1.0 - MPP_TOLERANCE):
        raise SlideError(slide_id, f"tiling.mpp {target_mpp:g} µm/px is finer than the slide's level 0 "
                                   f"({mpp_x:g} µm/px); upsampling is refused: use tiling.mpp >= {mpp_x:.3g} "
                                   "or remove this slide")
    size0_x = max(1, int(round(tile_px * target_mpp / mpp_x)))
    size0_y = max(1, int(round(tile_px * target_mpp / mpp_y)))
    step_px = tile_px - overlap_px
    stride0_x = max(1, int(round(step_px * target_mpp / mpp_x)))
    stride0_y = max(1, int(round(step_px * target_mpp / mpp_y)))
    choice = best_level_for_mpp(level_downsamples, mpp_x, target_mpp)
    read_w = max(1, int(round(size0_x / choice.downsample)))
    read_h = max(1, int(round(size0_y / choice.downsample)))
    n_cols = (int(width) - size0_x) // stride0_x + 1 if width >= size0_x else 0
    n_rows = (int(height) - size0_y) // stride0_y + 1 if height >= size0_y else 0
    return GridSpec(target_mpp=float(target_mpp), tile_px=int(tile_px), level=choice.level,
                    downsample=choice.downsample, size0_x=size0_x, size0_y=size0_y,
                    stride0_x=stride0_x, stride0_y=stride0_y, read_w=read_w, read_h=read_h,
                    n_cols=max(n_cols, 0), n_rows=max(n_rows, 0))


def grid_coordinates(spec: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, col, row)`` of every grid tile, row-major (sorted by y then x)."""
    rows, cols = np.divmod(np.arange(spec.n_tiles, dtype=np.int64), max(spec.n_cols, 1))
    return cols * spec.stride0_x, rows * spec.stride0_y, cols, rows


def _sums_between(a: np.ndarray, cuts: np.ndarray, axis: int, dtype, binary: bool = False) -> np.ndarray:
    """Sums of ``a`` between consecutive ``cuts`` (sorted indices) along ``axis`` (0 or 1): entry
    k sums ``a[cuts[k]:cuts[k + 1]]``. A regular grid over a pyramid mask (tiles a whole number
    of mask px apart) has equal steps: one reshaped sum, no Python loop. ``binary``: ``a`` is a
    uint8 0/1 mask."""
    steps = np.diff(cuts)
    n = len(steps)
    if n and steps[0] > 0 and (steps == steps[0]).all():
        d, lo, hi = int(steps[0]), int(cuts[0]), int(cuts[-1])
        blocks = a[lo:hi].reshape(n, d, a.shape[1]) if axis == 0 else a[:, lo:hi].reshape(a.shape[0], n, d)
        if binary and d <= 255:
            # 0/1 sums of at most 255 fit uint8: no widened copy of the whole mask
            return np.add.reduce(blocks, axis=axis + 1, dtype=np.uint8).astype(dtype, copy=False)
        return blocks.sum(axis=axis + 1, dtype=dtype)
    if axis == 1:      # int32/int64 in their own type: numpy would widen int32 to int64 with a copy
        own = a.dtype if a.dtype in (np.int32, np.int64) else np.dtype(dtype)
        return np.add.reduceat(a[:, :cuts[-1]], cuts[:-1], axis=1, dtype=own).astype(dtype, copy=False)
    # a loop of contiguous sums is ~4x faster than np.add.reduceat along axis 0; 0/1 bands of at
    # most 255 rows add up in uint8, without casting
    small = binary and n and steps.max() <= 255
    out = np.empty((n, a.shape[1]), np.uint8 if small else dtype)
    for k in range(n):
        np.add.reduce(a[cuts[k]:cuts[k + 1]], axis=0, dtype=out.dtype, out=out[k])
    return out.astype(dtype, copy=False)


def _sparse_integral(mask: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The summed-area table at the given sorted integer columns/rows only (each list starting at
    0): the mask is first summed in bands of rows (contiguous memory, one pass), then the small
    band table is accumulated, instead of two full cumulative sums over the mask."""
    m = mask.view(np.uint8) if mask.dtype == bool else (mask > 0).astype(np.uint8)
    # int32 holds any count of a mask under 2^31 px (46k x 46k): half the memory of int64
    # (fresh pages cost a fault each), and every value the same integer
    count = np.int32 if m.size < 2 ** 31 else np.int64
    table = np.zeros((len(rows), len(cols)), dtype=count)
    if len(cols) < 2 or len(rows) < 2:
        return table
    # bands of at most 255 rows stay uint8 (a quarter of int32)
    band = np.uint8 if int(np.diff(rows).max()) <= 255 else count
    bands = _sums_between(m, rows, 0, band, binary=True)               # (len(rows) - 1, w)
    blocks = _sums_between(bands, cols, 1, count)                      # (len(rows) - 1, len(cols) - 1)
    np.cumsum(blocks, axis=0, dtype=count, out=blocks)
    np.cumsum(blocks, axis=1, dtype=count, out=table[1:, 1:])
    return table


def _present(values: np.ndarray, size: int) -> np.ndarray:
    """The distinct values (0..size) of an integer array, sorted: a presence table, O(n)."""
    seen = np.zeros(size + 1, bool)
    seen[values] = True
    return np.flatnonzero(seen)


def tissue_fractions(mask: np.ndarray, scale_x: float, scale_y: float, x: np.ndarray, y: np.ndarray,
                     size0_x: int, size0_y: int) -> np.ndarray:
    """Exact tissue fraction of level-0 tiles ``(x, y, size0)`` over a binary mask whose px are
    ``scale_x x scale_y`` level-0 px; outside the mask counts as background. Vectorised: the
    summed-area table is built only at the mask columns/rows the tile corners fall in."""
    mask = np.asarray(mask)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(0)
    h, w = mask.shape
    if h == 0 or w == 0:
        return np.zeros(len(x))
    us = np.clip(np.concatenate([x / scale_x, (x + size0_x) / scale_x]), 0.0, w)
    vs = np.clip(np.concatenate([y / scale_y, (y + size0_y) / scale_y]), 0.0, h)
    j0 = np.minimum(us.astype(np.int64), w - 1)          # floor: us, vs are >= 0
    i0 = np.minimum(vs.astype(np.int64), h - 1)
    cols = _present(np.concatenate([[0, w], j0, j0 + 1]), w)
    rows = _present(np.concatenate([[0, h], i0, i0 + 1]), h)
    table = _sparse_integral(mask, cols, rows)
    # position of every mask column/row in `cols`/`rows` (a lookup table instead of searchsorted)
    col_at = np.zeros(w + 1, np.int64)
    col_at[cols] = np.arange(len(cols))
    row_at = np.zeros(h + 1, np.int64)
    row_at[rows] = np.arange(len(rows))

    def at(u, j, v, i):
        cj, ri = col_at[j], row_at[i]
        a, b = u - j, v - i
        s00 = table[ri, cj].astype(np.float64)
        s01, s10, s11 = table[ri, cj + 1], table[ri + 1, cj], table[ri + 1, cj + 1]
        return s00 + a * (s01 - s00) + b * (s10 - s00) + a * b * (s11 - s10 - s01 + s00)

    n = len(x)
    u0, u1, v0, v1 = us[:n], us[n:], vs[:n], vs[n:]
    j_0, j_1, i_0, i_1 = j0[:n], j0[n:], i0[:n], i0[n:]
    inside = at(u1, j_1, v1, i_1) - at(u0, j_0, v1, i_1) - at(u1, j_1, v0, i_0) + at(u0, j_0, v0, i_0)
    area = (float(size0_x) / scale_x) * (float(size0_y) / scale_y)  # whole tile, even beyond the mask
    return np.clip(inside / area, 0.0, 1.0) if area > 0 else np.zeros(n)


def grid_tissue_fractions(mask: np.ndarray, scale_x: float, scale_y: float, spec: GridSpec) -> np.ndarray:
    """:func:`tissue_fractions` of every tile of grid ``spec``, in :func:`grid_coordinates` order
    (row-major), with the same arithmetic and so the same values. Faster: a grid's tile edges
    take only ``2 x n_cols`` distinct x and ``2 x n_rows`` distinct y values, so the table is
    interpolated once per (edge row, edge column) and each tile reads its four corners from that
    small table; table rows/columns that an interpolation weighs by 0 are never summed."""
    mask = np.asarray(mask)
    n_rows, n_cols = spec.n_rows, spec.n_cols
    h, w = mask.shape
    if n_rows * n_cols == 0 or h == 0 or w == 0:
        return np.zeros(n_rows * n_cols)
    x = np.arange(n_cols, dtype=np.float64) * spec.stride0_x
    y = np.arange(n_rows, dtype=np.float64) * spec.stride0_y
    us = np.clip(np.concatenate([x / scale_x, (x + spec.size0_x) / scale_x]), 0.0, w)
    vs = np.clip(np.concatenate([y / scale_y, (y + spec.size0_y) / scale_y]), 0.0, h)
    j = np.minimum(us.astype(np.int64), w - 1)
    i = np.minimum(vs.astype(np.int64), h - 1)
    a, b = us - j, vs - i
    cols = _present(np.concatenate([[0], j, j[a > 0] + 1]), w)
    rows = _present(np.concatenate([[0], i, i[b > 0] + 1]), h)
    table = _sparse_integral(mask, cols, rows)
    col_at = np.zeros(w + 1, np.int64)
    col_at[cols] = np.arange(len(cols))
    row_at = np.zeros(h + 1, np.int64)
    row_at[rows] = np.arange(len(rows))
    # the table's next row/column where the weight is > 0; where it is 0 any index will do
    c0, c1 = col_at[j], np.where(a > 0, col_at[np.minimum(j + 1, w)], col_at[j])
    r0, r1 = row_at[i], np.where(b > 0, row_at[np.minimum(i + 1, h)], row_at[i])
    # the integral at every (edge y, edge x): tissue_fractions' bilinear formula, term by term
    # (row gather, then column gather: 4x faster than np.ix_'s advanced indexing)
    if not a.any() and not b.any():     # edges on mask px boundaries: the table itself (exact integers)
        at = table[r0][:, c0]
    else:
        # s00 + A * (s01 - s00) + B * (s10 - s00) + A * B * (s11 - s10 - s01 + s00), each
        # operation as Python evaluates it (so bit for bit), in place where IEEE allows (x + y
        # == y + x and x * y == y * x exactly): 5 temporaries of the (edge y, edge x) size, not 11
        top_rows, bottom_rows = table[r0], table[r1]
        s00 = top_rows[:, c0].astype(np.float64)
        s01, s10 = top_rows[:, c1], bottom_rows[:, c0]
        A, B = a[None, :], b[:, None]
        at = np.subtract(s01, s00)
        at *= A
        at += s00
        term = np.subtract(s10, s00)
        term *= B
        at += term
        cross = np.subtract(bottom_rows[:, c1], s10)          # integers, exact
        cross -= s01
        np.add(cross, s00, out=term)
        np.multiply(A, B, out=s00)                           # s00 is no longer needed
        term *= s00
        at += term
    top, bottom = at[:n_rows], at[n_rows:]           # y0 and y1 of each tile row
    inside = (bottom[:, n_cols:] - bottom[:, :n_cols] - top[:, n_cols:] + top[:, :n_cols]).ravel()
    area = (float(spec.size0_x) / scale_x) * (float(spec.size0_y) / scale_y)
    return np.clip(inside / area, 0.0, 1.0) if area > 0 else np.zeros(n_rows * n_cols)


# --------------------------------------------------------------------------------------------
# Sampling


def slide_seed(seed: int, slide_id: str) -> int:
    """``seed`` + a stable hash of the slide id (Python's hash() changes per process)."""
    return int(seed) + int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:4], "little")


def sample_indices(n: int, cap: int | None, rng: np.random.Generator, priority: np.ndarray | None = None,
                   priority_share: float = 0.5) -> np.ndarray:
    """Indices of at most ``cap`` of ``n`` items, drawn without replacement, returned sorted.

    With ``priority`` (bool per item), up to ``round(cap * priority_share)`` places go to
    priority items and the rest to the others; places a stratum cannot fill go to the other
    stratum, so the cap is always used. Tiling never passes a priority (bag tiles must not
    depend on annotations); the patch classifier's train-slide sample does
    (``patch_classifier.lesion_share``).
    """
    if cap is None or n <= cap:
        return np.arange(n)
    if priority is None or not priority.any() or priority.all():
        return np.sort(rng.choice(n, size=cap, replace=False))
    pri = np.flatnonzero(priority)
    rest = np.flatnonzero(~priority)
    n_pri = min(len(pri), int(round(cap * priority_share)))
    n_rest = min(len(rest), cap - n_pri)
    n_pri = min(len(pri), cap - n_rest)  # give unused places back to the priority stratum
    picked = np.concatenate([rng.choice(pri, size=n_pri, replace=False),
                             rng.choice(rest, size=n_rest, replace=False)])
    return np.sort(picked)


# --------------------------------------------------------------------------------------------
# Table building (pure) and I/O


def build_tiles_table(slide_id: str, width: int, height: int, mpp_x: float, mpp_y: float, level_downsamples,
                      mask: np.ndarray, scale_x: float, scale_y: float, settings: TilingSettings,
                      seed: int = 0):
    """All tiles of one slide at every ``settings.mpp`` as a pyarrow Table (sorted by
    target_mpp in config order, then y, x) and a dict of per-resolution stats. Nothing here
    reads annotations: the tiles that features, MIL, heatmaps and slide features use are the
    same whether or not the sheet has them (no test-slide lesion information in the bags)."""
    import pyarrow as pa

    rng = np.random.default_rng(slide_seed(seed, slide_id))
    parts, stats = [], {}
    for target in settings.mpp:
        spec = grid_spec(width, height, mpp_x, mpp_y, level_downsamples, target, settings.tile_px,
                         settings.overlap_px, slide_id)
        x, y, col, row = grid_coordinates(spec)
        frac = grid_tissue_fractions(mask, scale_x, scale_y, spec)
        keep = np.flatnonzero(frac >= settings.min_tissue_fraction - 1e-9)
        x, y, col, row, frac = x[keep], y[keep], col[keep], row[keep], frac[keep]
        n_tissue = len(x)
        pick = sample_indices(len(x), settings.max_tiles_per_slide, rng)   # tissue only, no priority
        x, y, col, row, frac = x[pick], y[pick], col[pick], row[pick], frac[pick]
        n = len(x)
        schema = tiles_schema()
        columns = {
            "slide_id": _repeated_string(slide_id, n),
            "x": _column(x, np.int64),
            "y": _column(y, np.int64),
            "read_level": _column(np.full(n, spec.level), np.int16),
            "read_w": _column(np.full(n, spec.read_w), np.int32),
            "read_h": _column(np.full(n, spec.read_h), np.int32),
            "target_mpp": _column(np.full(n, spec.target_mpp), np.float64),
            "tile_px": _column(np.full(n, spec.tile_px), np.int32),
            "tissue_fraction": _column(frac, np.float32),
            "col": _column(col, np.int32),
            "row": _column(row, np.int32),
            "size0": _column(np.full(n, spec.size0_x), np.int32),
        }
        parts.append(pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema))
        stats[f"{target:g}"] = {"level": spec.level, "size0": spec.size0_x, "stride0": spec.stride0_x,
                                "read_w": spec.read_w, "grid": spec.n_tiles, "tissue": n_tissue, "kept": n}
    table = pa.concat_tables(parts) if parts else empty_tiles_table()
    return table, stats


def _metadata(mpp_x, mpp_y, settings: TilingSettings, stats: dict, status: str, reason: str | None) -> dict[str, str]:
    return {
        "histoflow.mpp_x": json.dumps(mpp_x),
        "histoflow.mpp_y": json.dumps(mpp_y),
        # one stride per resolution: {"0.5": 512, "2": 2048}
        "histoflow.stride0": json.dumps({k: v["stride0"] for k, v in stats.items()}, sort_keys=True),
        "histoflow.target_mpp": json.dumps(list(settings.mpp)),
        "histoflow.tile_px": str(settings.tile_px),
        "histoflow.overlap_px": str(settings.overlap_px),
        "histoflow.min_tissue_fraction": json.dumps(settings.min_tissue_fraction),
        "histoflow.max_tiles_per_slide": json.dumps(settings.max_tiles_per_slide),
        "histoflow.status": status,
        "histoflow.reason": reason or "",
    }


def tile_slide(slide_json, mask_png, tissue_json, out_path, settings, seed: int = 0,
               on_error: str = "fail") -> dict:
    """Tile one slide: read its metadata and tissue mask, write ``tiles/{slide_id}.parquet``.

    A slide skipped upstream (status "skipped") gets an empty table with the full schema.
    Returns the per-resolution stats (also logged).
    """
    stats, table, metadata = _tiles_of_slide(slide_json, mask_png, tissue_json, settings, seed, on_error)
    write_tiles_table(out_path, table, metadata)
    return stats


def _tiles_of_slide(slide_json, mask_png, tissue_json, settings, seed: int, on_error: str):
    """:func:`tile_slide`'s work before the write: ``(stats, pyarrow table, metadata)``."""
    start = time.perf_counter()
    settings = settings if isinstance(settings, TilingSettings) else TilingSettings.from_config(settings)
    meta = read_json(slide_json)
    slide_id = str(meta.get("slide_id") or Path(slide_json).stem)
    tissue = read_json(tissue_json) if tissue_json and Path(tissue_json).exists() else {}
    mpp_x, mpp_y = meta.get("mpp_x"), meta.get("mpp_y")

    def write_empty(reason: str):
        log.warning("slide %s: no tiles (%s)", slide_id, reason)
        return {}, empty_tiles_table(), _metadata(mpp_x, mpp_y, settings, {}, "skipped", reason)

    if meta.get("status") != "ok":
        return write_empty(f"slide skipped upstream: {meta.get('reason') or 'no reason given'}")
    if tissue.get("status", "ok") != "ok":
        return write_empty(f"tissue detection skipped: {tissue.get('reason') or 'no reason given'}")
    if not mpp_x:
        raise SlideError(slide_id, "has no µm/px (not in the file): fill the sheet's `mpp` column or set "
                                   "`default_mpp` in config.yaml")
    mpp_y = mpp_y or mpp_x
    try:
        mask = read_grey_png(mask_png) > 127
        scale_x = float(tissue.get("scale_x") or meta["width"] / mask.shape[1])
        scale_y = float(tissue.get("scale_y") or meta["height"] / mask.shape[0])
    except (OSError, SlideError, InputError) as err:
        if on_error == "skip":
            return write_empty(f"{err}")
        if isinstance(err, (SlideError, InputError)):
            raise
        raise SlideError(slide_id, f"tissue mask {str(mask_png)!r} cannot be read ({err}); delete it and "
                                   "rerun the tissue stage") from None

    table, stats = build_tiles_table(slide_id, int(meta["width"]), int(meta["height"]), float(mpp_x), float(mpp_y),
                                     meta["level_downsamples"], mask, scale_x, scale_y, settings, seed)
    metadata = _metadata(float(mpp_x), float(mpp_y), settings, stats, "ok", None)
    for mpp, st in stats.items():
        log.info("slide %s @ %s µm/px: level %d, size0 %d px, %d grid tiles, %d with tissue >= %.2f, %d kept",
                 slide_id, mpp, st["level"], st["size0"], st["grid"], st["tissue"],
                 settings.min_tissue_fraction, st["kept"])
    log.info("slide %s: %d tiles in %.3f s", slide_id, table.num_rows, time.perf_counter() - start)
    return stats, table, metadata


def tile_image_name(slide_id: str, x: int, y: int, mpp: float, image_format: str) -> str:
    return f"{slide_id}_{int(x)}_{int(y)}_{mpp:g}{IMAGE_FORMATS[image_format]}"


def export_tile_images(slide_json, tiles_path, out_dir, image_format: str = "jpeg") -> int:
    """Write every tile of the table as an image ``{out_dir}/{slide_id}_{x}_{y}_{mpp}.jpg|png``.

    The folder appears complete or not at all (built beside it, then renamed). A skipped slide
    gives an empty folder. Returns the number of images written.
    """
    import contextlib
    import tempfile

    from PIL import Image
    from tqdm import tqdm

    from .io import inside_root, safe_remove

    out_dir = Path(out_dir)
    meta = read_json(slide_json)
    slide_id = str(meta.get("slide_id") or Path(slide_json).stem)
    # refused before any work: a folder named '.'/'..' or outside the output folder is never replaced
    root = out_dir.parent
    try:
        inside_root(out_dir, root, "replace")
    except ValueError as err:
        raise InputError(f"slide {slide_id!r}: {err}; slide ids must be plain file names") from None
    frame = read_tiles_table(tiles_path)
    if image_format not in IMAGE_FORMATS and image_format != "none":
        raise InputError(f"config key 'tiling.export_images': {image_format!r} must be none, jpeg or png")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent))
    try:
        if len(frame) and image_format != "none" and meta.get("status") == "ok":
            slide = open_slide(meta["path"], slide_id, meta.get("colour_fix"), record=meta)
            try:
                for row in tqdm(frame.to_dict("records"), desc=f"tiles {slide_id}", unit="tile", mininterval=5):
                    img = Image.fromarray(slide.read_tile(row))
                    name = tile_image_name(slide_id, row["x"], row["y"], row["target_mpp"], image_format)
                    if image_format == "jpeg":
                        img.save(tmp / name, quality=90)
                    else:
                        img.save(tmp / name)
            finally:
                slide.close()
        if out_dir.exists() or out_dir.is_symlink():
            safe_remove(out_dir, root)
        os.replace(tmp, out_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            safe_remove(tmp, root)
        raise
    n = len(list(out_dir.iterdir()))
    log.info("slide %s: %d tile images in %s", slide_id, n, out_dir)
    return n


def tile_slide_with_preview(slide_json, mask_png, tissue_json, overlay_jpg, out_path, preview_path, settings,
                            seed: int = 0, on_error: str = "fail") -> dict:
    """Rule `tile_slide`: the tile table, then its preview. One job per slide rather than two:
    a 10,000-slide cohort has 10,000 fewer jobs to plan and submit, and a cluster group of
    per-slide rules (whose check in Snakemake grows with the square of its size) stays small."""
    from concurrent.futures import ThreadPoolExecutor

    settings = settings if isinstance(settings, TilingSettings) else TilingSettings.from_config(settings)

    def overlay_and_canvas():
        background = _read_overlay_or_none(overlay_jpg)
        return background, None if background is None else preview_canvas(background, len(settings.mpp))

    # a second thread decodes the overlay JPEG and lays out the preview while the grid is
    # computed, then writes the Parquet while the tiles are drawn (both release the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        overlay = pool.submit(overlay_and_canvas)
        stats, table, metadata = _tiles_of_slide(slide_json, mask_png, tissue_json, settings, seed, on_error)
        written = pool.submit(write_tiles_table, out_path, table, metadata)
        background, canvas = overlay.result()
        write_tile_preview(slide_json, table, overlay_jpg, preview_path, background=background,  # the table in hand
                           canvas=canvas)
        written.result()
    return stats
