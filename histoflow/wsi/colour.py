"""Colour space: JPEG frames stored as YCbCr in a container that says RGB (bfconvert's DICOM),
which OpenSlide passes through unconverted. Detected at slide QC (:func:`check_colour_space`),
recorded as the slide's ``colour_fix``, and applied by every read (:class:`SlideReader`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import SlideError

log = logging.getLogger("histoflow.wsi")

COLOUR_FIXES = ("ycbcr_to_rgb",)
COLOUR_SAMPLE_PX = 1024       # the colour check reads a level (or a patch) at most this size
BACKGROUND_CHROMA_MAX = 20    # max - min channel of a bright-field slide's glass: near grey
WRONG_CHROMA_MIN = 40         # glass this coloured, and grey once read as YCbCr: it is YCbCr


def ycbcr_to_rgb_array(arr: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 (full-range JPEG Y, Cb, Cr) -> uint8 RGB (PIL's, i.e. libjpeg's JFIF
    conversion)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3]), "YCbCr").convert("RGB"))


def jpeg_colour_space(data: bytes) -> str | None:
    """What a JPEG stream's markers say its 3 components are, as libjpeg decides it: "rgb"
    (Adobe APP14 transform 0, or component ids 'R','G','B'), "ycbcr" (JFIF, Adobe transform 1,
    ids 1,2,3) or None (not a 3-component JPEG, or no stream found). Why by hand: DICOM frames
    are inside the DICOM file, where no imaging library reports the markers it decided on."""
    start = data.find(b"\xff\xd8\xff")
    if start < 0:
        return None
    pos, jfif, adobe, ids = start + 2, False, None, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE0 and segment.startswith(b"JFIF"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe = segment[11]
        elif marker in (0xC0, 0xC1, 0xC2) and len(segment) >= 6:
            n = segment[5]
            ids = tuple(segment[6 + 3 * i] for i in range(n)) if len(segment) >= 6 + 3 * n else None
        elif marker == 0xDA:
            break
        pos += 2 + length
    if not ids or len(ids) != 3:
        return None
    if jfif:
        return "ycbcr"
    if adobe is not None:
        return "rgb" if adobe == 0 else "ycbcr"
    if ids == (ord("R"), ord("G"), ord("B")):
        return "rgb"
    return "ycbcr"


def _container_contradiction(path: Path, props: Mapping[str, str]) -> str | None:
    """A reason when the container's colour space contradicts its JPEG frames (a DICOM saying
    RGB whose frames are YCbCr, as bfconvert writes), else None. Reads the first frame's
    markers only (the first MB of the file)."""
    said = str(props.get("dicom.PhotometricInterpretation", "")).upper()
    if said != "RGB":
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
    except OSError:
        return None
    if jpeg_colour_space(head) == "ycbcr":
        return "its JPEG frames are YCbCr (JFIF / component ids) while its PhotometricInterpretation says RGB"
    return None


def _order_statistic(counts: np.ndarray, k: int) -> int:
    """The ``k``-th smallest value (0-based) of integers given by their histogram ``counts``."""
    return int(np.searchsorted(np.cumsum(counts), k, side="right"))


def _chroma_of_glass(rgb) -> float:
    """Median chroma (max - min channel) of the brightest tenth of the pixels: the glass of a
    bright-field slide, which is near grey when the colours are right. Exactly
    ``median(chroma[luma >= quantile(luma, 0.9)])``, computed from histograms of the integer
    luma and chroma (no sort of a million pixels: 9x faster, and slide QC runs it twice)."""
    pixels = rgb.reshape(-1, 3)
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    # channel by channel: numpy's reductions along a 3-long axis are ~10x slower
    luma = np.add(r, g, dtype=np.int16)
    luma += b
    counts = np.bincount(luma, minlength=766)
    n = len(luma)
    h = (n - 1) * 0.9                             # numpy's linear quantile: between order statistics lo, lo + 1
    lo = int(np.floor(h))
    low = _order_statistic(counts, lo)
    high = _order_statistic(counts, min(lo + 1, n - 1))
    # luma is integer: ">= a value strictly between low and high" is "> low"
    bright = luma >= low if (h == lo or high == low) else luma > low
    r, g, b = r[bright], g[bright], b[bright]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    m = len(chroma)
    hist = np.bincount(chroma, minlength=256)
    if m % 2:
        return float(_order_statistic(hist, m // 2))
    return (_order_statistic(hist, m // 2 - 1) + _order_statistic(hist, m // 2)) / 2.0


def check_colour_space(reader, slide_id: str) -> dict[str, Any]:
    """Decide whether the backend's pixels are RGB or unconverted YCbCr: the same pixels read
    both ways, and the one whose glass is grey wins; a container that contradicts its JPEG
    frames is the second witness. ``reader``: a :class:`SlideReader` opened without a colour
    fix. Returns the record's ``colour_fix`` (None or "ycbcr_to_rgb") and ``colour_check`` (the
    numbers). Raises SlideError when the container contradicts its frames and the pixels cannot
    tell which is right (the slide would be read in wrong colours)."""
    dims = reader.level_dimensions
    level = next((i for i, (w, h) in enumerate(dims) if max(w, h) <= COLOUR_SAMPLE_PX), len(dims) - 1)
    w, h = dims[level]
    pw, ph = min(w, COLOUR_SAMPLE_PX), min(h, COLOUR_SAMPLE_PX)
    ds = reader.level_downsamples[level]
    x, y = (w - pw) // 2, (h - ph) // 2
    rgba = reader.read_rgba(int(x * ds), int(y * ds), level, pw, ph)
    alpha = rgba[..., 3]
    # all of it scanned (the usual case): a view of the pixels, not a gathered copy of them
    scanned = rgba[..., :3].reshape(-1, 3) if alpha.min() == 255 else rgba[..., :3][alpha == 255]
    contradiction = _container_contradiction(Path(reader.path), reader.properties)
    check: dict[str, Any] = {"level": int(level), "n_pixels": int(len(scanned)), "container": contradiction or "consistent"}
    fix = None
    if len(scanned) >= 256:
        as_read = _chroma_of_glass(scanned)
        converted = _chroma_of_glass(ycbcr_to_rgb_array(scanned[None]))
        check.update(glass_chroma_as_read=as_read, glass_chroma_as_ycbcr=converted)
        if as_read > WRONG_CHROMA_MIN and converted <= BACKGROUND_CHROMA_MAX:
            fix = "ycbcr_to_rgb"
            log.warning("slide %s: pixels are YCbCr read as RGB (glass chroma %.0f, %.0f once converted)%s; "
                        "reading it with colour_fix ycbcr_to_rgb", slide_id, as_read, converted,
                        f"; {contradiction}" if contradiction else "")
        elif contradiction and as_read > BACKGROUND_CHROMA_MAX:
            raise SlideError(slide_id, f"{contradiction}, and its pixels do not show which is right (glass chroma "
                                       f"{as_read:.0f} as read, {converted:.0f} as YCbCr); convert the slide to a format "
                                       "with consistent colour (e.g. SVS/TIFF) or set on_error: skip")
    elif contradiction:
        raise SlideError(slide_id, f"{contradiction}, and too few scanned pixels to check which is right; convert the "
                                   "slide to a format with consistent colour or set on_error: skip")
    return {"colour_fix": fix, "colour_check": check}
