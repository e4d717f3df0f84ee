"""Tissue detection and the shared GeoJSON helpers: what users rely on when they open the mask,
the overlay or the polygons in QuPath."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoflow.annotations import read_qupath_geojson
from histoflow.geojson import mask_to_polygons, polygons_to_feature_collection, write_geojson
from histoflow.io import write_json
from histoflow.slide_qc import write_slide_metadata
from histoflow.tissue import choose_mask_source, detect_tissue_for_slide, overlay_image
from histoflow.tissue_mask import TissueSettings, clean_mask, compute_tissue_mask, detect_method, pen_mask

RNG = np.random.default_rng(0)
SETTINGS = TissueSettings()


def ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def he_image(tissue: np.ndarray, seed: int = 0) -> np.ndarray:
    """Glass ~(238, 236, 240) with noise; tissue a pink/purple H&E mixture with texture."""
    rng = np.random.default_rng(seed)
    h, w = tissue.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = (238, 236, 240)
    mix = rng.uniform(0, 1, (h, w, 1)).astype(np.float32)
    pink, purple = np.array([225, 150, 190], np.float32), np.array([140, 90, 170], np.float32)
    img[tissue] = (mix * purple + (1 - mix) * pink)[tissue]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---------------------------------------------------------------- pure mask functions

def test_otsu_mask_recovers_tissue_on_synthetic_he():
    truth = ellipse((200, 300), 100, 150, 60, 100)
    res = compute_tissue_mask(he_image(truth), mpp=8.0, settings=SETTINGS)
    assert res.method == "brightfield" and res.method_detected
    assert iou(res.mask, truth) > 0.95
    assert not res.mask[:20].any()  # glass stays background


def test_blank_glass_gives_an_empty_mask():
    res = compute_tissue_mask(he_image(np.zeros((150, 150), bool)), mpp=8.0, settings=SETTINGS)
    assert not res.mask.any()


def test_pale_white_regions_are_background_even_if_slightly_tinted():
    img = he_image(np.zeros((100, 100), bool))
    img[30:70, 30:70] = (235, 215, 235)  # faint pink, grey > 220: mounting-medium tint, not tissue
    assert not compute_tissue_mask(img, 8.0, replace(SETTINGS, min_object_um2=0)).mask.any()


def test_pen_removal_removes_a_green_stroke():
    truth = ellipse((200, 300), 100, 150, 60, 100)
    img = he_image(truth)
    stroke = np.zeros_like(truth)
    stroke[90:100, 10:290] = True   # across glass and tissue
    img[stroke] = (40, 150, 110)     # green marker
    kept = compute_tissue_mask(img, 8.0, replace(SETTINGS, remove_pen=False))
    removed = compute_tissue_mask(img, 8.0, SETTINGS)
    assert kept.mask[stroke].mean() > 0.9           # without removal, ink counts as tissue
    assert removed.mask[stroke].mean() < 0.02       # with removal it is gone ...
    assert removed.pen[stroke].mean() > 0.95 and 0 < removed.pen_fraction < 0.3
    assert iou(removed.mask, truth & ~stroke) > 0.85  # ... and the tissue is kept


def test_ink_colours_and_he_colours():
    colours = np.array([[[40, 150, 110], [30, 60, 200], [200, 20, 25],        # green, blue, red ink
                         [225, 150, 190], [140, 90, 170], [60, 40, 110], [200, 60, 90]]], np.uint8)  # H&E, RBC
    assert pen_mask(colours)[0].tolist() == [True, True, True, False, False, False, False]


def test_ink_tables_apply_the_ink_rules_to_every_hue_saturation_value():
    """pen_mask looks the rules up in tables; for every 8-bit (hue, saturation, value) it must
    say what the rules say (thresholds as on the 0-1 scale: x > a is x >= floor(255 a) + 1)."""
    import math

    import cv2

    from histoflow.tissue_mask import HUE_SCALE, pen_mask

    h, s, v = (a.astype(np.uint8) for a in np.meshgrid(np.arange(256), np.arange(256), np.arange(0, 256, 3),
                                                       indexing="ij"))
    deg = lambda d: d * HUE_SCALE                                        # noqa: E731
    hf, sf, vf = h.astype(float), s / 255.0, v / 255.0
    green = (hf >= math.ceil(deg(90))) & (hf < math.ceil(deg(195))) & ((hf < math.ceil(deg(180))) | (sf > 0.4)) & (vf > 0.15)
    blue = (hf >= math.ceil(deg(195))) & (hf < math.ceil(deg(230))) & (sf > 0.3) & (vf > 0.6)
    red = ((hf >= math.ceil(deg(345))) | (hf <= math.floor(deg(15)))) & (sf > 0.8) & (vf > 0.3)
    want = (sf > 0.2) & (green | blue | red)
    hsv3 = np.ascontiguousarray(np.stack([h, s, v], axis=-1).reshape(256, -1, 3))  # any RGB: planes given
    got = pen_mask(cv2.cvtColor(hsv3, cv2.COLOR_HSV2RGB_FULL), planes=(h.reshape(256, -1), s.reshape(256, -1),
                                                                      v.reshape(256, -1)))
    assert np.array_equal(got, want.reshape(256, -1))


def test_small_objects_and_holes_are_removed_by_area_in_um2():
    mask = np.zeros((200, 200), bool)
    mask[20:50, 20:50] = True            # 900 px
    mask[100:190, 100:190] = True
    mask[140:150, 140:150] = False       # 100 px hole
    # at 8 µm/px: 900 px = 57,600 µm² (kept), hole 6,400 µm² (filled)
    out8 = clean_mask(mask, 8.0, 0, min_object_um2=50_000, min_hole_um2=20_000)
    assert out8[20:50, 20:50].all() and out8[140:150, 140:150].all()
    # at 7 µm/px the same 900 px is 44,100 µm² < 50,000: removed; same config, physical sizes
    out7 = clean_mask(mask, 7.0, 0, min_object_um2=50_000, min_hole_um2=2_000)
    assert not out7[20:50, 20:50].any() and not out7[140:150, 140:150].any()


def test_a_one_pixel_mask_is_cleaned():
    # a tiny slide's thumbnail at the mask resolution can be 1 x 1 px (OpenSlide's small.svs)
    speck = clean_mask(np.ones((1, 1), bool), 8.0, 0, min_object_um2=50_000, min_hole_um2=0)
    assert speck.shape == (1, 1) and not speck.any()
    kept = clean_mask(np.ones((1, 1), bool), 8.0, 0, min_object_um2=0, min_hole_um2=20_000)
    assert kept.shape == (1, 1) and kept.all()


def test_fluorescence_is_detected_and_bright_signal_is_tissue():
    truth = ellipse((200, 300), 110, 160, 60, 100)
    rng = np.random.default_rng(1)
    img = np.zeros((200, 300, 3), np.float32)
    img[..., 2] = rng.normal(5, 2, truth.shape)
    img[..., 2][truth] = rng.uniform(40, 200, truth.sum())  # DAPI: blue nuclei on black
    img = np.clip(img, 0, 255).astype(np.uint8)
    method, evidence = detect_method(img)
    assert method == "fluorescence" and evidence["border_median"] < 80
    assert detect_method(he_image(truth))[0] == "brightfield"
    res = compute_tissue_mask(img, 8.0, SETTINGS)
    assert res.method == "fluorescence" and res.method_detected
    assert iou(res.mask, truth) > 0.9
    forced = compute_tissue_mask(img, 8.0, replace(SETTINGS, method="fluorescence"))
    assert forced.method == "fluorescence" and not forced.method_detected


def test_median_window_keeps_its_size_in_um_whatever_the_mask_resolution():
    settings = TissueSettings()                       # median_um 40
    assert [settings.median_size(m) for m in (16.0, 8.0, 4.0, 32.0)] == [3, 5, 9, 1]
    assert TissueSettings(median_px=7).median_size(16.0) == 7     # px, when given, wins
    assert TissueSettings(median_um=0).median_size(16.0) == 1     # off
    rgb = he_image(np.zeros((60, 60), bool))
    assert compute_tissue_mask(rgb, 8.0, settings).thresholds["median_px"] == 5   # recorded


def test_settings_reject_unknown_keys_with_the_key_named():
    with pytest.raises(Exception, match="tissue.white_treshold"):
        TissueSettings.from_config({"white_treshold": 200})


# ---------------------------------------------------------------- level choice

def test_mask_uses_the_pyramid_level_nearest_mask_mpp():
    src = choose_mask_source([1, 4, 16, 64], mpp0=0.5, mask_mpp=8.0)
    assert (src.level, src.factor, src.mpp, src.scale) == (2, 1, 8.0, 16)


def test_without_a_near_level_the_coarsest_finer_level_is_shrunk():
    single = choose_mask_source([1], mpp0=0.25, mask_mpp=8.0)
    assert (single.level, single.factor, single.mpp) == (0, 32, 8.0)
    gap = choose_mask_source([1, 4, 128], mpp0=0.25, mask_mpp=8.0)  # 1 and 32 µm/px only
    assert (gap.level, gap.factor, gap.scale) == (1, 8, 32)


def test_chunked_shrink_equals_block_mean_of_the_whole_level(openslide_fixtures):
    from histoflow.wsi import OpenSlideReader

    slide = OpenSlideReader(openslide_fixtures / "boxes.tiff")  # 300 x 250, 4 levels
    full = slide.read_region(0, 0, 0, *slide.dimensions).astype(np.float32)
    small, scanned = slide.read_level(0, 4, chunk_px=64)  # many chunks, ragged edges
    assert small.shape == (63, 75, 3) and scanned.all()
    expect = full[:248].reshape(62, 4, 75, 4, 3).mean(axis=(1, 3))
    assert np.abs(small[:62].astype(np.float32) - expect).max() <= 1.0
    assert np.array_equal(small, slide.read_level(0, 4, chunk_px=4096)[0])


def read_polygons(path):
    """(polygon, class) pairs of a GeoJSON, read back as the annotations reader reads it."""
    return [(part, r.name) for r in read_qupath_geojson(path)
            for part in (r.geometry.geoms if r.geometry.geom_type == "MultiPolygon" else [r.geometry])]


def random_masks(n: int, seed: int = 5):
    """Masks with specks, holes, diagonal contacts and regions on the border."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(1, 90, 2)
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(0.4, 3))
        yield field > rng.uniform(-0.6, 0.6)


