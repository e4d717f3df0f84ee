"""Opening slides and choosing pyramid levels. OpenSlide (openslide-bin 4.x: SVS, TIFF, NDPI,
MRXS, DICOM WSI, ...) reads; nothing here ever reads a whole level-0 image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError


COLOUR_FIXES = ("ycbcr_to_rgb",)


def open_slide(path: str | os.PathLike, slide_id: str = "?", colour_fix: str | None = None):
    """Open a slide with OpenSlide, turning every failure into a one-line SlideError.

    ``colour_fix`` (the ``colour_fix`` of slides/{id}.json, set by slide QC): ``ycbcr_to_rgb``
    wraps the handle so every ``read_region`` / ``get_thumbnail`` returns converted RGB (frames
    stored as YCbCr JPEG that the container calls RGB, which OpenSlide passes through raw)."""
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, f"file {str(path)!r} does not exist")
    if colour_fix and colour_fix not in COLOUR_FIXES:
        raise SlideError(slide_id, f"unknown colour_fix {colour_fix!r} in its slides json (known: "
                                   f"{', '.join(COLOUR_FIXES)}); re-run slide_qc")
    try:
        slide = openslide.OpenSlide(str(path))
        return ColourFixedSlide(slide) if colour_fix == "ycbcr_to_rgb" else slide
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(slide_id, f"{path.name!r} is not a slide format OpenSlide can read "
                                   "(corrupt, truncated, or not a WSI); check the source or set on_error: skip") from None
    except openslide.OpenSlideError as err:
        raise SlideError(slide_id, f"{path.name!r} cannot be read: {err} (corrupt file?); "
                                   "re-download it or set on_error: skip") from None


def ycbcr_to_rgb(img):
    """A PIL RGB/RGBA image whose channels hold full-range (JPEG) Y, Cb, Cr -> the same mode in
    RGB; alpha is kept (PIL's conversion is libjpeg's JFIF one)."""
    from PIL import Image

    bands = img.split()
    rgb = Image.merge("YCbCr", bands[:3]).convert("RGB")
    if img.mode == "RGBA":
        rgb.putalpha(bands[3])
    return rgb


def ycbcr_to_rgb_array(arr: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 (Y, Cb, Cr) -> uint8 RGB."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3]), "YCbCr").convert("RGB"))


class ColourFixedSlide:
    """An OpenSlide handle whose pixels are converted YCbCr -> RGB on every read; everything
    else (levels, properties, close) is the wrapped handle's."""

    colour_fix = "ycbcr_to_rgb"

    def __init__(self, slide):
        self._slide = slide

    def read_region(self, location, level, size):
        return ycbcr_to_rgb(self._slide.read_region(location, level, size))

    def get_thumbnail(self, size):
        import openslide

        # OpenSlide's own, on the converted read_region (it composites on white after reading)
        return openslide.AbstractSlide.get_thumbnail(self, size)

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._slide.close()


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


