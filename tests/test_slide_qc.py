"""Slide QC: the per-slide metadata record and the cohort QC table users check first."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoflow.errors import SlideError
from histoflow.slide_qc import mpp_from_properties, resolve_mpp, write_qc_table, write_slide_metadata


def manifest(tmp_path: Path, slide_id: str, path, status: str = "ok", reason: str = "") -> Path:
    m = tmp_path / f"{slide_id}.manifest.json"
    m.write_text(json.dumps({"slide_id": slide_id, "status": status, "reason": reason, "path": str(path)}))
    return m


def qc(tmp_path, slide_id, path, sheet_mpp=None, default_mpp=None, on_error="fail", **kw) -> dict:
    out = tmp_path / "slides" / f"{slide_id}.json"
    write_slide_metadata(slide_id, manifest(tmp_path, slide_id, path, **kw), out, sheet_mpp, default_mpp, on_error)
    return json.loads(out.read_text())


# ---------------------------------------------------------------- µm/px resolution (pure)

def test_slide_mpp_is_used_when_the_sheet_gives_none():
    mx, my, source, notes = resolve_mpp("s1", {"openslide.mpp-x": "0.2525", "openslide.mpp-y": "0.2525"}, None, 1.0)
    assert (mx, my, source) == (0.2525, 0.2525, "slide") and "mpp_warning" not in notes


def test_the_sheet_mpp_wins_over_the_file_and_a_disagreement_is_warned():
    props = {"openslide.mpp-x": "0.2525", "openslide.mpp-y": "0.2525"}
    mx, my, source, notes = resolve_mpp("s1", props, 0.5, 1.0)
    assert (mx, my, source) == (0.5, 0.5, "sheet")
    assert notes["mpp_file"] == [0.2525, 0.2525] and notes["mpp_file_source"] == "slide"
    assert "0.5" in notes["mpp_warning"] and "0.2525" in notes["mpp_warning"]
    # within 10 %: the sheet's value, no warning
    mx, _, source, notes = resolve_mpp("s1", props, 0.27, None)
    assert (mx, source) == (0.27, "sheet") and "mpp_warning" not in notes


def test_missing_mpp_falls_back_to_sheet_then_default():
    assert resolve_mpp("s1", {}, 0.25, 0.5)[2:3] == ("sheet",)
    assert resolve_mpp("s1", {}, 0.25, 0.5)[0] == 0.25
    assert resolve_mpp("s1", {}, None, 0.5)[:3] == (0.5, 0.5, "default_mpp")
    assert resolve_mpp("s1", {}, float("nan"), 0.5)[2] == "default_mpp"  # empty sheet cell


def test_missing_mpp_everywhere_is_one_line_naming_slide_and_both_fixes():
    with pytest.raises(SlideError) as err:
        resolve_mpp("patient7_A", {}, None, None)
    msg = str(err.value)
    assert "\n" not in msg and "patient7_A" in msg
    assert "`mpp` column" in msg and "default_mpp" in msg


def test_mpp_from_tiff_resolution_tags():
    cm = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}
    inch = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"}
    assert mpp_from_properties(cm) == pytest.approx((0.25, 0.25, "tiff_resolution"))
    assert mpp_from_properties(inch) == pytest.approx((0.25, 0.25, "tiff_resolution"))
    assert resolve_mpp("s", cm)[2] == "tiff_resolution"


def test_72dpi_placeholder_is_not_taken_as_a_resolution():
    # 72 dpi = 352.8 µm/px: what image editors write into every TIFF
    props = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72", "tiff.YResolution": "72"}
    mx, _, source, notes = resolve_mpp("s", props, sheet_mpp=0.5)
    assert (mx, source) == (0.5, "sheet") and notes["slide_mpp_rejected"][0] == pytest.approx(352.78, rel=1e-3)
    with pytest.raises(SlideError, match="implausible"):
        resolve_mpp("s", props)


@pytest.mark.parametrize("bad", [0.01, 50.0])
def test_implausible_sheet_or_default_mpp_is_an_error_naming_the_source(bad):
    with pytest.raises(SlideError, match="samples sheet"):
        resolve_mpp("s", {}, sheet_mpp=bad)
    with pytest.raises(SlideError, match="default_mpp"):
        resolve_mpp("s", {}, default_mpp=bad)


# ---------------------------------------------------------------- real files (openslide-python fixtures)

def test_small_svs_record(tmp_path, openslide_fixtures):
    path = openslide_fixtures / "small.svs"
    rec = qc(tmp_path, "small", path)
    assert rec["status"] == "ok" and rec["vendor"] == "aperio" and rec["format"] == "svs"
    assert (rec["width"], rec["height"], rec["level_count"]) == (16, 16, 1)
    assert rec["level_dimensions"] == [[16, 16]] and rec["level_downsamples"] == [1.0]
    assert rec["mpp_x"] == pytest.approx(0.499) and rec["mpp_source"] == "slide"
    assert rec["objective_power"] == 20
    assert rec["associated_images"] == ["thumbnail"]
    assert rec["file_size_bytes"] == path.stat().st_size
    assert rec["md5"] == hashlib.md5(path.read_bytes()).hexdigest()


def test_generic_tiff_with_placeholder_resolution_needs_sheet_mpp(tmp_path, openslide_fixtures):
    path = openslide_fixtures / "boxes.tiff"
    with pytest.raises(SlideError) as err:
        qc(tmp_path, "boxes", path)
    assert "'boxes'" in str(err.value) and "default_mpp" in str(err.value)
    rec = qc(tmp_path, "boxes", path, sheet_mpp=0.25)
    assert rec["status"] == "ok" and rec["vendor"] == "generic-tiff"
    assert rec["mpp_x"] == 0.25 and rec["mpp_source"] == "sheet" and rec["level_count"] == 4
    assert rec["level_downsamples"][1] == pytest.approx(2.0)


def _tiff_with_resolution(path: Path, mpp: float) -> Path:
    """A small tiled TIFF whose resolution tags say ``mpp`` µm/px (OpenSlide reads them as mpp)."""
    import tifffile

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_sheet_mpp_overrides_a_tiff_resolution_tag_with_a_warning_in_json_and_qc_table(tmp_path):
    path = _tiff_with_resolution(tmp_path / "scan.tiff", 0.25)
    rec = qc(tmp_path, "scan", path)
    assert rec["mpp_x"] == pytest.approx(0.25) and rec["mpp_source"] in ("slide", "tiff_resolution")
    assert not rec["mpp_warning"]
    rec = qc(tmp_path, "scan", path, sheet_mpp=0.5)
    assert rec["mpp_x"] == 0.5 and rec["mpp_y"] == 0.5 and rec["mpp_source"] == "sheet"
    assert rec["mpp_file"] == pytest.approx([0.25, 0.25]) and "more than 10%" in rec["mpp_warning"]
    slide_json = tmp_path / "slides" / "scan.json"
    write_qc_table([slide_json], [], [], tmp_path / "qc" / "slides.tsv")
    table = pd.read_csv(tmp_path / "qc" / "slides.tsv", sep="\t")
    assert table.loc[0, "mpp_source"] == "sheet" and "more than 10%" in table.loc[0, "mpp_warning"]
    rec = qc(tmp_path, "scan", path, sheet_mpp=0.26)   # 4 % off: used, not warned
    assert rec["mpp_x"] == 0.26 and rec["mpp_source"] == "sheet" and not rec["mpp_warning"]


def test_dicom_fixture(tmp_path, openslide_fixtures):
    rec = qc(tmp_path, "dcm", openslide_fixtures / "boxes_0.dcm")
    assert rec["status"] == "ok" and rec["vendor"] == "dicom" and rec["mpp_source"] == "slide"


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_corrupt_slide_fails_with_one_line_or_is_skipped(tmp_path, openslide_fixtures, name):
    with pytest.raises(SlideError) as err:
        qc(tmp_path, "bad", openslide_fixtures / name)
    msg = str(err.value)
    assert "\n" not in msg and "'bad'" in msg and name in msg and "on_error: skip" in msg
    rec = qc(tmp_path, "bad", openslide_fixtures / name, on_error="skip")
    assert rec["status"] == "skipped" and name in rec["reason"]
    assert rec["mpp_x"] is None and rec["level_dimensions"] == []


def test_failed_download_is_an_error_or_skip(tmp_path):
    with pytest.raises(SlideError, match="download failed .*HTTP 404"):
        qc(tmp_path, "gone", tmp_path / "nothing.svs", status="failed", reason="HTTP 404")
    rec = qc(tmp_path, "gone", tmp_path / "nothing.svs", status="failed", reason="HTTP 404", on_error="skip")
    assert rec["status"] == "skipped" and "HTTP 404" in rec["reason"]


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        qc(tmp_path, "lost", tmp_path / "lost.svs")


# ---------------------------------------------------------------- real slides (shared data)

def test_cmu_small_region_svs(tmp_path, shared_data):
    rec = qc(tmp_path, "cmu", shared_data / "slides" / "CMU-1-Small-Region.svs")
    assert rec["mpp_x"] == pytest.approx(0.499) and rec["objective_power"] == 20
    assert (rec["width"], rec["height"]) == (2220, 2967)
    assert {"label", "macro", "thumbnail"} <= set(rec["associated_images"])


def test_cmu_small_region_svs_sheet_mpp_corrects_the_file(tmp_path, shared_data):
    rec = qc(tmp_path, "cmu", shared_data / "slides" / "CMU-1-Small-Region.svs", sheet_mpp=0.25)
    assert rec["mpp_x"] == 0.25 and rec["mpp_source"] == "sheet"
    assert rec["mpp_file"][0] == pytest.approx(0.499) and rec["mpp_warning"]


def test_dicom_series_opens_from_one_file(tmp_path, shared_data):
    one = sorted((shared_data / "slides" / "dicom-cmu-1-small-region").glob("*.dcm"))[0]
    rec = qc(tmp_path, "dcm", one)
    assert rec["vendor"] == "dicom" and rec["level_count"] == 12
    assert (rec["width"], rec["height"]) == (2220, 2967) and rec["mpp_x"] == pytest.approx(0.499)


# ---------------------------------------------------------------- cohort QC table

def _tiles(path: Path, mpps: list[float]) -> Path:
    pq.write_table(pa.table({"slide_id": pa.array(["x"] * len(mpps), pa.string()),
                             "target_mpp": pa.array(mpps, pa.float64())}), path)
    return path


def test_qc_table_one_row_per_slide_with_tiles_per_mpp_and_skips(tmp_path):
    slides, tissue, tiles = [], [], []
    for sid, status in [("b", "ok"), ("a", "ok"), ("c", "skipped")]:
        p = tmp_path / f"{sid}.json"
        p.write_text(json.dumps({"slide_id": sid, "status": status, "reason": "corrupt" if status != "ok" else "",
                                 "vendor": "aperio" if status == "ok" else None, "mpp_x": 0.5 if status == "ok" else None}))
        slides.append(p)
        t = tmp_path / f"{sid}.tissue.json"
        t.write_text(json.dumps({"slide_id": sid, "status": status, "tissue_area_mm2": 12.5 if status == "ok" else 0.0,
                                 "method": "brightfield", "pen_fraction": 0.0}))
        tissue.append(t)
    tiles = [_tiles(tmp_path / "b.parquet", [0.5, 0.5, 1.0]), _tiles(tmp_path / "a.parquet", [0.5]),
             _tiles(tmp_path / "c.parquet", [])]
    out = tmp_path / "qc" / "slides.tsv"
    write_qc_table(slides, tissue, tiles, out)
    table = pd.read_csv(out, sep="\t")
    assert list(table["slide_id"]) == ["a", "b", "c"]
    assert list(table["status"]) == ["ok", "ok", "skipped"] and table.loc[2, "reason"] == "corrupt"
    assert list(table["n_tiles_0.5"]) == [1, 2, 0] and list(table["n_tiles_1"]) == [0, 1, 0]
    assert table.loc[0, "tissue_area_mm2"] == 12.5


def test_qc_table_of_empty_cohort_is_valid(tmp_path):
    out = tmp_path / "slides.tsv"
    write_qc_table([], [], [], out)
    table = pd.read_csv(out, sep="\t")
    assert len(table) == 0 and {"slide_id", "status", "reason", "tissue_area_mm2"} <= set(table.columns)