def test_majority_is_a_median_filter_of_the_mask_with_edges_replicated():
    from scipy import ndimage

    from histoflow.tissue_mask import majority

    for mask in random_masks(40):
        for size in (3, 5, 7, 17, 23):                                 # 23: sums beyond a byte
            expect = ndimage.median_filter(mask.view(np.uint8), size=size, mode="nearest") > 0
            assert np.array_equal(majority(mask, size), expect)
        both = majority(np.stack([mask, ~mask], axis=-1), 3)          # several masks at once
        assert np.array_equal(both[..., 1], majority(~mask, 3))


def test_closing_dilation_and_erosion_use_a_disk_with_background_outside():
    from scipy import ndimage

    from histoflow.tissue_mask import _morph, disk

    for mask in random_masks(40):
        for r in (1, 2, 4, 7):
            se = disk(r).astype(bool)
            assert np.array_equal(_morph(mask, r, "dilate"), ndimage.binary_dilation(mask, se))
            assert np.array_equal(_morph(mask, r, "erode"), ndimage.binary_erosion(mask, se, border_value=0))
            # closing pads first: regions at the image border are not eaten
            padded = np.pad(mask, 2 * r)
            closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, se), se, border_value=1)
            assert np.array_equal(_morph(mask, r, "close"), closed[2 * r:-2 * r, 2 * r:-2 * r])


