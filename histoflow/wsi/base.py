"""The one interface every stage reads slides through (modelled on TRIDENT's WSI base class):
metadata as properties, pixels as uint8 RGB numpy arrays, nothing ever reading a whole level 0.

A backend implements :meth:`SlideReader._read_rgba` (and its metadata); everything else
(background filling, the colour fix, chunked level reads, thumbnails, tile reads with their
resize rule) is written once here."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from .colour import COLOUR_FIXES, ycbcr_to_rgb_array
from .levels import mpp_from_properties
from ..errors import SlideError


class SlideReader:
    """One open slide. Coordinates ``x, y`` are level-0 px; ``w, h`` px at ``level``.

    Properties: ``dimensions``, ``level_count``, ``level_dimensions``, ``level_downsamples``,
    ``mpp`` (x, y µm/px at level 0 from the file, or None) with ``mpp_source``, ``vendor``,
    ``properties`` (the backend's key/value metadata), ``associated_image_names`` (label,
    macro, ...: named, never read). ``colour_fix`` ("ycbcr_to_rgb" or None) converts every read.
    """

    backend = "?"

    def __init__(self, path: str | os.PathLike, slide_id: str = "?", colour_fix: str | None = None):
        if colour_fix and colour_fix not in COLOUR_FIXES:
            raise SlideError(slide_id, f"unknown colour_fix {colour_fix!r} in its slides json (known: "
                                       f"{', '.join(COLOUR_FIXES)}); re-run slide_qc")
        self.path = str(path)
        self.slide_id = slide_id
        self.colour_fix = colour_fix

    # ------------------------------------------------------------------ metadata (backends)
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    vendor: str | None = None
    properties: Mapping[str, str] = {}
    associated_image_names: list[str] = []

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.level_dimensions[0])

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> tuple[float, float] | None:
        mx, my, _ = mpp_from_properties(self.properties)
        return (mx, my) if mx and my else None

    @property
    def mpp_source(self) -> str | None:
        return mpp_from_properties(self.properties)[2]

    # ------------------------------------------------------------------ pixels
    def _read_rgba(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """uint8 H x W x 4, alpha 0 where nothing was scanned (the backend's own colours)."""
        raise NotImplementedError

    def read_rgba(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """The backend's pixels as they are (no colour fix): uint8 RGBA, alpha 0 = unscanned."""
        return self._read_rgba(int(x), int(y), int(level), int(w), int(h))

    def read_region(self, x: int, y: int, level: int, w: int, h: int, background: int = 255,
                    with_scanned: bool = False):
        """uint8 RGB ``h x w x 3``; unscanned areas (alpha 0) set to ``background``. With
        ``with_scanned``: ``(rgb, scanned bool)``."""
        rgba = self._read_rgba(int(x), int(y), int(level), int(w), int(h))
        rgb = rgba[..., :3]
        if self.colour_fix == "ycbcr_to_rgb":
            rgb = ycbcr_to_rgb_array(rgb)
        alpha = rgba[..., 3]
        holes = alpha == 0
        if holes.any():
            rgb = rgb.copy()
            rgb[holes] = background
        if with_scanned:
            return rgb, ~holes
        return rgb

    def read_level(self, level: int, factor: int = 1, background: int = 255, chunk_px: int = 2048,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The whole of ``level`` shrunk by an integer ``factor`` (block mean), read in chunks of
        at most ``chunk_px`` x ``chunk_px`` level px so memory stays bounded whatever the slide
        size. Returns ``(rgb uint8 [h, w, 3], scanned bool [h, w])`` with h, w = ceil(level size
        / factor); ``scanned`` is False where nothing was scanned (filled with ``background``).
        Edge blocks that overhang the level are averaged over their real pixels. Integer maths
        throughout (uint8 in, uint32 block sums): float chunks cost ~9x the result's memory."""
        factor = max(1, int(factor))
        width, height = self.level_dimensions[level]
        downsample = float(self.level_downsamples[level])
        out_w, out_h = -(-width // factor), -(-height // factor)
        rgb = np.empty((out_h, out_w, 3), dtype=np.uint8)
        scanned = np.empty((out_h, out_w), dtype=bool)
        step = max(factor, (chunk_px // factor) * factor)
        boxes = [(x, y) for y in range(0, height, step) for x in range(0, width, step)]
        iterator = boxes
        if progress and len(boxes) > 1:
            from tqdm import tqdm

            iterator = tqdm(boxes, desc=f"reading level {level} /{factor}", unit="chunk", mininterval=5)
        n = factor * factor
        for x, y in iterator:
            w, h = min(step, width - x), min(step, height - y)
            chunk, seen = self.read_region(int(round(x * downsample)), int(round(y * downsample)), level, w, h,
                                           background, with_scanned=True)
            holes = ~seen
            oy, ox = y // factor, x // factor
            if factor == 1:
                rgb[oy:oy + h, ox:ox + w] = chunk
                scanned[oy:oy + h, ox:ox + w] = seen
                continue
            ph, pw = -(-h // factor) * factor - h, -(-w // factor) * factor - w
            if ph or pw:  # replicate the edge so partial blocks keep their own colour
                chunk = np.pad(chunk, ((0, ph), (0, pw), (0, 0)), mode="edge")
                holes = np.pad(holes, ((0, ph), (0, pw)), mode="edge")
            bh, bw = chunk.shape[0] // factor, chunk.shape[1] // factor
            sums = chunk.reshape(bh, factor, bw, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
            # round half to even like np.rint of the float mean
            mean, rest = np.divmod(sums, n)
            mean += (2 * rest > n) | ((2 * rest == n) & (mean % 2 == 1))
            rgb[oy:oy + bh, ox:ox + bw] = mean.astype(np.uint8)
            n_holes = holes.reshape(bh, factor, bw, factor).sum(axis=(1, 3), dtype=np.uint32)
            scanned[oy:oy + bh, ox:ox + bw] = 2 * n_holes <= n     # scanned where >= half the block is
        return rgb, scanned

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level OpenSlide picks for ``downsample``: the largest level whose downsample is at
        most ``downsample`` (level 0 below its own)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample:
                best = i
        return best

    def thumbnail(self, max_px: int) -> np.ndarray:
        """uint8 RGB of the whole slide within ``max_px`` x ``max_px`` (aspect kept), as
        OpenSlide's ``get_thumbnail`` makes it: the level :meth:`best_level_for_downsample`
        gives, unscanned areas white, shrunk by PIL's ``thumbnail`` (Lanczos)."""
        from PIL import Image

        w0, h0 = self.dimensions
        level = self.best_level_for_downsample(max(w0 / max_px, h0 / max_px))
        lw, lh = self.level_dimensions[level]
        img = Image.fromarray(self.read_region(0, 0, level, lw, lh))
        img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        return np.asarray(img)

    def read_tile(self, row: Mapping[str, Any], out_px: int | None = None) -> np.ndarray:
        """One tile of a tiles table as ``(out_px, out_px, 3)`` uint8 RGB (``out_px`` defaults to
        the row's ``tile_px``): ``read_w x read_h`` px at ``read_level`` (level-0 corner ``x, y``),
        downscaled when the level is finer than the target (a box mean for integer factors, the
        correct anti-aliasing filter and several times faster than Lanczos; Lanczos otherwise)."""
        from PIL import Image

        tile_px = int(out_px or row["tile_px"])
        rgb = self.read_region(int(row["x"]), int(row["y"]), int(row["read_level"]), int(row["read_w"]),
                               int(row["read_h"]))
        h, w = rgb.shape[:2]
        if w == tile_px and h == tile_px:
            return rgb
        img = Image.fromarray(rgb)
        if w == h and w % tile_px == 0:
            return np.asarray(img.reduce(w // tile_px))
        return np.asarray(img.resize((tile_px, tile_px), Image.Resampling.LANCZOS))

    # ------------------------------------------------------------------ lifetime
    def reset(self) -> None:
        """Drop open handles (after a read error, or in a forked worker); reopened lazily."""

    def close(self) -> None:
        self.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
