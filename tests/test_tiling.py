"""Tiling: grid geometry, level choice, tissue filter, seeded caps (never informed by annotations),
empty outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoflow.errors import SlideError
from histoflow.tiles_table import TILE_COLUMNS, read_tiles_table
from histoflow.tiling import (TilingSettings, export_tile_images, grid_coordinates, grid_spec, grid_tissue_fractions,
                              sample_indices, tile_slide, tissue_fractions)
from histoflow.wsi import open_slide

DOWNSAMPLES = [1.0, 4.0, 16.0]


def write_inputs(tmp: Path, mask: np.ndarray, width: int, height: int, mpp: float = 0.25, status: str = "ok",
                 slide_id: str = "s1", path: str | None = None, downsamples=DOWNSAMPLES):
    """slides/{id}.json + tissue/{id}.png/.json as the upstream stages write them."""
    slide_json = tmp / f"{slide_id}.slide.json"
    slide_json.write_text(json.dumps({
        "slide_id": slide_id, "status": status, "reason": "corrupt file" if status != "ok" else None,
        "path": path, "width": width, "height": height, "level_count": len(downsamples),
        "level_dimensions": [[int(width / d), int(height / d)] for d in downsamples],
        "level_downsamples": downsamples, "mpp_x": mpp if status == "ok" else None,
        "mpp_y": mpp if status == "ok" else None}))
    mask_png = tmp / f"{slide_id}.png"
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(mask_png)
    tissue_json = tmp / f"{slide_id}.tissue.json"
    tissue_json.write_text(json.dumps({
        "slide_id": slide_id, "status": status, "mask_level": 2, "mask_width": mask.shape[1],
        "mask_height": mask.shape[0], "scale_x": width / mask.shape[1], "scale_y": height / mask.shape[0]}))
    return slide_json, mask_png, tissue_json


def run_tiling(tmp, mask, width, height, settings, seed=0, name="tiles.parquet", **kw):
    slide_json, mask_png, tissue_json = write_inputs(tmp, mask, width, height, **kw)
    out = tmp / name
    tile_slide(slide_json, mask_png, tissue_json, out, settings, seed=seed)
    return out, read_tiles_table(out)


# ---------------------------------------------------------------------------------------- geometry

def test_grid_has_stride_tile_minus_overlap_and_stays_inside_the_slide():
    spec = grid_spec(10_000, 6_000, 0.25, 0.25, DOWNSAMPLES, 0.5, 256, overlap_px=64)
    assert spec.size0_x == 512 and spec.stride0_x == (256 - 64) * 2 == 384
    x, y, col, row = grid_coordinates(spec)
    assert (x == col * 384).all() and (y == row * 384).all()
    assert x.max() + spec.size0_x <= 10_000 < x.max() + 384 + spec.size0_x  # last column that fits
    assert y.max() + spec.size0_y <= 6_000 < y.max() + 384 + spec.size0_y
    assert len(x) == spec.n_cols * spec.n_rows == len(set(zip(x.tolist(), y.tolist())))


@pytest.mark.parametrize("target,level,size0,read", [(0.25, 0, 256, 256), (0.5, 0, 512, 512), (1.0, 1, 1024, 256),
                                                     (2.0, 1, 2048, 512), (4.0, 2, 4096, 256), (8.0, 2, 8192, 512)])
def test_level_is_the_coarsest_not_coarser_than_target_and_read_size_matches(target, level, size0, read):
    spec = grid_spec(50_000, 40_000, 0.25, 0.25, DOWNSAMPLES, target, 256)
    assert (spec.level, spec.size0_x, spec.read_w, spec.read_h) == (level, size0, read, read)
    # never upsampled: the level read has at least as many px as the tile
    assert spec.read_w >= spec.tile_px


def test_target_finer_than_level0_is_refused_with_one_line_naming_slide_and_fix():
    with pytest.raises(SlideError) as err:
        grid_spec(10_000, 10_000, 0.5, 0.5, [1.0], 0.25, 256, slide_id="TCGA-01")
    msg = str(err.value)
    assert "\n" not in msg and "TCGA-01" in msg and "upsampling is refused" in msg and "tiling.mpp >= 0.5" in msg


def test_scanner_calibration_scatter_is_tolerated():
    spec = grid_spec(10_000, 10_000, 0.2527, 0.2527, [1.0, 4.0], 0.25, 256)
    assert spec.level == 0 and spec.size0_x == 253


# ---------------------------------------------------------------------------------------- tissue fraction

def integral_image(mask: np.ndarray) -> np.ndarray:
    """The dense summed-area table with a zero first row/column (the reference)."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = (np.asarray(mask) > 0).cumsum(0).cumsum(1)
    return table