def test_cleaning_inside_the_tissue_box_equals_cleaning_the_whole_mask():
    """clean_mask works on the tissue's bounding box; specks, holes and closing must be exactly
    those of the whole image, glass touching the box's sides included (it is never a hole)."""
    from histoflow.tissue_mask import _clean, clean_mask, um2_to_px

    rng = np.random.default_rng(1)
    for mask in random_masks(300, seed=5):
        if rng.random() < 0.6:                  # tissue in one corner of the glass
            mask[:rng.integers(0, mask.shape[0])] = False
            mask[:, :rng.integers(0, mask.shape[1])] = False
        mpp = float(rng.choice([4, 8, 16]))
        closing, speck, hole = rng.choice([0, 30, 50, 100]), rng.choice([0, 5e3, 5e4]), rng.choice([0, 2e3, 2e4, 8e4])
        whole = _clean(mask, int(round(closing / mpp / 2)), um2_to_px(speck, mpp), um2_to_px(hole, mpp), (False,) * 4)
        assert np.array_equal(clean_mask(mask, mpp, closing, speck, hole), whole)


def test_small_regions_are_the_4_connected_regions_below_the_size_whatever_their_number():
    """Speck and hole removal count each 4-connected region's pixels exactly, with 16-bit labels
    when they fit and 32-bit ones beyond 65,535 regions."""
    import cv2

    from histoflow.tissue_mask import _small_regions

    def reference(mask, min_px):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4,
                                                               ltype=cv2.CV_32S)
        small = stats[:, cv2.CC_STAT_AREA] < min_px
        small[0] = False
        return small[labels]

    rng = np.random.default_rng(3)
    for mask in random_masks(200, seed=8):
        min_px = int(rng.integers(1, 60))
        got = _small_regions(mask, min_px)
        want = reference(mask, min_px)
        assert (not want.any()) if got is None else np.array_equal(got, want)
    dots = np.zeros((600, 600), bool)
    dots[::2, ::2] = True                          # 90,000 one-pixel regions
    assert np.array_equal(_small_regions(dots, 2), dots)


