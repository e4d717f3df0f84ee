"""Tiling: a grid of square tiles at one or several µm/px over the tissue of a slide.

Only metadata is needed to tile: the slide JSON (size, levels, µm/px) and the tissue mask (a
low-resolution PNG). The slide itself is opened only to export tile images or, later, by the
feature extractor through :func:`read_tile`. Memory is therefore bounded by the mask size,
whatever the slide size.

Geometry (all coordinates at level 0):
  * ``size0 = round(tile_px * target_mpp / mpp_x)``: tile side at level 0.
  * ``stride0 = round((tile_px - overlap_px) * target_mpp / mpp_x)``: grid step.
  * Tile ``(col, row)`` has top-left ``(col * stride0, row * stride0)``; only tiles lying
    entirely inside the slide are made.
  * Tiles are read from the coarsest level that is at least as fine as ``target_mpp``
    (:func:`histoflow.slide.best_level_for_mpp`), ``read_w x read_h`` px at that level, then
    downscaled to ``tile_px`` (never upscaled beyond :data:`MPP_TOLERANCE`).

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
from .io import atomic_path, read_grey_png, read_json, write_parquet
from .logs import get_logger
from .slide import best_level_for_mpp

log = get_logger(__name__)

# A level whose µm/px is within 2 % of the target serves it: scanner calibrations scatter by
# about that much (0.2527 µm/px "40x" slides must serve a 0.25 request).
MPP_TOLERANCE = 0.02

IMAGE_FORMATS = {"jpeg": ".jpg", "png": ".png"}


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("slide_id", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("read_level", pa.int16()),
        ("read_w", pa.int32()),
        ("read_h", pa.int32()),
        ("target_mpp", pa.float64()),
        ("tile_px", pa.int32()),
        ("tissue_fraction", pa.float32()),
        ("col", pa.int32()),
        ("row", pa.int32()),
        ("size0", pa.int32()),
    ])


TILE_COLUMNS = ("slide_id", "x", "y", "read_level", "read_w", "read_h", "target_mpp", "tile_px",
                "tissue_fraction", "col", "row", "size0")


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
        if len(set(self.mpp)) != len(self.mpp):
            raise InputError(f"config key 'tiling.mpp': {list(self.mpp)} lists a resolution twice; give each µm/px once")
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


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row/column: ``S[i, j] = mask[:i, :j].sum()``."""
    binary = (np.asarray(mask) > 0)
    # int32 holds up to 2**31 mask px (a 46k x 46k mask): far above any sane mask size
    dtype = np.int32 if binary.size < 2**31 else np.int64
    table = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), dtype=dtype)
    np.cumsum(binary, axis=0, dtype=dtype, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, dtype=dtype, out=table[1:, 1:])
    return table