def box_fractions(table, x0, y0, x1, y1) -> np.ndarray:
    """Reference: fraction of each box (mask px, fractional) covered, by bilinear interpolation
    of the dense table; outside the mask is background."""
    h, w = table.shape[0] - 1, table.shape[1] - 1

    def at(u, v):
        u, v = np.clip(np.asarray(u, float), 0, w), np.clip(np.asarray(v, float), 0, h)
        j0, i0 = np.minimum(np.floor(u).astype(int), max(w - 1, 0)), np.minimum(np.floor(v).astype(int), max(h - 1, 0))
        a, b = u - j0, v - i0
        s00 = table[i0, j0].astype(float)
        s01, s10, s11 = table[i0, j0 + 1], table[i0 + 1, j0], table[i0 + 1, j0 + 1]
        return s00 + a * (s01 - s00) + b * (s10 - s00) + a * b * (s11 - s10 - s01 + s00)

    x0, y0, x1, y1 = (np.asarray(v, float) for v in (x0, y0, x1, y1))
    inside = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    return np.clip(inside / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)


def test_tissue_fraction_equals_brute_force_area_at_non_integer_scale():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    table = integral_image(mask)
    # boxes with fractional mask coordinates: compare with a 10x supersampled brute force
    fine = np.kron(mask, np.ones((10, 10), bool))
    x0 = np.array([0.0, 3.3, 10.7, 40.2, 50.0]); y0 = np.array([0.0, 1.5, 20.1, 30.0, 35.0])
    x1 = x0 + 2.6; y1 = y0 + 1.9
    got = box_fractions(table, x0, y0, x1, y1)
    want = [fine[int(round(a * 10)):int(round(c * 10)), int(round(b * 10)):int(round(d * 10))].sum()
            / ((round(c * 10) - round(a * 10)) * (round(d * 10) - round(b * 10)))
            if round(c * 10) <= 370 and round(d * 10) <= 530 else None
            for a, b, c, d in zip(y0, x0, y1, x1)]
    for g, w in zip(got, want):
        if w is not None:
            assert g == pytest.approx(w, abs=1e-9)
    # beyond the mask counts as background: a box half outside is at most half tissue
    assert box_fractions(integral_image(np.ones((4, 4))), [2.0], [0.0], [6.0], [4.0])[0] == pytest.approx(0.5)


def test_tile_tissue_fraction_matches_the_dense_summed_area_table_at_any_scale():
    rng = np.random.default_rng(1)
    mask = rng.random((41, 67)) > 0.5
    table = integral_image(mask)
    for scale, size0, stride in ((16.0, 64, 48), (12.3, 100, 77), (40.0, 512, 512), (7.0, 7, 7)):
        spec_w, spec_h = int(67 * scale) + 300, int(41 * scale) + 300  # grid runs past the mask
        xs, ys = np.meshgrid(np.arange(0, spec_w - size0, stride), np.arange(0, spec_h - size0, stride))
        x, y = xs.ravel(), ys.ravel()
        got = tissue_fractions(mask, scale, scale, x, y, size0, size0)
        want = box_fractions(table, x / scale, y / scale, (x + size0) / scale, (y + size0) / scale)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert got.max() <= 1.0 and got.min() >= 0.0