def test_median_from_a_histogram_is_numpys_median():
    """detect_method reads its medians off 256-bin histograms: the same numbers as np.median,
    the mean of the two middle values for an even count."""
    from histoflow.tissue_mask import _histogram_median

    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 10, 11, 1000, 1001):
        values = rng.integers(0, 256, n).astype(np.uint8)
        assert _histogram_median(np.bincount(values, minlength=256)) == np.median(values)
    assert np.isnan(_histogram_median(np.zeros(256, np.int64)))


def test_otsu_of_a_histogram_equals_otsu_of_the_sample():
    from histoflow.tissue_mask import otsu, otsu_of_histogram, plane_histogram

    rng = np.random.default_rng(2)
    for _ in range(30):
        plane = np.clip(np.concatenate([rng.normal(rng.uniform(10, 60), 8, 3000),
                                        rng.normal(rng.uniform(80, 200), 20, 2000)]), 0, 255).astype(np.uint8)
        plane = plane.reshape(50, 100)
        sample = rng.random(plane.shape) > 0.1
        hist = plane_histogram(plane, sample)
        assert np.array_equal(hist, np.bincount(plane[sample], minlength=256))
        assert otsu_of_histogram(hist, np.arange(256.0)) == otsu(plane[sample])


def test_dark_is_the_rounded_grey_level_below_the_white_threshold():
    from histoflow.tissue_mask import grey, saturation_dark_and_ink

    rgb = np.random.default_rng(4).integers(150, 256, (256, 256, 3), dtype=np.uint8)
    g = grey(rgb).astype(np.float64)
    for white in (200, 220, 220.5, 240):
        _, dark, _ = saturation_dark_and_ink(rgb, white, with_ink=False)
        cut = np.ceil(white) - 0.5              # 8-bit grey < ceil(white) <=> exact grey < this
        clear = np.abs(g - cut) > 0.02          # OpenCV's fixed-point luma is within 0.01 of exact
        assert clear.mean() > 0.95
        assert np.array_equal(dark[clear], (g < cut)[clear])


# ---------------------------------------------------------------- GeoJSON helpers

def test_geojson_coordinates_are_rounded_to_two_decimals():
    import shapely

    from histoflow.geojson import polygon_to_geometry

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1e5, (50, 2))
    ring = polygon_to_geometry(shapely.Polygon(xy))["coordinates"][0]
    got = np.array(ring)
    assert np.abs(got[:-1] - xy).max() <= 0.005 + 1e-9
    assert all(len(repr(v).split(".")[1]) <= 2 for v in got.ravel().tolist())


def test_polygons_preserve_area_holes_and_level0_scale():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:30, 20:30] = False            # hole
    mask[22:28, 22:28] = True             # island in the hole
    polys = mask_to_polygons(mask, scale_x=16, scale_y=16)
    assert len(polys) == 2
    big, island = polys
    assert len(big.interiors) == 1
    # RFC 7946 orientation: outlines counter-clockwise, holes clockwise
    assert big.exterior.is_ccw and island.exterior.is_ccw and not big.interiors[0].is_ccw
    assert big.area == pytest.approx((40 * 60 - 100) * 256, rel=0.01)
    assert island.area == pytest.approx(36 * 256, rel=0.05)
    assert big.bounds == pytest.approx((160, 160, 1120, 800))  # pixel edges at level 0


