"""The demo cohort: slides a scanner could have written, with ground truth other stages are
tested against (tissue masks, lesion polygons, labels by patient)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoflow.annotations import lesion_geometry, read_annotations
from histoflow.config import validate_samples
from histoflow.demo import MASK_DS, make_demo_cohort, plan_cohort

N = 6   # enough for pairs of slides, both labels, pen, blur, bubble and the almost empty slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_cohort(out, n_slides=N, seed=7, small=True, progress=False)
    return out


def _sheet(cohort: Path) -> pd.DataFrame:
    return pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str)


def _truth(cohort: Path, slide_id: str) -> dict:
    return json.loads((cohort / "truth" / f"{slide_id}.json").read_text())


def test_openslide_opens_every_slide_with_mpp_and_a_pyramid(cohort):
    import openslide

    sheet = _sheet(cohort)
    assert len(sheet) == N
    for row in sheet.itertuples():
        slide = openslide.OpenSlide(str(cohort / row.source))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, abs=1e-3)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5, abs=1e-3)
        assert slide.level_count >= 3
        assert slide.level_dimensions[0] == (3000, 2400)
        assert slide.level_downsamples[1] == pytest.approx(2.0)


def test_samples_sheet_is_valid_and_md5_matches_the_files(cohort):
    import hashlib

    sheet = _sheet(cohort)
    assert list(sheet.columns) == ["slide_id", "patient_id", "label", "source", "md5", "annotations"]
    table = validate_samples(sheet, cohort / "samples.tsv")   # the workflow's own checks
    assert set(table["label"]) == {"tumor", "normal"}
    for row in sheet.itertuples():
        assert hashlib.md5((cohort / row.source).read_bytes()).hexdigest() == row.md5
        assert row.slide_id.startswith("demo_") and row.patient_id.startswith("P")


def test_labels_are_per_patient_balanced_and_some_patients_have_two_slides():
    for n in (4, 6, 16, 25):
        plans = plan_cohort(n, seed=7)
        by_patient: dict[str, set] = {}
        for p in plans:
            by_patient.setdefault(p.patient_id, set()).add(p.label)
        assert all(len(labels) == 1 for labels in by_patient.values())
        counts = pd.Series([p.patient_id for p in plans]).value_counts()
        assert (counts == 2).sum() >= 1
        n_tumor = sum(p.label == "tumor" for p in plans)
        assert abs(n_tumor - n / 2) <= 1.5, (n, n_tumor)
        assert sum(p.almost_empty for p in plans) == 1
        assert any(p.pen for p in plans) and any(p.blur for p in plans) and any(p.bubble for p in plans)


def test_positives_have_lesions_inside_tissue_and_negatives_none(cohort):
    from shapely.geometry import Point

    for row in _sheet(cohort).itertuples():
        truth = _truth(cohort, row.slide_id)
        geo = lesion_geometry(read_annotations(cohort / row.annotations))
        asap = lesion_geometry(read_annotations(cohort / row.annotations.replace(".geojson", ".xml")))
        if row.label == "normal":
            assert geo.is_empty and asap.is_empty and truth["lesions"] == []
            continue
        assert 1 <= len(truth["lesions"]) <= 3
        assert geo.area * 0.25 == pytest.approx(sum(l["area_um2"] for l in truth["lesions"]), rel=0.01)
        assert asap.symmetric_difference(geo).area < 0.01 * geo.area   # both formats agree
        mask = np.array(Image.open(cohort / "truth" / f"{row.slide_id}.tissue.png")) > 0
        # every point of the lesion (vertices and a grid inside) lies on tissue
        minx, miny, maxx, maxy = geo.bounds
        xs, ys = np.meshgrid(np.arange(minx, maxx, 8), np.arange(miny, maxy, 8))
        inside = [(x, y) for x, y in zip(xs.ravel(), ys.ravel()) if geo.contains(Point(x, y))]
        coords = np.array(inside + [c for p in getattr(geo, "geoms", [geo]) for c in p.exterior.coords])
        assert mask[(coords[:, 1] // MASK_DS).astype(int), (coords[:, 0] // MASK_DS).astype(int)].all()


def test_geojson_is_what_qupath_imports(cohort):
    positive = next(r for r in _sheet(cohort).itertuples() if r.label == "tumor")
    data = json.loads((cohort / positive.annotations).read_text())
    assert data["type"] == "FeatureCollection" and data["features"]
    for feat in data["features"]:
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "Tumor" and len(props["classification"]["color"]) == 3
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and max(x for x, _ in ring) <= 3000 and max(y for _, y in ring) <= 2400


def test_tissue_truth_matches_what_the_pixels_show(cohort):
    """A grey threshold on the 16x-downsampled slide reproduces truth/*.tissue.png (IoU >= 0.9),
    so tissue-detection tests can rely on it; the almost empty slide has ~0.1 mm² of tissue."""
    import openslide

    empty = 0
    for row in _sheet(cohort).itertuples():
        slide = openslide.OpenSlide(str(cohort / row.source))
        truth = np.array(Image.open(cohort / "truth" / f"{row.slide_id}.tissue.png")) > 0
        level = slide.get_best_level_for_downsample(MASK_DS + 0.1)
        assert slide.level_downsamples[level] == pytest.approx(MASK_DS, rel=0.01)
        rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        seen = rgb.astype(float).mean(2) < 220
        pen = [n for n in _truth(cohort, row.slide_id)["nuisances"] if n["type"] == "pen"]
        assert truth.shape == seen.shape
        if not pen:   # ink on glass is dark but is not tissue
            iou = (truth & seen).sum() / (truth | seen).sum()
            assert iou >= 0.9, (row.slide_id, iou)
        area_mm2 = _truth(cohort, row.slide_id)["tissue_area_mm2"]
        assert area_mm2 == pytest.approx(truth.sum() * (MASK_DS * 0.5 / 1000) ** 2)
        if any(n["type"] == "almost_empty" for n in _truth(cohort, row.slide_id)["nuisances"]):
            assert 0.05 < area_mm2 < 0.2     # one fragment: a tile or two at most
            empty += 1
        else:
            assert area_mm2 > 0.4
    assert empty == 1


def test_nuisances_are_in_the_pixels(cohort):
    """Pen ink is saturated colour on glass; the bubble has a dark rim; blur lowers detail."""
    import openslide

    seen = set()
    for row in _sheet(cohort).itertuples():
        slide = openslide.OpenSlide(str(cohort / row.source))
        for n in _truth(cohort, row.slide_id)["nuisances"]:
            seen.add(n["type"])
            if n["type"] == "pen":
                x, y = n["polyline_px"][len(n["polyline_px"]) // 2]
                rgb = np.asarray(slide.read_region((int(x) - 8, int(y) - 8), 0, (16, 16)).convert("RGB")).astype(float)
                assert (rgb.max(2) - rgb.min(2)).mean() > 40 and rgb.mean() < 200
            if n["type"] == "air_bubble":
                cx, cy = n["center_px"]
                r = n["radius_px"]
                rgb = np.asarray(slide.read_region((int(cx - r - 10), int(cy) - 2), 0, (30, 4)).convert("RGB"))
                assert rgb.mean(2).min() < 150   # the rim
            if n["type"] == "blur":
                cx, cy = n["center_px"]
                patch = np.asarray(slide.read_region((int(cx) - 64, int(cy) - 64), 0, (128, 128)).convert("L")).astype(float)
                assert np.abs(np.diff(patch, axis=1)).mean() < 3.0
    assert {"pen", "blur", "air_bubble", "almost_empty"} <= seen


def _tiles(slide, geom_ok, n_max=40, size=224):
    out = []
    w, h = slide.level_dimensions[0]
    for y in range(0, h - size, size // 2):
        for x in range(0, w - size, size // 2):
            if geom_ok(x, y, size):
                out.append(np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB")).astype(float))
            if len(out) >= n_max:
                return out
    return out


def _effect(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2 + 1e-9)


def test_lesions_differ_from_normal_tissue_by_texture_more_than_by_colour(cohort):
    """What a CNN can learn: nuclear texture (local contrast at nucleus scale) separates lesion
    tiles from normal tissue tiles better than the mean colour of the tile does."""
    import openslide
    from shapely.geometry import box

    lesion_tiles, normal_tiles = [], []
    for row in _sheet(cohort).itertuples():
        if row.label != "tumor":
            continue
        slide = openslide.OpenSlide(str(cohort / row.source))
        geo = lesion_geometry(read_annotations(cohort / row.annotations))
        mask = np.array(Image.open(cohort / "truth" / f"{row.slide_id}.tissue.png")) > 0
        near = geo.buffer(150)

        def in_lesion(x, y, s):
            return geo.contains(box(x, y, x + s, y + s))

        def in_normal(x, y, s):
            sub = mask[y // MASK_DS:(y + s) // MASK_DS + 1, x // MASK_DS:(x + s) // MASK_DS + 1]
            return sub.all() and not near.intersects(box(x, y, x + s, y + s))

        lesion_tiles += _tiles(slide, in_lesion, 20)
        normal_tiles += _tiles(slide, in_normal, 20)
    assert len(lesion_tiles) >= 5 and len(normal_tiles) >= 20

    def texture(t):   # nuclear density: dark, haematoxylin-rich pixels
        grey = t.mean(2)
        return ((grey < 130) & (t[..., 2] > t[..., 1])).mean()

    tex = _effect([texture(t) for t in lesion_tiles], [texture(t) for t in normal_tiles])
    col = max(_effect([t[..., c].mean() for t in lesion_tiles], [t[..., c].mean() for t in normal_tiles])
              for c in range(3))
    assert tex > 3.0
    assert tex > 1.5 * col, (tex, col)


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(tmp_path):
    import openslide

    def pixels(out, seed):
        sheet = make_demo_cohort(out, n_slides=2, seed=seed, width=1024, height=768, progress=False)
        rows = pd.read_csv(sheet, sep="\t")
        slide = openslide.OpenSlide(str(out / rows.source[0]))
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions)), rows

    a, rows_a = pixels(tmp_path / "a", 7)
    b, rows_b = pixels(tmp_path / "b", 7)
    c, _ = pixels(tmp_path / "c", 8)
    assert np.array_equal(a, b)
    assert list(rows_a.md5) == list(rows_b.md5)    # no date in the file: byte-identical
    assert (tmp_path / "a" / "annotations" / "demo_000.geojson").read_bytes() == \
        (tmp_path / "b" / "annotations" / "demo_000.geojson").read_bytes()
    assert not np.array_equal(a, c)


def test_demo_config_layers_on_the_main_config(cohort, repo_root):
    import yaml

    from histoflow.config import validate_config

    main = yaml.safe_load((repo_root / "config.yaml").read_text())
    demo = yaml.safe_load((cohort / "config.yaml").read_text())
    assert demo["samples"] == str(cohort / "samples.tsv")
    assert demo["tiling"]["mpp"] == [1.0] and demo["tiling"]["tile_px"] == 224
    assert demo["tiling"]["min_tissue_fraction"] == 0.5
    # the demo runs offline with no pretrained weights: its encoder is trained on its own tiles
    assert demo["features"]["encoders"] == ["ssl:resnet-tiny"]
    assert "abmil" in demo["mil"]["models"]    # gated attention MIL (Ilse et al.) is compared
    # explored on this cohort's own test folds (docs/mil.md): not a setting the demo may report
    assert "bag_center" not in demo["mil"]
    from snakemake.utils import update_config

    merged = dict(main)
    update_config(merged, demo)   # what a second --configfile does: nested keys merge
    validate_config(merged)       # schema-valid as snakemake will see it


def test_cli_demo_cohort_without_annotations_and_where(tmp_path, capsys):
    from histoflow.cli import main

    out = tmp_path / "cli_demo"
    assert main(["demo-cohort", "--out", str(out), "--slides", "1", "--seed", "3", "--small",
                 "--no-annotations"]) == 0
    sheet = pd.read_csv(out / "samples.tsv", sep="\t")
    assert "annotations" not in sheet.columns and len(sheet) == 1
    assert not (out / "annotations").exists()
    capsys.readouterr()

    run = tmp_path / "results"
    (run / "qc").mkdir(parents=True)
    (run / "qc" / "slides.tsv").write_text("slide_id\n")
    assert main(["where", "--outdir", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("report.html" in l and "not yet" in l for l in lines)
    assert any("checklist.md" in l and "not yet" in l for l in lines)
    assert any("slides.tsv" in l and "exists" in l for l in lines)
    assert any(f"sqlite:///{run}/mlflow.db" in l for l in lines)
    assert any("http://127.0.0.1:5000" in l and "mlflow-ui" in l for l in lines)


def test_bad_slide_count_is_one_actionable_line(tmp_path, capsys):
    from histoflow.cli import main

    assert main(["demo-cohort", "--out", str(tmp_path), "--slides", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--slides" in err


def test_histoflow_entry_point_is_installed():
    exe = Path(sys.executable).parent / "histoflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "histoflow.cli"]
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "demo-cohort" in res.stdout and "where" in res.stdout
