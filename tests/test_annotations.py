"""Annotation readers and tile labels from lesion overlap: what a user's QuPath / ASAP files become."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from histoflow.annotations import lesion_geometry, read_annotations, read_asap_xml, read_qupath_geojson
from histoflow.errors import InputError
from histoflow.io import write_json
from histoflow.patch_labels import (PatchLabelSettings, count_labels, label_tiles, labels_from_overlap,
                                    overlap_fractions, patch_labels_for_slide)

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="1000" Y="1000" />
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="3" X="0" Y="1000" />
        <Coordinate Order="1" X="1000" Y="0" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="250" Y="250" />
        <Coordinate Order="1" X="750" Y="250" />
        <Coordinate Order="2" X="750" Y="750" />
        <Coordinate Order="3" X="250" Y="750" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="2000,5" Y="2000" />
        <Coordinate Order="1" X="2100,5" Y="2000" />
        <Coordinate Order="2" X="2100,5" Y="2100" />
        <Coordinate Order="3" X="2000,5" Y="2100" />
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="Tumor" PartOfGroup="None" Color="#ff0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def qupath_geojson(path):
    square_with_hole = {"type": "Polygon", "coordinates": [
        [[0, 0], [1000, 0], [1000, 1000], [0, 1000], [0, 0]],
        [[250, 250], [750, 250], [750, 750], [250, 750], [250, 250]]]}
    two_squares = {"type": "MultiPolygon", "coordinates": [
        [[[2000, 0], [2100, 0], [2100, 100], [2000, 100], [2000, 0]]],
        [[[3000, 0], [3100, 0], [3100, 100], [3000, 100], [3000, 0]]]]}
    point = {"type": "Point", "coordinates": [5, 5]}
    feats = [
        {"type": "Feature", "geometry": square_with_hole,
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": two_squares,
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[5000, 0], [5100, 0], [5100, 100], [5000, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 200, 0]}}},
        {"type": "Feature", "geometry": point, "properties": {"objectType": "annotation"}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_asap_xml_orders_vertices_and_cuts_exclusion_holes(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(ASAP)
    regions = read_asap_xml(path)
    assert [r.name for r in regions] == ["Tumor", "_2", "_1"]
    # vertices sorted by Order make a square, not a bow tie
    assert regions[0].geometry.area == pytest.approx(1000 * 1000)
    geom = lesion_geometry(regions)
    # 1000² square minus the 500² _2 hole, plus the 100² _1 square (decimal commas parsed)
    assert geom.area == pytest.approx(1000 * 1000 - 500 * 500 + 100 * 100)
    assert not geom.contains(__import__("shapely").geometry.Point(500, 500))


def test_qupath_geojson_keeps_holes_multipolygons_and_classes(tmp_path):
    regions = read_qupath_geojson(qupath_geojson(tmp_path / "a.geojson"))
    assert [r.name for r in regions] == ["Tumor", "Tumor", "Stroma"]  # the Point has no area
    assert regions[0].geometry.area == pytest.approx(1000 * 1000 - 500 * 500)
    assert regions[1].geometry.geom_type == "MultiPolygon"
    only_tumor = lesion_geometry(regions, positive_classes=["tumor"])
    assert only_tumor.area == pytest.approx(750_000 + 2 * 100 * 100)
    every_class = lesion_geometry(regions)
    assert every_class.area == pytest.approx(only_tumor.area + 5000)


def test_reader_dispatch_and_one_line_errors(tmp_path):
    assert len(read_annotations(qupath_geojson(tmp_path / "b.json"))) == 3
    with pytest.raises(InputError, match="does not exist"):
        read_annotations(tmp_path / "missing.xml")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON") as err:
        read_annotations(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="unknown format"):
        (tmp_path / "x.csv").write_text("")
        read_annotations(tmp_path / "x.csv")


def grid_coords(n=6, size=100):
    xs, ys = np.meshgrid(np.arange(n), np.arange(n))
    return pd.DataFrame({"slide_id": "s", "x": xs.ravel() * size, "y": ys.ravel() * size, "target_mpp": 0.5,
                         "tile_px": 100, "size0": size, "col": xs.ravel(), "row": ys.ravel()})


def test_overlap_fraction_of_tiles_covered_exactly():
    from shapely.geometry import box

    coords = grid_coords()
    # covers tiles (col 1-2, row 1-2) fully and half of column 3 on those rows
    geom = box(100, 100, 350, 300)
    ov = overlap_fractions(coords["x"], coords["y"], coords["size0"], geom)
    grid = ov.reshape(6, 6)
    assert np.allclose(grid[1:3, 1:3], 1.0)
    assert np.allclose(grid[1:3, 3], 0.5)
    assert grid.sum() == pytest.approx(4 + 1.0)
    labels = labels_from_overlap(ov, PatchLabelSettings()).reshape(6, 6)
    assert (labels[1:3, 1:4] == 1).all()  # 0.5 >= positive_overlap 0.5
    assert (labels[0] == 0).all()
    strict = labels_from_overlap(ov, PatchLabelSettings(positive_overlap=0.9)).reshape(6, 6)
    assert (strict[1:3, 3] == -1).all()  # between the thresholds: ambiguous, never trained on


def test_negative_slides_are_negative_and_unannotated_positives_unknown():
    from shapely.geometry import box

    coords = grid_coords(3)
    neg = label_tiles(coords, box(0, 0, 300, 300), slide_positive=False, settings=PatchLabelSettings())
    assert (neg["label"] == 0).all()
    unknown = label_tiles(coords, None, slide_positive=True, settings=PatchLabelSettings())
    assert (unknown["label"] == -1).all()


def test_settings_reject_inverted_thresholds():
    with pytest.raises(InputError, match="negative_overlap < positive_overlap"):
        PatchLabelSettings.from_config({"positive_overlap": 0.2, "negative_overlap": 0.3})


def test_patch_labels_rule_outputs_and_skipped_slide(tmp_path):
    from histoflow.io import write_parquet

    tiles = tmp_path / "tiles.parquet"
    write_parquet(tiles, grid_coords())
    slide = tmp_path / "slide.json"
    write_json(slide, {"slide_id": "s", "status": "ok"})
    ann = tmp_path / "s.xml"
    ann.write_text(ASAP)
    out = tmp_path / "patch_labels" / "s.parquet"
    frame = patch_labels_for_slide("s", tiles, slide, str(ann), "tumor", "tumor", {}, out)
    table = pq.read_table(out)
    assert {"x", "y", "col", "row", "overlap", "label"} <= set(table.column_names)
    assert table.num_rows == 36 and (frame["label"] == 1).sum() > 0
    # the _2 hole (250..750) makes the centre tiles negative
    lab = frame.set_index(["col", "row"])
    assert lab.loc[(3, 3), "overlap"] == 0 and lab.loc[(3, 3), "label"] == 0
    assert lab.loc[(0, 0), "overlap"] == 1 and lab.loc[(0, 0), "label"] == 1

    skipped = tmp_path / "skipped.json"
    write_json(skipped, {"slide_id": "k", "status": "skipped", "reason": "corrupt"})
    out2 = tmp_path / "patch_labels" / "k.parquet"
    patch_labels_for_slide("k", tmp_path / "nope.parquet", skipped, None, "tumor", "tumor", {}, out2)
    assert pq.read_table(out2).num_rows == 0
    counts = count_labels([out, out2], tmp_path / "patch_labels" / "counts.tsv")
    s_row = counts[counts["slide_id"] == "s"].iloc[0]
    assert s_row["n_positive"] + s_row["n_negative"] + s_row["n_ambiguous"] == 36
    assert counts[counts["slide_id"] == "k"]["n_tiles"].iloc[0] == 0