def test_polygons_follow_the_marching_squares_contours_of_skimage():
    """Every outline and hole is one of skimage's ``find_contours(mask, 0.5,
    fully_connected="high")`` contours (through pixel centres, diagonal pixels joined), shifted
    half a pixel onto level-0 pixel edges, and every contour is used once."""
    import shapely
    from skimage.measure import find_contours

    for mask in random_masks(60):
        expect = [shapely.Polygon(np.column_stack([c[:, 1] - 0.5, c[:, 0] - 0.5]))
                  for c in find_contours(np.pad(mask, 1).astype(float), 0.5, fully_connected="high")]
        polys = mask_to_polygons(mask, simplify_px=0)
        rings = [shapely.Polygon(p.exterior) for p in polys] + [shapely.Polygon(i) for p in polys for i in p.interiors]
        assert len(rings) == len(expect) and all(p.is_valid for p in polys)
        for contour in expect:
            assert sum(contour.equals(ring) for ring in rings) == 1


def test_contours_from_opencv_border_following_are_the_marching_squares_rings(monkeypatch):
    """With OpenCV loaded (the tissue step) the rings come from its border following, else from
    marching squares: the same rings (as shapes, vertex for vertex up to the start), the same
    orientation (outlines counter-clockwise, holes clockwise), straight runs dropped alike."""
    import sys

    import cv2  # noqa: F401  (loaded: the OpenCV path)

    from histoflow.geojson import contour_rings

    def rings(coords, ring):
        return [np.column_stack([coords[ring == r, 1], coords[ring == r, 0]]) for r in np.unique(ring)]

    def canonical(xy):          # a ring's vertices from its smallest vertex on
        start = np.lexsort((xy[:, 1], xy[:, 0]))[0]
        return np.roll(xy, -start, axis=0).tolist()

    masks = list(random_masks(300, seed=11))
    masks += [np.ones((1, 1), bool), np.eye(5, dtype=bool), np.eye(5, dtype=bool)[::-1] | np.eye(5, dtype=bool)]
    for mask in masks:
        padded = np.pad(mask, 1)
        by_borders = rings(*contour_rings(padded))
        monkeypatch.delitem(sys.modules, "cv2")
        by_cells = rings(*contour_rings(padded))
        monkeypatch.undo()
        # rotated to a common start, not reversed: same vertices in the same direction
        assert sorted(map(canonical, by_borders)) == sorted(map(canonical, by_cells))


def test_contours_need_a_background_border_and_invalid_parts_keep_their_largest_polygon():
    import shapely

    from histoflow.geojson import _largest_polygon, contour_rings

    with pytest.raises(ValueError, match="pad"):
        contour_rings(np.ones((3, 3), bool))
    nested = shapely.GeometryCollection([shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 0, 5, 3)]),
                                         shapely.LineString([(0, 0), (9, 9)])])
    assert _largest_polygon(nested).area == 9


def test_min_area_drops_specks():
    mask = np.zeros((50, 50), bool)
    mask[5:30, 5:30] = True
    mask[40:42, 40:42] = True
    assert len(mask_to_polygons(mask, 1, 1, min_area_px=10)) == 1


def test_feature_collection_is_qupath_shaped_and_round_trips(tmp_path):
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = mask[20:35, 20:35] = True
    polys = mask_to_polygons(mask, 4, 4)
    fc = polygons_to_feature_collection(polys, ["Tumor", "Stroma"], [(200, 0, 0), (0, 0, 200)], "detection",
                                        [{"prob": 0.9, "model": "abmil"}, {"prob": 0.1, "model": "abmil"}])
    assert fc["type"] == "FeatureCollection"
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "detection" and props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props["measurements"] == {"prob": 0.9} and props["model"] == "abmil"
    path = tmp_path / "x.geojson"
    write_geojson(path, fc)
    back = read_polygons(path)
    assert [c for _, c in back] == ["Tumor", "Stroma"]
    assert [p.area for p, _ in back] == pytest.approx([p.area for p in polys], rel=1e-3)


def test_empty_mask_gives_valid_empty_collection():
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    assert polygons_to_feature_collection([]) == {"type": "FeatureCollection", "features": []}


