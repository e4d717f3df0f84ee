"""Tile (patch) labels from lesion polygons, by the fraction of each tile the lesion covers.

label 1: overlap >= positive_overlap; 0: overlap <= negative_overlap; -1: in between (ambiguous,
never used for training). Every tile of a slide whose slide label is negative is 0; tiles of a
positive slide without annotations are -1 (their class is unknown).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from shapely import STRtree, area, box, intersection
from shapely.geometry.base import BaseGeometry

from .config import defaults_from_schema, section_defaults
from .annotations import DEFAULT_EXCLUDE_CLASSES, lesion_geometry, polygons_of, read_annotations
from .errors import InputError
from .io import read_json, write_parquet, write_tsv

log = logging.getLogger("histoflow.patch_labels")

COORD_COLUMNS = ["slide_id", "x", "y", "target_mpp", "tile_px", "size0", "col", "row"]
LABEL_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("x", pa.int64()), ("y", pa.int64()), ("target_mpp", pa.float64()),
    ("tile_px", pa.int32()), ("size0", pa.int32()), ("col", pa.int32()), ("row", pa.int32()),
    ("overlap", pa.float32()), ("label", pa.int8()),
])


@dataclass(frozen=True)
@defaults_from_schema("patch_labels")
class PatchLabelSettings:
    positive_overlap: float
    negative_overlap: float
    positive_classes: tuple[str, ...]
    exclude_classes: tuple[str, ...] = DEFAULT_EXCLUDE_CLASSES

    @classmethod
    def from_config(cls, cfg: dict | None) -> "PatchLabelSettings":
        cfg = {**section_defaults("patch_labels"), **dict(cfg or {})}
        s = cls(positive_overlap=float(cfg["positive_overlap"]),
                negative_overlap=float(cfg["negative_overlap"]),
                positive_classes=tuple(cfg.get("positive_classes") or ()),
                exclude_classes=tuple(cfg.get("exclude_classes") or DEFAULT_EXCLUDE_CLASSES))
        if not 0.0 <= s.negative_overlap < s.positive_overlap <= 1.0:
            raise InputError("config patch_labels: need 0 <= negative_overlap < positive_overlap <= 1 "
                             f"(got {s.negative_overlap} and {s.positive_overlap})")
        return s


def overlap_fractions(x: np.ndarray, y: np.ndarray, size0: np.ndarray, geom: BaseGeometry) -> np.ndarray:
    """Fraction of each square tile (top-left x, y, side size0; level-0 px) covered by ``geom``.

    An STRtree over the lesion parts keeps this near-linear in the number of tiles.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    size0 = np.broadcast_to(np.asarray(size0, dtype=float), x.shape)
    out = np.zeros(len(x), dtype=np.float64)
    parts = polygons_of(geom)
    if not len(x) or not parts:
        return out.astype(np.float32)
    tiles = box(x, y, x + size0, y + size0)
    tree = STRtree(parts)
    tile_idx, part_idx = tree.query(tiles, predicate="intersects")
    if len(tile_idx):
        # the parts of a union are disjoint, so per-part areas add up
        parts_arr = np.empty(len(parts), dtype=object)
        parts_arr[:] = parts
        areas = area(intersection(tiles[tile_idx], parts_arr[part_idx]))
        np.add.at(out, tile_idx, areas)
    out /= size0 * size0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def labels_from_overlap(overlap: np.ndarray, settings: PatchLabelSettings) -> np.ndarray:
    overlap = np.asarray(overlap)
    label = np.full(overlap.shape, -1, dtype=np.int8)
    label[overlap >= settings.positive_overlap] = 1
    label[overlap <= settings.negative_overlap] = 0
    return label


def label_tiles(coords: pd.DataFrame, geom: BaseGeometry | None, slide_positive: bool,
                settings: PatchLabelSettings) -> pd.DataFrame:
    """``coords`` (x, y, size0, ...) plus ``overlap`` and ``label`` columns.

    ``geom`` None means the slide has no annotations.
    """
    out = coords.copy()
    if not slide_positive:
        # a negative slide has no lesion, whatever was drawn on it
        out["overlap"] = np.zeros(len(out), dtype=np.float32)
        out["label"] = np.zeros(len(out), dtype=np.int8)
    elif geom is None:
        out["overlap"] = np.full(len(out), np.nan, dtype=np.float32)
        out["label"] = np.full(len(out), -1, dtype=np.int8)
    else:
        out["overlap"] = overlap_fractions(out["x"].to_numpy(), out["y"].to_numpy(), out["size0"].to_numpy(), geom)
        out["label"] = labels_from_overlap(out["overlap"].to_numpy(), settings)
    return out


