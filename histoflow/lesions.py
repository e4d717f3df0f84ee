"""Lesion detection on tile-probability maps, and its evaluation: CAMELYON16 lesion-level FROC
and pixel Dice on the tile grid.

Lesions (polygons, Dice): (optionally Gaussian-smoothed) probability map >= ``threshold``,
8-connected components, each a lesion polygon (level-0 px) with area (µm²), max and mean
probability. This is an operating point: Dice depends on ``threshold``.

FROC detections do not depend on ``threshold`` (CAMELYON16 style): every local maximum of the
(smoothed) map with probability > 0 is a detection, scored by its probability; maxima closer
than ``peak_distance_um`` are one (the higher wins). The FROC curve sweeps every detection score,
so it covers the whole probability range, not only the part above ``threshold``.

FROC (CAMELYON16): ground-truth lesions closer than ``merge_distance_um`` (75 µm) merge, done as
in the challenge's evaluation code by dilating each by half that distance. A detection inside a
lesion hits it (only a lesion's best hit counts, further hits are neither TP nor FP); inside an
isolated-tumour-cell lesion (longest axis < ``itc_um``, 275 µm) it is ignored; elsewhere it is a
false positive. Average FPs per slide are over every test slide with ground truth (normal +
tumour); sensitivity is interpolated at 0.25, 0.5, 1, 2, 4, 8 FPs/slide; the FROC score is their
mean. Only test-role slides are scored (holdout: the validation slides' maps are not held out
from model selection, so they are left out).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from .config import defaults_from_schema
from .annotations import lesion_geometry, polygons_of, read_annotations
from .geojson import qupath_feature, write_feature_collection
from .heatmaps import GridGeometry, grid_geometry, rasterize
from .errors import InputError
from .io import atomic_path, read_json, write_json, write_tsv
from .patch_labels import PatchLabelSettings, overlap_fractions
from .tile_probs import read_slide_probs

log = logging.getLogger("histoflow.lesions")

LESION_CLASS = ("Tumor", (220, 20, 60))
FROC_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
@defaults_from_schema("lesions")
class LesionSettings:
    threshold: float
    smooth_sigma: float  # Gaussian sigma in tiles; 0 = no smoothing
    min_area_um2: float  # smaller components are dropped
    merge_distance_um: float  # CAMELYON16: GT lesions closer than this are one lesion
    itc_um: float  # CAMELYON16: GT lesions with a shorter longest axis are ignored
    gt_overlap: float  # a tile is ground-truth tumour for Dice at this lesion overlap
    peak_distance_um: float  # FROC detections: local maxima closer than this are one
    fp_rates: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: dict | None) -> "LesionSettings":
        cfg = {k: v for k, v in (cfg or {}).items() if k in cls.__dataclass_fields__}
        if "fp_rates" in cfg:
            cfg["fp_rates"] = tuple(float(r) for r in cfg["fp_rates"])
        return cls(**cfg)


@dataclass
class Lesion:
    label: int
    cells: np.ndarray          # [k, 2] (row, col) of the component's tiles
    n_tiles: int
    max_prob: float
    mean_prob: float
    peak: tuple[int, int]      # (row, col) of the most probable tile


def smooth_map(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that ignores cells without a tile (NaN): normalised convolution, so
    the tissue border is not dragged towards 0."""
    if sigma <= 0:
        return grid.copy()
    from scipy.ndimage import gaussian_filter

    valid = np.isfinite(grid)
    num = gaussian_filter(np.where(valid, grid, 0.0).astype(np.float64), sigma, mode="constant")
    den = gaussian_filter(valid.astype(np.float64), sigma, mode="constant")
    out = np.where(valid, num / np.maximum(den, 1e-12), np.nan)
    return out.astype(np.float32)


