"""Lesion detection and its evaluation (CAMELYON16 FROC, Dice), on hand-made cases with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, box

from histoflow.io import read_json, write_json, write_parquet
from histoflow.lesions import (SlideEval, detect_lesions, dice, evaluation_lesions, froc, froc_detections,
                               lesions_for_slide, match_detections, summarize_lesions)


def test_components_are_8_connected_and_thresholded():
    grid = np.full((6, 8), np.nan, dtype=np.float32)
    grid[:5, :] = 0.1
    grid[0, 0] = grid[1, 1] = 0.8          # diagonal neighbours: one lesion under 8-connectivity
    grid[3:5, 5:8] = [[0.6, 0.7, 0.9], [0.5, 0.6, 0.7]]   # a 2x3 block, 0.5 counts (>= threshold)
    grid[0, 7] = 0.49                      # just below threshold: nothing
    labels, lesions = detect_lesions(grid, threshold=0.5)
    assert len(lesions) == 2
    by_size = sorted(lesions, key=lambda l: l.n_tiles)
    assert by_size[0].n_tiles == 2 and by_size[0].max_prob == pytest.approx(0.8)
    big = by_size[1]
    assert big.n_tiles == 6 and big.peak == (3, 7)
    assert big.max_prob == pytest.approx(0.9) and big.mean_prob == pytest.approx(4.0 / 6)
    assert labels[0, 7] == 0 and (labels[5] == 0).all()  # NaN cells (no tile) never join a lesion
    _, min_area = detect_lesions(grid, threshold=0.5, min_tiles=3)
    assert [l.n_tiles for l in min_area] == [6]


def test_smoothing_ignores_cells_without_tiles():
    grid = np.full((5, 5), np.nan, dtype=np.float32)
    grid[1:4, 1:4] = 0.8
    _, lesions = detect_lesions(grid, threshold=0.75, sigma=1.0)
    # an untiled border would drag a naive blur below 0.75; normalised smoothing keeps all 9 tiles
    assert len(lesions) == 1 and lesions[0].n_tiles == 9


def make_slide(tmp_path, slide_id="t1", mpp=0.5, probs=None, status="ok", role="test"):
    """A 8x8 grid of 256-px tiles (stride 256 at level 0, 0.5 µm/px => 128 µm per tile side)."""
    xs, ys = np.meshgrid(np.arange(8), np.arange(8))
    prob = np.zeros((8, 8), np.float32) if probs is None else probs
    frame = pd.DataFrame({"slide_id": slide_id, "x": xs.ravel() * 256, "y": ys.ravel() * 256, "col": xs.ravel(),
                          "row": ys.ravel(), "size0": 256, "target_mpp": 1.0, "fold": 0, "role": role,
                          "prob": prob.ravel(), "attention": np.nan})
    write_parquet(tmp_path / f"{slide_id}_probs.parquet", frame)
    write_json(tmp_path / f"{slide_id}.json", {"slide_id": slide_id, "status": status, "mpp_x": mpp, "mpp_y": mpp,
                                               "reason": "unreadable" if status == "skipped" else None})
    return str(tmp_path / f"{slide_id}_probs.parquet"), str(tmp_path / f"{slide_id}.json")


def write_gt(tmp_path, geoms, name="gt.geojson"):
    from shapely.geometry import mapping

    feats = [{"type": "Feature", "geometry": mapping(g),
              "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [255, 0, 0]}}}
             for g in geoms]
    (tmp_path / name).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return str(tmp_path / name)


def test_lesion_polygons_areas_and_qupath_geojson(tmp_path):
    probs = np.zeros((8, 8), np.float32)
    probs[1:3, 1:4] = 0.9       # 6 tiles
    probs[6, 6] = 0.7           # 1 tile
    p, s = make_slide(tmp_path, probs=probs)
    gt = write_gt(tmp_path, [box(256, 256, 1024, 768)])  # exactly the 6-tile block
    rec = lesions_for_slide("t1", "patch_classifier", [p], s, gt, "tumor", "tumor", True, {}, {},
                            tmp_path / "t1.geojson", tmp_path / "t1.lesions.json")
    fc = json.loads((tmp_path / "t1.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    areas = sorted(f["properties"]["measurements"]["area_um2"] for f in fc["features"])
    tile_um2 = (256 * 0.5) ** 2
    assert areas == pytest.approx([tile_um2, 6 * tile_um2])
    for f in fc["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tumor"
        assert f["geometry"]["type"] == "Polygon"
    big = max(fc["features"], key=lambda f: f["properties"]["measurements"]["area_um2"])
    xs = [c[0] for c in big["geometry"]["coordinates"][0]]
    ys = [c[1] for c in big["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (256, 1024, 256, 768)  # level-0 px
    # the block hits the GT lesion, the single tile is a false positive; Dice 2*6/(7+6)
    assert sorted(d["hit"] for d in rec["detections"]) == [-1, 0]
    assert rec["dice"] == pytest.approx(12 / 13)


def test_dice_perfect_and_disjoint():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_froc_hand_made_case():
    # tumour slide with 2 lesions: hit L0 at 0.9 (and again at 0.7: not a TP twice, not an FP),
    # FP at 0.8, hit L1 at 0.6; normal slide: FP at 0.95
    tumour = SlideEval("t", np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, -1, 0, 1]), n_lesions=2)
    normal = SlideEval("n", np.array([0.95]), np.array([-1]), n_lesions=0)
    r = froc([tumour, normal])
    # curve (avg FP, sensitivity): (0,0) (0.5,0) (0.5,0.5) (1,0.5) (1,1)
    assert r["sensitivity"] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert r["froc_score"] == pytest.approx(4.75 / 6)
    assert (r["n_slides"], r["n_lesions"]) == (2, 2)


def test_froc_ignores_itc_hits_and_merges_lesions_within_75um():
    mpp = 0.5
    # two 600x600 px (300 µm) lesions 60 µm (120 px) apart merge; a third 300 µm away stays apart;
    # a 100 µm (200 px) speck is an isolated tumour cell cluster (< 275 µm)
    gt = box(0, 0, 600, 600).union(box(720, 0, 1320, 600)).union(box(1920, 0, 2520, 600)).union(box(0, 3000, 200, 3200))
    regions, itc = evaluation_lesions(gt, mpp)
    assert len(regions) == 3 and sorted(itc) == [False, False, True]
    hits = match_detections(np.array([[100, 100], [900, 100], [2100, 200], [100, 3100], [5000, 5000]]), regions, itc)
    assert hits[0] == hits[1] >= 0              # same merged lesion
    assert hits[2] >= 0 and hits[2] != hits[0]
    assert hits[3] == -2 and hits[4] == -1       # ITC ignored, background is FP
    # dilation by 37.5 µm = 75 px: a point 60 px outside a lesion still hits it
    assert match_detections(np.array([[2580, 200]]), regions, itc)[0] == hits[2]
    r = froc([SlideEval("s", np.array([0.9, 0.8, 0.7, 0.6]), hits[[0, 2, 3, 4]], n_lesions=2)])
    assert r["n_lesions"] == 2 and r["sensitivity"][-1] == 1.0


def test_cohort_metrics_and_slides_without_ground_truth(tmp_path):
    probs = np.zeros((8, 8), np.float32)
    probs[2:5, 2:5] = 0.95
    p1, s1 = make_slide(tmp_path, "t1", probs=probs)
    gt = write_gt(tmp_path, [box(512, 512, 1280, 1280)])  # 384 µm: not an ITC
    p2, s2 = make_slide(tmp_path, "n1")
    p3, s3 = make_slide(tmp_path, "u1", probs=probs)          # tumour slide, no annotations
    p4, s4 = make_slide(tmp_path, "k1", status="skipped")     # skipped upstream
    paths = [p1, p2, p3, p4]
    jsons = []
    for sid, s, ann, label in (("t1", s1, gt, "tumor"), ("n1", s2, None, "normal"), ("u1", s3, None, "tumor"),
                               ("k1", s4, None, "normal")):
        jsons.append(str(tmp_path / f"{sid}.out.json"))
        lesions_for_slide(sid, "mil-abmil", paths, s, ann, label, "tumor", True, {}, {}, tmp_path / f"{sid}.geojson", jsons[-1])
    assert read_json(jsons[2])["gt_available"] is False and read_json(jsons[2])["n_lesions_detected"] == 1
    assert json.loads((tmp_path / "k1.geojson").read_text())["features"] == []
    m = summarize_lesions(jsons, "mil-abmil", {}, tmp_path / "metrics.json", tmp_path / "per_slide.tsv", tmp_path / "froc.png")
    assert m["n_slides_with_gt"] == 2 and m["froc"]["available"]
    assert m["froc"]["froc_score"] == pytest.approx(1.0)   # one lesion found, no FP
    assert m["dice"]["pooled"] == pytest.approx(1.0)
    table = pd.read_csv(tmp_path / "per_slide.tsv", sep="\t")
    assert table.set_index("slide_id").loc["k1", "status"] == "skipped"
    assert (tmp_path / "froc.png").stat().st_size > 0

    none = summarize_lesions([jsons[2]], "mil-abmil", {}, tmp_path / "m2.json", tmp_path / "p2.tsv", tmp_path / "f2.png")
    assert none["froc"]["available"] is False and none["dice"]["available"] is False


def _froc_cohort(tmp_path, settings, extra=()):
    """A tumour slide with a faint lesion A (peak 0.35) and a strong lesion B (0.9), FPs at 0.6 and
    0.45; a normal slide with FPs at 0.7 and 0.3. Both test slides; ``extra``: more (slide_id,
    probs, role, label) slides."""
    tumour = np.full((8, 8), 0.02, np.float32)
    tumour[1:3, 1:4] = 0.3
    tumour[1, 2] = 0.35                       # lesion A, under 0.5 everywhere
    tumour[5:7, 4:7] = 0.8
    tumour[5, 5] = 0.9                        # lesion B
    tumour[4, 0], tumour[0, 7] = 0.45, 0.6    # false positives
    normal = np.full((8, 8), 0.02, np.float32)
    normal[3, 3], normal[6, 6] = 0.3, 0.7
    gt = write_gt(tmp_path, [box(256, 256, 1024, 768), box(1024, 1280, 1792, 1792)])  # 384 µm long: no ITC
    jsons = []
    for sid, probs, role, label in (("t1", tumour, "test", "tumor"), ("n1", normal, "test", "normal"), *extra):
        p, s = make_slide(tmp_path, sid, probs=probs, role=role)
        jsons.append(str(tmp_path / f"{sid}.out.json"))
        lesions_for_slide(sid, "patch_classifier", [p], s, gt if label == "tumor" else None, label, "tumor", True,
                          settings, {}, tmp_path / f"{sid}.geojson", jsons[-1])
    return summarize_lesions(jsons, "patch_classifier", settings, tmp_path / "metrics.json", tmp_path / "per_slide.tsv",
                             tmp_path / "froc.png")


def test_froc_covers_the_whole_probability_range_whatever_lesions_threshold(tmp_path):
    results = [_froc_cohort(tmp_path, {"threshold": t})["froc"] for t in (0.2, 0.5, 0.8)]
    for r in results[1:]:
        assert r["froc_score"] == results[0]["froc_score"] and r["curve"] == results[0]["curve"]
    r = results[0]
    # B at 0 FPs; A (0.35) once the 0.7, 0.6 and 0.45 FPs are in: 3 FPs over 2 slides
    assert r["sensitivity"] == pytest.approx([0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    assert r["froc_score"] == pytest.approx(0.75)
    curve = pd.DataFrame(r["curve"]).dropna()
    full = curve[curve["sensitivity"] == 1.0]
    assert full["thresholds"].max() == pytest.approx(0.35) and full["avg_fp"].min() == pytest.approx(1.5)
    assert curve["thresholds"].min() < 0.1                 # the sweep goes down to the background


def test_lesion_metrics_score_test_role_slides_only(tmp_path):
    noisy = np.full((8, 8), 0.95, np.float32)    # a val-role tumour slide, all false positives
    noisy[1:3, 1:4] = 0.0
    base = _froc_cohort(tmp_path, {})
    with_val = _froc_cohort(tmp_path, {}, extra=[("v1", noisy, "val", "tumor")])
    assert with_val["froc"]["froc_score"] == base["froc"]["froc_score"]
    assert with_val["froc"]["n_slides"] == 2 and with_val["dice"]["n_slides"] == 2
    assert (with_val["n_slides_evaluated"], with_val["n_slides_not_test"]) == (2, 1)
    table = pd.read_csv(tmp_path / "per_slide.tsv", sep="\t").set_index("slide_id")
    assert not table.loc["v1", "evaluated"] and table.loc["t1", "evaluated"]


def test_froc_detections_one_per_peak_and_plateau():
    grid = np.full((6, 6), 0.1, np.float32)
    grid[0, 0] = np.nan
    grid[1:3, 1:3] = 0.9                  # a plateau: one detection
    grid[4, 4] = 0.5
    dets = froc_detections(grid)
    scores = [round(d[2], 3) for d in dets]
    assert scores[:2] == [0.9, 0.5] and set(scores[2:]) == {0.1}   # background maxima come last
    assert dets[0][:2] in {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert froc_detections(np.ones((4, 4), np.float32)) and len(froc_detections(np.ones((4, 4), np.float32))) == 1
    assert froc_detections(np.zeros((3, 3), np.float32)) == []


def test_holdout_test_slide_map_is_the_mean_of_the_fold_models(tmp_path):
    probs = np.zeros((8, 8), np.float32)
    probs[2:5, 2:5] = 0.9
    p0, s = make_slide(tmp_path, "t1", probs=probs)
    frame = pd.read_parquet(p0)
    p1 = str(tmp_path / "fold1.parquet")
    write_parquet(p1, frame.assign(fold=1, prob=frame["prob"] * 0.5))   # the second fold model: half as sure
    gt = write_gt(tmp_path, [box(512, 512, 1280, 1280)])
    rec = lesions_for_slide("t1", "patch_classifier", [p0, p1], s, gt, "tumor", "tumor", True, {}, {},
                            tmp_path / "t1.geojson", tmp_path / "t1.out.json")
    assert (rec["fold"], rec["role"]) == (-1, "test")
    assert max(d["score"] for d in rec["detections"]) == pytest.approx(0.675)
