"""Reading slides: one interface (:class:`SlideReader`), one factory (:func:`open_slide`).

Every stage (slide QC, tissue, tiling's image export, stain, SSL, features, heatmaps) reads
pixels through here; ``openslide`` and ``tifffile`` are imported nowhere else (a test checks).
Backends, as in TRIDENT's ``WSIFactory``: OpenSlide for every format it reads, and tifffile for
JPEG-tiled TIFF/SVS pyramids, whose stored tiles it decodes directly (falling back to OpenSlide
for whatever it cannot serve with OpenSlide's pixels).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .base import SlideReader
from .colour import COLOUR_FIXES, check_colour_space, jpeg_colour_space, ycbcr_to_rgb_array
from .levels import (MPP_TOLERANCE, LevelChoice, best_level_for_mpp, nearest_level_for_mpp, same_mpp,
                     same_mpp_mask)
from .openslide_reader import OpenSlideReader, detect_vendor
from .tiff_jpeg import TIFF_JPEG_VENDORS, TiffJpegReader

__all__ = ["SlideReader", "OpenSlideReader", "TiffJpegReader", "open_slide", "MPP_TOLERANCE", "LevelChoice",
           "best_level_for_mpp", "nearest_level_for_mpp", "same_mpp", "same_mpp_mask", "COLOUR_FIXES",
           "check_colour_space", "jpeg_colour_space", "ycbcr_to_rgb_array", "detect_vendor", "slide_format_error"]


def open_slide(path: str | os.PathLike, slide_id: str = "?", colour_fix: str | None = None,
               record: Mapping[str, Any] | None = None, backend: str = "auto") -> SlideReader:
    """A :class:`SlideReader` for ``path``; every failure to open is a one-line SlideError.

    ``colour_fix``: the slide QC's ``colour_fix`` ("ycbcr_to_rgb": every read is converted).
    ``record``: the slide's QC record (slides/{id}.json): metadata from it, so OpenSlide opens
    only when a read needs it. ``backend``: "auto" (tifffile for JPEG-tiled TIFF/SVS, else
    OpenSlide) or "openslide"."""
    vendor = (record or {}).get("vendor")
    if vendor is None and backend == "auto":
        try:
            vendor = detect_vendor(path)
        except Exception:  # noqa: BLE001 - OpenSlideReader reports it in one line
            vendor = None
    if backend == "auto" and not colour_fix and vendor in TIFF_JPEG_VENDORS:
        return TiffJpegReader(path, slide_id, colour_fix, record)
    return OpenSlideReader(path, slide_id, colour_fix, record)


def slide_format_error() -> tuple[type[BaseException], ...]:
    """The exception types a backend raises for a file it cannot decode (for callers that
    count failed reads)."""
    import openslide

    return (openslide.OpenSlideError,)