def test_overlay_draws_green_outline_and_magenta_pen():
    truth = ellipse((100, 100), 50, 50, 30, 30)
    pen = np.zeros_like(truth)
    pen[5:10, 5:60] = True
    img = overlay_image(he_image(truth), truth, pen)
    assert max(img.shape[:2]) >= 512 and img.dtype == np.uint8
    assert ((img == (0, 255, 0)).all(-1)).sum() > 100
    assert ((img[..., 0] > 200) & (img[..., 1] < 150) & (img[..., 2] > 200)).sum() > 100


def test_overlay_drawn_on_a_background_made_beforehand_is_the_same_image():
    """The tissue step resizes the thumbnail while the mask is computed; the overlay must not
    depend on that."""
    from histoflow.tissue import overlay_background

    for shape in ((200, 200), (1250, 1562), (3000, 700)):
        truth = ellipse(shape, shape[0] // 2, shape[1] // 2, shape[0] // 3, shape[1] // 3)
        rgb, pen = he_image(truth), np.zeros_like(truth)
        pen[5:10, 5:60] = True
        background = overlay_background(rgb)
        assert np.array_equal(overlay_image(rgb, truth, pen, background=background), overlay_image(rgb, truth, pen))
        assert np.array_equal(overlay_background(rgb), background)      # drawing left it untouched


# ---------------------------------------------------------------- the rule's function on slides

def run_rule(tmp_path: Path, slide_json: Path, settings=None, on_error="fail", name="s") -> tuple[dict, dict]:
    paths = {k: tmp_path / f"{name}.{k}" for k in ("png", "geojson", "overlay.jpg", "json")}
    detect_tissue_for_slide(slide_json, paths["png"], paths["geojson"], paths["overlay.jpg"], paths["json"],
                            settings or {}, on_error)
    return json.loads(paths["json"].read_text()), paths


def slide_json(tmp_path: Path, slide_id: str, path: Path, sheet_mpp=None) -> Path:
    manifest = tmp_path / f"{slide_id}.manifest.json"
    write_json(manifest, {"slide_id": slide_id, "status": "ok", "path": str(path)})
    out = tmp_path / f"{slide_id}.slide.json"
    write_slide_metadata(slide_id, manifest, out, sheet_mpp, None, "skip")
    return out


def test_skipped_slide_gives_valid_empty_outputs(tmp_path):
    sj = tmp_path / "gone.json"
    write_json(sj, {"slide_id": "gone", "status": "skipped", "reason": "download failed"})
    stats, paths = run_rule(tmp_path, sj)
    assert stats["status"] == "skipped" and stats["tissue_area_mm2"] == 0 and stats["reason"] == "download failed"
    assert np.asarray(Image.open(paths["png"])).max() == 0
    assert json.loads(paths["geojson"].read_text()) == {"type": "FeatureCollection", "features": []}
    assert Image.open(paths["overlay.jpg"]).size[0] > 0


def test_corrupt_slide_at_tissue_stage_fails_or_skips(tmp_path, openslide_fixtures):
    sj = tmp_path / "bad.json"
    write_json(sj, {"slide_id": "bad", "status": "ok", "path": str(openslide_fixtures / "unreadable.svs"),
                    "mpp_x": 0.5, "mpp_y": 0.5})
    with pytest.raises(Exception, match="'bad'"):
        run_rule(tmp_path, sj)
    stats, _ = run_rule(tmp_path, sj, on_error="skip")
    assert stats["status"] == "skipped" and "unreadable.svs" in stats["reason"]


def test_cmu_slide_outputs_agree_and_are_deterministic(tmp_path, shared_data):
    sj = slide_json(tmp_path, "cmu", shared_data / "slides" / "CMU-1-Small-Region.svs")
    stats, paths = run_rule(tmp_path, sj, name="a")
    mask = np.asarray(Image.open(paths["png"]))
    assert stats["method"] == "brightfield" and mask.shape == (stats["mask_height"], stats["mask_width"])
    # the default mask_mpp (16) on a one-level slide: level 0 shrunk by an integer factor
    assert stats["mask_mpp"] == pytest.approx(16.0, rel=0.05) and 0.2 < stats["tissue_fraction"] < 0.6
    polys = read_polygons(paths["geojson"])
    assert polys and all(c == "Tissue" for _, c in polys)
    minx = min(p.bounds[0] for p, _ in polys)
    maxx = max(p.bounds[2] for p, _ in polys)
    assert 0 <= minx and maxx <= 2220 + stats["scale_x"]  # level-0 px, inside the slide
    area_mm2 = sum(p.area for p, _ in polys) * 0.499 ** 2 / 1e6
    assert area_mm2 == pytest.approx(stats["tissue_area_mm2"], rel=0.05)
    _, again = run_rule(tmp_path, sj, name="b")
    for key in ("png", "geojson"):
        assert paths[key].read_bytes() == again[key].read_bytes()


def test_fluorescence_dapi_ndpi_is_detected_with_a_sensible_mask(tmp_path, shared_data):
    sj = slide_json(tmp_path, "dapi", shared_data / "slides" / "fluorescence-DAPI.ndpi")
    stats, _ = run_rule(tmp_path, sj)
    assert stats["method"] == "fluorescence" and stats["method_detected"] is True
    assert stats["mask_level"] > 0                     # a pyramid level, not level 0
    assert 0.15 < stats["tissue_fraction"] < 0.85      # neither everything nor nothing


INK = {
    "green": lambda a: (a[..., 1] > a[..., 0] + 40) & (a[..., 1] > a[..., 2] - 10),
    "red": lambda a: (a[..., 0] > 150) & (a[..., 1] < 50) & (a[..., 2] < 60),
    "blue": lambda a: (a[..., 2] > a[..., 0] + 60) & (a[..., 2] > 150),
}


@pytest.mark.parametrize("name,ink", [("tcga-green-pen.png", "green"), ("tcga-red-pen.png", "red"),
                                      ("wsi-blue-pen.png", "blue"), ("diagnostic-slide-thumb-rgb.png", "green"),
                                      ("diagnostic-slide-thumb-rgb.png", "red")])
def test_pen_marked_thumbnails_lose_their_ink(shared_data, name, ink):
    rgb = np.asarray(Image.open(shared_data / "thumbnails" / name).convert("RGB"))
    inked = INK[ink](rgb.astype(np.int16))  # int: uint8 sums would wrap
    assert inked.mean() > 0.005
    res = compute_tissue_mask(rgb, 8.0, replace(SETTINGS, min_object_um2=0))
    assert res.mask[inked].mean() < 0.05
    assert res.mask.mean() > 0.2 and res.pen_fraction > 0


def test_thumbnail_without_pen_keeps_its_tissue(shared_data):
    rgb = np.asarray(Image.open(shared_data / "thumbnails" / "tcga-lung-rgb.png").convert("RGB"))
    res = compute_tissue_mask(rgb, 8.0, SETTINGS)
    assert res.pen_fraction < 0.02 and res.mask.mean() > 0.6


# ---------------------------------------------------------------- demo cohort ground truth

@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    demo = pytest.importorskip("histoflow.demo", reason="histoflow.demo (demo cohort generator) not available yet")
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo_cohort(out, n_slides=4, seed=7, small=True, progress=False)
    return out


@pytest.mark.parametrize("settings", [{}, {"mask_mpp": 8.0}], ids=["defaults-16um", "8um"])
def test_tissue_iou_against_demo_ground_truth(tmp_path, demo_cohort, settings):
    """IoU >= 0.9 with the defaults (mask at 16 µm/px, compared on the truth's 8 µm/px grid) and
    at the truth's own resolution."""
    for tiff in sorted((demo_cohort / "slides").glob("*.tiff")):
        sid = tiff.stem
        stats, paths = run_rule(tmp_path, slide_json(tmp_path, sid, tiff), settings, name=sid)
        mask = np.asarray(Image.open(paths["png"])) > 0
        truth = np.asarray(Image.open(demo_cohort / "truth" / f"{sid}.tissue.png")) > 0
        # the truth is at downsample 16 of the demo's 0.5 µm/px (8 µm/px): bring the mask to it
        factor = int(round(stats["mask_mpp"] / 8.0))
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
        # the pyramid rounds the last column differently
        assert abs(mask.shape[0] - truth.shape[0]) <= factor and abs(mask.shape[1] - truth.shape[1]) <= factor
        h, w = min(mask.shape[0], truth.shape[0]), min(mask.shape[1], truth.shape[1])
        assert iou(mask[:h, :w], truth[:h, :w]) >= 0.9, sid


def test_mask_png_reads_back_as_the_mask_in_every_common_reader(tmp_path):
    """tissue/{slide_id}.png (OpenCV, unfiltered rows): PIL, OpenCV, libvips and the tiling
    step's reader must all read back exactly 0/255 where the mask is False/True, any size."""
    import cv2
    import pyvips

    from histoflow.io import read_grey_png
    from histoflow.tissue import _write_png

    rng = np.random.default_rng(8)
    for h, w in ((1, 1), (1, 700), (333, 1), (517, 389)):
        mask = rng.random((h, w)) < 0.3
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for k, (image, want) in enumerate(((mask, mask.astype(np.uint8) * 255), (grey, grey),
                                           (mask[:, ::-1], mask[:, ::-1] * np.uint8(255)))):
            path = tmp_path / f"m{h}x{w}_{k}.png"        # a new name each time: libvips caches by name
            _write_png(path, image)
            with Image.open(path) as img:
                assert img.mode == "L" and np.array_equal(np.array(img), want)
            assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), want)
            assert np.array_equal(pyvips.Image.new_from_file(str(path)).numpy().reshape(h, w), want)
            assert np.array_equal(read_grey_png(path), want)
    with pytest.raises(ValueError, match="2-D uint8 or bool"):
        _write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))


