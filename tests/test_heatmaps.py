"""Heatmaps: tiles land on the right grid cell, the overlay PNG is written, the GeoJSON is a QuPath
detection collection, and a skipped slide still yields valid empty outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoflow.heatmaps import grid_geometry, heatmap_for_slide, rasterize, tiles_geojson_features
from histoflow.io import write_json, write_parquet


def probs_frame(slide_id="s", role="test", fold=0):
    # 3 tiles on a grid with origin (1000, 2000) and stride 256 (level-0 px)
    col = np.array([0, 2, 1])
    row = np.array([0, 1, 3])
    return pd.DataFrame({"slide_id": slide_id, "x": 1000 + col * 256, "y": 2000 + row * 256, "col": col, "row": row,
                         "size0": 256, "target_mpp": 0.5, "fold": fold, "role": role, "prob": [0.1, 0.9, 0.5],
                         "attention": [0.2, 0.5, 0.3]})


def test_raster_puts_each_tile_at_row_col():
    f = probs_frame()
    grid = rasterize(f["col"], f["row"], f["prob"])
    assert grid.shape == (4, 3)  # rows x cols
    assert grid[0, 0] == pytest.approx(0.1) and grid[1, 2] == pytest.approx(0.9) and grid[3, 1] == pytest.approx(0.5)
    assert np.isnan(grid).sum() == 12 - 3  # cells without a tile stay empty, not 0


def test_grid_geometry_maps_cells_back_to_level0():
    geom = grid_geometry(probs_frame())
    assert (geom.x0, geom.y0, geom.stride0) == pytest.approx((1000, 2000, 256))
    assert geom.extent == pytest.approx((1000, 1000 + 3 * 256, 2000 + 4 * 256, 2000))
    cx, cy = geom.cell_center(2, 1)
    assert (cx, cy) == pytest.approx((1000 + 2.5 * 256, 2000 + 1.5 * 256))


def test_geojson_is_a_qupath_detection_collection():
    feats = tiles_geojson_features(probs_frame(), threshold=0.5)
    fc = {"type": "FeatureCollection", "features": feats}
    json.dumps(fc)  # serialisable
    assert len(feats) == 3
    for f in feats:
        assert f["geometry"]["type"] == "Polygon"
        p = f["properties"]
        assert p["objectType"] == "detection"
        assert set(p["classification"]) == {"name", "color"} and len(p["classification"]["color"]) == 3
        assert set(p["measurements"]) == {"prob", "attention"}
    assert [f["properties"]["classification"]["name"] for f in feats] == ["Non-tumor", "Tumor", "Tumor"]
    # level-0 square of the second tile
    xs = [c[0] for c in feats[1]["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs)) == (1512, 1768)


def test_heatmap_for_slide_uses_the_test_fold_and_writes_png(tmp_path):
    write_parquet(tmp_path / "fold0.parquet", probs_frame(role="train", fold=0).assign(prob=0.0))
    write_parquet(tmp_path / "fold1.parquet", probs_frame(role="test", fold=1))
    write_json(tmp_path / "slide.json", {"slide_id": "s", "status": "ok", "path": str(tmp_path / "absent.svs"),
                                         "width": 2000, "height": 3200, "mpp_x": 0.25})
    mask = np.zeros((40, 25), np.uint8)
    mask[20:35, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "tissue.png")
    write_json(tmp_path / "tissue.json", {"scale_x": 80.0, "scale_y": 80.0})
    info = heatmap_for_slide("s", "mil-abmil", [str(tmp_path / "fold0.parquet"), str(tmp_path / "fold1.parquet")],
                             str(tmp_path / "slide.json"), str(tmp_path / "tissue.json"), str(tmp_path / "tissue.png"),
                             tmp_path / "out.png", tmp_path / "out.geojson", {"dpi": 40})
    assert (info["fold"], info["role"]) == (1, "test")
    assert Image.open(tmp_path / "out.png").size[0] > 100
    fc = json.loads((tmp_path / "out.geojson").read_text())
    assert max(f["properties"]["measurements"]["prob"] for f in fc["features"]) == pytest.approx(0.9)


def test_skipped_slide_gives_empty_outputs(tmp_path):
    write_parquet(tmp_path / "fold0.parquet", probs_frame(slide_id="other"))
    write_json(tmp_path / "slide.json", {"slide_id": "s", "status": "skipped", "reason": "corrupt file"})
    info = heatmap_for_slide("s", "patch_classifier", [str(tmp_path / "fold0.parquet")], str(tmp_path / "slide.json"),
                             None, None, tmp_path / "out.png", tmp_path / "out.geojson", {"dpi": 30})
    assert info["status"] == "empty"
    assert json.loads((tmp_path / "out.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
    Image.open(tmp_path / "out.png").verify()


def test_multiclass_tile_probs_give_a_panel_per_class_and_survival_names_the_tile_risk(tmp_path, monkeypatch):
    """mil_tile_probs keeps the per-class instance probabilities by class name; the heatmap has a
    panel per class (plus attention) and GeoJSON tiles classed by their most probable class; a
    survival table's panel is the tile risk, not a tumour probability."""
    import histoflow.heatmaps as H
    from histoflow.tile_probs import mil_tile_probs

    scores = probs_frame().rename(columns={"prob": "instance_prob"})
    scores["instance_prob_0"] = [0.7, 0.1, 0.2]
    scores["instance_prob_1"] = [0.2, 0.8, 0.1]
    scores["instance_prob_2"] = [0.1, 0.1, 0.7]
    write_parquet(tmp_path / "tile_scores.parquet", scores,
                  metadata={"histoflow.target": "multiclass", "histoflow.classes": "lymphoid\tnormal\ttumor"})
    mil_tile_probs(tmp_path / "tile_scores.parquet", 0, tmp_path / "fold0.parquet")
    table = pd.read_parquet(tmp_path / "fold0.parquet")
    assert {"prob_lymphoid", "prob_normal", "prob_tumor"} <= set(table.columns)
    write_json(tmp_path / "slide.json", {"slide_id": "s", "status": "ok", "path": str(tmp_path / "absent.svs"),
                                         "width": 2000, "height": 3200, "mpp_x": 0.25})
    seen = []
    real = H.render_heatmap
    monkeypatch.setattr(H, "render_heatmap", lambda out, panels, *a, **k: (seen.append([p[0] for p in panels]),
                                                                            real(out, panels, *a, **k)))
    heatmap_for_slide("s", "mil-abmil", [str(tmp_path / "fold0.parquet")], str(tmp_path / "slide.json"), None, None,
                      tmp_path / "out.png", tmp_path / "out.geojson", {"dpi": 30})
    assert seen[-1][:3] == ["P(lymphoid)", "P(normal)", "P(tumor)"] and "attention" in seen[-1][3]
    fc = json.loads((tmp_path / "out.geojson").read_text())
    assert [f["properties"]["classification"]["name"] for f in fc["features"]] == ["lymphoid", "normal", "tumor"]
    # survival: one panel, named the tile risk (the target from the table's metadata)
    write_parquet(tmp_path / "surv.parquet", probs_frame(), metadata={"histoflow.target": "survival"})
    heatmap_for_slide("s", "mil-abmil", [str(tmp_path / "surv.parquet")], str(tmp_path / "slide.json"), None, None,
                      tmp_path / "s.png", tmp_path / "s.geojson", {"dpi": 30})
    assert seen[-1][0].startswith("tile risk")