def _integral_at(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Integral of the mask over [0, u) x [0, v) (u along columns, v along rows) at fractional
    mask coordinates: bilinear interpolation of the summed-area table, exact for a
    piecewise-constant mask."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    u = np.clip(u, 0.0, w)
    v = np.clip(v, 0.0, h)
    j0 = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    i0 = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    a = u - j0
    b = v - i0
    s00 = table[i0, j0].astype(np.float64)
    s01 = table[i0, j0 + 1]
    s10 = table[i0 + 1, j0]
    s11 = table[i0 + 1, j0 + 1]
    return s00 + a * (s01 - s00) + b * (s10 - s00) + a * b * (s11 - s10 - s01 + s00)


def box_fractions(table: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Fraction of each box (mask px, fractional allowed) covered by the mask; outside the mask
    counts as background."""
    x0, y0, x1, y1 = (np.asarray(a, dtype=np.float64) for a in (x0, y0, x1, y1))
    area = (x1 - x0) * (y1 - y0)
    inside = (_integral_at(table, x1, y1) - _integral_at(table, x0, y1)
              - _integral_at(table, x1, y0) + _integral_at(table, x0, y0))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, inside / area, 0.0)
    return np.clip(frac, 0.0, 1.0)


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


def empty_tiles_table():
    """A table with the full tiles schema and no rows (skipped slides, no tissue)."""
    import pyarrow as pa

    return pa.Table.from_pylist([], schema=_schema())


# Columns are built from raw buffers: ``pa.array``/``pa.table`` import pandas (~0.3 s and ~75 MB
# RSS per rule process) just to check whether their input is a pandas object.

def _column(values: np.ndarray, dtype):
    """A pyarrow array (no nulls) of ``values`` cast to the numpy ``dtype``, zero-copy."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


NUMPY_OF_ARROW = {"int32": np.int32, "int64": np.int64, "float": np.float32, "double": np.float64}


def _numpy_of(column) -> np.ndarray:
    """A numeric pyarrow (chunked) array as numpy, nulls as NaN, read from its buffers:
    ``to_numpy`` imports pandas, as ``pa.array`` does."""
    if str(column.type) not in NUMPY_OF_ARROW:     # not a type the tiles schema uses: the slow path
        values = column.to_numpy() if hasattr(column, "chunks") else column.to_numpy(zero_copy_only=False)
        return values.astype(np.float64) if column.null_count else values
    arrays = column.chunks if hasattr(column, "chunks") else [column]
    parts = []
    for arr in arrays:
        dtype = np.dtype(NUMPY_OF_ARROW[str(arr.type)])
        validity, data = arr.buffers()[:2]
        values = np.frombuffer(data, dtype=dtype, count=arr.offset + len(arr))[arr.offset:] if len(arr) else \
            np.empty(0, dtype)
        if arr.null_count:
            bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")[arr.offset:arr.offset + len(arr)]
            values = np.where(bits.astype(bool), values, np.nan)
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0)


def _repeated_string(value: str, n: int):
    """A pyarrow string array holding ``value`` ``n`` times."""
    import pyarrow as pa

    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


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
        schema = _schema()
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
    return _tile_slide(slide_json, mask_png, tissue_json, out_path, settings, seed, on_error)[0]


def _tile_slide(slide_json, mask_png, tissue_json, out_path, settings, seed: int, on_error: str,
                write=write_parquet):
    """:func:`tile_slide`, also returning the table it wrote (pyarrow). ``write(path, table,
    metadata)`` writes the Parquet (the caller may hand it to another thread)."""
    start = time.perf_counter()
    settings = settings if isinstance(settings, TilingSettings) else TilingSettings.from_config(settings)
    meta = read_json(slide_json)
    slide_id = str(meta.get("slide_id") or Path(slide_json).stem)
    tissue = read_json(tissue_json) if tissue_json and Path(tissue_json).exists() else {}
    mpp_x, mpp_y = meta.get("mpp_x"), meta.get("mpp_y")

    def write_empty(reason: str):
        log.warning("slide %s: no tiles (%s)", slide_id, reason)
        empty = empty_tiles_table()
        write(out_path, empty, _metadata(mpp_x, mpp_y, settings, {}, "skipped", reason))
        return {}, empty

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
    write(out_path, table, _metadata(float(mpp_x), float(mpp_y), settings, stats, "ok", None))
    for mpp, st in stats.items():
        log.info("slide %s @ %s µm/px: level %d, size0 %d px, %d grid tiles, %d with tissue >= %.2f, %d kept",
                 slide_id, mpp, st["level"], st["size0"], st["grid"], st["tissue"],
                 settings.min_tissue_fraction, st["kept"])
    log.info("slide %s: %d tiles in %.3f s", slide_id, table.num_rows, time.perf_counter() - start)
    return stats, table


def read_tiles_table(path: str | os.PathLike):
    """A tiles Parquet as a pandas DataFrame (all columns of the schema, in order). The schema
    metadata (mpp_x, mpp_y, stride0, ...) is in ``frame.attrs["histoflow"]``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    frame = table.to_pandas()
    # an older table's extra columns (annotation_fraction, before bag tiles stopped reading
    # annotations) follow the schema's
    frame = frame[list(TILE_COLUMNS) + [c for c in frame.columns if c not in TILE_COLUMNS]]
    raw = table.schema.metadata or {}
    frame.attrs["histoflow"] = {k.decode()[len("histoflow."):]: v.decode() for k, v in raw.items()
                                if k.decode().startswith("histoflow.")}
    return frame


# --------------------------------------------------------------------------------------------
# Reading tiles


def read_tile(slide, row) -> np.ndarray:
    """One tile as ``(tile_px, tile_px, 3)`` uint8 RGB: ``read_w x read_h`` px at ``read_level``
    (level-0 corner ``x, y``), downscaled to ``tile_px`` (box mean for integer factors, Lanczos
    otherwise) when the level is finer than the target. ``slide`` is an open OpenSlide; ``row`` any mapping/row with the tiles columns."""
    from PIL import Image

    from .slide import read_rgb

    tile_px = int(row["tile_px"])
    rgb = read_rgb(slide, int(row["x"]), int(row["y"]), int(row["read_level"]), int(row["read_w"]), int(row["read_h"]))
    if rgb.shape[0] == tile_px and rgb.shape[1] == tile_px:
        return rgb
    img = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    if w == h and w % tile_px == 0:
        # exact integer factor (pyramid level twice as fine, the common case): a box mean is the
        # correct anti-aliasing filter and several times faster than Lanczos
        return np.asarray(img.reduce(w // tile_px))
    return np.asarray(img.resize((tile_px, tile_px), Image.Resampling.LANCZOS))


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
    from .slide import open_slide

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
            slide = open_slide(meta["path"], slide_id, meta.get("colour_fix"))
            try:
                for row in tqdm(frame.to_dict("records"), desc=f"tiles {slide_id}", unit="tile", mininterval=5):
                    img = Image.fromarray(read_tile(slide, row))
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


# --------------------------------------------------------------------------------------------
# Preview


# viridis at 17 evenly spaced stops (matplotlib's values, 0-255), interpolated linearly: within
# 5/255 of the full map, and the preview (drawn in every tile_slide job) needs no matplotlib
VIRIDIS_STOPS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141), (44, 114, 142),
    (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115), (94, 201, 98),
    (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)], dtype=np.float64)


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB (int, 0-255) of ``values`` in [0, 1] on the viridis colour map."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS_STOPS))
    return np.stack([np.interp(v, stops, VIRIDIS_STOPS[:, k]) for k in range(3)], axis=-1).round().astype(int)


PREVIEW_COLUMNS = ("target_mpp", "x", "y", "size0", "tissue_fraction")


def _preview_columns(tiles) -> dict[str, np.ndarray]:
    """The columns the preview draws, as numpy arrays, from a pyarrow Table or a DataFrame."""
    names = tiles.column_names if hasattr(tiles, "column_names") else list(tiles.columns)
    n = tiles.num_rows if hasattr(tiles, "num_rows") else len(tiles)
    out = {}
    for name in PREVIEW_COLUMNS:
        if name not in names:
            out[name] = np.full(n, np.nan)
        elif hasattr(tiles, "column_names"):
            out[name] = _numpy_of(tiles.column(name))
        else:
            out[name] = tiles[name].to_numpy()
    return out


def _outline_pixels(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, box index) of the 1 px outlines of boxes [x0, x1] x [y0, y1] (inclusive),
    box by box in order (top, bottom, left, right): drawing them in one fancy-index assignment
    lets a later box overwrite a shared edge, as drawing them one by one would."""
    n = len(x0)
    # int32: a preview is a few thousand px wide; half the memory of int64 temporaries
    x0, y0, x1, y1 = (np.asarray(a, np.int32) for a in (x0, y0, x1, y1))
    w, h = x1 - x0 + 1, y1 - y0 + 1
    # per box and side: start (col, row), step (dcol, drow), length
    sc = np.stack([x0, x0, x0, x1], axis=1).ravel()
    sr = np.stack([y0, y1, y0, y0], axis=1).ravel()
    dc = np.tile(np.array([1, 1, 0, 0], np.int32), n)
    dr = np.tile(np.array([0, 0, 1, 1], np.int32), n)
    length = np.stack([w, w, h, h], axis=1).ravel()
    total = int(length.sum())
    starts = np.repeat(np.cumsum(length, dtype=np.int32) - length, length)
    step = np.arange(total, dtype=np.int32) - starts
    rows = np.repeat(sr, length) + np.repeat(dr, length) * step
    cols = np.repeat(sc, length) + np.repeat(dc, length) * step
    return rows, cols, np.repeat(np.arange(n, dtype=np.int32), 2 * (w + h))


PREVIEW_HEADER_PX, PREVIEW_GAP_PX = 18, 8


def _preview_background(background: np.ndarray, max_px: int) -> np.ndarray:
    """The thumbnail as uint8 RGB, shrunk so its longer side is at most ``max_px``."""
    from PIL import Image

    base = np.asarray(background, np.uint8)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    base = base[..., :3]
    scale = min(1.0, max_px / max(base.shape[:2])) if max(base.shape[:2]) else 1.0
    if scale < 1.0:
        bg = Image.fromarray(np.ascontiguousarray(base))
        bg = bg.resize((max(1, int(bg.width * scale)), max(1, int(bg.height * scale))), Image.Resampling.BILINEAR)
        base = np.asarray(bg)
    return base


def preview_canvas(background: np.ndarray, n_panels: int, max_px: int = 1600) -> np.ndarray:
    """The preview before any tile is drawn: white, with the thumbnail under each panel's
    header. Apart from the drawing so that the tiling step makes it while the grid is computed."""
    base = _preview_background(background, max_px)
    ph, pw = base.shape[:2]
    out = np.full((ph + PREVIEW_HEADER_PX, n_panels * (pw + PREVIEW_GAP_PX) - PREVIEW_GAP_PX, 3), 255, np.uint8)
    for k in range(n_panels):
        out[PREVIEW_HEADER_PX:, k * (pw + PREVIEW_GAP_PX):k * (pw + PREVIEW_GAP_PX) + pw] = base
    return out


def _has_panels(canvas: np.ndarray, n_panels: int, background: np.ndarray, max_px: int) -> bool:
    """Whether ``canvas`` is :func:`preview_canvas` of this background with ``n_panels`` panels."""
    h, w = np.shape(background)[:2]
    scale = min(1.0, max_px / max(h, w)) if max(h, w) else 1.0
    ph, pw = (max(1, int(h * scale)), max(1, int(w * scale))) if scale < 1.0 else (h, w)
    return canvas.shape == (ph + PREVIEW_HEADER_PX, n_panels * (pw + PREVIEW_GAP_PX) - PREVIEW_GAP_PX, 3)


def tile_preview_image(background: np.ndarray, tiles, width: int, height: int, max_px: int = 1600,
                       canvas: np.ndarray | None = None) -> np.ndarray:
    """The tile grid over a slide thumbnail, one panel per resolution (uint8 RGB): outlines
    coloured by tissue fraction (viridis); annotations are not drawn (the tiling step never reads
    them). ``background`` covers the whole slide (``width x height`` level-0 px); ``tiles``: a
    tiles table (pyarrow Table or pandas DataFrame). Drawn with array operations (a slide has thousands of tiles), in place
    in ``canvas`` (:func:`preview_canvas` of ``background``) when it has one panel per resolution."""
    from PIL import Image, ImageDraw

    cols = _preview_columns(tiles)
    mpps = list(dict.fromkeys(cols["target_mpp"].tolist())) or [None]
    if canvas is None or not canvas.flags.c_contiguous or not _has_panels(canvas, len(mpps), background, max_px):
        canvas = preview_canvas(background, len(mpps), max_px)
    out = canvas
    gap, header_h = PREVIEW_GAP_PX, PREVIEW_HEADER_PX
    ph = out.shape[0] - header_h
    pw = (out.shape[1] + gap) // len(mpps) - gap
    sx, sy = pw / max(width, 1), ph / max(height, 1)
    for k, mpp in enumerate(mpps):
        left = k * (pw + gap)
        sel = np.ones(len(cols["x"]), bool) if mpp is None else cols["target_mpp"] == mpp
        n_sel = int(sel.sum())
        if n_sel:
            x, y, size0 = cols["x"][sel], cols["y"][sel], cols["size0"][sel]
            x0 = (x * sx).astype(np.int64)
            y0 = (y * sy).astype(np.int64)
            x1 = np.maximum(((x + size0) * sx).astype(np.int64) - 1, x0)
            y1 = np.maximum(((y + size0) * sy).astype(np.int64) - 1, y0)
            colours = viridis(cols["tissue_fraction"][sel]).astype(np.uint8)
            rows, cc, box = _outline_pixels(x0, y0, x1, y1)
            inside = (rows >= 0) & (rows < ph) & (cc >= 0) & (cc < pw)
            if not inside.all():
                rows, cc, box = rows[inside], cc[inside], box[inside]
            # one flat assignment of 3-byte pixels (out is contiguous): ~2x faster than a 2-D
            # fancy index of RGB rows; a later box still overwrites an earlier one's edge
            at = (rows.astype(np.intp) + header_h) * out.shape[1] + cc + left
            out.reshape(-1).view("V3")[at] = colours.reshape(-1).view("V3")[box]
        # PIL's default font is ASCII only: "um/px"
        label = ("no tiles" if mpp is None else
                 f"{mpp:g} um/px: {n_sel} tiles (outline: tissue fraction, viridis)")
        header = Image.new("RGB", (pw, header_h), (255, 255, 255))
        ImageDraw.Draw(header).text((4, 3), label, fill=(0, 0, 0))
        out[:header_h, left:left + pw] = np.asarray(header)
    return out


def _read_overlay(overlay_jpg) -> np.ndarray | None:
    from PIL import Image

    if not overlay_jpg or not Path(overlay_jpg).exists():
        return None
    with Image.open(overlay_jpg) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _read_overlay_or_none(overlay_jpg) -> np.ndarray | None:
    """:func:`_read_overlay`, None when unreadable: decided later, once the slide's status is
    known (a skipped slide's preview ignores it; an ok slide's preview reads it again and fails)."""
    try:
        return _read_overlay(overlay_jpg)
    except OSError:
        return None


def write_tile_preview(slide_json, tiles, overlay_jpg, out_path, max_px: int = 1600,
                       background: np.ndarray | None = None, canvas: np.ndarray | None = None) -> None:
    """The tile grid drawn over the tissue overlay (for the report and for a quick look at what
    will be extracted). ``tiles``: the tiles Parquet's path, or the table itself. A skipped slide
    gets a small blank image. ``background``: the overlay, when the caller has read it already;
    ``canvas``: its :func:`preview_canvas`, drawn on in place."""
    from PIL import Image

    meta = read_json(slide_json)
    if isinstance(tiles, (str, os.PathLike)):
        import pyarrow.parquet as pq

        tiles = pq.read_table(tiles)
    width, height = int(meta.get("width") or 0), int(meta.get("height") or 0)
    if meta.get("status") != "ok" or not width or not height:
        background = canvas = None
    elif background is None:
        background, canvas = _read_overlay(overlay_jpg), None
    if background is None:
        background = np.full((256, 256, 3), 255, np.uint8)
        width = width or 256
        height = height or 256
    image = tile_preview_image(background, tiles, width, height, max_px, canvas=canvas)
    with atomic_path(out_path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=90)
    log.info("slide %s: tile preview %s (%d x %d px)", meta.get("slide_id"), out_path, image.shape[1], image.shape[0])


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
        written = []
        stats, table = _tile_slide(slide_json, mask_png, tissue_json, out_path, settings, seed,
                                   on_error, write=lambda *args: written.append(pool.submit(write_parquet, *args)))
        background, canvas = overlay.result()
        write_tile_preview(slide_json, table, overlay_jpg, preview_path, background=background,  # the table in hand
                           canvas=canvas)
        for future in written:
            future.result()
    return stats
