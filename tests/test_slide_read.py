"""Reading a whole low-resolution level for the tissue mask: the libvips fast path must give
OpenSlide's pixels exactly, and must step aside for every slide it cannot read the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoflow.io import read_json, write_json
from histoflow.slide import open_slide, read_whole_level_fast
from histoflow.slide_qc import write_slide_metadata

pyvips = pytest.importorskip("pyvips")


def openslide_level(path, level) -> np.ndarray:
    slide = open_slide(path)
    try:
        rgba = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    finally:
        slide.close()
    assert rgba[..., 3].min() == 255            # fully scanned: the comparison is on RGB
    return rgba[..., :3]


def slide_meta(tmp_path, path) -> dict:
    manifest = tmp_path / "m.json"
    write_json(manifest, {"slide_id": "s", "status": "ok", "path": str(path)})
    write_slide_metadata("s", manifest, tmp_path / "s.json", 0.5, None, "fail")
    return read_json(tmp_path / "s.json")


@pytest.fixture
def jpeg_pyramid(tmp_path):
    """A JPEG-compressed tiled pyramid with texture (as scanners write them), 0.5 µm/px."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    img = pyvips.Image.new_from_array(base, interpretation="srgb").resize(8, kernel="linear")
    path = tmp_path / "pyramid.tiff"
    img.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=85, tile_width=256, tile_height=256,
                 xres=2000.0, yres=2000.0)
    return path


def test_every_level_of_a_generic_tiff_reads_exactly_as_openslide(tmp_path, jpeg_pyramid):
    meta = slide_meta(tmp_path, jpeg_pyramid)
    assert meta["vendor"] == "generic-tiff" and meta["level_count"] >= 3
    for level in range(meta["level_count"]):
        rgb, scanned = read_whole_level_fast(jpeg_pyramid, meta["vendor"], meta["level_dimensions"], level)
        assert np.array_equal(rgb, openslide_level(jpeg_pyramid, level)) and scanned.all()


def assert_aperio_reads_as_openslide(tmp_path, path):
    meta = slide_meta(tmp_path, path)
    assert meta["vendor"] == "aperio"
    rgb, _ = read_whole_level_fast(path, "aperio", meta["level_dimensions"], 0)
    assert np.array_equal(rgb, openslide_level(path, 0))


def test_aperio_svs_fixture_reads_exactly_as_openslide(tmp_path, openslide_fixtures):
    assert_aperio_reads_as_openslide(tmp_path, openslide_fixtures / "small.svs")


def test_real_aperio_svs_reads_exactly_as_openslide(tmp_path, shared_data):
    """A real scan: JPEG tiles in YCbCr, with thumbnail, label and macro pages beside the level."""
    assert_aperio_reads_as_openslide(tmp_path, shared_data / "slides" / "CMU-1-Small-Region.svs")


def test_formats_it_cannot_read_the_same_way_are_left_to_openslide(tmp_path, jpeg_pyramid):
    meta = slide_meta(tmp_path, jpeg_pyramid)
    dims = meta["level_dimensions"]
    assert read_whole_level_fast(jpeg_pyramid, "hamamatsu", dims, 1) is None          # vendor not known to match
    assert read_whole_level_fast(jpeg_pyramid, "generic-tiff", [[7, 7]] * len(dims), 1) is None  # size mismatch
    assert read_whole_level_fast(jpeg_pyramid, "generic-tiff", dims, len(dims)) is None  # no such level
    assert read_whole_level_fast(tmp_path / "missing.tiff", "generic-tiff", dims, 0) is None


def test_ndpi_is_read_by_openslide(tmp_path, shared_data):
    ndpi = shared_data / "slides" / "fluorescence-DAPI.ndpi"
    meta = slide_meta(tmp_path, ndpi)
    assert meta["vendor"] == "hamamatsu"
    assert read_whole_level_fast(ndpi, meta["vendor"], meta["level_dimensions"], 3) is None