def read_level_downsampled(slide, level: int, factor: int, background: int = 255,
                           chunk_px: int = 2048, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The whole of ``level`` shrunk by an integer ``factor`` (block mean), read in chunks of at
    most ``chunk_px`` x ``chunk_px`` level px so memory stays bounded whatever the slide size.

    Returns ``(rgb uint8 [h, w, 3], scanned bool [h, w])`` with h, w = ceil(level size / factor);
    ``scanned`` is False where OpenSlide reports no image (alpha 0), which is filled with
    ``background``. Edge blocks that overhang the level are averaged over their real pixels.
    Integer maths throughout (uint8 in, uint32 block sums): float chunks cost ~9x the result's
    memory on a large mask.
    """
    factor = max(1, int(factor))
    width, height = slide.level_dimensions[level]
    downsample = float(slide.level_downsamples[level])
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
        region = np.asarray(slide.read_region((int(round(x * downsample)), int(round(y * downsample))),
                                              int(level), (int(w), int(h))))
        alpha = region[..., 3]
        chunk = region[..., :3]
        holes = alpha == 0
        if holes.any():
            chunk = chunk.copy()
            chunk[holes] = background
        oy, ox = y // factor, x // factor
        if factor == 1:
            rgb[oy:oy + h, ox:ox + w] = chunk
            scanned[oy:oy + h, ox:ox + w] = ~holes
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


# OpenSlide vendors whose pyramid levels are whole TIFF pages that libvips decodes to the same
# pixels (checked pixel for pixel in tests/test_slide_read.py on generic TIFF and Aperio SVS).
# Others (NDPI, MRXS, DICOM, Ventana's overlapping tiles, ...) always go through OpenSlide.
TIFF_PAGE_VENDORS = ("generic-tiff", "aperio")


def tiff_has_missing_tiles(path: str | os.PathLike, last_page: int) -> bool:
    """True when a tiled page among TIFF directories 0..``last_page`` lists a tile with no bytes
    (a sparse scan), or when the file cannot be parsed. OpenSlide shows a missing tile as
    unscanned (transparent) at every level of an Aperio slide, also where the lower pages hold
    pixels, so such slides must be read through OpenSlide. Reads only the directories and their
    TileByteCounts arrays (a few hundred kB for a 40x slide), never image data."""
    from .tiff import has_missing_tiles, read_tiff_pages

    pages = read_tiff_pages(path, last_page)
    return pages is None or has_missing_tiles(pages)


def read_whole_level_fast(path: str | os.PathLike, vendor: str | None, level_dimensions, level: int
                          ) -> tuple[np.ndarray, np.ndarray] | None:
    """A whole (small) pyramid level as ``(rgb uint8, scanned bool)`` read from its TIFF page
    (all of a page is scanned: ``scanned`` is a read-only all-True view that takes no memory),
    or None when the slide is not a plain tiled TIFF pyramid (the caller then reads with
    OpenSlide).

    Why: the tissue mask needs one whole low-resolution level. JPEG tiles are decoded straight
    from the page (:func:`histoflow.tiff.read_jpeg_page`, ~2x faster than libvips), other pages
    by libvips, which is 3-5x faster than ``openslide.read_region`` compositing them (25 vs
    60-90 ms for a 1562 x 1250 level); the pixels are OpenSlide's for the vendors in
    :data:`TIFF_PAGE_VENDORS` (tests/test_slide_read.py). A sparse scan (tiles with no bytes,
    which OpenSlide reports as unscanned) is left to OpenSlide. Callers use it only for levels
    they would read whole anyway (never level 0 of a large slide)."""
    from .tiff import has_missing_tiles, read_jpeg_page, read_tiff_pages

    if vendor not in TIFF_PAGE_VENDORS or not level_dimensions or not 0 <= level < len(level_dimensions):
        return None
    width, height = (int(v) for v in level_dimensions[level])
    # generic TIFF levels are pages 0, 1, 2, ...; an Aperio SVS puts its thumbnail second, so
    # its level k > 0 is usually page k + 1; the page must be tiled and have OpenSlide's size
    candidates = [level] if vendor == "generic-tiff" or level == 0 else [level + 1, level]
    try:
        for page_index in candidates:
            pages = read_tiff_pages(path, page_index)
            if pages is None:             # no such page (or not a TIFF this parser reads)
                continue
            page = pages[-1]
            if page.size != (width, height) or not page.tiled:
                continue
            if has_missing_tiles(pages):
                return None
            rgb = read_jpeg_page(path, page)
            if rgb is None:               # not plain JPEG tiles: the page through libvips
                rgb = _libvips_page(str(path), page_index)
            # all of a page is scanned: a read-only all-True view, no memory
            return None if rgb is None else (rgb, np.broadcast_to(np.True_, rgb.shape[:2]))
    except Exception:   # a decode error: OpenSlide reads it and reports it clearly
        return None
    return None


def _libvips_page(path: str, page: int) -> np.ndarray | None:
    """TIFF page ``page`` decoded by libvips as uint8 RGB, or None when it is not 3-band uchar.
    ``revalidate``: a file rewritten at the same path is read again, not served from libvips'
    cache."""
    import pyvips

    image = pyvips.Image.tiffload(path, page=page, revalidate=True)
    if image.bands != 3 or image.format != "uchar":
        return None
    return image.numpy().reshape(image.height, image.width, 3)
