"""Slide-level feature engineering from a tumour-probability map (the CAMELYON16-winning path):
tumour percentage and area, tumour regions (connected components), largest region and its major
axis, and statistics of the positive (>= t) and negative (< t) probabilities, at several
thresholds. Pure functions on the tile grid; the table I/O is at the bottom."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from .config import defaults_from_schema

STAT_NAMES = ("mean", "median", "mode", "var", "sd", "min", "max", "range", "sum", "count")


@dataclass(frozen=True)
@defaults_from_schema("slide_features")
class SlideFeatureSettings:
    thresholds: tuple[float, ...]
    mode_bins: int

    @classmethod
    def from_config(cls, section: dict | None) -> "SlideFeatureSettings":
        section = dict(section or {})
        return cls(thresholds=tuple(float(t) for t in section.get("thresholds", cls.thresholds)),
                   mode_bins=int(section.get("mode_bins", cls.mode_bins)))


def probability_stats(values: np.ndarray, prefix: str, mode_bins: int = 10) -> dict[str, float]:
    """Mean, median, binned mode, variance, SD, min, max, range, sum and count of ``values``.
    An empty set gives zeros (a slide with no tumour tile has no positive probabilities)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {f"{prefix}_{name}": 0.0 for name in STAT_NAMES}
    hist, edges = np.histogram(values, bins=mode_bins, range=(0.0, 1.0))
    mode = float((edges[np.argmax(hist)] + edges[np.argmax(hist) + 1]) / 2)
    return {
        f"{prefix}_mean": float(values.mean()), f"{prefix}_median": float(np.median(values)),
        f"{prefix}_mode": mode, f"{prefix}_var": float(values.var()), f"{prefix}_sd": float(values.std()),
        f"{prefix}_min": float(values.min()), f"{prefix}_max": float(values.max()),
        f"{prefix}_range": float(values.max() - values.min()), f"{prefix}_sum": float(values.sum()),
        f"{prefix}_count": float(values.size),
    }


