"""GeoJSON that QuPath opens: binary masks <-> polygons in level-0 pixel coordinates.

QuPath (0.3+) reads a FeatureCollection whose features carry, in ``properties``,
``objectType`` ("annotation" | "detection"), ``classification`` {"name", "color": [r, g, b]}
and ``measurements`` {name: number}. Coordinates are level-0 pixels, x right, y down.
Used by the tissue stage and reused by heatmaps and lesions.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from .io import atomic_path

OBJECT_TYPES = ("annotation", "detection")


def contour_rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed contours of a binary mask at level 0.5 (marching squares' contours, with diagonal
    mask pixels joined), from OpenCV's border following (:func:`_rings_from_borders`).

    Returns ``(coords, ring)``: vertices (row, col) as float (edge midpoints, so .5 on one axis)
    in walking order without the closing repeat, and the ring index of each vertex (rings in
    runs). Outlines run counter-clockwise and holes clockwise in shapely's (x, y) sense.
    Vertices in the middle of a straight run (horizontal, vertical or 45°) are dropped. The
    mask must have a False border (pad it), so every contour is closed."""
    m = np.ascontiguousarray(np.asarray(mask, bool)).view(np.uint8)
    if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
        raise ValueError("contour_rings needs a mask with a False border: np.pad(mask, 1) first")
    coords, ring = _rings_from_borders(m)
    if len(ring) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    # drop vertices where the direction does not change (cyclically within each ring)
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    prev, foll = _cyclic_neighbours(np.diff(np.r_[starts, len(ring)]))
    turn = np.any((coords - coords[prev]) != (coords[foll] - coords), axis=1)
    return coords[turn], ring[turn]