def detect_lesions(grid: np.ndarray, threshold: float, sigma: float = 0.0, min_tiles: int = 1) -> tuple[np.ndarray, list[Lesion]]:
    """Label map (0 = background) and lesions: 8-connected components of smooth(grid) >= threshold.
    max/mean probability are of the unsmoothed map (what the tiles actually scored)."""
    from skimage.measure import label as cc_label

    smoothed = smooth_map(grid, sigma)
    mask = np.nan_to_num(smoothed, nan=-np.inf) >= threshold
    labels = cc_label(mask, connectivity=2).astype(np.int32)
    lesions: list[Lesion] = []
    raw = np.nan_to_num(grid, nan=-np.inf)
    for lab in range(1, int(labels.max()) + 1):
        cells = np.argwhere(labels == lab)
        if len(cells) < min_tiles:
            labels[labels == lab] = 0
            continue
        vals = raw[cells[:, 0], cells[:, 1]]
        k = int(np.argmax(vals))
        lesions.append(Lesion(label=lab, cells=cells, n_tiles=len(cells), max_prob=float(vals[k]),
                              mean_prob=float(vals.mean()), peak=(int(cells[k, 0]), int(cells[k, 1]))))
    return labels, lesions


def froc_detections(grid: np.ndarray, sigma: float = 0.0, min_distance: int = 1) -> list[tuple[int, int, float]]:
    """CAMELYON16-style detections, independent of any threshold: (row, col, score) of every local
    maximum of smooth(grid) (the maximum within ``min_distance`` cells, Chebyshev) with score > 0,
    highest first. A connected plateau of equal maxima is one detection (its cell nearest the
    plateau's centre); of two maxima closer than ``min_distance`` the higher is kept.
    Written on scipy's maximum filter because skimage's peak_local_max returns no peak at all on a
    constant map (a slide whose every tile scored 1.0) and splits plateaus."""
    from scipy.ndimage import find_objects, label, maximum_filter

    img = np.nan_to_num(smooth_map(grid, sigma).astype(np.float64), nan=-1.0)  # no tile: never a peak
    r = max(1, int(min_distance))
    local = (img == maximum_filter(img, size=2 * r + 1, mode="constant", cval=-1.0)) & (img > 0)
    plateaus, _ = label(local, structure=np.ones((3, 3)))
    cand = []
    for lab, box_ in enumerate(find_objects(plateaus), start=1):
        cells = np.argwhere(plateaus[box_] == lab) + [box_[0].start, box_[1].start]
        k = int(np.argmin(((cells - cells.mean(axis=0)) ** 2).sum(axis=1)))
        cand.append(cells[k])
    cand = np.array(cand, dtype=np.int64).reshape(-1, 2)
    scores = img[cand[:, 0], cand[:, 1]]
    order = np.lexsort((cand[:, 1], cand[:, 0], -scores))  # by score, ties in raster order: deterministic
    taken = np.zeros(img.shape, dtype=bool)
    out = []
    for i in order:
        row, col = int(cand[i, 0]), int(cand[i, 1])
        if taken[row, col]:
            continue
        out.append((row, col, float(scores[i])))
        taken[max(0, row - r):row + r + 1, max(0, col - r):col + r + 1] = True
    return out


def cells_polygon(cells: np.ndarray, geom: GridGeometry) -> BaseGeometry:
    """Union of the grid cells (row, col) as a level-0 (Multi)Polygon; row runs merged first."""
    boxes = []
    for r in np.unique(cells[:, 0]):
        cols = np.sort(cells[cells[:, 0] == r, 1])
        breaks = np.nonzero(np.diff(cols) > 1)[0]
        starts = np.concatenate([[cols[0]], cols[breaks + 1]])
        ends = np.concatenate([cols[breaks], [cols[-1]]])
        for c0, c1 in zip(starts, ends):
            boxes.append(box(geom.x0 + c0 * geom.stride0, geom.y0 + r * geom.stride0,
                             geom.x0 + (c1 + 1) * geom.stride0, geom.y0 + (r + 1) * geom.stride0))
    return unary_union(boxes)