def test_mask_png_reader_takes_any_png_and_rejects_damaged_ones(tmp_path):
    """The tiling step reads the mask with read_grey_png: palette, 1-bit and RGB PNGs give the
    same pixels; a truncated or corrupted file raises OSError (the step turns it into a clear
    error)."""
    from histoflow.io import read_grey_png
    from histoflow.tissue import _write_png

    rng = np.random.default_rng(9)
    mask = rng.random((301, 457)) < 0.4
    want = mask.astype(np.uint8) * 255
    ours = tmp_path / "ours.png"
    _write_png(ours, mask)
    for k, image in enumerate((Image.fromarray(want), Image.fromarray(mask), Image.fromarray(want).convert("RGB"),
                               Image.fromarray(want).convert("P"))):
        other = tmp_path / f"other{k}.png"
        image.save(other, optimize=True)
        assert np.array_equal(read_grey_png(other), want)
    data = ours.read_bytes()
    damaged = {"truncated": data[:len(data) // 2],
               "flipped": data[:60] + bytes([data[60] ^ 0xFF]) + data[61:]}
    for name, bad in damaged.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(bad)
        with pytest.raises(OSError):
            read_grey_png(path)


def test_saturation_dark_and_ink_in_one_pass_equal_the_separate_functions():
    """compute_tissue_mask takes saturation, the dark mask and the ink from one strip-by-strip
    pass: they must equal hsv()'s saturation, 8-bit luma below ceil(white_threshold) and
    pen_mask, whatever the image's size (strips that do not divide the height, one-row strips
    of a very wide image, a single pixel, an empty image) and the threshold."""
    import cv2

    from histoflow.tissue_mask import hsv, saturation_dark_and_ink

    rng = np.random.default_rng(12)
    for h, w in ((1, 1), (37, 53), (700, 389), (3, 300_000), (0, 5)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[: h // 2, : w // 2] = (40, 200, 60)                  # a green marker stroke
        luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).reshape(h, w) if h * w else np.zeros((h, w), np.uint8)
        hue, sat, val = hsv(rgb)
        for white in (220, 200.5, 0, 300):
            s, d, ink = saturation_dark_and_ink(rgb, white)
            assert np.array_equal(s, sat)
            assert np.array_equal(d, luma < np.ceil(white)) and d.dtype == bool
            assert np.array_equal(ink, pen_mask(rgb, (hue, sat, val))) and ink.dtype == bool
            assert saturation_dark_and_ink(rgb, white, with_ink=False)[2] is None

def test_the_tissue_rule_gives_opencv_the_jobs_cores_only(tmp_path):
    """A `threads: 1` job on a cluster has one core: the tissue step tells OpenCV so (its pool
    would otherwise start a worker per core of the node); called without ``threads`` (a user's
    script) it leaves OpenCV as it was."""
    import cv2

    sj = tmp_path / "gone.json"
    write_json(sj, {"slide_id": "gone", "status": "skipped", "reason": "download failed"})
    outputs = [tmp_path / f"gone.{ext}" for ext in ("png", "geojson", "overlay.jpg", "json")]
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        detect_tissue_for_slide(sj, *outputs, {}, "fail")
        assert cv2.getNumThreads() == 2
        detect_tissue_for_slide(sj, *outputs, {}, "fail", threads=1)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
