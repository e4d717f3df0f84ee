"""GeoJSON that QuPath opens: binary masks <-> polygons in level-0 pixel coordinates.

QuPath (0.3+) reads a FeatureCollection whose features carry, in ``properties``,
``objectType`` ("annotation" | "detection"), ``classification`` {"name", "color": [r, g, b]}
and ``measurements`` {name: number}. Coordinates are level-0 pixels, x right, y down.
Used by the tissue stage and reused by heatmaps and lesions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .io import atomic_path

OBJECT_TYPES = ("annotation", "detection")


def _ring_to_level0(contour: np.ndarray, scale_x: float, scale_y: float, offset: float) -> np.ndarray:
    # find_contours gives (row, col) through pixel centres; pixel i's centre is at (i + 0.5) * scale
    # in level-0 px, so a mask px covers [i*scale, (i+1)*scale).
    rows = contour[:, 0] - offset
    cols = contour[:, 1] - offset
    # an (n, 2) array: shapely builds rings from arrays ~10x faster than from lists of tuples
    return np.column_stack(((cols + 0.5) * scale_x, (rows + 0.5) * scale_y))


def mask_to_polygons(mask: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0, min_area_px: float = 0.0,
                     simplify_px: float = 0.25) -> list:
    """Polygons (shapely, with holes) outlining the True pixels of ``mask``, in level-0 px.

    ``scale_x``/``scale_y``: level-0 px per mask px. ``min_area_px``: drop regions and holes
    smaller than this many mask pixels. ``simplify_px``: Douglas-Peucker tolerance in mask px
    (0.25 drops the collinear vertices find_contours puts on every pixel edge while keeping
    the outline within a quarter pixel; 0 keeps every vertex). Regions inside holes become separate polygons. Order is deterministic
    (largest first).
    """
    from shapely import STRtree
    from shapely.geometry import Polygon
    from shapely.validation import make_valid
    from skimage.measure import find_contours

    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return []
    # trace only the bounding box of the True pixels (find_contours' cost is per pixel scanned;
    # tissue is often a fraction of the glass), padded so regions touching it give closed contours
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    padded = np.pad(mask[r0:int(rows[-1]) + 1, c0:int(cols[-1]) + 1], 1).astype(np.uint8)
    shift = np.array([r0 - 1.0, c0 - 1.0])
    rings = []
    for contour in find_contours(padded, 0.5, fully_connected="high"):
        if len(contour) < 4:
            continue
        ring = Polygon(_ring_to_level0(contour + shift, 1.0, 1.0, 0.0))  # still in mask px here
        if simplify_px > 0:
            ring = ring.simplify(simplify_px, preserve_topology=True)
        if not ring.is_valid:
            ring = make_valid(ring)
            ring = max(getattr(ring, "geoms", [ring]), key=lambda g: g.area if g.geom_type == "Polygon" else 0)
            if ring.geom_type != "Polygon":
                continue
        if ring.area <= 0 or ring.area < min_area_px:
            continue
        rings.append(Polygon(ring.exterior))
    # Nesting depth by containment: even depth = region outline, odd = hole of its parent.
    rings.sort(key=lambda r: -r.area)
    # the spatial index keeps this fast for masks with thousands of regions (heatmaps)
    tree = STRtree(rings)
    parent: list[int | None] = []
    depth: list[int] = []
    for i, ring in enumerate(rings):
        # outlines never cross, so one interior point decides containment; the enclosing ring
        # is the smallest one (latest in area order) before i that contains it
        hits = [int(j) for j in tree.query(ring.representative_point(), predicate="within") if j < i]
        p = max(hits) if hits else None
        parent.append(p)
        depth.append(0 if p is None else depth[p] + 1)
    holes: dict[int, list] = {}
    for i, p in enumerate(parent):
        if depth[i] % 2 == 1:
            holes.setdefault(p, []).append(rings[i])
    out = []
    for i, ring in enumerate(rings):
        if depth[i] % 2 == 0:
            poly = Polygon(ring.exterior.coords, [h.exterior.coords for h in holes.get(i, [])])
            if not poly.is_valid:
                poly = make_valid(poly)
                poly = max(getattr(poly, "geoms", [poly]), key=lambda g: g.area if g.geom_type == "Polygon" else 0)
            if poly.geom_type == "Polygon" and poly.area > 0:
                out.append(_scale(poly, scale_x, scale_y))
    out.sort(key=lambda p: (-p.area, p.bounds))
    return out


def _scale(poly, scale_x: float, scale_y: float):
    from shapely import affinity

    return affinity.scale(poly, xfact=scale_x, yfact=scale_y, origin=(0, 0))


def _rounded_coords(coords: Iterable[Sequence[float]], ndigits: int) -> list[list[float]]:
    import shapely

    # Python's round (correctly rounded), over plain floats from one array -> list conversion
    xy = shapely.get_coordinates(coords) if hasattr(coords, "geom_type") else np.asarray(coords, float)[:, :2]
    return [[round(x, ndigits), round(y, ndigits)] for x, y in xy.tolist()]


def polygon_to_geometry(poly, ndigits: int = 2) -> dict:
    """GeoJSON geometry of a shapely Polygon or MultiPolygon (rings closed, holes kept)."""
    if poly.geom_type == "MultiPolygon":
        return {"type": "MultiPolygon",
                "coordinates": [polygon_to_geometry(p, ndigits)["coordinates"] for p in poly.geoms]}
    if poly.geom_type != "Polygon":
        raise ValueError(f"expected a Polygon or MultiPolygon, got {poly.geom_type}")
    rings = [_rounded_coords(poly.exterior, ndigits)]
    rings += [_rounded_coords(r, ndigits) for r in poly.interiors]
    return {"type": "Polygon", "coordinates": rings}


def polygons_to_feature_collection(polys: Sequence, classification: str | Sequence[str] = "Tissue",
                                   color: Sequence[int] | Sequence[Sequence[int]] = (0, 160, 0),
                                   object_type: str = "annotation",
                                   properties_list: Sequence[dict[str, Any]] | None = None) -> dict:
    """A QuPath-importable FeatureCollection of ``polys`` (level-0 px).

    ``classification``/``color`` are one class for all polygons or one per polygon.
    ``properties_list``: per-polygon numbers (go to ``measurements``, which QuPath shows in its
    measurement table); non-numeric values stay plain properties.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    n = len(polys)
    names = [classification] * n if isinstance(classification, str) else list(classification)
    colors = [list(color)] * n if color and np.isscalar(color[0]) else [list(c) for c in color]
    props_in = list(properties_list) if properties_list is not None else [{} for _ in range(n)]
    if not (len(names) == len(colors) == len(props_in) == n):
        raise ValueError("classification, color and properties_list must have one entry per polygon")
    features = []
    for i, poly in enumerate(polys):
        measurements, extra = {}, {}
        for key, value in props_in[i].items():
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                extra[key] = value
            else:
                measurements[key] = float(value)
        properties = {"objectType": object_type,
                      "classification": {"name": names[i], "color": [int(c) for c in colors[i]]},
                      "isLocked": False, **extra}
        if measurements:
            properties["measurements"] = measurements
        features.append({"type": "Feature", "id": f"{names[i]}-{i}",
                         "geometry": polygon_to_geometry(poly), "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, fc: dict) -> None:
    """Write a FeatureCollection atomically (compact: large tissue outlines have many vertices)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fc, separators=(",", ":")) + "\n")


def _class_name(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    cls = props.get("classification", feature.get("classification"))
    if isinstance(cls, dict):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    # older QuPath exports and other tools
    return props.get("name") or props.get("class") or None


def read_polygons(path: str | os.PathLike) -> list[tuple[Any, str | None]]:
    """``[(shapely Polygon, class name or None), ...]`` from a QuPath GeoJSON export.

    Accepts a FeatureCollection, a single Feature or a bare list of features (QuPath 0.2);
    MultiPolygons are split into their Polygons; other geometry types (points, lines) are skipped.
    """
    from shapely.geometry import shape

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError(f"{str(path)!r} is not a GeoJSON FeatureCollection, Feature or list of features")
    out = []
    for feature in features:
        geom = feature.get("geometry")
        if not geom:
            continue
        name = _class_name(feature)
        g = shape(geom)
        if g.geom_type == "Polygon":
            out.append((g, name))
        elif g.geom_type == "MultiPolygon":
            out.extend((p, name) for p in g.geoms)
    return out