def cell_area_um2(geom: GridGeometry, mpp_x: float, mpp_y: float) -> float:
    return (geom.stride0 * mpp_x) * (geom.stride0 * mpp_y)


# --- ground truth ------------------------------------------------------------------------------

def longest_axis(poly: BaseGeometry) -> float:
    """Longest side of the minimum rotated rectangle (level-0 px): the lesion's length."""
    if poly.is_empty:
        return 0.0
    rect = poly.minimum_rotated_rectangle
    if not isinstance(rect, Polygon):
        return float(rect.length)
    xs, ys = rect.exterior.coords.xy
    sides = np.hypot(np.diff(xs), np.diff(ys))
    return float(sides.max())


def evaluation_lesions(gt: BaseGeometry, mpp: float, merge_distance_um: float = 75.0,
                       itc_um: float = 275.0) -> tuple[list[BaseGeometry], list[bool]]:
    """Evaluation regions (dilated by merge_distance/2, merged) and whether each is an ITC
    (longest axis of the undilated tumour inside it < itc_um)."""
    parts = polygons_of(gt)
    if not parts:
        return [], []
    grow = merge_distance_um / 2.0 / mpp
    merged = polygons_of(unary_union([p.buffer(grow) for p in parts]))
    itc = []
    for region in merged:
        inside = unary_union([p for p in parts if p.intersects(region)])
        itc.append(longest_axis(inside) * mpp < itc_um)
    return merged, itc


def match_detections(points: np.ndarray, regions: Sequence[BaseGeometry], itc: Sequence[bool]) -> np.ndarray:
    """For each detection point (x, y): index of the evaluation lesion containing it, -1 outside
    every lesion (false positive), -2 inside an ITC lesion (ignored)."""
    import shapely

    xy = np.asarray(points, dtype=float).reshape(-1, 2)
    hits = np.full(len(xy), -1, dtype=np.int64)
    pts = shapely.points(xy)
    # vectorised per region (a slide has thousands of FROC detections); the first region wins
    for j, region in enumerate(regions):
        free = hits == -1
        if not free.any():
            break
        inside = np.zeros(len(xy), dtype=bool)
        inside[free] = shapely.covers(region, pts[free])
        hits[inside] = -2 if itc[j] else j
    return hits


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|); 1.0 when both are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


@dataclass
class SlideEval:
    """What FROC needs from one slide with ground truth."""

    slide_id: str
    scores: np.ndarray         # detection scores
    hits: np.ndarray           # match_detections output
    n_lesions: int             # evaluation lesions that are not ITC


