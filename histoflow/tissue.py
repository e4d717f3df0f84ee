"""The tissue step: a low-resolution view of the slide (never a whole level-0 read) -> mask PNG,
QuPath GeoJSON, overlay JPEG and stats JSON. The mask itself is :mod:`histoflow.tissue_mask`.

Brightfield (H&E, IHC): tissue is coloured and darker than the glass, so a pixel is tissue when
its HSV saturation is above an Otsu threshold AND its grey level is below ``white_threshold``.
Fluorescence (DAPI, ...): the background is dark and signal bright, so Otsu runs on intensity and
tissue is the bright side. ``method: auto`` decides from the brightness of the thumbnail (its
border and overall median) and the stats JSON records which method ran and whether it was
detected, so a wrong guess is visible rather than silent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import HistoflowError, SlideError
from .io import atomic_path, read_json, write_json
from .tissue_mask import (METHODS, Foreground, TissueResult, TissueSettings, _u8, clean_foreground,  # noqa: F401
                          compute_tissue_mask, thumbnail_foreground)
from .wsi import best_level_for_mpp, nearest_level_for_mpp, open_slide

log = logging.getLogger("histoflow.tissue")

TISSUE_COLOR = (0, 160, 0)
OVERLAY_MAX_PX = 1024


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _overlay_size(h: int, w: int, max_px: int) -> tuple[tuple[int, int], float]:
    """(width, height) of the overlay of an h x w thumbnail and its scale: longer side at most
    ``max_px``, at least 512 for tiny slides."""
    scale = min(max_px / max(h, w), max(1.0, 512 / max(h, w)))
    return (max(1, int(round(w * scale))), max(1, int(round(h * scale)))), scale


def overlay_background(rgb: np.ndarray, max_px: int = OVERLAY_MAX_PX) -> np.ndarray:
    """The thumbnail resized to the overlay's size (what :func:`overlay_image` draws on). Apart
    so that it can be made while the mask is computed: it needs only the pixels."""
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.full((64, 64, 3), 255, np.uint8)
    size, scale = _overlay_size(h, w, max_px)
    rgb = np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., :3])
    # as libvips' resize: a box shrink by the integer part of the factor (no aliasing of the
    # texture; OpenCV's area filter is fast for integer factors only), then linear
    shrink = int(1 / scale) if scale < 1 else 1
    if shrink >= 2 and min(h, w) >= shrink:
        hs, ws = h // shrink, w // shrink      # whole blocks: the fast integer path
        rgb = cv2.resize(rgb[:hs * shrink, :ws * shrink], (ws, hs), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def overlay_image(rgb: np.ndarray, mask: np.ndarray, pen: np.ndarray | None = None,
                  max_px: int = OVERLAY_MAX_PX, background: np.ndarray | None = None) -> np.ndarray:
    """The thumbnail with the tissue outline in green and removed ink tinted magenta (uint8 RGB),
    resized so its longer side is at most ``max_px`` (and at least 512 for tiny slides).
    ``background``: :func:`overlay_background` of ``rgb``, when the caller made it already."""
    h, w = mask.shape
    if h == 0 or w == 0:
        return np.full((64, 64, 3), 255, np.uint8)   # nothing to draw on
    return _draw_overlay(overlay_background(rgb, max_px) if background is None else background.copy(), mask, pen)


def _draw_overlay(img: np.ndarray, mask: np.ndarray, pen: np.ndarray | None) -> np.ndarray:
    """Draw the outline of ``mask`` and the ink ``pen`` on ``img`` (an :func:`overlay_background`),
    in place; returns ``img``."""
    h, w = mask.shape
    if h == 0 or w == 0:
        return np.full((64, 64, 3), 255, np.uint8)
    size = (img.shape[1], img.shape[0])

    def nearest(plane: np.ndarray) -> np.ndarray:
        return cv2.resize(_u8(plane), size, interpolation=cv2.INTER_NEAREST_EXACT).view(bool)

    m = nearest(mask)
    if pen is not None and pen.any():
        p = nearest(pen)
        img[p] = (0.5 * img[p] + 0.5 * np.array([255, 0, 255])).astype(np.uint8)
    # tissue pixels with a background 4-neighbour (outside the image counts as background),
    # thickened by the cross on large overlays so the outline stays visible
    edge = m & ~cv2.erode(_u8(m), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    if max(img.shape[:2]) >= 400:
        edge = cv2.dilate(_u8(edge), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    img[edge] = (0, 255, 0)
    return img


# ---------------------------------------------------------------- level choice and slide I/O

@dataclass(frozen=True)
class MaskSource:
    level: int
    factor: int          # integer shrink applied to the level
    mpp: float           # µm/px of the mask
    scale: float         # level-0 px per mask px


# Vendors whose coarse levels may be point samples of level 0 (a converter's nearest-neighbour
# pyramid: bfconvert's DICOM): a mask made from such a level sees one level-0 pixel in every
# 32 x 32 at 16 µm/px and under-counts thin tissue (CMU-1-Small-Region: 11 % less tissue than
# the same SVS). Their mask is the block mean of a level at least SUBSAMPLED_FINER times finer.
SUBSAMPLED_VENDORS = ("dicom",)
SUBSAMPLED_FINER = 4


def choose_mask_source(level_downsamples, mpp0: float, mask_mpp: float, subsampled: bool = False) -> MaskSource:
    """The pyramid level nearest ``mask_mpp`` when one is within x1.5 of it; otherwise the coarsest
    finer level shrunk by an integer factor (read in bounded chunks, never as one level-0 image).
    ``subsampled`` (levels that are point samples): the coarsest level at least
    :data:`SUBSAMPLED_FINER` times finer than ``mask_mpp``, block-averaged down to it."""
    if subsampled:
        base = best_level_for_mpp(level_downsamples, mpp0, mask_mpp / SUBSAMPLED_FINER)
        factor = max(1, int(round(mask_mpp / base.mpp)))
        return MaskSource(base.level, factor, base.mpp * factor, base.downsample * factor)
    nearest = nearest_level_for_mpp(level_downsamples, mpp0, mask_mpp)
    if mask_mpp / 1.5 <= nearest.mpp <= mask_mpp * 1.5:
        return MaskSource(nearest.level, 1, nearest.mpp, nearest.downsample)
    base = best_level_for_mpp(level_downsamples, mpp0, mask_mpp)
    factor = max(1, int(round(mask_mpp / base.mpp)))
    return MaskSource(base.level, factor, base.mpp * factor, base.downsample * factor)


def read_mask_level(meta: dict, slide_id: str, settings: TissueSettings
                    ) -> tuple[np.ndarray, np.ndarray | None, MaskSource]:
    """The mask source's pixels: ``(rgb, scanned or None when all of it is scanned, source)``.
    Unscanned areas come back white; a fluorescence result blackens them later."""
    reader = open_slide(meta["path"], slide_id, meta.get("colour_fix"), record=meta)
    source = choose_mask_source(reader.level_downsamples, float(meta["mpp_x"]), settings.mask_mpp,
                                reader.vendor in SUBSAMPLED_VENDORS)
    try:
        rgb, scanned = reader.read_level(source.level, source.factor, background=255, progress=True)
    except HistoflowError:
        raise
    except Exception as err:  # decode errors mid-read
        raise SlideError(slide_id, f"{Path(meta['path']).name!r}: cannot read level {source.level} "
                                   f"for the tissue mask: {err} (corrupt tiles?); re-download it or set "
                                   "on_error: skip") from None
    finally:
        reader.close()
    # a whole stored page comes with a read-only all-True view (no memory): nothing to mask
    return rgb, (None if scanned.strides == (0, 0) else scanned), source


def _encoded(extension: str, array: np.ndarray, params: list[int]) -> bytes:
    ok, data = cv2.imencode(extension, array, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {extension} image of shape {array.shape}")
    return data.tobytes()


def _write_png(path, array: np.ndarray) -> None:
    """A mask (bool: 0/255) or grey image as an 8-bit greyscale PNG. Rows unfiltered: a 0/255
    mask compresses to a few percent anyway, and libpng's adaptive filter choice takes 3x as
    long as the whole encoding (9 vs 27 ms on a 2 Mpx mask)."""
    image = np.asarray(array)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"a mask PNG takes a 2-D uint8 or bool image, got {image.dtype} {image.shape}")
    if image.dtype == np.bool_:
        image = image.view(np.uint8) * np.uint8(255)
    data = _encoded(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER,
                                    cv2.IMWRITE_PNG_FILTER_NONE])
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def _write_jpeg(path, array: np.ndarray) -> None:
    bgr = cv2.cvtColor(np.ascontiguousarray(array, np.uint8), cv2.COLOR_RGB2BGR)
    data = _encoded(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def _write_empty(slide_id: str, mask_png, geojson_path, overlay_path, stats_json, settings: TissueSettings,
                 reason: str) -> None:
    from .geojson import polygons_to_feature_collection, write_geojson

    _write_png(mask_png, np.zeros((1, 1), np.uint8))
    write_geojson(geojson_path, polygons_to_feature_collection([], "Tissue", TISSUE_COLOR))
    placeholder = np.full((64, 64, 3), 200, np.uint8)
    placeholder[np.eye(64, dtype=bool) | np.eye(64, dtype=bool)[::-1]] = (160, 0, 0)  # a grey card crossed out
    _write_jpeg(overlay_path, placeholder)
    write_json(stats_json, {
        "slide_id": slide_id, "status": "skipped", "reason": reason, "method": None, "method_detected": False,
        "mask_level": None, "mask_width": 0, "mask_height": 0, "mask_mpp": None, "scale_x": None, "scale_y": None,
        "tissue_area_mm2": 0.0, "tissue_fraction": 0.0, "n_regions": 0, "pen_fraction": 0.0,
        "params": asdict(settings)})


def detect_tissue_for_slide(slide_json, mask_png, geojson_path, overlay_path, stats_json,
                            settings: dict | TissueSettings, on_error: str = "fail",
                            threads: int | None = None) -> dict:
    """Rule `detect_tissue`: mask PNG (255 = tissue), QuPath GeoJSON (level-0 px), overlay JPEG and
    stats JSON for one slide. A skipped slide (or, with ``on_error: skip``, one that fails here)
    gets valid empty outputs with status "skipped". ``threads``: the job's cores, which OpenCV
    is then told to use (its own pool otherwise takes every core of the node, and its workers
    spin between calls); None leaves OpenCV as it is."""
    if threads is not None:
        cv2.setNumThreads(max(1, int(threads)))
    if not isinstance(settings, TissueSettings):
        settings = TissueSettings.from_config(settings)
    meta = read_json(slide_json)
    slide_id = meta.get("slide_id") or Path(slide_json).stem
    if meta.get("status") != "ok":
        reason = meta.get("reason") or "slide skipped upstream"
        log.warning("slide %s is skipped upstream (%s): writing empty tissue outputs", slide_id, reason)
        _write_empty(slide_id, mask_png, geojson_path, overlay_path, stats_json, settings, reason)
        return {"status": "skipped"}
    try:
        rgb, scanned, source = read_mask_level(meta, slide_id, settings)
    except HistoflowError as err:
        if on_error != "skip":
            raise
        log.error("%s; skipped (on_error: skip)", err)
        _write_empty(slide_id, mask_png, geojson_path, overlay_path, stats_json, settings, str(err))
        return {"status": "skipped"}

    # the step's second thread: the overlay's background while the mask is computed, then the
    # outlines while OpenCV (which releases the GIL) encodes the images
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        background = pool.submit(overlay_background, rgb)
        foreground = thumbnail_foreground(rgb, source.mpp, settings, scanned)
        if foreground.method == "fluorescence" and scanned is not None and not scanned.all():
            rgb = rgb.copy()
            rgb[~scanned] = 0       # unscanned glass is dark under fluorescence
            background.result()
            background = pool.submit(overlay_background, rgb)
        # the pixels are done with (the overlay thread keeps them until its resize ends): the
        # cleaning's images reuse their memory instead of faulting in fresh pages
        del rgb, scanned
        result = clean_foreground(foreground, source.mpp, settings)
        del foreground
        return _write_tissue_outputs(pool, slide_id, meta, source, result, background.result(), settings,
                                     mask_png, geojson_path, overlay_path, stats_json)
    finally:
        pool.shutdown()


def _write_tissue_outputs(pool, slide_id: str, meta: dict, source: "MaskSource",
                          result: TissueResult, background: np.ndarray, settings: TissueSettings,
                          mask_png, geojson_path, overlay_path, stats_json) -> dict:
    from .geojson import mask_to_polygons, polygons_to_feature_collection, write_geojson

    mpp_x, mpp_y = float(meta["mpp_x"]), float(meta["mpp_y"])
    ds = source.scale
    scale_x = scale_y = ds  # pyramid downsamples are the same along x and y
    mask_mpp_x, mask_mpp_y = mpp_x * scale_x, mpp_y * scale_y
    n_tissue = np.count_nonzero(result.mask)     # a count, not a sum: no widening copy
    area_mm2 = n_tissue * mask_mpp_x * mask_mpp_y / 1e6

    def write_outlines() -> list:
        polys = mask_to_polygons(result.mask, scale_x, scale_y)
        props = [{"area_mm2": p.area * mpp_x * mpp_y / 1e6} for p in polys]
        write_geojson(geojson_path, polygons_to_feature_collection(polys, "Tissue", TISSUE_COLOR, "annotation", props))
        return polys

    # the outlines and the images are independent: trace one while OpenCV (which releases
    # the GIL) encodes the others, on the second core when the job has one
    outlines = pool.submit(write_outlines)
    _write_png(mask_png, result.mask)
    _write_jpeg(overlay_path, _draw_overlay(background, result.mask, result.pen))   # the step's own copy: in place
    polys = outlines.result()
    h, w = result.mask.shape
    stats = {
        "slide_id": slide_id, "status": "ok", "reason": "",
        "method": result.method, "method_detected": result.method_detected,
        "mask_level": source.level, "mask_factor": source.factor,
        "mask_width": w, "mask_height": h, "mask_mpp": mask_mpp_x, "mask_mpp_y": mask_mpp_y,
        "scale_x": scale_x, "scale_y": scale_y,
        "tissue_area_mm2": area_mm2, "tissue_fraction": n_tissue / max(result.mask.size, 1),
        "n_regions": len(polys), "pen_fraction": result.pen_fraction,
        "thresholds": result.thresholds, "params": asdict(settings),
    }
    write_json(stats_json, stats)
    log.info("slide %s: %s%s, %.2f mm² tissue in %d region(s), pen %.1f%%, mask %dx%d at %.2f µm/px (level %d /%d)",
             slide_id, result.method, " (detected)" if result.method_detected else "", area_mm2, len(polys),
             100 * result.pen_fraction, w, h, mask_mpp_x, source.level, source.factor)
    return stats