def _read_coords(tiles_path: str | os.PathLike) -> pd.DataFrame:
    from .tiles_table import read_tile_columns

    return read_tile_columns(tiles_path, COORD_COLUMNS).to_pandas()


def _to_table(frame: pd.DataFrame) -> pa.Table:
    frame = frame.reindex(columns=LABEL_SCHEMA.names)
    return pa.Table.from_pandas(frame, schema=LABEL_SCHEMA, preserve_index=False)


def patch_labels_for_slide(slide_id: str, tiles_path: str | os.PathLike, slide_json: str | os.PathLike,
                           annotations: str | None, slide_label: str, positive_label: str,
                           settings: dict | PatchLabelSettings, out_path: str | os.PathLike) -> pd.DataFrame:
    """Rule entry point: ``patch_labels/{slide_id}.parquet`` (tile coords + overlap + label)."""
    settings = settings if isinstance(settings, PatchLabelSettings) else PatchLabelSettings.from_config(settings)
    meta = read_json(slide_json)
    if meta.get("status") == "skipped" or not Path(tiles_path).exists():
        log.info("slide %s skipped upstream (%s): writing empty labels", slide_id, meta.get("reason"))
        frame = pd.DataFrame(columns=LABEL_SCHEMA.names)
        write_parquet(out_path, LABEL_SCHEMA.empty_table(), metadata={"histoflow.status": "skipped"})
        return frame
    coords = _read_coords(tiles_path)
    positive = str(slide_label) == str(positive_label)
    has_ann = bool(annotations) and not (isinstance(annotations, float) and np.isnan(annotations))
    geom = None
    if has_ann:
        try:
            geom = lesion_geometry(read_annotations(annotations), settings.positive_classes, settings.exclude_classes)
        except InputError as err:
            raise InputError(f"slide {slide_id!r}: {err}") from None
        if positive and geom.is_empty:
            log.warning("slide %s is %s but its annotations hold no lesion polygon", slide_id, positive_label)
    frame = label_tiles(coords, geom, positive, settings)
    counts = frame["label"].value_counts().to_dict()
    log.info("slide %s: %d tiles, %d positive, %d negative, %d ambiguous", slide_id, len(frame),
             counts.get(1, 0), counts.get(0, 0), counts.get(-1, 0))
    write_parquet(out_path, _to_table(frame), metadata={
        "histoflow.annotations": str(annotations) if has_ann else "",
        "histoflow.positive_overlap": str(settings.positive_overlap),
        "histoflow.negative_overlap": str(settings.negative_overlap),
        "histoflow.status": "ok"})
    return frame


def count_labels(label_paths: list[str | os.PathLike], out_path: str | os.PathLike) -> pd.DataFrame:
    """``patch_labels/counts.tsv``: per slide and target_mpp, tiles by label."""
    rows = []
    for path in label_paths:
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        frame = table.to_pandas()
        slide_id = Path(path).stem
        if frame.empty:
            rows.append(dict(slide_id=slide_id, target_mpp=np.nan, n_tiles=0, n_positive=0, n_negative=0,
                             n_ambiguous=0, annotated=False, status=meta.get("histoflow.status", "ok")))
            continue
        for mpp, grp in frame.groupby("target_mpp"):
            lab = grp["label"].to_numpy()
            rows.append(dict(slide_id=slide_id, target_mpp=mpp, n_tiles=len(grp), n_positive=int((lab == 1).sum()),
                             n_negative=int((lab == 0).sum()), n_ambiguous=int((lab == -1).sum()),
                             annotated=bool(meta.get("histoflow.annotations")), status=meta.get("histoflow.status", "ok")))
    counts = pd.DataFrame(rows, columns=["slide_id", "target_mpp", "n_tiles", "n_positive", "n_negative",
                                         "n_ambiguous", "annotated", "status"])
    write_tsv(out_path, counts)
    return counts