def froc(slides: Sequence[SlideEval], fp_rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """FROC curve (average FPs per slide vs lesion sensitivity over all thresholds), sensitivity at
    ``fp_rates`` by linear interpolation (as the CAMELYON16 script), and their mean (FROC score)."""
    n_slides = len(slides)
    total_lesions = sum(s.n_lesions for s in slides)
    fp_scores, lesion_scores = [], []
    for s in slides:
        scores, hits = np.asarray(s.scores, float), np.asarray(s.hits)
        fp_scores.extend(scores[hits == -1].tolist())
        for j in np.unique(hits[hits >= 0]):
            lesion_scores.append(float(scores[hits == j].max()))  # a lesion counts once, at its best hit
    if n_slides == 0 or total_lesions == 0:
        return {"available": False, "reason": "no slide with ground truth" if n_slides == 0 else
                "no ground-truth lesion (all normal or ITC)", "n_slides": n_slides, "n_lesions": total_lesions}
    fp_scores_a, lesion_scores_a = np.asarray(fp_scores), np.asarray(lesion_scores)
    thresholds = np.unique(np.concatenate([fp_scores_a, lesion_scores_a]))[::-1]
    # counts of scores >= each threshold by binary search: detections now span the whole
    # probability range (thousands per slide), so no per-threshold pass over all of them
    fp_sorted, lesion_sorted = np.sort(fp_scores_a), np.sort(lesion_scores_a)
    fps = np.r_[0.0, (len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")) / n_slides]
    sens = np.r_[0.0, (len(lesion_sorted) - np.searchsorted(lesion_sorted, thresholds, side="left")) / total_lesions]
    curve = pd.DataFrame({"fp": fps, "sens": sens}).groupby("fp", as_index=False)["sens"].max()
    at = np.interp(np.asarray(fp_rates, float), curve["fp"].to_numpy(), curve["sens"].to_numpy())
    # the stored curve keeps every point where sensitivity changes and both ends of each flat run
    # (the interpolation and the plot are the same; the JSON stays small)
    keep = np.ones(len(sens), dtype=bool)
    if len(sens) > 2:
        keep[1:-1] = (sens[1:-1] != sens[:-2]) | (sens[2:] != sens[1:-1])
    t_all = np.r_[np.nan, thresholds]
    return {"available": True, "n_slides": n_slides, "n_lesions": total_lesions,
            "n_detections": int(sum(len(s.scores) for s in slides)),
            "fp_rates": [float(r) for r in fp_rates], "sensitivity": [float(v) for v in at],
            "froc_score": float(np.mean(at)),
            "curve": {"thresholds": [None if np.isnan(t) else float(t) for t in t_all[keep]],
                      "avg_fp": [float(v) for v in fps[keep]], "sensitivity": [float(v) for v in sens[keep]]}}


# --- per slide and cohort (rule entry points) ------------------------------------------------

def _has(value) -> bool:
    return bool(value) and not (isinstance(value, float) and np.isnan(value))


def lesions_for_slide(slide_id: str, source: str, prob_paths: list[str], slide_json: str, annotations: str | None,
                      slide_label: str, positive_label: str, cohort_has_annotations: bool, settings: dict | LesionSettings,
                      label_settings: dict | PatchLabelSettings, out_geojson: str | os.PathLike,
                      out_json: str | os.PathLike) -> dict:
    """``lesions/{source}/{slide_id}.geojson`` (lesion polygons) and ``.json`` (detections and
    their ground-truth matches for FROC, Dice counts)."""
    settings = settings if isinstance(settings, LesionSettings) else LesionSettings.from_config(settings)
    label_settings = label_settings if isinstance(label_settings, PatchLabelSettings) else \
        PatchLabelSettings.from_config(label_settings)
    meta = read_json(slide_json)
    positive = str(slide_label) == str(positive_label)
    record: dict[str, Any] = {"slide_id": slide_id, "source": source, "label": str(slide_label), "status": "ok",
                              "settings": asdict(settings)}
    # holdout: a test slide's map is the mean of the fold models' maps, as its slide-level prediction
    frame, fold, role = read_slide_probs(prob_paths, slide_id, mean_over_test_folds=True)
    if meta.get("status") == "skipped" or frame.empty:
        record.update(status="skipped" if meta.get("status") == "skipped" else "no_tiles", reason=meta.get("reason"),
                      gt_available=False, detections=[], lesions=[], n_lesions_detected=0, n_detections=0)
        write_feature_collection(out_geojson, [])
        write_json(out_json, record)
        return record
    if not meta.get("mpp_x"):
        raise InputError(f"slide {slide_id!r}: slides/{slide_id}.json has no mpp_x, so lesion areas in µm² are "
                         "unknown; give the sheet's `mpp` column or config default_mpp")
    mpp_x = float(meta["mpp_x"])
    mpp_y = float(meta.get("mpp_y") or mpp_x)
    geom = grid_geometry(frame)
    shape = (geom.n_rows, geom.n_cols)
    grid = rasterize(frame["col"], frame["row"], frame["prob"], shape)
    cell_um2 = cell_area_um2(geom, mpp_x, mpp_y)
    min_tiles = max(1, int(np.ceil(settings.min_area_um2 / cell_um2 - 1e-9))) if settings.min_area_um2 > 0 else 1
    labels, lesions = detect_lesions(grid, settings.threshold, settings.smooth_sigma, min_tiles)
    index = rasterize(frame["col"], frame["row"], np.arange(len(frame)), shape, fill=-1).astype(np.int64)

    def centre(cell) -> tuple[float, float]:
        t = frame.iloc[index[cell]]
        return float(t["x"] + t["size0"] / 2.0), float(t["y"] + t["size0"] / 2.0)

    features, components = [], []
    for les in lesions:
        px, py = centre(les.peak)
        area = les.n_tiles * cell_um2
        features.append(qupath_feature(cells_polygon(les.cells, geom), "annotation", LESION_CLASS[0], LESION_CLASS[1],
                                       {"area_um2": area, "max_prob": les.max_prob, "mean_prob": les.mean_prob,
                                        "n_tiles": les.n_tiles, "peak_x": px, "peak_y": py},
                                       name=f"lesion {len(features) + 1}"))
        components.append({"x": px, "y": py, "max_prob": les.max_prob, "area_um2": area, "n_tiles": les.n_tiles,
                           "mean_prob": les.mean_prob})
    # FROC detections: local maxima over the whole probability range, whatever lesions.threshold is
    cell_um = geom.stride0 * (mpp_x + mpp_y) / 2.0
    min_distance = max(1, int(np.ceil(settings.peak_distance_um / cell_um - 1e-9)))
    detections = []
    for row, col, score in froc_detections(grid, settings.smooth_sigma, min_distance):
        px, py = centre((row, col))
        detections.append({"x": px, "y": py, "score": score})
    record.update(fold=fold, role=role, n_tiles=len(frame), n_lesions_detected=len(lesions),
                  n_detections=len(detections), detected_area_um2=float(sum(c["area_um2"] for c in components)),
                  max_prob=float(np.nanmax(grid)), cell_area_um2=cell_um2, peak_distance_cells=min_distance)
    # ground truth: the slide's annotations; a negative slide is lesion-free when the cohort is annotated
    gt = None
    if not positive and (cohort_has_annotations or _has(annotations)):
        gt = Polygon()
    elif positive and _has(annotations):
        gt = lesion_geometry(read_annotations(annotations), label_settings.positive_classes, label_settings.exclude_classes)
    record["gt_available"] = gt is not None
    if gt is not None:
        regions, itc = evaluation_lesions(gt, (mpp_x + mpp_y) / 2.0, settings.merge_distance_um, settings.itc_um)
        hits = match_detections(np.array([[d["x"], d["y"]] for d in detections]).reshape(-1, 2), regions, itc)
        for d, h in zip(detections, hits):
            d["hit"] = int(h)
        overlap = overlap_fractions(frame["x"].to_numpy(), frame["y"].to_numpy(), frame["size0"].to_numpy(), gt)
        truth = rasterize(frame["col"], frame["row"], overlap >= settings.gt_overlap, shape, fill=0) > 0
        pred = labels > 0
        record.update(n_gt_lesions=int(sum(not i for i in itc)), n_gt_itc=int(sum(itc)),
                      gt_area_um2=float(gt.area * mpp_x * mpp_y), dice=dice(pred, truth),
                      dice_intersection=int((pred & truth).sum()), dice_pred=int(pred.sum()), dice_truth=int(truth.sum()))
    record["lesions"] = components
    record["detections"] = detections
    write_feature_collection(out_geojson, features)
    write_json(out_json, record)
    log.info("%s: %d lesions, %d FROC detections (fold %s, %s), GT %s", slide_id, len(lesions), len(detections), fold, role,
             "available" if gt is not None else "not available")
    return record


def plot_froc(result: dict, out_png: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if result.get("available"):
        c = result["curve"]
        ax.plot(c["avg_fp"], c["sensitivity"], drawstyle="default", color="tab:red", label="FROC")
        ax.scatter(result["fp_rates"], result["sensitivity"], color="black", zorder=3,
                   label=f"FROC score {result['froc_score']:.3f}")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlim(0, max(8.0, max(c["avg_fp"])) * 1.3)  # the 8-FP point inside the frame
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, f"FROC not available:\n{result.get('reason')}", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


PER_SLIDE_COLUMNS = ["slide_id", "label", "status", "fold", "role", "n_tiles", "n_lesions_detected", "detected_area_um2",
                     "max_prob", "gt_available", "n_gt_lesions", "n_gt_itc", "gt_area_um2", "n_tp", "n_fp", "dice",
                     "n_detections", "evaluated"]


def summarize_lesions(slide_jsons: list[str], source: str, settings: dict | LesionSettings, out_metrics: str | os.PathLike,
                      out_tsv: str | os.PathLike, out_png: str | os.PathLike) -> dict:
    """``lesions/{source}/metrics.json`` (FROC, Dice), ``per_slide.tsv``, ``froc.png``.

    Only test-role slides with ground truth are scored (``evaluated``): with a holdout split the
    other slides' maps come from the fold where they were validation slides (used for early
    stopping and calibration), not held out. ``n_tp``/``n_fp`` per slide are at the operating point
    ``lesions.threshold``; the FROC curve sweeps every detection score."""
    settings = settings if isinstance(settings, LesionSettings) else LesionSettings.from_config(settings)
    records = [read_json(p) for p in slide_jsons]
    evals, rows, scored = [], [], []
    for r in records:
        dets = r.get("detections", [])
        row = {k: r.get(k) for k in PER_SLIDE_COLUMNS}
        row["evaluated"] = bool(r.get("gt_available")) and r.get("role") == "test"
        if row["evaluated"]:
            hits = np.array([d["hit"] for d in dets], dtype=np.int64)
            scores = np.array([d["score"] for d in dets], float)
            evals.append(SlideEval(r["slide_id"], scores, hits, int(r["n_gt_lesions"])))
            at = scores >= settings.threshold
            row["n_tp"] = int(len(np.unique(hits[at & (hits >= 0)])))
            row["n_fp"] = int((at & (hits == -1)).sum())
            scored.append(r)
        rows.append(row)
    result = froc(evals, settings.fp_rates)
    result["evaluated_role"] = "test"
    dice_info: dict[str, Any] = {"available": bool(scored), "evaluated_role": "test",
                                 "threshold": settings.threshold}
    if scored:
        inter = sum(r["dice_intersection"] for r in scored)
        denom = sum(r["dice_pred"] + r["dice_truth"] for r in scored)
        tumour = [r["dice"] for r in scored if r["dice_truth"] > 0]
        dice_info.update(pooled=1.0 if denom == 0 else 2.0 * inter / denom,
                         mean_all_slides=float(np.mean([r["dice"] for r in scored])),
                         mean_tumour_slides=float(np.mean(tumour)) if tumour else None,
                         n_slides=len(scored), n_tumour_slides=len(tumour))
    else:
        dice_info["reason"] = ("no test slide with ground truth (add `annotations` to the samples sheet)"
                               if not any(r.get("gt_available") for r in records) else "no test-role slide with ground truth")
    with_gt = [r for r in records if r.get("gt_available")]
    metrics = {"source": source, "settings": asdict(settings), "n_slides": len(records),
               "n_slides_with_gt": len(with_gt), "n_slides_evaluated": len(scored),
               "n_slides_not_test": int(sum(1 for r in records if r.get("role") in ("val", "train"))),
               "n_lesions_detected": int(sum(r.get("n_lesions_detected", 0) for r in records)),
               "froc_detections": ("local maxima of the (smoothed) tile-probability map, each scored by its probability, "
                                   f"maxima within {settings.peak_distance_um:g} µm merged; every score is a threshold of the curve"),
               "froc": result, "dice": dice_info}
    write_json(out_metrics, metrics)
    write_tsv(out_tsv, pd.DataFrame(rows, columns=PER_SLIDE_COLUMNS))
    plot_froc(result, out_png, f"lesion FROC ({source}, {len(evals)} test slides)")
    return metrics
