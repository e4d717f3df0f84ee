"""Tissue masks from pixels: thresholds (brightfield saturation and grey, fluorescence
intensity), pen-ink removal and cleaning (median, closing, small objects and holes), on a
low-resolution view of the slide; pure array functions, no files. The tissue step that reads
the slide and writes the outputs is :mod:`histoflow.tissue`.

Sizes (closing radius, smallest object, smallest hole) are in µm / µm² and converted with the
µm/px of the mask, so the same config behaves the same on 20x and 40x scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from .config import defaults_from_schema
from .errors import InputError

METHODS = ("auto", "brightfield", "fluorescence")


@dataclass(frozen=True)
@defaults_from_schema("tissue")
class TissueSettings:
    """Config section ``tissue`` (defaults = the schema's)."""

    method: str
    mask_mpp: float
    white_threshold: float
    median_um: float  # median window (µm): the nearest odd px count at the mask's µm/px
    median_px: int | None  # the window in mask px instead (overrides median_um)
    closing_um: float
    min_object_um2: float
    min_hole_um2: float
    remove_pen: bool
    min_saturation: float  # Otsu on saturation is clipped to [min, max] (0-1): blank glass stays
    max_saturation: float  # empty, and pale tissue (eosin, fat, faint edges: ~0.1) is kept when Otsu lands high
    pen_dilate_um: float  # ink edges bleed; grow the pen mask by this much

    @classmethod
    def from_config(cls, section: dict | None) -> "TissueSettings":
        section = dict(section or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(section) - known)
        if unknown:
            raise InputError(f"config key 'tissue.{unknown[0]}' is not a tissue setting (known: {', '.join(sorted(known))})")
        settings = cls(**section)
        if settings.method not in METHODS:
            raise InputError(f"config key 'tissue.method': {settings.method!r} is not one of {', '.join(METHODS)}")
        if not 0 <= settings.min_saturation <= settings.max_saturation <= 1:
            raise InputError("config keys 'tissue.min_saturation' <= 'tissue.max_saturation' must lie in 0-1 "
                             f"(got {settings.min_saturation}, {settings.max_saturation})")
        if settings.mask_mpp <= 0:
            raise InputError("config key 'tissue.mask_mpp' must be > 0 µm/px (8-16 is typical)")
        return settings

    def median_size(self, mpp: float) -> int:
        """The median window in px of a mask at ``mpp`` µm/px: ``median_px`` when set, else the
        odd size nearest ``median_um`` (40 µm: 3 px at 16 µm/px, 5 px at 8), so the filter keeps
        its physical size whatever ``mask_mpp`` is."""
        if self.median_px is not None:
            return int(self.median_px)
        if self.median_um <= 0 or mpp <= 0:
            return 1
        return max(1, 2 * int(round((self.median_um / mpp - 1) / 2)) + 1)


@dataclass
class TissueResult:
    mask: np.ndarray                 # bool, tissue after cleaning and pen removal
    pen: np.ndarray                  # bool, ink pixels removed from the mask
    method: str                      # brightfield | fluorescence
    method_detected: bool            # True when `auto` chose the method
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def pen_fraction(self) -> float:
        """Ink pixels as a fraction of (tissue + ink) pixels: how much of the section pen covered."""
        ink = np.count_nonzero(self.pen)
        denom = np.count_nonzero(self.mask) + ink
        return ink / denom if denom else 0.0


# ---------------------------------------------------------------- pure array functions
# Whole-image operations run in OpenCV: uint8 in, uint8 out, SIMD and threaded, no float copies
# of the image. A 2 Mpx thumbnail costs about 1 ms per operation (HSV, median, morphology) and
# a few ms per labelling, where numpy/scipy/libvips took 5-20 ms each.

HUE_SCALE = 256.0 / 360.0        # OpenCV's full-range HSV: hue 0-255 for 0-360° (256 steps per turn)


def _u8(mask: np.ndarray) -> np.ndarray:
    """A bool (or 0/1) mask as a contiguous uint8 0/1 image for OpenCV, without a copy when possible."""
    mask = np.ascontiguousarray(mask)
    return mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value as contiguous uint8 planes (OpenCV's full-range RGB -> HSV): hue
    0-255 for 0-360° (x :data:`HUE_SCALE`), saturation (max - min) / max and value max, both
    0-255. Contiguous because OpenCV's lookups, histograms and comparisons want them so;
    converted in strips of rows, so the interleaved HSV image never exists whole (3 bytes/px
    less memory to fault in)."""
    rgb = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., :3])
    h, w = rgb.shape[:2]
    planes = [np.empty((h, w), np.uint8) for _ in range(3)]
    if rgb.size == 0:
        return planes[0], planes[1], planes[2]
    rows = max(1, (1 << 18) // w)                    # ~256k px per strip
    for top in range(0, h, rows):
        part = cv2.cvtColor(rgb[top:top + rows], cv2.COLOR_RGB2HSV_FULL)
        cv2.split(part, [p[top:top + rows] for p in planes])
    return planes[0], planes[1], planes[2]


def grey(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) as float32 0-255."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def detect_method(rgb: np.ndarray, scanned: np.ndarray | None = None) -> tuple[str, dict[str, float]]:
    """``fluorescence`` when the thumbnail is dark (border median and overall median grey both
    low: glass is black under fluorescence, white under brightfield), else ``brightfield``."""
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    valid = None if scanned is None or np.all(scanned) else np.asarray(scanned, bool)
    if h * w == 0 or (valid is not None and not valid.any()):
        return "brightfield", {"border_median": float("nan"), "overall_median": float("nan")}
    # medians of a 1-in-4 subsample: a decision between black and white glass needs no more
    step = 4 if h * w > 1 << 20 else 1
    g = cv2.cvtColor(np.ascontiguousarray(rgb[::step, ::step, :3], np.uint8), cv2.COLOR_RGB2GRAY)  # 8-bit luma
    sub = None if valid is None else valid[::step, ::step]
    sh, sw = g.shape
    bh, bw = max(1, sh // 20), max(1, sw // 20)
    border = np.zeros(g.shape, bool)
    border[:bh], border[-bh:], border[:, :bw], border[:, -bw:] = True, True, True, True
    if sub is not None:
        border &= sub
        if not sub.any():       # scanned, but not where the subsample looks: its first pixel
            sub = np.zeros_like(sub)
            sub[0, 0] = valid[0, 0]
    # exact medians from 256-bin histograms (no gather, no sort)
    overall_median = _histogram_median(plane_histogram(g, sub))
    border_median = _histogram_median(plane_histogram(g, border)) if border.any() else overall_median
    method = "fluorescence" if border_median < 80 and overall_median < 100 else "brightfield"
    return method, {"border_median": border_median, "overall_median": overall_median}


def _histogram_median(hist: np.ndarray) -> float:
    """``np.median`` of the sample whose 256-bin value histogram is ``hist`` (the mean of the
    two middle values for an even count); NaN for an empty sample."""
    n = int(hist.sum())
    if n == 0:
        return float("nan")
    below = np.cumsum(hist)
    low, high = np.searchsorted(below, [(n - 1) // 2, n // 2], side="right")
    return (float(low) + float(high)) / 2


def otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D sample; the midpoint when the sample is constant. Integer samples
    use one bin per value (exact for uint8 planes), others 256 bins over their range (as
    skimage's ``threshold_otsu``, without importing skimage)."""
    values = np.asarray(values).ravel()
    if values.size == 0:
        return 0.0
    lo, hi = values.min(), values.max()
    if float(hi) - float(lo) < 1e-6:
        return float(hi)
    if np.issubdtype(values.dtype, np.integer) and int(hi) - int(lo) < 65536:
        hist = np.bincount((values - lo).astype(np.intp), minlength=int(hi) - int(lo) + 1)
        return otsu_of_histogram(hist, np.arange(int(lo), int(hi) + 1, dtype=np.float64))
    hist, edges = np.histogram(values, bins=256, range=(float(lo), float(hi)))
    return otsu_of_histogram(hist, (edges[:-1] + edges[1:]) / 2)


def otsu_of_histogram(hist: np.ndarray, centers: np.ndarray) -> float:
    """Otsu threshold from a histogram (counts per bin, bin centres): the centre maximising the
    between-class variance; the only occupied centre when one bin holds everything."""
    hist = np.asarray(hist, np.float64)
    occupied = np.flatnonzero(hist)
    if len(occupied) == 0:
        return 0.0
    if len(occupied) == 1:
        return float(centers[occupied[0]])
    # trim empty bins at both ends: the same threshold as over the sample's own range
    hist, centers = hist[occupied[0]:occupied[-1] + 1], np.asarray(centers, np.float64)[occupied[0]:occupied[-1] + 1]
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.cumsum(hist * centers) / w1
        m2 = (np.cumsum((hist * centers)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.nanargmax(between))])


def plane_histogram(plane: np.ndarray, sample: np.ndarray | None = None) -> np.ndarray:
    """256-bin histogram of a uint8 plane over the pixels where ``sample`` is True (all when
    None); the sample is OpenCV's mask, so nothing is gathered."""
    plane = np.ascontiguousarray(plane, np.uint8)
    if plane.size == 0:
        return np.zeros(256, np.int64)
    if plane.size >= 1 << 24:     # OpenCV counts in float32: exact below 2^24 pixels
        values = plane if sample is None else plane[np.asarray(sample, bool)]
        return np.bincount(values.ravel(), minlength=256).astype(np.int64)
    mask = None if sample is None else _u8(np.asarray(sample, bool))
    hist = cv2.calcHist([plane], [0], mask, [256], [0, 256])
    return hist.reshape(-1).astype(np.int64)


def majority(mask: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a binary mask (``size`` x ``size``, edges replicated): True where more
    than half the window is. Median filtering commutes with thresholding, so
    ``majority(x > t) == median(x) > t``. ``mask`` may be ``(h, w)`` or ``(h, w, k)``: k masks
    filtered at once."""
    mask = np.asarray(mask, bool)
    if size <= 1 or mask.size == 0:
        return mask
    size = 2 * (size // 2) + 1
    if mask.ndim == 3:
        return np.stack([majority(mask[..., k], size) for k in range(mask.shape[2])], axis=-1)
    # OpenCV's median replicates the edges; on uint8 it takes any odd window
    return cv2.medianBlur(_u8(mask), size).view(bool)


def _median(channel: np.ndarray, size: int) -> np.ndarray:
    """Grey-level median (edges replicated), uint8 in and out."""
    channel = np.ascontiguousarray(channel, np.uint8)
    if size <= 1 or channel.size == 0:
        return channel
    return cv2.medianBlur(channel, 2 * (size // 2) + 1)


def brightfield_foreground(rgb: np.ndarray, settings: TissueSettings, scanned: np.ndarray | None = None,
                           exclude: np.ndarray | None = None,
                           planes: tuple[np.ndarray, np.ndarray] | None = None
                           ) -> tuple[np.ndarray, dict[str, float]]:
    """Saturation above Otsu (clipped to [``min_saturation``, ``max_saturation``]) and grey below
    ``white_threshold``, each after a median (:meth:`TissueSettings.median_size`; called by
    :func:`compute_tissue_mask`, which sets ``median_px`` for the mask's µm/px). ``exclude`` (e.g. ink) is left out
    of the Otsu sample: saturated pen would pull the threshold above real tissue. ``planes``: the
    image's saturation and dark mask (:func:`saturation_dark_and_ink`), when the caller already
    has them (pen removal does)."""
    s, dark = planes if planes is not None else saturation_dark_and_ink(rgb, settings.white_threshold, False)[:2]
    valid = None if scanned is None or np.all(scanned) else np.asarray(scanned, bool)
    sample = valid
    if exclude is not None and exclude.any():
        kept = ~exclude if valid is None else valid & ~exclude
        sample = kept if kept.any() else valid
    hist = plane_histogram(s, sample)
    t = otsu_of_histogram(hist, np.arange(256, dtype=np.float64)) if hist.any() else 255.0
    t = min(max(t, settings.min_saturation * 255), settings.max_saturation * 255)
    size = settings.median_size(settings.mask_mpp)   # compute_tissue_mask sets median_px for its mask
    mask = majority(s > t, size)
    mask &= majority(dark, size)
    if valid is not None:
        mask &= valid
    return mask, {"saturation_threshold": t / 255.0, "white_threshold": float(settings.white_threshold)}


def fluorescence_foreground(rgb: np.ndarray, settings: TissueSettings, scanned: np.ndarray | None = None
                            ) -> tuple[np.ndarray, dict[str, float]]:
    """Intensity (brightest channel, so any fluorophore counts) above its Otsu threshold, computed
    on log intensity: fluorescence spans decades, and linear Otsu keeps only the brightest nuclei."""
    rgb = np.asarray(rgb, np.uint8)
    intensity = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    intensity = _median(intensity, settings.median_size(settings.mask_mpp))
    valid = np.ones(intensity.shape, bool) if scanned is None else np.asarray(scanned, bool)
    if valid.any():
        # log1p of uint8 takes 256 values: Otsu on a per-value histogram, no float image
        counts = np.bincount(intensity[valid].ravel(), minlength=256)
        t = float(np.expm1(otsu(np.repeat(np.log1p(np.arange(256, dtype=np.float32)), counts))))
        background = float(np.percentile(intensity[valid], 5))
    else:
        t, background = 255.0, 0.0
    # a blank dark slide: Otsu splits noise; require signal clearly above the background level
    t = max(t, background + 8.0)
    return (intensity > t) & valid, {"intensity_threshold": t, "background_level": background}


def _deg(degrees: float) -> float:
    return degrees * HUE_SCALE


# Ink rules on OpenCV's 8-bit HSV (x >= a <=> x >= ceil(a); x > a <=> x >= floor(a) + 1).
# Every rule needs saturation > 0.2. Hue bands: green 90-195° (above 180° only when saturation
# > 0.4), blue 195-230° (saturation > 0.3, value > 0.6), red within 15° of 0° (saturation
# > 0.8, value > 0.3); green also needs value > 0.15.
_HUE_BANDS = (0, math.ceil(_deg(90)), math.ceil(_deg(180)), math.ceil(_deg(195)), math.ceil(_deg(230)),
              math.ceil(_deg(345)))                    # hue class: 0 none, 1 green, 2 teal, 3 blue, 4 red
_SAT_CUTS = (math.floor(0.2 * 255) + 1, math.floor(0.3 * 255) + 1, math.floor(0.4 * 255) + 1,
             math.floor(0.8 * 255) + 1)                # saturation class 0-4: above 0.2, 0.3, 0.4, 0.8
_VAL_CUTS = (math.floor(0.15 * 255) + 1, math.floor(0.3 * 255) + 1, math.floor(0.6 * 255) + 1)  # value 0-3


def _ink_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-plane lookup tables (hue, saturation, value -> uint8 bit set of the ink rules that
    plane allows; bits: green, teal, blue, red): a pixel is ink when the three sets share a bit."""
    x = np.arange(256)
    green, teal, blue, red = 1, 2, 4, 8
    hue = (np.where((x >= _HUE_BANDS[1]) & (x < _HUE_BANDS[2]), green, 0)
           | np.where((x >= _HUE_BANDS[2]) & (x < _HUE_BANDS[3]), teal, 0)
           | np.where((x >= _HUE_BANDS[3]) & (x < _HUE_BANDS[4]), blue, 0)
           | np.where((x >= _HUE_BANDS[5]) | (x <= math.floor(_deg(15))), red, 0))
    sat = (np.where(x >= _SAT_CUTS[0], green, 0) | np.where(x >= _SAT_CUTS[2], teal, 0)
           | np.where(x >= _SAT_CUTS[1], blue, 0) | np.where(x >= _SAT_CUTS[3], red, 0))
    val = (np.where(x >= _VAL_CUTS[0], green | teal, 0) | np.where(x >= _VAL_CUTS[2], blue, 0)
           | np.where(x >= _VAL_CUTS[1], red, 0))
    return hue.astype(np.uint8), sat.astype(np.uint8), val.astype(np.uint8)


_INK_HUE, _INK_SAT, _INK_VAL = _ink_tables()
_ANY_BIT = np.minimum(np.arange(256), 1).astype(np.uint8)       # 0 -> 0, else 1


def pen_mask(rgb: np.ndarray, planes: tuple | None = None) -> np.ndarray:
    """Marker ink by colour (H&E is purple to pink, hue 240-360°): green/teal (hue 90-195°), blue
    (hue 195-230° and bright: dense haematoxylin has that hue too but is dark) and red (within 15°
    of pure red and saturation > 0.8: eosin is pinker and paler, red cells less saturated).
    Black ink is not detected: at thumbnail scale it looks like dense haematoxylin.
    ``planes``: the image's :func:`hsv` when already computed. A table lookup per plane and
    two ANDs (OpenCV), whatever the number of rules."""
    h, s, v = (np.ascontiguousarray(p, np.uint8) for p in (planes if planes is not None else hsv(rgb)))
    if h.size == 0:
        return np.zeros(h.shape, bool)
    rules = cv2.LUT(h, _INK_HUE)
    cv2.bitwise_and(rules, cv2.LUT(s, _INK_SAT), dst=rules)
    cv2.bitwise_and(rules, cv2.LUT(v, _INK_VAL), dst=rules)
    return cv2.LUT(rules, _ANY_BIT).view(bool)


def saturation_dark_and_ink(rgb: np.ndarray, white_threshold: float, with_ink: bool = True
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What brightfield detection needs, in one pass over strips of rows: the saturation plane
    of :func:`hsv`, the "darker than glass" mask (8-bit luma, ITU-R 601 rounded, below
    ``white_threshold``) and :func:`pen_mask` (None without ``with_ink``). Why: hue, value and
    luma are needed only on the way, so they exist strip by strip (~256k px, cache-sized,
    reused) instead of as whole planes; each fresh page of memory costs a fault."""
    rgb = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., :3])
    h, w = rgb.shape[:2]
    s = np.empty((h, w), np.uint8)
    dark = np.empty((h, w), np.uint8)
    ink = np.empty((h, w), np.uint8) if with_ink else None
    if rgb.size:
        rows = max(1, (1 << 18) // w)
        hsv_rows, hue, val = np.empty((rows, w, 3), np.uint8), np.empty((rows, w), np.uint8), np.empty((rows, w), np.uint8)
        cut = math.ceil(white_threshold) - 1            # luma < ceil(t) <=> luma <= ceil(t) - 1
        for top in range(0, h, rows):
            n = min(rows, h - top)
            part, sat, below = rgb[top:top + n], s[top:top + n], dark[top:top + n]
            cv2.cvtColor(part, cv2.COLOR_RGB2HSV_FULL, dst=hsv_rows[:n])
            cv2.split(hsv_rows[:n], [hue[:n], sat, val[:n]])
            cv2.cvtColor(part, cv2.COLOR_RGB2GRAY, dst=below)
            cv2.threshold(below, cut, 255, cv2.THRESH_BINARY_INV, dst=below)   # 0/255
            if ink is not None:                                              # pen_mask's lookups
                rules, scratch = ink[top:top + n], val[:n]
                cv2.LUT(hue[:n], _INK_HUE, dst=rules)
                cv2.LUT(scratch, _INK_VAL, dst=scratch)
                cv2.bitwise_and(rules, scratch, dst=rules)
                cv2.LUT(sat, _INK_SAT, dst=scratch)
                cv2.bitwise_and(rules, scratch, dst=rules)
                cv2.LUT(rules, _ANY_BIT, dst=rules)
    return s, np.greater(dark, 0, out=dark.view(bool)), None if ink is None else ink.view(bool)


def um2_to_px(area_um2: float, mpp: float) -> int:
    return int(math.ceil(area_um2 / (mpp * mpp)))


def disk(radius: int) -> np.ndarray:
    """Disk structuring element (x² + y² <= r², as skimage's ``disk``), uint8 0/1."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (xx * xx + yy * yy <= radius * radius).astype(np.uint8)


def _disk_filter(mask: np.ndarray, radius: int, op: str, outside: bool) -> np.ndarray:
    """Dilation (``op="dilate"``) or erosion (``"erode"``) of a bool mask by :func:`disk`
    (``radius``), pixels outside the image being ``outside``."""
    apply = cv2.dilate if op == "dilate" else cv2.erode
    out = apply(_u8(mask), disk(radius), borderType=cv2.BORDER_CONSTANT, borderValue=int(outside))
    return out.view(bool)


def _morph(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Binary dilation/erosion/closing by a disk (outside the image = background; a closing pads
    first, so it never erodes regions at the image border)."""
    mask = np.asarray(mask, bool)
    if radius < 1 or mask.size == 0:
        return mask
    if op in ("dilate", "erode"):
        return _disk_filter(mask, radius, op, False)
    if op != "close":
        raise ValueError(f"unknown morphology {op!r}")
    r = radius
    grown = _disk_filter(np.pad(mask, r), r, "dilate", False)
    # the erosion of the centre only reads pixels of `grown`, so its outside value never matters
    return _disk_filter(grown, r, "erode", True)[r:-r, r:-r]


def _small_regions(mask: np.ndarray, min_px: int, open_sides: tuple[bool, bool, bool, bool] = (False,) * 4
                   ) -> np.ndarray | None:
    """Pixels of the 4-connected True regions of ``mask`` smaller than ``min_px`` pixels, or
    None when there are none (the caller then skips the gather). ``open_sides`` (top, bottom,
    left, right): sides where ``mask`` is a window of a larger image whose True region goes on
    beyond the side; regions touching such a side are never small."""
    n, labels, areas = _labels_and_areas(_u8(mask))
    small = areas < min_px
    small[0] = False                    # label 0 is the other value, not a region
    for side, edge in zip(open_sides, (labels[0], labels[-1], labels[:, 0], labels[:, -1])):
        if side:
            small[edge] = False
    found = np.flatnonzero(small)
    if found.size == 0:
        return None
    if found.size > 4:                  # several: one gather over the whole image
        return small[labels]
    # one to four: a comparison per region (a pass each) beats the gather. numpy, not
    # cv2.compare: OpenCV reads a 1 x 1 image against a scalar as array-op-array and fails
    out = labels == found[0]
    for i in found[1:]:
        out |= labels == i
    return out


def _labels_and_areas(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """4-connected labels of a uint8 0/1 mask and each label's pixel count. Labels are 16-bit
    when they fit (half the memory to write) and counted with a histogram: OpenCV's
    ``connectedComponentsWithStats`` also computes bounding boxes and centroids, 3x slower."""
    try:
        n, labels = cv2.connectedComponents(mask, connectivity=4, ltype=cv2.CV_16U)
    except cv2.error:                   # more than 65,535 regions
        n, labels = cv2.connectedComponents(mask, connectivity=4, ltype=cv2.CV_32S)
        return n, labels, np.bincount(labels.ravel(), minlength=n)
    if labels.size >= 1 << 24:          # calcHist counts in float32: exact below 2^24 pixels
        return n, labels, np.bincount(labels.ravel(), minlength=n)
    areas = cv2.calcHist([labels], [0], None, [n], [0, n]).reshape(-1)
    return n, labels, areas.astype(np.int64)


def _tissue_window(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The bounding box of the True pixels grown by ``margin`` px (within the image), or None
    when it is the whole image or there is no True pixel."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    y0, y1 = max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + 1 + margin)
    x0, x1 = max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + 1 + margin)
    if (y1 - y0) * (x1 - x0) == h * w:
        return None
    return slice(y0, y1), slice(x0, x1)


def clean_mask(mask: np.ndarray, mpp: float, closing_um: float, min_object_um2: float,
               min_hole_um2: float) -> np.ndarray:
    """Close gaps (disk of ``closing_um`` diameter), drop objects and fill holes smaller than the
    given areas (µm², converted with ``mpp`` µm/px). Objects and holes are 4-connected; holes are
    looked for after the specks are gone (a dropped speck merges with the background around it)."""
    mask = np.asarray(mask, bool)
    radius = int(round(closing_um / mpp / 2))
    min_obj, min_hole = um2_to_px(min_object_um2, mpp), um2_to_px(min_hole_um2, mpp)
    if mask.size == 0:
        return mask
    # Work on the tissue's bounding box (+ the closing radius and 1 px of glass): closing stays
    # inside it, and so do specks and holes, except background that reaches the box's inner
    # sides; that joins the glass outside the box, at least min(h, w) px, so it is no hole.
    window = _tissue_window(mask, radius + 1) if min(mask.shape) >= min_hole else None
    if window is None:
        return _clean(mask, radius, min_obj, min_hole, (False,) * 4)
    rows, cols = window
    h, w = mask.shape
    open_sides = (rows.start > 0, rows.stop < h, cols.start > 0, cols.stop < w)
    out = np.zeros_like(mask)
    out[window] = _clean(mask[window], radius, min_obj, min_hole, open_sides)
    return out


def _clean(mask: np.ndarray, radius: int, min_obj: int, min_hole: int,
           open_sides: tuple[bool, bool, bool, bool]) -> np.ndarray:
    if radius >= 1:
        # padded with background so closing does not erode regions at the image border
        mask = _morph(mask, radius, "close")
    if min_obj > 1:
        specks = _small_regions(mask, min_obj)
        if specks is not None:
            mask = mask & ~specks
    if min_hole > 1:
        holes = _small_regions(~mask, min_hole, open_sides)
        if holes is not None:
            mask = mask | holes
    return mask


@dataclass
class Foreground:
    """A thumbnail thresholded, before cleaning: all that :func:`clean_foreground` needs, so the
    pixels can be let go of once it exists."""
    raw: np.ndarray                  # bool, tissue-like pixels with the ink taken out
    pen: np.ndarray                  # bool, what the ink took away
    method: str
    method_detected: bool
    thresholds: dict[str, float]


def thumbnail_foreground(rgb: np.ndarray, mpp: float, settings: TissueSettings,
                         scanned: np.ndarray | None = None) -> Foreground:
    """The first half of :func:`compute_tissue_mask`: method, thresholds and ink."""
    rgb = np.asarray(rgb, dtype=np.uint8)[..., :3]
    # the foreground functions take the median window in px of this mask
    settings = replace(settings, median_px=settings.median_size(mpp))
    detected = settings.method == "auto"
    info: dict[str, float] = {}
    if detected:
        method, info = detect_method(rgb, scanned)
    else:
        method = settings.method
    if method == "fluorescence":
        raw, thr = fluorescence_foreground(rgb, settings, scanned)
        pen = np.zeros(raw.shape, bool)  # ink colours mean nothing under fluorescence
    else:
        # one pass: what pen removal and the foreground share
        s, dark, core = saturation_dark_and_ink(rgb, settings.white_threshold, settings.remove_pen)
        raw, thr = brightfield_foreground(rgb, settings, scanned, exclude=core, planes=(s, dark))
        del s, dark
        pen = np.zeros(raw.shape, bool)
        if core is not None:
            ink = core
            r = int(round(settings.pen_dilate_um / mpp))
            if r >= 1 and core.any():
                ink = _morph(core, r, "dilate")
            # report as pen what the ink took away: the ink itself and the tissue-like halo around it
            pen = ink & (raw | core)
            raw = raw & ~ink
    return Foreground(raw, pen, method, detected, {**info, **thr, "median_px": settings.median_px})


def clean_foreground(foreground: Foreground, mpp: float, settings: TissueSettings) -> TissueResult:
    """The second half of :func:`compute_tissue_mask`: closing, specks, holes, ink kept out."""
    mask = clean_mask(foreground.raw, mpp, settings.closing_um, settings.min_object_um2, settings.min_hole_um2)
    pen = foreground.pen
    if pen.any():
        mask &= ~pen  # hole filling must not give the ink back
        mask = clean_mask(mask, mpp, 0.0, settings.min_object_um2, 0.0)
    return TissueResult(mask=mask, pen=pen, method=foreground.method, method_detected=foreground.method_detected,
                        thresholds=foreground.thresholds)


def compute_tissue_mask(rgb: np.ndarray, mpp: float, settings: TissueSettings,
                        scanned: np.ndarray | None = None) -> TissueResult:
    """Tissue mask of an RGB thumbnail at ``mpp`` µm/px (pure: arrays in, arrays out)."""
    return clean_foreground(thumbnail_foreground(rgb, mpp, settings, scanned), mpp, settings)
