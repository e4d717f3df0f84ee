"""Pixels are the right colour, or the slide is refused. A DICOM whose JPEG frames are YCbCr
while its PhotometricInterpretation says RGB (as bfconvert writes) comes out of OpenSlide 4.0.1
unconverted (salmon glass, blue tissue); slide QC finds it and every read converts it, so the
same tissue in two formats gives the same tissue area, tile count and tile colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histoflow.config import validate_config
from histoflow.errors import SlideError
from histoflow.io import read_json, write_json
from histoflow.slide_qc import write_slide_metadata
from histoflow.wsi import SlideReader, check_colour_space, jpeg_colour_space


def _jpeg(mode: str = "RGB", **save) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, (16, 16), (200, 100, 50) if mode == "RGB" else 50).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_jpeg_markers_say_which_colour_space_the_frames_are():
    assert jpeg_colour_space(_jpeg()) == "ycbcr"                          # JFIF
    assert jpeg_colour_space(b"DICM..." + _jpeg()) == "ycbcr"              # found inside a container
    assert jpeg_colour_space(_jpeg(keep_rgb=True)) == "rgb"                # Adobe APP14 transform 0
    assert jpeg_colour_space(_jpeg("L")) is None and jpeg_colour_space(b"no jpeg here") is None


class FakeSlide(SlideReader):
    """A reader serving one image as its backend's raw pixels, for the colour check."""

    def __init__(self, rgb: np.ndarray, path="none", properties=None):
        super().__init__(path)
        self.rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
        self.level_dimensions = [(rgb.shape[1], rgb.shape[0])]
        self.level_downsamples = [1.0]
        self.properties = dict(properties or {})

    def _read_rgba(self, x, y, level, w, h):
        return self.rgba[y:y + h, x:x + w]


def _tissue_on_glass() -> np.ndarray:
    rgb = np.full((200, 200, 3), 242, np.uint8)
    rgb[50:150, 50:150] = (150, 60, 140)          # stained tissue
    return rgb


def test_ycbcr_read_as_rgb_is_found_and_rgb_is_left_alone(tmp_path):
    rgb = _tissue_on_glass()
    assert check_colour_space(FakeSlide(rgb, tmp_path / "none"), "s")["colour_fix"] is None
    as_ycbcr = np.asarray(Image.fromarray(rgb).convert("YCbCr"))     # what OpenSlide hands back
    found = check_colour_space(FakeSlide(as_ycbcr, tmp_path / "none"), "s")
    assert found["colour_fix"] == "ycbcr_to_rgb" and found["colour_check"]["glass_chroma_as_read"] > 40


def test_a_container_that_contradicts_its_frames_and_unclear_pixels_is_refused(tmp_path):
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(b"\0" * 132 + b"DICM" + _jpeg())
    tinted = np.full((200, 200, 3), (230, 180, 120), np.uint8)      # neither reading gives grey glass
    with pytest.raises(SlideError, match="PhotometricInterpretation says RGB.*on_error: skip"):
        check_colour_space(FakeSlide(tinted, dcm, {"dicom.PhotometricInterpretation": "RGB"}), "s")
    # the same file with grey glass as read: OpenSlide converted it, nothing to fix
    ok = check_colour_space(FakeSlide(_tissue_on_glass(), dcm, {"dicom.PhotometricInterpretation": "RGB"}), "s")
    assert ok["colour_fix"] is None and "PhotometricInterpretation" in ok["colour_check"]["container"]


@pytest.fixture(scope="module")
def pair(shared_data, tmp_path_factory):
    """CMU-1-Small-Region as SVS and as DICOM, through slide QC, tissue and tiling."""
    from histoflow.tiling import read_tiles_table, tile_slide
    from histoflow.tissue import detect_tissue_for_slide
    from histoflow.wsi import open_slide

    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    dcm_dir = shared_data / "slides" / "dicom-cmu-1-small-region"
    if not svs.is_file() or not dcm_dir.is_dir():
        pytest.skip("the CMU-1-Small-Region SVS/DICOM pair is not in the shared data")
    dcm = sorted(dcm_dir.glob("level-0-*.dcm"))[0]
    # the DICOM's coarse levels are nearest-neighbour subsamples (bfconvert): at the default
    # 16 µm/px its level 5 alone loses 11 % of the tissue area whatever the colours, so the
    # masks are compared at 8 µm/px, where both formats read a real pyramid level or level 0
    cfg = validate_config({"samples": "x.tsv", "tissue": {"mask_mpp": 8}})
    root = tmp_path_factory.mktemp("pair")
    result = {}
    for sid, path in (("svs", svs), ("dcm", dcm)):
        write_json(root / f"{sid}.manifest.json", {"slide_id": sid, "status": "ok", "path": str(path), "md5": "0" * 32})
        tile_check = {"mpp": cfg["features"]["mpp"], "tile_px": cfg["tiling"]["tile_px"], "max_failed_tile_fraction": 0.01}
        record = write_slide_metadata(sid, root / f"{sid}.manifest.json", root / f"{sid}.json", tile_check=tile_check)
        detect_tissue_for_slide(root / f"{sid}.json", root / f"{sid}.png", root / f"{sid}.geojson",
                                root / f"{sid}.overlay.jpg", root / f"{sid}.tissue.json", cfg["tissue"])
        tile_slide(root / f"{sid}.json", root / f"{sid}.png", root / f"{sid}.tissue.json", root / f"{sid}.parquet",
                   cfg["tiling"])
        tiles = read_tiles_table(root / f"{sid}.parquet")
        slide = open_slide(path, sid, record.get("colour_fix"), record=record)
        images = [slide.read_tile(row) for row in tiles.to_dict("records")]
        slide.close()
        result[sid] = {"record": record, "tissue": read_json(root / f"{sid}.tissue.json"), "tiles": tiles,
                       "images": images, "root": root}
    return result