def _cyclic_neighbours(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rings stored one after another (``lengths`` items each): the index of each item's
    previous and next item within its own ring, wrapping around."""
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    length = np.repeat(lengths, lengths)
    pos = np.arange(len(first)) - first
    return first + (pos - 1) % length, first + (pos + 1) % length


# Border following (OpenCV's findContours, Suzuki-Abe): foreground 8-connected and holes
# 4-connected, as marching squares with diagonal foreground joined. Each contour is a cycle of
# boundary pixels with the foreground on its left (y down); at each pixel the walk passes the
# "cracks" to its background 4-neighbours that lie, turning from the previous pixel's
# direction to the next one's, on its right. A crack's midpoint is a marching-squares vertex.
_STEPS = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], np.int64)  # (dx, dy)
_STEP_CODE = np.full(9, 8, np.int64)            # (dx + 1) * 3 + (dy + 1) -> index in _STEPS; 8: no step
_STEP_CODE[(_STEPS[:, 0] + 1) * 3 + _STEPS[:, 1] + 1] = np.arange(8)


def _crack_table() -> tuple[np.ndarray, np.ndarray]:
    """``count[back, out]`` and ``steps[back, out, :count]``: the 4-neighbour directions a walk
    passes at a pixel entered from direction ``back`` and left towards ``out`` (turning from
    ``back`` to ``out`` the other way round from the walk, all passed neighbours being
    background); 8 = a one-pixel contour (all four sides)."""
    count = np.zeros((9, 9), np.int64)
    steps = np.zeros((9, 9, 4), np.int64)
    for back in range(9):
        for out in range(9):
            if back == 8 or out == 8:
                passed = [6, 4, 2, 0]
            else:
                passed, d = [], (back - 1) % 8
                while d != out:
                    passed.append(d)
                    d = (d - 1) % 8
                passed = [d for d in passed if d % 2 == 0]
            count[back, out] = len(passed)
            steps[back, out, :len(passed)] = passed
    return count, steps


_CRACK_COUNT, _CRACK_STEPS = _crack_table()


def _rings_from_borders(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching-squares rings from OpenCV's border following: (row, col) vertices (crack
    midpoints) and ring ids, each ring walked backwards so that outlines run counter-clockwise."""
    import cv2

    contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    pixels = np.concatenate(contours).reshape(-1, 2).astype(np.int64)        # (x, y)
    n = len(pixels)

    def step(to: np.ndarray) -> np.ndarray:
        delta = pixels[to] - pixels
        return _STEP_CODE[(delta[:, 0] + 1) * 3 + delta[:, 1] + 1]

    prev, foll = _cyclic_neighbours(lengths)
    back, out = step(prev), step(foll)
    k = _CRACK_COUNT[back, out]
    at = np.repeat(np.arange(n), k)
    nth = np.arange(len(at)) - np.repeat(np.cumsum(k) - k, k)
    xy = pixels[at] + 0.5 * _STEPS[_CRACK_STEPS[back[at], out[at], nth]]
    ring = np.repeat(np.repeat(np.arange(len(contours)), lengths), k)
    walk = np.lexsort((-np.arange(len(at)), ring))
    return np.column_stack([xy[walk, 1], xy[walk, 0]]), ring[walk]


def mask_to_polygons(mask: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0, min_area_px: float = 0.0,
                     simplify_px: float = 0.25) -> list:
    """Polygons (shapely, with holes) outlining the True pixels of ``mask``, in level-0 px.

    ``scale_x``/``scale_y``: level-0 px per mask px. ``min_area_px``: drop regions and holes
    smaller than this many mask pixels. ``simplify_px``: Douglas-Peucker tolerance in mask px
    (0.25 keeps the outline within a quarter pixel of the marching-squares contour; 0 keeps
    every corner). Diagonally touching pixels are one region; regions inside holes become
    separate polygons. Order is deterministic (largest first).
    """
    import shapely

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return []
    # trace only the bounding box of the True pixels, padded so every contour closes
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    padded = np.pad(mask[r0:int(rows[-1]) + 1, c0:int(cols[-1]) + 1], 1)
    coords, ring = contour_rings(padded)
    # (x, y) in mask px with pixel i spanning [i, i + 1): contour through pixel centres + 0.5
    xy = np.column_stack([coords[:, 1] + (c0 - 1 + 0.5), coords[:, 0] + (r0 - 1 + 0.5)])
    _, ring = np.unique(ring, return_inverse=True)
    rings = shapely.polygons(shapely.linearrings(xy, indices=ring))
    # which side the mask is on: a ring's orientation (shoelace sign) tells outline from hole
    signed = _signed_areas(xy, ring, len(rings))
    checked = np.zeros(len(rings), bool)       # rings already known to be valid polygons
    if simplify_px > 0:
        simple = shapely.simplify(rings, simplify_px, preserve_topology=False)
        bad = ~shapely.is_valid(simple) | shapely.is_empty(simple)
        if bad.any():   # rare: a simplified outline touching itself; the slower, safe variant
            simple[bad] = shapely.simplify(rings[bad], simplify_px, preserve_topology=True)
        rings, checked = simple, ~bad
    rings = np.array([_largest_polygon(r) for r in rings], dtype=object)
    areas = np.array([0.0 if r is None else r.area for r in rings])
    keep = (areas > 0) & (areas >= min_area_px)
    outline = keep & (signed > 0)        # counter-clockwise in (x, y): an outline; clockwise: a hole
    holes = np.flatnonzero(keep & (signed < 0))
    outlines = np.flatnonzero(outline)
    hole_lists: dict[int, list] = {int(i): [] for i in outlines}
    if len(holes) and len(outlines):
        # a hole belongs to the smallest outline around it (contours never cross nor touch): one
        # of its own vertices decides, as a point inside the hole could lie on an island in it
        tree = shapely.STRtree(list(rings[outlines]))
        points = shapely.get_point(shapely.get_exterior_ring(list(rings[holes])), 0)
        which, hit = tree.query(points, predicate="within")
        best = {}
        for h, o in zip(which.tolist(), outlines[hit].tolist()):
            if areas[o] > areas[holes[h]] and (h not in best or areas[o] < areas[best[h]]):
                best[h] = o
        for h in sorted(best):
            hole_lists[best[h]].append(rings[holes[h]].exterior)
    out = []
    for i in outlines.tolist():
        poly = shapely.Polygon(rings[i].exterior, hole_lists[i]) if hole_lists[i] else rings[i]
        # an outline with holes is checked again: a simplified hole may touch its outline
        if (hole_lists[i] or not checked[i]) and not poly.is_valid:
            poly = _largest_polygon(shapely.make_valid(poly))
        if poly is not None and poly.area > 0:
            out.append(poly)
    if not out:
        return []
    scaled = shapely.transform(np.array(out, dtype=object), lambda c: c * np.array([scale_x, scale_y]))
    return sorted(scaled.tolist(), key=lambda p: (-p.area, p.bounds))


def _signed_areas(xy: np.ndarray, ring: np.ndarray, n: int) -> np.ndarray:
    """Shoelace area of each ring (vertices in order, ring ids 0..n-1 in runs), signed."""
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    nxt = np.arange(len(ring)) + 1
    ends = np.r_[starts[1:], len(ring)] - 1
    nxt[ends] = starts
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    return np.bincount(ring, weights=cross, minlength=n) / 2


def _largest_polygon(geom):
    """``geom`` if it is a Polygon, else its largest Polygon part at any depth (``make_valid``
    can return a GeometryCollection holding MultiPolygons), else None."""
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type == "Polygon":
        return geom
    parts = [_largest_polygon(g) for g in getattr(geom, "geoms", [])]
    parts = [g for g in parts if g is not None]
    return max(parts, key=lambda g: g.area) if parts else None


def _rounded(coords, ndigits: int) -> list[list[float]]:
    import shapely

    xy = shapely.get_coordinates(coords) if hasattr(coords, "geom_type") else np.asarray(coords, float)[:, :2]
    return np.round(xy, ndigits).tolist()


def polygon_to_geometry(poly, ndigits: int = 2) -> dict:
    """GeoJSON geometry of a shapely Polygon or MultiPolygon (rings closed, holes kept),
    coordinates rounded to ``ndigits`` decimals (level-0 px: 1/100 px is far below a pixel)."""
    if poly.geom_type == "MultiPolygon":
        return {"type": "MultiPolygon",
                "coordinates": [polygon_to_geometry(p, ndigits)["coordinates"] for p in poly.geoms]}
    if poly.geom_type != "Polygon":        # points, lines, an empty union: shapely's own mapping
        from shapely.geometry import mapping

        return mapping(poly)
    rings = [_rounded(poly.exterior, ndigits)]
    rings += [_rounded(r, ndigits) for r in poly.interiors]
    return {"type": "Polygon", "coordinates": rings}


def qupath_feature(geom, object_type: str, class_name: str, color: Sequence[int],
                   measurements: dict[str, Any] | None = None, feature_id: str | None = None,
                   **properties: Any) -> dict:
    """One GeoJSON Feature as QuPath imports it (File > Import objects): ``objectType``,
    ``classification`` {name, color}, ``isLocked``, plain ``properties``, then ``measurements``
    (finite numbers: QuPath's measurement table; NaN is not JSON and QuPath shows a missing
    one as NaN anyway). Every GeoJSON histoflow writes (tissue, heatmaps, lesions) is made here."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict[str, Any] = {"objectType": object_type,
                             "classification": {"name": class_name, "color": [int(c) for c in color]},
                             "isLocked": False, **properties}
    values = {k: float(v) for k, v in (measurements or {}).items() if np.isfinite(v)}
    if values:
        props["measurements"] = values
    feature: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feature["id"] = feature_id
    feature["geometry"] = polygon_to_geometry(geom)
    feature["properties"] = props
    return feature


def polygons_to_feature_collection(polys: Sequence, classification: str | Sequence[str] = "Tissue",
                                   color: Sequence[int] | Sequence[Sequence[int]] = (0, 160, 0),
                                   object_type: str = "annotation",
                                   properties_list: Sequence[dict[str, Any]] | None = None) -> dict:
    """A QuPath-importable FeatureCollection of ``polys`` (level-0 px), features named
    ``{class}-{i}``. ``classification``/``color``: one class for all polygons or one per polygon.
    ``properties_list``: per-polygon numbers (go to ``measurements``); non-numeric values stay
    plain properties."""
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
                measurements[key] = value
        features.append(qupath_feature(poly, object_type, names[i], colors[i], measurements,
                                       feature_id=f"{names[i]}-{i}", **extra))
    return feature_collection(features)


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, fc: dict) -> None:
    """Write a FeatureCollection atomically (compact: large tissue outlines have many vertices)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fc, separators=(",", ":")) + "\n")


def write_feature_collection(path: str | os.PathLike, features: list[dict]) -> None:
    """:func:`write_geojson` of a FeatureCollection of ``features`` (:func:`qupath_feature`)."""
    write_geojson(path, feature_collection(features))
