"""Heatmaps: tile probabilities (and MIL attention) rasterised on the tile grid, drawn over the
slide thumbnail with the tissue outline, plus a QuPath GeoJSON of the tiles as detections."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from shapely.geometry import box

from .config import defaults_from_schema
from .geojson import qupath_feature, write_feature_collection
from .io import atomic_path, read_json
from .tile_probs import class_columns, read_slide_probs, target_kind

# what the tile score means per target (histoflow.targets): the first panel's label
SCORE_LABEL = {"binary": "tumour probability", "multiclass": "P(evidence of any class)",
               "survival": "tile risk (sigmoid of the tile's Cox risk)",
               "regression": "tile score (sigmoid of the tile's standardised value)"}

log = logging.getLogger("histoflow.heatmaps")

TUMOR_CLASS = ("Tumor", (200, 0, 0))
NON_TUMOR_CLASS = ("Non-tumor", (0, 150, 60))
# never decode more than this many pixels for a thumbnail (single-level giant slides fall back to the mask)
MAX_THUMB_READ_PX = 64_000_000


@dataclass(frozen=True)
@defaults_from_schema("heatmaps")
class HeatmapSettings:
    cmap: str
    alpha: float
    threshold: float  # tiles at/above are classified Tumor in the GeoJSON
    thumbnail_px: int  # longest side of the thumbnail
    dpi: int

    @classmethod
    def from_config(cls, cfg: dict | None) -> "HeatmapSettings":
        return cls(**{k: v for k, v in (cfg or {}).items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GridGeometry:
    """Level-0 position of the tile grid: tile (col, row) starts at (x0 + col*stride, y0 + row*stride)."""

    x0: float
    y0: float
    stride0: float
    n_cols: int
    n_rows: int

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """matplotlib imshow extent (left, right, bottom, top) in level-0 px, origin upper."""
        return (self.x0, self.x0 + self.n_cols * self.stride0, self.y0 + self.n_rows * self.stride0, self.y0)

    def cell_center(self, col, row) -> tuple[np.ndarray, np.ndarray]:
        return self.x0 + (np.asarray(col) + 0.5) * self.stride0, self.y0 + (np.asarray(row) + 0.5) * self.stride0


def grid_geometry(frame: pd.DataFrame) -> GridGeometry:
    """The grid's origin and stride (level-0 px) from tile coordinates and their (col, row)."""
    col = frame["col"].to_numpy(dtype=float)
    row = frame["row"].to_numpy(dtype=float)
    x = frame["x"].to_numpy(dtype=float)
    y = frame["y"].to_numpy(dtype=float)
    stride = None
    for idx, pos in ((col, x), (row, y)):
        if np.ptp(idx) > 0:
            # least squares x = x0 + col * stride: exact for a regular grid
            stride = float(np.polyfit(idx, pos, 1)[0])
            break
    if stride is None:
        stride = float(frame["size0"].iloc[0])
    x0 = float(np.median(x - col * stride))
    y0 = float(np.median(y - row * stride))
    return GridGeometry(x0, y0, stride, int(col.max()) + 1, int(row.max()) + 1)


def rasterize(col: np.ndarray, row: np.ndarray, values: np.ndarray, shape: tuple[int, int] | None = None,
              fill: float = np.nan) -> np.ndarray:
    """A [n_rows, n_cols] float32 image with ``values`` at [row, col]; cells without a tile = ``fill``."""
    col = np.asarray(col, dtype=np.int64)
    row = np.asarray(row, dtype=np.int64)
    if shape is None:
        shape = (int(row.max()) + 1 if len(row) else 0, int(col.max()) + 1 if len(col) else 0)
    grid = np.full(shape, fill, dtype=np.float32)
    grid[row, col] = np.asarray(values, dtype=np.float32)
    return grid