def test_tissue_outputs_do_not_depend_on_which_reader_ran(tmp_path, jpeg_pyramid, monkeypatch):
    """The mask, polygons and stats of the fast path equal those read through OpenSlide."""
    from histoflow import tissue

    meta = slide_meta(tmp_path, jpeg_pyramid)
    outputs = {}
    for name in ("fast", "openslide"):
        if name == "openslide":
            monkeypatch.setattr(tissue, "read_whole_level_fast", lambda *a, **k: None)
        paths = [tmp_path / f"{name}.{ext}" for ext in ("png", "geojson", "jpg", "json")]
        tissue.detect_tissue_for_slide(tmp_path / "s.json", *paths, {"mask_mpp": 4.0}, "fail")
        stats = json.loads(paths[3].read_text())
        assert stats["mask_level"] == 3 and stats["mask_factor"] == 1   # a whole level, read either way
        outputs[name] = (paths[0].read_bytes(), paths[1].read_bytes(), stats)
    assert outputs["fast"] == outputs["openslide"]
    assert meta["level_dimensions"][3] == [stats["mask_width"], stats["mask_height"]]


def test_a_sparse_scan_is_left_to_openslide(tmp_path, jpeg_pyramid):
    """A tile stored with no bytes is unscanned for OpenSlide (transparent, at every level of an
    Aperio slide); libvips would show the lower pages' pixels there, so such files take the
    OpenSlide path."""
    import shutil
    import struct

    from histoflow.slide import tiff_has_missing_tiles

    meta = slide_meta(tmp_path, jpeg_pyramid)
    assert not tiff_has_missing_tiles(jpeg_pyramid, meta["level_count"] - 1)
    sparse = tmp_path / "sparse.tiff"
    shutil.copy(jpeg_pyramid, sparse)
    where, fmt = tile_byte_counts_at(sparse)
    with open(sparse, "r+b") as handle:         # level 0, tile 5: no bytes
        handle.seek(where + 5 * struct.calcsize(fmt))
        handle.write(struct.pack(fmt, 0))
    assert tiff_has_missing_tiles(sparse, 0) and tiff_has_missing_tiles(sparse, 2)
    assert read_whole_level_fast(jpeg_pyramid, "generic-tiff", meta["level_dimensions"], 2) is not None
    assert read_whole_level_fast(sparse, "generic-tiff", meta["level_dimensions"], 2) is None
    not_tiff = tmp_path / "x.tiff"
    not_tiff.write_bytes(b"not a tiff at all")
    assert tiff_has_missing_tiles(not_tiff, 0)   # unparseable: the safe answer


def tile_byte_counts_at(path) -> tuple[int, str]:
    """File offset and struct format of page 0's TileByteCounts array (a classic TIFF, as
    pyvips writes small pyramids), found by walking the first directory."""
    import struct

    data = path.read_bytes()
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    assert struct.unpack(order + "H", data[2:4])[0] == 42
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (n,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    for i in range(n):
        tag, kind, count, value = struct.unpack(order + "HHII", data[ifd + 2 + 12 * i:ifd + 14 + 12 * i])
        if tag == 325:
            assert count * {3: 2, 4: 4}[kind] > 4
            return value, order + {3: "H", 4: "I"}[kind]
    raise AssertionError("no TileByteCounts")


@pytest.mark.parametrize("colours,bigtiff", [("ycbcr", False), ("rgb", False), ("ycbcr", True)])
def test_jpeg_tiles_are_decoded_from_the_page_with_openslides_pixels(tmp_path, colours, bigtiff):
    """The tissue step decodes a level's JPEG tiles itself (histoflow.tiff): for YCbCr tiles
    (libvips' and most scanners' default) and for RGB tiles (Aperio's, whose streams look like
    YCbCr to libjpeg unless told), in classic TIFF and BigTIFF, every level equals OpenSlide's
    read, and the direct path is the one that ran."""
    from histoflow.tiff import read_jpeg_page, read_tiff_pages

    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, (260, 330, 3), dtype=np.uint8)
    img = pyvips.Image.new_from_array(base, interpretation="srgb").resize(7, kernel="linear")
    path = tmp_path / f"{colours}.tiff"
    img.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=80, tile_width=256, tile_height=256,
                 xres=2000.0, yres=2000.0, rgbjpeg=colours == "rgb", bigtiff=bigtiff)
    assert path.read_bytes()[2] == (43 if bigtiff else 42)
    meta = slide_meta(tmp_path, path)
    for level in range(meta["level_count"]):
        page = read_tiff_pages(path, level)[-1]
        assert page.value(262) == (2 if colours == "rgb" else 6)          # photometric as asked
        direct = read_jpeg_page(path, page)
        assert direct is not None
        assert np.array_equal(direct, openslide_level(path, level))
        rgb, _ = read_whole_level_fast(path, "generic-tiff", meta["level_dimensions"], level)
        assert np.array_equal(rgb, direct)