def test_grid_fractions_are_exactly_the_per_tile_fractions():
    """The tiling step computes a grid's fractions separably (edge rows x edge columns); the
    values must be bit for bit those of tissue_fractions, tile by tile, aligned on mask pixels
    (pyramid masks: one reshaped sum) or not (any µm/px)."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) > rng.random()
        scale = float(rng.choice([1.0, 4.0, 7.0, 8.0, 12.3, 16.0, 64.0, 3.7]))
        mpp = float(rng.choice([0.25, 0.2527, 0.5]))
        width = max(1, int(w * scale) + int(rng.integers(-20, 400)))
        height = max(1, int(h * scale) + int(rng.integers(-20, 400)))
        spec = grid_spec(width, height, mpp, mpp, [1.0], float(rng.choice([0.5, 1.0, 2.0])),
                         int(rng.choice([16, 64, 256])), int(rng.choice([0, 8])))
        x, y, _, _ = grid_coordinates(spec)
        want = tissue_fractions(mask, scale, scale, x, y, spec.size0_x, spec.size0_y)
        assert np.array_equal(grid_tissue_fractions(mask, scale, scale, spec), want)


def test_min_tissue_fraction_keeps_exactly_the_tiles_at_or_above_it(tmp_path):
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True          # left half tissue
    mask[:, 50:55] = True        # a strip: partial tiles at the boundary
    settings = {"mpp": [0.5], "tile_px": 256, "min_tissue_fraction": 0.5}
    _, tiles = run_tiling(tmp_path, mask, 10_000, 10_000, settings)
    spec = grid_spec(10_000, 10_000, 0.25, 0.25, DOWNSAMPLES, 0.5, 256)
    x, y, _, _ = grid_coordinates(spec)
    frac = tissue_fractions(mask, 100.0, 100.0, x, y, 512, 512)
    assert len(tiles) == int((frac >= 0.5).sum()) > 0
    assert (tiles["tissue_fraction"] >= 0.5).all()
    assert tiles["x"].max() == 5120  # the boundary tile (380 of 512 px on tissue) and nothing beyond
    assert tiles.loc[tiles.x == 5120, "tissue_fraction"].to_numpy() == pytest.approx(380 / 512)
    everything = run_tiling(tmp_path, mask, 10_000, 10_000, dict(settings, min_tissue_fraction=0.0), name="all.parquet")[1]
    assert len(everything) == spec.n_tiles


# ---------------------------------------------------------------------------------------- table

def test_several_resolutions_share_one_table_with_the_documented_schema(tmp_path):
    mask = np.ones((80, 100), bool)
    out, tiles = run_tiling(tmp_path, mask, 20_000, 16_000, {"mpp": [0.5, 2.0], "tile_px": 224})
    schema = pq.read_schema(out)
    assert tuple(schema.names) == TILE_COLUMNS
    types = {f.name: str(f.type) for f in schema}
    assert types["x"] == "int64" and types["read_level"] == "int16" and types["tissue_fraction"] == "float"
    assert types["target_mpp"] == "double" and types["size0"] == "int32" and types["slide_id"] == "string"
    meta = tiles.attrs["histoflow"]
    assert float(meta["mpp_x"]) == 0.25 and json.loads(meta["stride0"]) == {"0.5": 448, "2": 1792}
    by = tiles.groupby("target_mpp")
    assert set(by.groups) == {0.5, 2.0}
    assert by.get_group(0.5)["size0"].unique().tolist() == [448]
    assert by.get_group(2.0)["size0"].unique().tolist() == [1792]
    assert by.get_group(2.0)["read_level"].unique().tolist() == [1]  # 2.0 µm/px from level 1 (1.0 µm/px)
    assert by.get_group(0.5)["read_level"].unique().tolist() == [0]
    for _, g in by:  # within a resolution, sorted by y then x, and (col,row) index the grid
        assert g[["y", "x"]].equals(g[["y", "x"]].sort_values(["y", "x"]))
        assert (g["x"] == g["col"] * g["size0"]).all() and (g["y"] == g["row"] * g["size0"]).all()
    # bag tiles carry nothing from annotations (patch_labels computes lesion overlaps itself)
    assert "annotation_fraction" not in tiles.columns and "annotations" not in meta


def test_same_inputs_give_byte_identical_parquet(tmp_path):
    rng = np.random.default_rng(3)
    mask = rng.random((60, 60)) > 0.3
    settings = {"mpp": [0.5, 1.0], "max_tiles_per_slide": 40}
    a, _ = run_tiling(tmp_path, mask, 12_000, 12_000, settings, seed=7, name="a.parquet")
    b, _ = run_tiling(tmp_path, mask, 12_000, 12_000, settings, seed=7, name="b.parquet")
    assert a.read_bytes() == b.read_bytes()


def test_cap_is_a_seeded_random_sample_per_slide_and_resolution(tmp_path):
    mask = np.ones((100, 100), bool)
    settings = {"mpp": [0.5, 1.0], "max_tiles_per_slide": 25}
    full = run_tiling(tmp_path, mask, 20_000, 20_000, dict(settings, max_tiles_per_slide=None), name="f.parquet")[1]
    a = run_tiling(tmp_path, mask, 20_000, 20_000, settings, seed=1, name="a.parquet")[1]
    b = run_tiling(tmp_path, mask, 20_000, 20_000, settings, seed=1, name="b.parquet")[1]
    c = run_tiling(tmp_path, mask, 20_000, 20_000, settings, seed=2, name="c.parquet")[1]
    d = run_tiling(tmp_path, mask, 20_000, 20_000, settings, seed=1, name="d.parquet", slide_id="s2")[1]
    assert a.groupby("target_mpp").size().tolist() == [25, 25]
    assert a.equals(b)
    key = lambda t: set(zip(t["target_mpp"], t["x"], t["y"]))
    assert key(a) != key(c) and key(a) != key(d.assign(slide_id="s1"))
    assert key(a) <= key(full)
    # not just the first rows of the grid: spread over the slide
    assert a[a.target_mpp == 0.5]["y"].max() > 10_000


def test_tiling_settings_have_no_annotation_share_and_the_deprecated_key_is_ignored_with_a_warning(capsys):
    from histoflow.config import validate_config

    assert not hasattr(TilingSettings(), "annotation_share")
    cfg = validate_config({"samples": "s.tsv", "tiling": {"max_tiles_per_slide": 12, "annotation_share": 0.9}})
    assert "annotation_share" not in cfg["tiling"]
    err = capsys.readouterr().err
    assert "tiling.annotation_share" in err and "patch_classifier.lesion_share" in err


def test_skipped_slide_gives_an_empty_table_with_the_full_schema(tmp_path):
    out, tiles = run_tiling(tmp_path, np.ones((10, 10), bool), 1000, 1000, {"mpp": [0.5, 2.0]}, status="skipped")
    assert len(tiles) == 0 and tuple(pq.read_schema(out).names) == TILE_COLUMNS
    assert tiles.attrs["histoflow"]["status"] == "skipped"


def test_slide_without_tissue_gives_an_empty_table(tmp_path):
    _, tiles = run_tiling(tmp_path, np.zeros((10, 10), bool), 10_000, 10_000, {"mpp": [0.5]})
    assert len(tiles) == 0 and list(tiles.columns) == list(TILE_COLUMNS)


def test_huge_slide_is_tiled_from_its_mask_only_in_seconds(tmp_path):
    # 100,000 x 80,000 px at 0.25 µm/px, mask at 8 µm/px: no pixel of the slide is read
    yy, xx = np.mgrid[0:2500, 0:3125]
    mask = ((xx - 1500) ** 2 / 1200 ** 2 + (yy - 1250) ** 2 / 900 ** 2) < 1
    start = time.perf_counter()
    _, tiles = run_tiling(tmp_path, mask, 100_000, 80_000, {"mpp": [0.5, 2.0]})
    assert time.perf_counter() - start < 10
    area_frac = mask.mean()
    n_grid_05 = (100_000 // 512) * (80_000 // 512)
    assert (tiles.target_mpp == 0.5).sum() == pytest.approx(area_frac * n_grid_05, rel=0.05)


def test_bad_settings_are_one_line_errors_naming_the_key():
    from histoflow.errors import InputError

    with pytest.raises(InputError, match="tiling.overlap_px"):
        TilingSettings.from_config({"tile_px": 256, "overlap_px": 256})
    with pytest.raises(InputError, match="tiling.mpp"):
        TilingSettings.from_config({"mpp": [0.5, 0.5]})


def test_sample_indices_fills_the_cap_from_the_other_stratum_when_one_is_short():
    rng = np.random.default_rng(0)
    priority = np.zeros(100, bool)
    priority[:5] = True
    idx = sample_indices(100, 20, rng, priority, 0.5)
    assert len(idx) == 20 and set(range(5)) <= set(idx.tolist()) and (np.diff(idx) > 0).all()


# ---------------------------------------------------------------------------------------- pixels

@pytest.fixture()
def pyramid_tiff(tmp_path):
    """A 2048 x 1536 tiled pyramidal TIFF: left half red, right half blue, levels 1, 2, 4, ..."""
    pyvips = pytest.importorskip("pyvips")
    left = pyvips.Image.black(1024, 1536, bands=3) + [200, 30, 30]
    right = pyvips.Image.black(1024, 1536, bands=3) + [30, 30, 200]
    img = left.join(right, "horizontal").cast("uchar")
    path = tmp_path / "slide.tiff"
    img.tiffsave(str(path), tile=True, pyramid=True, compression="none", tile_width=256, tile_height=256,
                 xres=4000.0, yres=4000.0)  # 4000 px/mm = 0.25 µm/px
    return path


def test_read_tile_gives_tile_px_rgb_from_the_right_place(tmp_path, pyramid_tiff):
    slide = open_slide(pyramid_tiff)
    ds = [float(d) for d in slide.level_downsamples]
    mask = np.ones((48, 64), bool)
    _, tiles = run_tiling(tmp_path, mask, 2048, 1536, {"mpp": [0.5, 1.0], "tile_px": 128},
                          path=str(pyramid_tiff), downsamples=ds)
    for mpp in (0.5, 1.0):
        row = tiles[tiles.target_mpp == mpp].iloc[0]
        tile = slide.read_tile(row)
        assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
        assert tile[..., 0].mean() > 150 and tile[..., 2].mean() < 80  # top-left tile is red
    right = tiles[(tiles.target_mpp == 0.5) & (tiles.x >= 1024)].iloc[0]
    assert slide.read_tile(right)[..., 2].mean() > 150
    slide.close()


def test_export_writes_one_image_per_tile_named_by_coordinates(tmp_path, pyramid_tiff):
    mask = np.ones((48, 64), bool)
    out, tiles = run_tiling(tmp_path, mask, 2048, 1536, {"mpp": [1.0], "tile_px": 128, "max_tiles_per_slide": 5},
                            path=str(pyramid_tiff), downsamples=[1.0, 2.0, 4.0, 8.0])
    folder = tmp_path / "tile_images" / "s1"
    n = export_tile_images(tmp_path / "s1.slide.json", out, folder, "jpeg")
    names = sorted(p.name for p in folder.iterdir())
    assert n == 5 == len(names)
    assert names == sorted(f"s1_{x}_{y}_1.jpg" for x, y in zip(tiles.x, tiles.y))
    assert Image.open(folder / names[0]).size == (128, 128)


def test_export_for_a_skipped_slide_writes_an_empty_folder(tmp_path):
    out, _ = run_tiling(tmp_path, np.ones((4, 4), bool), 1000, 1000, {"mpp": [0.5]}, status="skipped")
    folder = tmp_path / "imgs"
    assert export_tile_images(tmp_path / "s1.slide.json", out, folder, "png") == 0 and folder.is_dir()


@pytest.mark.shared
def test_real_svs_tiles_read_back_as_tissue(tmp_path, shared_data):
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    thumb = np.asarray(Image.fromarray(slide.thumbnail(297)).convert("L"))
    mask = thumb < 210
    _, tiles = run_tiling(tmp_path, mask, 2220, 2967, {"mpp": [0.5, 1.0], "tile_px": 224},
                          mpp=0.499, path=str(path), downsamples=[1.0])
    assert len(tiles) > 10 and (tiles.read_level == 0).all()
    row = tiles[tiles.target_mpp == 1.0].sort_values("tissue_fraction").iloc[-1]
    tile = slide.read_tile(row)
    assert row.read_w == 449 and tile.shape == (224, 224, 3)
    assert tile.mean() < 215  # stained tissue, not white glass
    slide.close()


def test_preview_draws_one_panel_per_resolution_over_the_thumbnail(tmp_path):
    from histoflow.tiling import write_tile_preview

    mask = np.zeros((40, 50), bool)
    mask[10:30, 10:40] = True
    out, tiles = run_tiling(tmp_path, mask, 5000, 4000, {"mpp": [0.5, 2.0], "tile_px": 128})
    overlay = tmp_path / "overlay.jpg"
    Image.fromarray(np.full((400, 500, 3), 230, np.uint8)).save(overlay)
    preview = tmp_path / "preview.jpg"
    write_tile_preview(tmp_path / "s1.slide.json", out, overlay, preview)
    img = np.asarray(Image.open(preview))
    assert img.shape[1] == 2 * 500 + 8 and img.shape[0] == 400 + 18   # two panels side by side
    panel = img[18:, :500].astype(int)
    # outlines are drawn inside the tissue box only (grey background elsewhere)
    assert np.abs(panel[120:280, 110:390] - 230).max() > 40
    assert np.abs(panel[:80, :80] - 230).max() < 20


def test_preview_outlines_each_tile_in_its_tissue_colour():
    import pandas as pd

    from histoflow.tile_preview import tile_preview_image, viridis

    tiles = pd.DataFrame({"target_mpp": [0.5, 0.5], "x": [0, 200], "y": [0, 200], "size0": [100, 100],
                          "tissue_fraction": [1.0, 0.0]})
    img = tile_preview_image(np.full((400, 400, 3), 200, np.uint8), tiles, 400, 400)
    panel = img[18:].astype(int)
    full, empty = viridis(np.array([1.0, 0.0]))
    for y, x in ((0, 50), (99, 50), (50, 0), (50, 99)):          # the four sides of tile 1
        assert tuple(panel[y, x]) == tuple(full)
    assert tuple(panel[50, 50]) == (200, 200, 200)                # inside: the thumbnail
    assert tuple(panel[200, 250]) == tuple(empty)                 # tile 2's outline
    assert tuple(panel[250, 250]) == (200, 200, 200)              # no tint: annotations are not drawn
    assert tuple(panel[350, 350]) == (200, 200, 200)


def test_preview_draws_boxes_in_table_order_as_one_by_one_drawing_would():
    """Overlapping tiles (overlap_px > 0) share edges: the preview, drawn in one array
    assignment on a canvas laid out beforehand, must equal drawing each tile's four sides in
    table order, a later tile over an earlier one, panel by panel."""
    import pandas as pd

    from histoflow.tile_preview import preview_canvas, tile_preview_image, viridis

    rng = np.random.default_rng(7)
    n = 300
    tiles = pd.DataFrame({"target_mpp": rng.choice([0.5, 2.0], n), "x": rng.integers(-50, 990, n),
                          "y": rng.integers(-50, 790, n), "size0": rng.integers(10, 200, n),
                          "tissue_fraction": rng.random(n)})
    background = rng.integers(0, 255, (160, 200, 3)).astype(np.uint8)
    got = tile_preview_image(background, tiles, 1000, 800)
    assert np.array_equal(tile_preview_image(background, tiles, 1000, 800, canvas=preview_canvas(background, 2)), got)
    expect = preview_canvas(background, 2)
    sx, sy = 200 / 1000, 160 / 800
    for k, mpp in enumerate(dict.fromkeys(tiles.target_mpp)):
        panel = expect[18:, k * 208:k * 208 + 200]
        for t in tiles[tiles.target_mpp == mpp].itertuples():
            x0, y0 = int(t.x * sx), int(t.y * sy)
            x1, y1 = max(int((t.x + t.size0) * sx) - 1, x0), max(int((t.y + t.size0) * sy) - 1, y0)
            colour = viridis(np.array([t.tissue_fraction]))[0]
            for r, c in ([(y0, c) for c in range(x0, x1 + 1)] + [(y1, c) for c in range(x0, x1 + 1)] +
                         [(r, x0) for r in range(y0, y1 + 1)] + [(r, x1) for r in range(y0, y1 + 1)]):
                if 0 <= r < 160 and 0 <= c < 200:
                    panel[r, c] = colour
    assert np.array_equal(got[18:], expect[18:])


def test_preview_of_a_skipped_slide_is_a_blank_image(tmp_path):
    from histoflow.tiling import write_tile_preview

    out, _ = run_tiling(tmp_path, np.ones((4, 4), bool), 1000, 1000, {"mpp": [0.5]}, status="skipped")
    write_tile_preview(tmp_path / "s1.slide.json", out, tmp_path / "missing.jpg", tmp_path / "p.jpg")
    assert Image.open(tmp_path / "p.jpg").size[0] >= 256


def test_tile_slide_job_draws_its_preview_from_the_table_in_hand_without_pandas(tmp_path):
    """The tile_slide rule (table + preview) runs in every per-slide job: it must not pay for
    pandas or matplotlib (~0.3 s and ~60 MB per job), and its preview is the one drawn from
    the Parquet file read back."""
    import subprocess
    import sys

    from histoflow.tiling import write_tile_preview

    mask = np.zeros((40, 50), bool)
    mask[10:30, 10:40] = True
    slide_json, mask_png, tissue_json = write_inputs(tmp_path, mask, 5000, 4000)
    overlay = tmp_path / "overlay.jpg"
    Image.fromarray(np.full((400, 500, 3), 230, np.uint8)).save(overlay)
    code = (
        "import sys\n"
        "from histoflow.tiling import tile_slide_with_preview\n"
        f"tile_slide_with_preview({str(slide_json)!r}, {str(mask_png)!r}, {str(tissue_json)!r}, {str(overlay)!r}, "
        f"{str(tmp_path / 't.parquet')!r}, {str(tmp_path / 'job.jpg')!r}, {{'mpp': [0.5, 2.0], 'tile_px': 128}})\n"
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    write_tile_preview(slide_json, tmp_path / "t.parquet", overlay, tmp_path / "file.jpg")
    assert (tmp_path / "job.jpg").read_bytes() == (tmp_path / "file.jpg").read_bytes()


def test_numeric_columns_come_out_of_arrow_buffers_with_nulls_as_nan():
    import pyarrow as pa

    from histoflow.tiles_table import _numpy_of

    floats = pa.array([1.0, None, 3.0, 4.0], pa.float32())
    assert np.array_equal(_numpy_of(floats), [1.0, np.nan, 3.0, 4.0], equal_nan=True)
    chunked = pa.chunked_array([floats.slice(1, 2), pa.array([7, 8], pa.int64()).cast(pa.float32())])
    assert np.array_equal(_numpy_of(chunked), [np.nan, 3.0, 7.0, 8.0], equal_nan=True)
    ints = pa.chunked_array([pa.array([5, 6, 7], pa.int64()).slice(1)])
    assert _numpy_of(ints).tolist() == [6, 7] and _numpy_of(ints).dtype == np.int64
