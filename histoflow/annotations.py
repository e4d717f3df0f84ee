"""Lesion annotations: QuPath GeoJSON and ASAP XML (CAMELYON16) readers, and GeoJSON writing.

All coordinates are level-0 pixels. A reader returns ``Region``s (class name + shapely
geometry); ``lesion_geometry`` turns them into one (Multi)Polygon of positive area with the
excluded classes cut out as holes, which is what patch labels, FROC and Dice compare against.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from shapely import make_valid
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from .errors import InputError

# CAMELYON16 ASAP groups: Tumor/_0/_1 are lesion outlines, _2 (and Exclusion in later releases)
# are non-tumour areas drawn inside lesions, i.e. holes.
ASAP_POSITIVE_GROUPS = ("tumor", "_0", "_1")
DEFAULT_EXCLUDE_CLASSES = ("exclusion", "_2", "ignore", "other")


@dataclass(frozen=True)
class Region:
    """One annotated region: its class (QuPath classification / ASAP group) and geometry."""

    name: str
    geometry: BaseGeometry


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Repair self-intersections (common in hand-drawn outlines) and keep only polygonal parts."""
    if not geom.is_valid:
        geom = make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return unary_union(parts) if parts else Polygon()


def read_qupath_geojson(path: str | os.PathLike) -> list[Region]:
    """Polygon/MultiPolygon features of a QuPath export (FeatureCollection, Feature or list of
    Features); the class is ``properties.classification.name`` (``""`` when unclassified)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"annotations {str(path)!r} is not valid JSON ({err}); export it from QuPath "
                         "with File > Export objects as GeoJSON") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise InputError(f"annotations {str(path)!r}: expected a GeoJSON FeatureCollection or a list of "
                         "Features (QuPath: File > Export objects as GeoJSON)")
    regions = []
    for feat in features:
        geom = feat.get("geometry") or {}
        if geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points / lines carry no area
        props = feat.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name", "") if isinstance(cls, dict) else str(cls)
        regions.append(Region(name=name or "", geometry=_polygonal(shape(geom))))
    return regions


def read_asap_xml(path: str | os.PathLike) -> list[Region]:
    """``<ASAP_Annotations><Annotations><Annotation PartOfGroup=...><Coordinates><Coordinate
    Order X Y>`` polygons; vertices are sorted by ``Order``. The class is ``PartOfGroup``."""
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as err:
        raise InputError(f"annotations {str(path)!r} is not valid XML ({err}); expected an ASAP "
                         "(CAMELYON16) annotation file") from None
    regions = []
    for ann in root.iter("Annotation"):
        coords = []
        for c in ann.iter("Coordinate"):
            order = float(c.get("Order", len(coords)))
            # CAMELYON16 files sometimes use a decimal comma
            x = float(str(c.get("X")).replace(",", "."))
            y = float(str(c.get("Y")).replace(",", "."))
            coords.append((order, x, y))
        if len(coords) < 3:
            continue
        coords.sort(key=lambda t: t[0])
        poly = Polygon([(x, y) for _, x, y in coords])
        regions.append(Region(name=ann.get("PartOfGroup", "") or "", geometry=_polygonal(poly)))
    return regions


def read_annotations(path: str | os.PathLike) -> list[Region]:
    """Read QuPath GeoJSON (``.geojson``/``.json``) or ASAP XML (``.xml``) by extension."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"annotations file {str(path)!r} does not exist; fix the samples sheet's "
                         "`annotations` column (relative paths are read from the sheet's folder)")
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path)
    if suffix in (".geojson", ".json"):
        return read_qupath_geojson(path)
    raise InputError(f"annotations {str(path)!r}: unknown format {suffix!r}; use QuPath GeoJSON "
                     "(.geojson) or ASAP XML (.xml)")


def lesion_geometry(regions: Sequence[Region], positive_classes: Iterable[str] = (),
                    exclude_classes: Iterable[str] = DEFAULT_EXCLUDE_CLASSES) -> BaseGeometry:
    """Union of the positive regions minus the union of the excluded ones (holes).

    Class names compare case-insensitively. With ``positive_classes`` empty every class that is
    not excluded counts as lesion (ASAP: Tumor/_0/_1 positive, _2/Exclusion holes).
    """
    positive = {c.lower() for c in positive_classes}
    exclude = {c.lower() for c in exclude_classes}
    pos, neg = [], []
    for r in regions:
        name = r.name.lower()
        if name in exclude:
            neg.append(r.geometry)
        elif not positive or name in positive:
            pos.append(r.geometry)
    geom = unary_union(pos) if pos else Polygon()
    if neg and not geom.is_empty:
        geom = geom.difference(unary_union(neg))
    return _polygonal(geom)


def polygons_of(geom: BaseGeometry) -> list[Polygon]:
    """The Polygon parts of a geometry (empty list for an empty one)."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]


# GeoJSON that QuPath opens is written by histoflow.geojson (one writer for every stage)
from .geojson import feature_collection, qupath_feature, write_feature_collection  # noqa: E402,F401
