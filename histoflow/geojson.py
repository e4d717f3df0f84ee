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


# Marching squares on a binary image, vectorised. A cell joins the centres of pixels (r, c),
# (r, c+1), (r+1, c+1), (r+1, c) (clockwise: corner bits 1, 2, 4, 8); a contour crosses a cell
# edge (clockwise: top, right, bottom, left) where its two pixels differ, at the edge's midpoint.
# Each segment runs from an edge where the walk clockwise enters the mask to one where it leaves,
# so the mask is always on the same side: outlines and holes come out with opposite orientations.
# Saddle cells (two diagonal mask pixels) join the diagonal, as skimage's
# ``find_contours(fully_connected="high")`` does: diagonal mask pixels are one region.

def _marching_squares_table() -> np.ndarray:
    """``table[case] = [from_edge, to_edge, from_edge2, to_edge2]`` (-1: no segment)."""
    table = np.full((16, 4), -1, np.int64)
    for case in range(16):
        v = [(case >> k) & 1 for k in range(4)]
        entering = [k for k in range(4) if not v[k] and v[(k + 1) % 4]]
        leaving = [k for k in range(4) if v[k] and not v[(k + 1) % 4]]
        if len(entering) == 1:
            table[case, :2] = entering[0], leaving[0]
        elif len(entering) == 2:        # saddle: pair each entry with the exit just before it
            table[case] = entering[0], (entering[0] - 1) % 4, entering[1], (entering[1] - 1) % 4
    return table


_MS_TABLE = _marching_squares_table()


def _crossing_keys(rows: np.ndarray, cols: np.ndarray, edges: np.ndarray, width: int) -> np.ndarray:
    """A unique integer per crossing point: 2 * pixel index of the edge's first pixel, + 1 for the
    vertical edges (between a pixel and the one below it)."""
    r = rows + (edges == 2)                      # bottom edge: the top edge of the cell below
    c = cols + (edges == 1)                      # right edge: the left edge of the cell to the right
    return 2 * (r * width + c) + ((edges == 1) | (edges == 3))


def contour_rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed marching-squares contours of a binary mask at level 0.5.

    Returns ``(coords, ring)``: vertices (row, col) as float (edge midpoints, so .5 on one axis)
    in walking order without the closing repeat, and the ring index of each vertex (rings in
    runs). Outlines run counter-clockwise and holes clockwise in shapely's (x, y) sense.
    Vertices in the middle of a straight run (horizontal, vertical or 45°) are dropped. The
    mask must have a False border (pad it), so every contour is closed.

    With OpenCV loaded (the tissue step), the contours come from its border following
    (:func:`_rings_from_borders`, ~3x faster); otherwise from vectorised marching squares
    (:func:`_rings_from_cells`). Both give the same rings."""
    import sys

    m = np.ascontiguousarray(np.asarray(mask, bool)).view(np.uint8)
    if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
        raise ValueError("contour_rings needs a mask with a False border: np.pad(mask, 1) first")
    cv2 = sys.modules.get("cv2")
    coords, ring = _rings_from_borders(m, cv2) if cv2 is not None else _rings_from_cells(m)
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


def _rings_from_cells(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching squares, vectorised: each crossed cell's segments (:data:`_MS_TABLE`), chained
    into rings by pointer jumping. (row, col) vertices and ring ids, rings in runs."""
    h, w = m.shape
    case = m[:-1, :-1] | (m[:-1, 1:] << 1) | (m[1:, 1:] << 2) | (m[1:, :-1] << 3)
    cells = np.flatnonzero((case != 0) & (case != 15))
    if len(cells) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    kinds = _MS_TABLE[case.ravel()[cells]]
    rows, cols = np.divmod(cells, w - 1)
    second = kinds[:, 2] >= 0
    rows = np.concatenate([rows, rows[second]])
    cols = np.concatenate([cols, cols[second]])
    src = np.concatenate([kinds[:, 0], kinds[second, 2]])
    dst = np.concatenate([kinds[:, 1], kinds[second, 3]])
    start = _crossing_keys(rows, cols, src, w)
    end = _crossing_keys(rows, cols, dst, w)
    # every crossing is the end of one segment and the start of the next
    order = np.argsort(start, kind="stable")
    nxt = order[np.searchsorted(start[order], end)]
    n = len(start)
    # pointer jumping: each ring's smallest segment index names it, and each segment's distance
    # to the ring's last segment orders it; log2(n) passes of array operations, no Python loop
    ring = np.arange(n)
    jump = nxt.copy()
    for _ in range(max(1, int(np.ceil(np.log2(n))) + 1)):
        ring = np.minimum(ring, ring[jump])
        jump = jump[jump]
    last = nxt == ring                           # the segment before the ring's first one
    succ = np.where(last, np.arange(n), nxt)
    dist = (~last).astype(np.int64)
    for _ in range(max(1, int(np.ceil(np.log2(n))) + 1)):
        dist = dist + dist[succ]
        succ = succ[succ]
    # ring by ring, walked backwards: outlines come out counter-clockwise and holes clockwise in
    # shapely's (x, y) sense, the orientation GeoJSON (RFC 7946) asks for
    walk = np.lexsort((dist, ring))
    key = start[walk]
    ring = ring[walk]
    vertical = (key & 1).astype(bool)
    pixel = key >> 1
    pr, pc = np.divmod(pixel, w)
    coords = np.column_stack([pr + 0.5 * vertical, pc + 0.5 * ~vertical])
    return coords, ring


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