def probability_grid(cols: np.ndarray, rows: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Rasterise tile probabilities on their (col, row) grid; NaN where there is no tissue tile."""
    cols = np.asarray(cols, dtype=int)
    rows = np.asarray(rows, dtype=int)
    if cols.size == 0:
        return np.full((0, 0), np.nan)
    grid = np.full((rows.max() + 1, cols.max() + 1), np.nan)
    grid[rows, cols] = probs
    return grid


def region_features(grid: np.ndarray, threshold: float, cell_um: float) -> dict[str, float]:
    """Connected tumour regions (8-connectivity) of ``grid >= threshold``: count, largest area
    in µm², and the largest region's major axis in µm (from its second moments)."""
    mask = np.nan_to_num(grid, nan=0.0) >= threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return {"n_regions": 0.0, "largest_region_um2": 0.0, "largest_region_major_axis_um": 0.0}
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    rr, cc = np.nonzero(labels == largest)
    if rr.size > 1:
        cov = np.cov(np.vstack([rr, cc]).astype(float)) + np.eye(2) / 12.0  # pixel extent
        major = 4.0 * np.sqrt(np.linalg.eigvalsh(cov).max())
    else:
        major = 1.0
    return {"n_regions": float(n), "largest_region_um2": float(sizes.max() * cell_um ** 2),
            "largest_region_major_axis_um": float(major * cell_um)}


def slide_features(cols: np.ndarray, rows: np.ndarray, probs: np.ndarray, cell_um: float,
                   settings: SlideFeatureSettings = SlideFeatureSettings()) -> dict[str, float]:
    """Every slide-level feature of one slide's tile probabilities (``cell_um``: grid step in µm)."""
    probs = np.asarray(probs, dtype=float)
    n_tiles = probs.size
    features: dict[str, float] = {"n_tissue_tiles": float(n_tiles),
                                  "tissue_area_mm2": float(n_tiles * cell_um ** 2 / 1e6)}
    features.update(probability_stats(probs, "all", settings.mode_bins))
    grid = probability_grid(cols, rows, probs)
    for t in settings.thresholds:
        tag = f"t{int(round(t * 100)):02d}"
        positive = probs >= t
        features[f"{tag}_tumour_pct"] = float(positive.mean() * 100) if n_tiles else 0.0
        features[f"{tag}_tumour_area_mm2"] = float(positive.sum() * cell_um ** 2 / 1e6)
        for name, value in region_features(grid, t, cell_um).items():
            features[f"{tag}_{name}"] = value
        features.update(probability_stats(probs[positive], f"{tag}_pos", settings.mode_bins))
        features.update(probability_stats(probs[~positive], f"{tag}_neg", settings.mode_bins))
    return features


def grid_step_um(tiles: pd.DataFrame, mpp_x: float) -> float:
    """Grid step in µm: level-0 stride between neighbouring columns times the slide's µm/px
    (equals the tile side when tiles do not overlap)."""
    if len(tiles) >= 2 and tiles["col"].nunique() > 1:
        by_col = tiles.groupby("col")["x"].min().sort_index()
        steps = np.diff(by_col.to_numpy()) / np.diff(by_col.index.to_numpy())
        return float(np.median(steps) * mpp_x)
    return float(tiles["size0"].iloc[0] * mpp_x) if len(tiles) else 0.0


def cohort_slide_features(tile_probs: pd.DataFrame, slide_mpp: dict[str, float], splits: pd.DataFrame,
                          settings: SlideFeatureSettings, provenance: dict | None = None) -> pd.DataFrame:
    """One row per (slide, fold) of the split table (slide_id, patient_id, y, fold, role) from a
    long tile-probability table (slide_id, fold, x, col, row, size0, prob). A slide without a single
    tile still gets a row (zeros), so no slide silently drops out of the comparison.
    ``provenance``: (fold, slide_id) -> the model that scored its tiles (column
    ``tile_probs_model``; default ``fold{k}``, the outer fold's model)."""
    by_key = {key: part for key, part in tile_probs.groupby(["fold", "slide_id"], sort=False)}
    empty = tile_probs.iloc[0:0]
    rows = []

    def _target_value(y):  # a class index stays an int; a regression value stays a float
        return int(y) if float(y).is_integer() else float(y)

    for rec in splits.sort_values(["fold", "slide_id"]).to_dict("records"):
        part = by_key.get((rec["fold"], rec["slide_id"]), empty)
        cell = grid_step_um(part, slide_mpp.get(rec["slide_id"], 0.0))
        feats = slide_features(part["col"].to_numpy(), part["row"].to_numpy(), part["prob"].to_numpy(), cell, settings)
        model = (provenance or {}).get((int(rec["fold"]), rec["slide_id"]), f"fold{int(rec['fold'])}")
        # survival: the slide's time and event ride along (targets, never features)
        outcome = {k: rec[k] for k in ("time", "event") if k in rec and pd.notna(rec[k])}
        rows.append({"slide_id": rec["slide_id"], "patient_id": rec["patient_id"], "y": _target_value(rec["y"]),
                     **outcome, "fold": int(rec["fold"]), "role": rec["role"], "tile_probs_model": model, **feats})
    return pd.DataFrame(rows)


def honest_tile_probs(fold_probs: pd.DataFrame, crossfit_paths: list[str]) -> tuple[pd.DataFrame, dict]:
    """Fold models' tile probabilities with every train-role slide's rows replaced by its
    cross-fitted ones (:mod:`histoflow.crossfit`: scored by an inner model that did not see it),
    and the provenance of each (fold, slide): ``fold{k}`` (the outer model: val and test
    slides) or ``fold{k}.inner{j}``."""
    from .crossfit import crossfit_models

    parts, provenance = [fold_probs[fold_probs["role"] != "train"]], {}
    for path in crossfit_paths:
        cf = pd.read_parquet(path)
        outer = int((pq_metadata(path).get("histoflow.outer_fold")) or cf["fold"].iloc[0])
        for j, info in crossfit_models(path).items():
            for sid in info["scored"]:
                provenance[(outer, sid)] = f"fold{outer}.inner{int(j)}"
        parts.append(cf.drop(columns=["inner_fold"], errors="ignore"))
    return pd.concat(parts, ignore_index=True), provenance


def pq_metadata(path: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    return {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}


def write_slide_features(tile_prob_paths: list[str], splits_path: str, slide_jsons: list[str], out_path: str,
                         settings: dict | None, source: str, crossfit_paths: list[str] | None = None) -> None:
    """Rule `slide_features`: one Parquet per tumour-probability source, a row per (slide, fold).
    With ``crossfit_paths`` (one per outer fold), train-role rows come from cross-fitted tile
    probabilities (what the slide classifiers train on); without, they are in-sample and
    ``tile_probs_model`` says so (``fold{k}`` on a train row)."""
    import json

    from .io import write_parquet
    from .logs import get_logger

    log = get_logger(__name__)
    cfg = SlideFeatureSettings.from_config(settings)
    tile_probs = pd.concat([pd.read_parquet(p) for p in tile_prob_paths], ignore_index=True)
    provenance = None
    if crossfit_paths:
        tile_probs, provenance = honest_tile_probs(tile_probs, list(crossfit_paths))
    splits = pd.read_csv(splits_path, sep="\t", dtype={"slide_id": str, "patient_id": str})
    slide_mpp = {}
    for path in slide_jsons:
        meta = json.loads(open(path).read())
        slide_mpp[meta["slide_id"]] = float(meta.get("mpp_x") or 0.0)
    table = cohort_slide_features(tile_probs, slide_mpp, splits, cfg, provenance)
    log.info("source %s: %d slide-fold rows, %d features (train rows %s)", source, len(table), table.shape[1] - 6,
             "cross-fitted" if crossfit_paths else "in-sample")
    write_parquet(out_path, table, metadata={"histoflow.source": source,
                                             "histoflow.thresholds": ",".join(map(str, cfg.thresholds)),
                                             "histoflow.train_tile_probs": "crossfit" if crossfit_paths else "in_sample"})