def tiles_geojson_features(frame: pd.DataFrame, threshold: float) -> list[dict]:
    """One QuPath detection per tile (level-0 square), class Tumor/Non-tumor at ``threshold``
    (multi-class tables: the tile's most probable class), measurements prob (per class when
    multi-class, and attention when present)."""
    feats = []
    has_att = "attention" in frame and frame["attention"].notna().any()
    per_class = class_columns(frame.drop(columns=["prob"]))
    palette = [(200, 0, 0), (0, 150, 60), (30, 90, 200), (220, 140, 0), (140, 60, 180), (0, 160, 170)]
    for t in frame.to_dict("records"):
        if per_class:
            k = int(np.nanargmax([t[c] for c in per_class])) if np.isfinite([t[c] for c in per_class]).any() else 0
            cls = (per_class[k][len("prob_"):], palette[k % len(palette)])
            meas = {c: float(t[c]) for c in per_class}
        else:
            cls = TUMOR_CLASS if t["prob"] >= threshold else NON_TUMOR_CLASS
            meas = {"prob": float(t["prob"])}
        if has_att:
            meas["attention"] = float(t["attention"])
        feats.append(qupath_feature(box(t["x"], t["y"], t["x"] + t["size0"], t["y"] + t["size0"]), "detection", cls[0],
                                    cls[1], meas, name=f"tile c{int(t['col'])} r{int(t['row'])}"))
    return feats


def _thumbnail(slide_meta: dict, max_px: int) -> np.ndarray | None:
    """RGB thumbnail covering the whole level-0 extent, read from a coarse pyramid level."""
    try:
        from .wsi import open_slide

        with open_slide(slide_meta["path"], slide_meta.get("slide_id", "?"), slide_meta.get("colour_fix"),
                        record=slide_meta) as slide:
            ds = max(slide.dimensions) / max_px
            level = slide.best_level_for_downsample(max(ds, 1.0))
            w, h = slide.level_dimensions[level]
            if w * h > MAX_THUMB_READ_PX:
                log.warning("no pyramid level small enough for a thumbnail; drawing on the tissue mask")
                return None
            return slide.thumbnail(max_px)
    except Exception as err:  # the heatmap is still useful on a blank background
        log.warning("thumbnail unavailable (%s); drawing on a blank background", err)
        return None


def _tissue_mask(tissue_png: str | None, tissue_json: str | None) -> tuple[np.ndarray, float, float] | None:
    if not tissue_png or not Path(tissue_png).exists() or not tissue_json or not Path(tissue_json).exists():
        return None
    from PIL import Image

    stats = read_json(tissue_json)
    mask = np.asarray(Image.open(tissue_png).convert("L")) > 127
    return mask, float(stats.get("scale_x", 1.0)), float(stats.get("scale_y", 1.0))