def _rings_from_borders(m: np.ndarray, cv2) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rings_from_cells`' rings from OpenCV's border following: (row, col) vertices and
    ring ids, each ring walked backwards so that outlines run counter-clockwise."""
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


def round_like_python(values: np.ndarray, ndigits: int) -> np.ndarray:
    """``[round(v, ndigits) for v in values]`` (Python's correctly rounded decimal rounding),
    elementwise over a float array. ``rint(v * 10**ndigits) / 10**ndigits`` is that exactly
    unless the product's own rounding crossed a half-way point: only values whose product lies
    within two ulps of one (and non-finite or huge ones) go through Python's ``round``."""
    values = np.asarray(values, np.float64)
    scale = 10.0 ** ndigits
    scaled = values * scale
    out = np.rint(scaled) / scale
    with np.errstate(invalid="ignore"):
        doubtful = ~(np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) > 2 * np.spacing(np.abs(scaled)))
    doubtful |= ~(np.abs(scaled) < 2.0 ** 52)
    if doubtful.any():
        out[doubtful] = [round(v, ndigits) for v in values[doubtful].tolist()]
    return out


def _rounded_coords(coords: Iterable[Sequence[float]], ndigits: int) -> list[list[float]]:
    import shapely

    xy = shapely.get_coordinates(coords) if hasattr(coords, "geom_type") else np.asarray(coords, float)[:, :2]
    return round_like_python(xy, ndigits).tolist()


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
                                   properties_list: Sequence[dict[str, Any]] | None = None,
                                   geometries: bool = True) -> dict:
    """A QuPath-importable FeatureCollection of ``polys`` (level-0 px). ``geometries=False``:
    features without their "geometry" (:func:`write_polygons_geojson` writes it).

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
        feature = {"type": "Feature", "id": f"{names[i]}-{i}"}
        if geometries:
            feature["geometry"] = polygon_to_geometry(poly)
        feature["properties"] = properties
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, fc: dict) -> None:
    """Write a FeatureCollection atomically (compact: large tissue outlines have many vertices)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fc, separators=(",", ":")) + "\n")


def _geometry_text(poly, ndigits: int = 2) -> str:
    """``json.dumps(polygon_to_geometry(poly))``, compact. A Polygon's coordinates are rounded
    in numpy (:func:`round_like_python`) and written by GEOS in C (shortest round-trip numbers,
    as Python's): no Python float and list per vertex. Up to 15 significant digits a rounded
    value has one shortest form, which both write; larger values (GEOS breaks ties and
    switches to exponents otherwise than Python) take the dict route."""
    import shapely

    if poly.geom_type == "Polygon":
        xy = shapely.get_coordinates(poly)
        rounded = round_like_python(xy, ndigits)
        if np.abs(rounded).max(initial=0.0) < 10.0 ** (15 - ndigits):      # also False for NaN or inf
            if not np.array_equal(rounded, xy):
                poly = shapely.transform(poly, lambda _: rounded)
            return shapely.to_geojson(poly)
    return json.dumps(polygon_to_geometry(poly, ndigits), separators=(",", ":"))


def write_polygons_geojson(path: str | os.PathLike, polys: Sequence, classification: str | Sequence[str] = "Tissue",
                           color: Sequence[int] | Sequence[Sequence[int]] = (0, 160, 0),
                           object_type: str = "annotation",
                           properties_list: Sequence[dict[str, Any]] | None = None) -> None:
    """``write_geojson(path, polygons_to_feature_collection(polys, ...))``, the same bytes,
    with each geometry serialised by :func:`_geometry_text` (a tissue outline has thousands of
    vertices; the dict route builds a Python list per vertex, then encodes it)."""
    fc = polygons_to_feature_collection([None] * len(polys), classification, color, object_type, properties_list,
                                        geometries=False)
    dumps = lambda value: json.dumps(value, separators=(",", ":"))   # noqa: E731
    features = [f'{{"type":"Feature","id":{dumps(feature["id"])},"geometry":{_geometry_text(poly)},'
                f'"properties":{dumps(feature["properties"])}}}'
                for feature, poly in zip(fc["features"], polys)]
    with atomic_path(path) as tmp:
        tmp.write_text('{"type":"FeatureCollection","features":[' + ",".join(features) + "]}\n")


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
