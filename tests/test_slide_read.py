"""Reading slides through histoflow.wsi: the tifffile backend (JPEG tiles decoded from the TIFF
pages) must give OpenSlide's pixels exactly, for whole levels and for any region, and must step
aside for every slide it cannot read the same way; only histoflow/wsi imports the readers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from histoflow.io import read_json, write_json
from histoflow.slide_qc import write_slide_metadata
from histoflow.wsi import OpenSlideReader, TiffJpegReader, open_slide

pyvips = pytest.importorskip("pyvips")

REPO = Path(__file__).resolve().parents[1]


def openslide_level(path, level) -> np.ndarray:
    with OpenSlideReader(path) as slide:
        rgba = slide.read_rgba(0, 0, level, *slide.level_dimensions[level])
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


def assert_regions_match_openslide(path, level: int, rng, n: int = 12, size: int = 224) -> None:
    """Unaligned regions (a 224-px tile on 256/240-px stored tiles), some overhanging the
    level's edge, equal OpenSlide's read, unscanned areas included."""
    fast, ref = open_slide(path), OpenSlideReader(path)
    assert isinstance(fast, TiffJpegReader) and level in fast.pages
    w, h = fast.level_dimensions[level]
    ds = fast.level_downsamples[level]
    for _ in range(n):
        lx, ly = int(rng.integers(-size // 2, w)), int(rng.integers(-size // 2, h))
        x, y = int(lx * ds), int(ly * ds)
        got, seen = fast.read_region(x, y, level, size, size, with_scanned=True)
        want, want_seen = ref.read_region(x, y, level, size, size, with_scanned=True)
        assert np.array_equal(got, want) and np.array_equal(np.asarray(seen), want_seen), (lx, ly)
    # wholly past the right or bottom edge: background, nothing scanned
    for lx, ly in ((w + 10, 0), (0, h + 10), (w + 10, h + 10)):
        x, y = int(lx * ds), int(ly * ds)
        got, seen = fast.read_region(x, y, level, 20, 20, with_scanned=True)
        want, want_seen = ref.read_region(x, y, level, 20, 20, with_scanned=True)
        assert np.array_equal(got, want) and np.array_equal(np.asarray(seen), want_seen), (lx, ly)
    fast.close()
    ref.close()


def test_every_level_of_a_generic_tiff_reads_exactly_as_openslide(tmp_path, jpeg_pyramid):
    meta = slide_meta(tmp_path, jpeg_pyramid)
    assert meta["vendor"] == "generic-tiff" and meta["level_count"] >= 3
    reader = open_slide(jpeg_pyramid, record=meta)
    assert isinstance(reader, TiffJpegReader) and sorted(reader.pages) == list(range(meta["level_count"]))
    rng = np.random.default_rng(0)
    for level in range(meta["level_count"]):
        rgb, scanned = reader.read_level(level)
        assert np.array_equal(rgb, openslide_level(jpeg_pyramid, level)) and scanned.all()
        assert_regions_match_openslide(jpeg_pyramid, level, rng, n=4)
    assert reader._slide is None          # YCbCr pages: OpenSlide never opened, the tiles served it all


def assert_aperio_reads_as_openslide(tmp_path, path):
    meta = slide_meta(tmp_path, path)
    assert meta["vendor"] == "aperio"
    reader = open_slide(path, record=meta)
    rgb, _ = reader.read_level(0)
    assert np.array_equal(rgb, openslide_level(path, 0))
    assert reader._checked.get(0) in (None, True)          # an RGB page passed its one probe
    assert_regions_match_openslide(path, 0, np.random.default_rng(1))


def test_aperio_svs_fixture_reads_exactly_as_openslide(tmp_path, openslide_fixtures):
    assert_aperio_reads_as_openslide(tmp_path, openslide_fixtures / "small.svs")


def test_real_aperio_svs_reads_exactly_as_openslide(tmp_path, shared_data):
    """A real scan: RGB JPEG tiles of 240 px (component ids that libjpeg would read as YCbCr),
    with thumbnail, label and macro pages beside the level."""
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert_aperio_reads_as_openslide(tmp_path, path)
    reader = open_slide(path)
    assert reader.pages[0].tile_w == 240 and reader._level_ok(0)      # the fast path engages on 240-px tiles


def test_formats_it_cannot_read_the_same_way_are_left_to_openslide(tmp_path, shared_data):
    ndpi = shared_data / "slides" / "fluorescence-DAPI.ndpi"
    meta = slide_meta(tmp_path, ndpi)
    assert meta["vendor"] == "hamamatsu"
    assert type(open_slide(ndpi, record=meta)) is OpenSlideReader
    # a colour fix is OpenSlide's pixels converted: never the tiles
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert type(open_slide(svs, colour_fix="ycbcr_to_rgb")) is OpenSlideReader


def test_tissue_outputs_do_not_depend_on_which_reader_ran(tmp_path, jpeg_pyramid, monkeypatch):
    """The mask, polygons and stats from the tiles equal those read through OpenSlide."""
    from histoflow import tissue, wsi

    meta = slide_meta(tmp_path, jpeg_pyramid)
    outputs = {}
    for name in ("fast", "openslide"):
        if name == "openslide":
            monkeypatch.setattr(tissue, "open_slide", lambda *a, **k: wsi.open_slide(*a, backend="openslide", **k))
        paths = [tmp_path / f"{name}.{ext}" for ext in ("png", "geojson", "jpg", "json")]
        tissue.detect_tissue_for_slide(tmp_path / "s.json", *paths, {"mask_mpp": 4.0}, "fail")
        stats = json.loads(paths[3].read_text())
        assert stats["mask_level"] == 3 and stats["mask_factor"] == 1   # a whole level, read either way
        outputs[name] = (paths[0].read_bytes(), paths[1].read_bytes(), stats)
    assert outputs["fast"] == outputs["openslide"]
    assert meta["level_dimensions"][3] == [stats["mask_width"], stats["mask_height"]]


def test_a_sparse_page_is_left_to_openslide(tmp_path, jpeg_pyramid):
    """A tile stored with no bytes is unscanned for OpenSlide (transparent; an Aperio level draws
    it from the finer level); the tiles' backend would decode nothing there, so that page is read
    by OpenSlide. The other pages hold every tile and are decoded from their tiles with
    OpenSlide's pixels (each page's own tiles are all OpenSlide reads for its level)."""
    import shutil
    import struct

    sparse = tmp_path / "sparse.tiff"
    shutil.copy(jpeg_pyramid, sparse)
    where, fmt = tile_byte_counts_at(sparse)
    with open(sparse, "r+b") as handle:         # level 0, tile 5: no bytes
        handle.seek(where + 5 * struct.calcsize(fmt))
        handle.write(struct.pack(fmt, 0))
    assert 0 in open_slide(jpeg_pyramid).pages
    reader = open_slide(sparse)
    assert 0 not in reader.pages and not reader._level_ok(0)
    rgb, scanned = reader.read_level(0)
    assert not scanned.all()                    # the missing tile, as OpenSlide shows it
    for level in range(1, reader.level_count):
        assert level in reader.pages and reader._level_ok(level)
        assert np.array_equal(reader.read_level(level)[0], openslide_level(sparse, level))


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
    """YCbCr tiles (libvips' and most scanners' default) and RGB tiles (Aperio's, whose streams
    look like YCbCr to libjpeg unless told), in classic TIFF and BigTIFF: every level and
    unaligned regions equal OpenSlide's read, and the tiles' path is the one that ran."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, (260, 330, 3), dtype=np.uint8)
    img = pyvips.Image.new_from_array(base, interpretation="srgb").resize(7, kernel="linear")
    path = tmp_path / f"{colours}.tiff"
    img.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=80, tile_width=256, tile_height=256,
                 xres=2000.0, yres=2000.0, rgbjpeg=colours == "rgb", bigtiff=bigtiff)
    assert path.read_bytes()[2] == (43 if bigtiff else 42)
    meta = slide_meta(tmp_path, path)
    reader = open_slide(path, record=meta)
    for level in range(meta["level_count"]):
        assert reader.pages[level].photometric == (2 if colours == "rgb" else 6)     # photometric as asked
        assert reader._level_ok(level)
        rgb, _ = reader.read_level(level)
        assert np.array_equal(rgb, openslide_level(path, level))
        assert_regions_match_openslide(path, level, rng, n=3)