def render_heatmap(out_png: str | os.PathLike, panels: list[tuple[str, np.ndarray, tuple[float, float]]],
                   geometry: GridGeometry | None, width0: float, height0: float, thumbnail: np.ndarray | None,
                   tissue: tuple[np.ndarray, float, float] | None, title: str, settings: HeatmapSettings,
                   message: str | None = None) -> None:
    """One panel per map (label, grid, (vmin, vmax)): thumbnail, translucent map, tissue outline, colourbar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    aspect = height0 / width0 if width0 else 1.0
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, max(3.0, 5.0 * aspect) + 0.6), squeeze=False)
    for ax, panel in zip(axes[0], panels or [("", None, (0, 1))]):
        label, grid, (vmin, vmax) = panel
        if thumbnail is not None:
            ax.imshow(thumbnail, extent=(0, width0, height0, 0))
        if tissue is not None:
            mask, sx, sy = tissue
            ys, xs = np.arange(mask.shape[0]) * sy + sy / 2, np.arange(mask.shape[1]) * sx + sx / 2
            ax.contour(xs, ys, mask.astype(float), levels=[0.5], colors="black", linewidths=0.7)
        if grid is not None and geometry is not None and grid.size:
            im = ax.imshow(np.ma.masked_invalid(grid), extent=geometry.extent, cmap=settings.cmap, vmin=vmin, vmax=vmax,
                           alpha=settings.alpha, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)
        if message:
            ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", wrap=True)
        ax.set_xlim(0, width0 or 1)
        ax.set_ylim(height0 or 1, 0)
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        # the panels' captions, readable without looking at the pixels (PNG text chunk)
        fig.savefig(tmp, dpi=settings.dpi, format="png",
                    metadata={"histoflow.panels": "; ".join(p[0] for p in panels)})
    plt.close(fig)


def heatmap_for_slide(slide_id: str, source: str, prob_paths: list[str], slide_json: str, tissue_json: str | None,
                      tissue_png: str | None, out_png: str | os.PathLike, out_geojson: str | os.PathLike,
                      settings: dict | HeatmapSettings, target: str | None = None) -> dict:
    """Rule entry point: ``heatmaps/{source}/{slide_id}.png`` and ``.geojson`` from the fold in
    which the slide is a test slide. ``target`` (binary | multiclass | survival | regression;
    None: from the tables' metadata) names the tile score; multi-class tables (prob_<class>
    columns) get one panel per class, survival the tile risk, both beside the attention."""
    settings = settings if isinstance(settings, HeatmapSettings) else HeatmapSettings.from_config(settings)
    if target is None:
        target = next((target_kind(p) for p in prob_paths if Path(p).exists()), "binary")
    meta = read_json(slide_json)
    frame, fold, role = read_slide_probs(prob_paths, slide_id)
    width0, height0 = float(meta.get("width") or 0), float(meta.get("height") or 0)
    if meta.get("status") == "skipped" or frame.empty:
        why = f"slide skipped: {meta.get('reason')}" if meta.get("status") == "skipped" else "no scored tiles"
        log.info("%s: %s; writing an empty heatmap", slide_id, why)
        render_heatmap(out_png, [], None, width0 or 1, height0 or 1, None, None, f"{slide_id} ({source})", settings,
                       message=why)
        write_feature_collection(out_geojson, [])
        return {"slide_id": slide_id, "status": "empty", "reason": why}
    geom = grid_geometry(frame)
    shape = (geom.n_rows, geom.n_cols)
    per_class = class_columns(frame.drop(columns=["prob"]))
    if per_class:   # multi-class: P(tile is evidence of class c), a panel per class
        panels = [(f"P({c[len('prob_'):]})", rasterize(frame["col"], frame["row"], frame[c], shape), (0.0, 1.0))
                  for c in per_class]
    else:
        panels = [(SCORE_LABEL.get(target, SCORE_LABEL["binary"]),
                   rasterize(frame["col"], frame["row"], frame["prob"], shape), (0.0, 1.0))]
    att = frame["attention"].to_numpy(dtype=float) if "attention" in frame else np.array([np.nan])
    if np.isfinite(att).any():
        lo, hi = np.nanmin(att), np.nanmax(att)
        # attention sums to 1 over a bag, so its scale shrinks with tile count: min-max per slide
        scaled = (att - lo) / (hi - lo) if hi > lo else np.zeros_like(att)
        panels.append(("attention (min-max per slide)", rasterize(frame["col"], frame["row"], scaled, shape), (0.0, 1.0)))
    if not width0 or not height0:
        width0, height0 = geom.extent[1], geom.extent[2]
    title = f"{slide_id}: {source}, fold {fold} ({role}), {len(frame)} tiles @ {frame['target_mpp'].iloc[0]:g} µm/px"
    render_heatmap(out_png, panels, geom, width0, height0, _thumbnail(meta, settings.thumbnail_px),
                   _tissue_mask(tissue_png, tissue_json), title, settings)
    write_feature_collection(out_geojson, tiles_geojson_features(frame, settings.threshold))
    return {"slide_id": slide_id, "status": "ok", "fold": fold, "role": role, "n_tiles": len(frame)}
