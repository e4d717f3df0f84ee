"""Pyramid levels and resolutions: which level serves a µm/px, and when two µm/px are one."""

from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Any, Mapping

import numpy as np

# One tolerance for every µm/px comparison: scanner calibrations scatter by about 2 % (a
# 0.2527 µm/px "40x" slide must serve a 0.25 request), and config values that differ by less
# are the same resolution (0.5 and 0.5000001).
MPP_TOLERANCE = 0.02


def same_mpp(a: float, b: float) -> bool:
    """Whether two µm/px are the same resolution (within :data:`MPP_TOLERANCE`, relative)."""
    return abs(float(a) - float(b)) <= MPP_TOLERANCE * max(abs(float(a)), abs(float(b)))


def same_mpp_mask(values, mpp: float) -> np.ndarray:
    """:func:`same_mpp` of every value of an array against ``mpp``."""
    values = np.asarray(values, dtype=float)
    return np.abs(values - float(mpp)) <= MPP_TOLERANCE * np.maximum(np.abs(values), abs(float(mpp)))


@dataclass(frozen=True)
class LevelChoice:
    level: int
    downsample: float      # level-0 px per px of this level
    mpp: float             # µm/px of this level


def best_level_for_mpp(level_downsamples, mpp0: float, target_mpp: float) -> LevelChoice:
    """The coarsest level whose resolution is at least as fine as ``target_mpp`` (so tiles are
    only ever downscaled, never upsampled beyond :data:`MPP_TOLERANCE`), or level 0 if the
    target is finer than level 0."""
    downsamples = np.asarray(level_downsamples, dtype=float)
    wanted = target_mpp / mpp0
    ok = np.nonzero(downsamples <= wanted * (1.0 + MPP_TOLERANCE))[0]
    level = int(ok[np.argmax(downsamples[ok])]) if len(ok) else 0
    return LevelChoice(level=level, downsample=float(downsamples[level]), mpp=float(mpp0 * downsamples[level]))


def nearest_level_for_mpp(level_downsamples, mpp0: float, target_mpp: float) -> LevelChoice:
    """The level whose µm/px is nearest ``target_mpp`` on a log scale (for masks and thumbnails)."""
    downsamples = np.asarray(level_downsamples, dtype=float)
    level = int(np.argmin(np.abs(np.log(downsamples * mpp0) - np.log(target_mpp))))
    return LevelChoice(level=level, downsample=float(downsamples[level]), mpp=float(mpp0 * downsamples[level]))


TIFF_UNIT_UM = {"inch": 25400.0, "centimeter": 10000.0, "millimeter": 1000.0}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or number <= 0 else number


def mpp_from_properties(props: Mapping[str, str]) -> tuple[float | None, float | None, str | None]:
    """(mpp_x, mpp_y, source) from OpenSlide properties: ``openslide.mpp-*`` ("slide"), else the
    TIFF XResolution/YResolution tags with their unit ("tiff_resolution"), else (None, None, None)."""
    mx, my = _number(props.get("openslide.mpp-x")), _number(props.get("openslide.mpp-y"))
    if mx and my:
        return mx, my, "slide"
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    rx, ry = _number(props.get("tiff.XResolution")), _number(props.get("tiff.YResolution"))
    if unit in TIFF_UNIT_UM and rx and ry:
        return TIFF_UNIT_UM[unit] / rx, TIFF_UNIT_UM[unit] / ry, "tiff_resolution"
    return None, None, None