def test_pages_that_are_not_plain_jpeg_tiles_are_read_by_openslide(tmp_path):
    """LZW or Deflate tiles, and files that are not TIFF at all, have no tile index; the level
    still equals OpenSlide's."""
    rng = np.random.default_rng(6)
    img = pyvips.Image.new_from_array(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8), interpretation="srgb")
    for compression in ("lzw", "deflate"):
        path = tmp_path / f"{compression}.tiff"
        img.tiffsave(str(path), tile=True, pyramid=True, compression=compression, tile_width=128, tile_height=128,
                     xres=2000.0, yres=2000.0)
        slide_meta(tmp_path, path)
        reader = open_slide(path)
        assert reader.pages == {}
        assert np.array_equal(reader.read_level(0)[0], openslide_level(path, 0))
    from histoflow.wsi.tiff_jpeg import index_jpeg_pages

    junk = tmp_path / "junk.tiff"
    junk.write_bytes(b"II*\x00" + b"\xff" * 20)
    assert index_jpeg_pages(str(junk), [(10, 10)]) == {} and index_jpeg_pages(str(tmp_path / "none.tiff"), []) == {}


def test_forked_workers_inherit_the_index_instead_of_parsing_again(tmp_path, jpeg_pyramid, monkeypatch):
    """The features dataset makes its reader (tifffile index, level probes) in the parent; a
    worker's reset (what _worker_init does after the fork) keeps them, and reads go on."""
    import pandas as pd

    from histoflow import features as F
    from histoflow.wsi import tiff_jpeg

    meta = slide_meta(tmp_path, jpeg_pyramid)
    tiles = pd.DataFrame({"x": [0, 512], "y": [0, 256], "read_level": [1, 1], "read_w": [224, 224],
                          "read_h": [224, 224], "tile_px": [224, 224]})
    dataset = F.TileDataset(str(jpeg_pyramid), "s", tiles, 224, record=meta)
    assert 1 in dataset.reader.pages and dataset.reader._level_ok(1)

    def no_parsing(*a, **k):
        raise AssertionError("the TIFF was parsed again in a worker")

    monkeypatch.setattr(tiff_jpeg, "index_jpeg_pages", no_parsing)
    dataset.reader.reset()
    images = [dataset[i] for i in range(len(dataset))]
    assert all(ok for _, _, ok in images)
    with OpenSlideReader(jpeg_pyramid) as ref:
        want = ref.read_region(512, 256, 1, 224, 224)
    assert np.array_equal(images[1][0].numpy().transpose(1, 2, 0), want)


def test_openslide_and_tifffile_are_imported_only_in_histoflow_wsi():
    """One reading package: no other module of histoflow imports a slide library."""
    pattern = re.compile(r"^\s*(import|from)\s+(openslide|tifffile)\b", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "histoflow").rglob("*.py")
                 if "wsi" not in p.relative_to(REPO / "histoflow").parts and pattern.search(p.read_text())]
    assert offenders == []


def test_a_level_read_parses_only_its_own_page(tmp_path, jpeg_pyramid):
    """Reading one level (the tissue step's mask level) parses that page alone: tifffile turns a
    page's tile offsets into Python tuples, and level 0 of a large slide has 10^5 tiles."""
    from histoflow.wsi.tiff_jpeg import JpegPages

    meta = slide_meta(tmp_path, jpeg_pyramid)
    reader = open_slide(jpeg_pyramid, record=meta)
    assert isinstance(reader.pages, JpegPages) and reader.pages._pages == {}
    level = meta["level_count"] - 2
    rgb, _ = reader.read_level(level)
    assert list(reader.pages._pages) == [level] and reader._slide is None
    assert np.array_equal(rgb, openslide_level(jpeg_pyramid, level))