def test_pages_that_are_not_plain_jpeg_tiles_go_through_libvips(tmp_path):
    """LZW or Deflate tiles, and files that are not TIFF at all, are not decoded by histoflow:
    read_jpeg_page declines and the level still equals OpenSlide's."""
    from histoflow.tiff import read_jpeg_page, read_tiff_pages

    rng = np.random.default_rng(6)
    img = pyvips.Image.new_from_array(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8), interpretation="srgb")
    for compression in ("lzw", "deflate"):
        path = tmp_path / f"{compression}.tiff"
        img.tiffsave(str(path), tile=True, pyramid=True, compression=compression, tile_width=128, tile_height=128,
                     xres=2000.0, yres=2000.0)
        meta = slide_meta(tmp_path, path)
        assert read_jpeg_page(path, read_tiff_pages(path, 0)[-1]) is None
        rgb, _ = read_whole_level_fast(path, "generic-tiff", meta["level_dimensions"], 0)
        assert np.array_equal(rgb, openslide_level(path, 0))
    junk = tmp_path / "junk.tiff"
    junk.write_bytes(b"II*\x00" + b"\xff" * 20)
    assert read_tiff_pages(junk, 0) is None and read_tiff_pages(tmp_path / "none.tiff", 0) is None


def test_a_jpeg_stream_is_read_in_the_colour_space_the_tiff_says_or_not_at_all():
    """libjpeg guesses a stream's colour space from its markers; histoflow adds an Adobe marker
    when the guess differs from the TIFF's photometric tag, and declines when a JFIF or Adobe
    marker contradicts it (libtiff would override what the decoder guesses)."""
    import cv2

    from histoflow.tiff import libjpeg_colour_space, stream_in_colour_space

    pixels = np.random.default_rng(7).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    jfif = cv2.imencode(".jpg", pixels)[1].tobytes()           # OpenCV writes JFIF: YCbCr
    assert libjpeg_colour_space(jfif) == "ycbcr"
    assert stream_in_colour_space(jfif, "ycbcr") == jfif
    assert stream_in_colour_space(jfif, "rgb") is None
    bare = jfif[:2] + jfif[2 + 2 + int.from_bytes(jfif[4:6], "big"):]   # the JFIF segment dropped
    assert bare[2:4] != b"\xff\xe0" and libjpeg_colour_space(bare) == "ycbcr"      # ids 1, 2, 3
    as_rgb = stream_in_colour_space(bare, "rgb")
    assert libjpeg_colour_space(as_rgb) == "rgb"
    # decoded without conversion: the raw components, as libtiff reads an RGB-photometric tile
    raw = cv2.imdecode(np.frombuffer(as_rgb, np.uint8), cv2.IMREAD_COLOR_RGB)
    converted = cv2.imdecode(np.frombuffer(bare, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert not np.array_equal(raw, converted)
    assert stream_in_colour_space(as_rgb, "ycbcr") is None     # its Adobe marker says RGB
    assert libjpeg_colour_space(b"not a jpeg") is None and stream_in_colour_space(b"\xff\xd8", "rgb") is None