@pytest.mark.shared
def test_qc_flags_the_dicom_and_not_the_svs(pair):
    assert pair["svs"]["record"]["colour_fix"] is None
    assert pair["dcm"]["record"]["colour_fix"] == "ycbcr_to_rgb"
    assert "PhotometricInterpretation" in pair["dcm"]["record"]["colour_check"]["container"]


@pytest.mark.shared
def test_the_same_tissue_in_two_formats_gives_the_same_area_tiles_and_colour(pair):
    svs, dcm = pair["svs"], pair["dcm"]
    area_svs, area_dcm = svs["tissue"]["tissue_area_mm2"], dcm["tissue"]["tissue_area_mm2"]
    assert abs(area_dcm - area_svs) / area_svs < 0.10, (area_svs, area_dcm)
    assert dcm["tissue"]["pen_fraction"] < 0.05                  # blue tissue used to read as pen
    n_svs, n_dcm = len(svs["tiles"]), len(dcm["tiles"])
    assert abs(n_dcm - n_svs) / n_svs <= 0.10, (n_svs, n_dcm)
    mean_svs = np.mean([im.reshape(-1, 3).mean(0) for im in svs["images"]], axis=0)
    mean_dcm = np.mean([im.reshape(-1, 3).mean(0) for im in dcm["images"]], axis=0)
    assert np.abs(mean_dcm - mean_svs).max() < 6, (mean_svs, mean_dcm)
    # the stored tile, side by side with the SVS's nearest one, for a look (tests/README: view it)
    first = dcm["tiles"].iloc[0]
    near = ((svs["tiles"]["x"] - first["x"]) ** 2 + (svs["tiles"]["y"] - first["y"]) ** 2).to_numpy().argmin()
    Image.fromarray(np.hstack([svs["images"][near], dcm["images"][0]])).save(dcm["root"] / "tiles_svs_dcm.png")


@pytest.mark.shared
def test_features_see_the_dicom_in_rgb(pair):
    """Through the features stage (its readers take colour_fix from slides/{id}.json): an
    encoder whose features are the tile's mean colour gives the same colours for both formats."""
    from torch import nn

    from histoflow.features import extract_slide_features, read_features
    from test_features import TinyEncoder

    encoder = TinyEncoder(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(), name="mean-colour",
                          input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), dim=3)
    colours = {}
    for sid in ("svs", "dcm"):
        root = pair[sid]["root"]
        out = root / f"{sid}.features.parquet"
        extract_slide_features(str(root / f"{sid}.json"), str(root / f"{sid}.parquet"), str(out), "mean-colour",
                               {"mpp": 0.5, "num_workers": 0, "dtype": "float32"}, [0.5], encoder=encoder)
        _, feats = read_features(out)
        assert len(feats) == len(pair[sid]["tiles"])
        colours[sid] = feats.mean(axis=0) * 255
    assert np.abs(colours["dcm"] - colours["svs"]).max() < 6, colours


# the DICOM's coarse levels are point samples; its mask at the default resolution is the block
# mean of a finer level (tissue.SUBSAMPLED_VENDORS), which brings it within this of the SVS's
DEFAULT_MASK_AREA_TOLERANCE = 0.05


@pytest.mark.shared
def test_at_the_default_mask_resolution_both_formats_give_the_same_tissue_area(pair):
    """tissue.mask_mpp at its default (16 µm/px): the SVS's mask is its level 0 shrunk by 32, the
    DICOM's would be its level 5, one level-0 pixel in 32 x 32 (11 % less tissue); it is read
    from a level at least 4x finer instead and averaged down."""
    from histoflow.tissue import detect_tissue_for_slide

    cfg = validate_config({"samples": "x.tsv"})
    assert cfg["tissue"]["mask_mpp"] == 16
    areas = {}
    for sid in ("svs", "dcm"):
        root = pair[sid]["root"]
        stats = detect_tissue_for_slide(root / f"{sid}.json", root / f"{sid}.16.png", root / f"{sid}.16.geojson",
                                        root / f"{sid}.16.overlay.jpg", root / f"{sid}.16.tissue.json", cfg["tissue"])
        assert stats["mask_mpp"] == pytest.approx(16, rel=0.05)
        areas[sid] = stats["tissue_area_mm2"]
    assert abs(areas["dcm"] - areas["svs"]) / areas["svs"] < DEFAULT_MASK_AREA_TOLERANCE, areas


def test_glass_chroma_from_histograms_is_the_median_over_the_brightest_tenth():
    """The colour check's statistic, computed from histograms, equals its definition:
    median(max - min channel) over the pixels with luma >= the 0.9 quantile (numpy's)."""
    from histoflow.wsi.colour import _chroma_of_glass

    def definition(rgb):
        pixels = rgb.reshape(-1, 3).astype(np.int16)
        luma = pixels.sum(axis=1)
        bright = pixels[luma >= np.quantile(luma, 0.9)]
        return float(np.median(bright.max(axis=1) - bright.min(axis=1)))

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 11, 257, 12345):
        for k in range(12):
            x = rng.integers(0, 256, (n, 3), dtype=np.uint8) if k % 3 else \
                np.clip(rng.normal(230, 8, (n, 3)), 0, 255).astype(np.uint8)
            if k % 4 == 3:
                x[:] = x[0]                         # ties everywhere
            assert _chroma_of_glass(x) == definition(x), (n, k)
