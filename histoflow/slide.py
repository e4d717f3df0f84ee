"""Opening slides and choosing pyramid levels. OpenSlide (openslide-bin 4.x: SVS, TIFF, NDPI,
MRXS, DICOM WSI, ...) reads; nothing here ever reads a whole level-0 image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError


def open_slide(path: str | os.PathLike, slide_id: str = "?"):
    """Open a slide with OpenSlide, turning every failure into a one-line SlideError."""
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, f"file {str(path)!r} does not exist")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(slide_id, f"{path.name!r} is not a slide format OpenSlide can read "
                                   "(corrupt, truncated, or not a WSI); check the source or set on_error: skip") from None
    except openslide.OpenSlideError as err:
        raise SlideError(slide_id, f"{path.name!r} cannot be read: {err} (corrupt file?); "
                                   "re-download it or set on_error: skip") from None


@dataclass(frozen=True)
class LevelChoice:
    level: int
    downsample: float      # level-0 px per px of this level
    mpp: float             # µm/px of this level


def best_level_for_mpp(level_downsamples, mpp0: float, target_mpp: float) -> LevelChoice:
    """The coarsest level whose resolution is at least as fine as ``target_mpp`` (so tiles are
    only ever downscaled, never upsampled), or level 0 if the target is finer than level 0."""
    downsamples = np.asarray(level_downsamples, dtype=float)
    wanted = target_mpp / mpp0
    # small tolerance: a 0.2501 µm/px level serves a 0.25 request
    ok = np.nonzero(downsamples <= wanted * 1.01)[0]
    level = int(ok[np.argmax(downsamples[ok])]) if len(ok) else 0
    return LevelChoice(level=level, downsample=float(downsamples[level]), mpp=float(mpp0 * downsamples[level]))


def nearest_level_for_mpp(level_downsamples, mpp0: float, target_mpp: float) -> LevelChoice:
    """The level whose µm/px is nearest ``target_mpp`` on a log scale (for masks and thumbnails)."""
    downsamples = np.asarray(level_downsamples, dtype=float)
    level = int(np.argmin(np.abs(np.log(downsamples * mpp0) - np.log(target_mpp))))
    return LevelChoice(level=level, downsample=float(downsamples[level]), mpp=float(mpp0 * downsamples[level]))


def read_rgb(slide, x: int, y: int, level: int, w: int, h: int, background: int = 255) -> np.ndarray:
    """Read a region (x, y at level 0; w, h at ``level``) as uint8 RGB, transparent areas set
    to ``background`` (OpenSlide returns premultiplied RGBA with alpha 0 outside scanned area)."""
    rgba = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(w), int(h))))
    rgb = rgba[..., :3].copy()
    alpha = rgba[..., 3]
    if alpha.min() < 255:
        rgb[alpha == 0] = background
    return rgb
