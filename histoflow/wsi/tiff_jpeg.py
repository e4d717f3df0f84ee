"""The tifffile backend: tiled TIFF pyramids (generic TIFF, Aperio SVS) whose levels are pages
of JPEG tiles, read straight from the tile bytes.

Why beside OpenSlide: a region OpenSlide serves goes through its tile cache, cairo compositing
and ARGB -> RGBA conversion; decoding the stored JPEG tiles that cover it (libjpeg-turbo via
OpenCV) and cropping gives the same pixels about twice as fast (benchmarks/features.py, tile
reads; the tissue step's whole level: docs/benchmarks.md). tifffile parses each page a read
needs once, on its first use (:class:`JpegPages`); a forked worker inherits the index and only
opens the file. Anything else (another compression, a sparse page, whose missing tiles OpenSlide
shows as unscanned or draws from the finer level, a level at a fractional position, a colour
fix) is read by OpenSlide.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .openslide_reader import OpenSlideReader

# OpenSlide vendors whose levels are whole TIFF pages of plain JPEG tiles with OpenSlide's pixels
# (checked pixel for pixel in tests/test_slide_read.py); NDPI, MRXS, DICOM, Ventana's overlapping
# tiles, Philips' sparse pages ... are always read by OpenSlide.
TIFF_JPEG_VENDORS = ("generic-tiff", "aperio")
JPEG, RGB, YCBCR = 7, 2, 6            # TIFF Compression and PhotometricInterpretation values
TILE_CACHE = 32                       # decoded tiles kept per reader (~6 MB of 256-px tiles)
PROBE_TOLERANCE = 2                   # grey levels: IDCT rounding between decoder builds
# An Adobe APP14 segment (version 100, no flags, transform 0) telling libjpeg the components are
# RGB, as libtiff tells it for a page whose photometric tag says RGB: Aperio's RGB tiles carry
# component ids 1, 2, 3, from which libjpeg would otherwise guess YCbCr.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class JpegPage:
    """One pyramid level stored as a TIFF page of JPEG tiles."""
    width: int
    height: int
    tile_w: int
    tile_h: int
    across: int
    offsets: np.ndarray
    counts: np.ndarray
    prefix: bytes          # the page's JPEGTables without their EOI: spliced before each tile
    photometric: int


def _jpeg_page(page, w: int, h: int) -> JpegPage | None:
    """``page`` (a tifffile page) as the JpegPage of a ``w`` x ``h`` level, or None when it is not
    that level stored as plain JPEG tiles with every tile's bytes (a sparse page: OpenSlide shows
    its missing tiles as unscanned, or an Aperio level draws them from the finer level)."""
    if (not getattr(page, "is_tiled", False) or (page.imagewidth, page.imagelength) != (w, h)
            or int(page.compression) != JPEG or page.samplesperpixel != 3 or int(page.planarconfig) != 1
            or page.bitspersample != 8 or int(page.photometric) not in (RGB, YCBCR)):
        return None
    tables = page.jpegtables or b""
    if tables and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
        return None
    across = -(-w // page.tilewidth)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if len(offsets) != across * -(-h // page.tilelength) or not counts.all():
        return None
    return JpegPage(int(w), int(h), int(page.tilewidth), int(page.tilelength), across, offsets, counts,
                    tables[:-2], int(page.photometric))


def index_jpeg_pages(path: str, level_dimensions, levels=None) -> dict[int, JpegPage]:
    """The ``levels`` (default: all) of ``path`` stored as plain JPEG tile pages with every tile's
    bytes, matched to OpenSlide's levels by size; {} when tifffile cannot parse the file.

    Only the pages asked for are parsed: tifffile turns a page's tile offsets and byte counts
    into Python tuples, and level 0 of a 100,000 px slide has 122,000 tiles (~25 ms for all ten
    pages of the ingest benchmark's slide against ~1 ms for its mask level). A level is looked
    for at its own page index and the next (a generic TIFF's and an Aperio SVS's pyramid order:
    Aperio's thumbnail is page 1), then in file order."""
    found: dict[int, JpegPage] = {}
    levels = range(len(level_dimensions)) if levels is None else [int(v) for v in levels]
    try:
        import cv2  # the decoder; without it (or tifffile, or before OpenCV 4.10) OpenSlide reads everything
        import tifffile

        if not hasattr(cv2, "IMREAD_COLOR_RGB"):
            return {}

        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            for level in levels:
                w, h = level_dimensions[level]
                order = [i for i in (level, level + 1) if i < n_pages]
                for index in order + [i for i in range(n_pages) if i not in order]:
                    page = tif.pages[index]
                    if getattr(page, "is_tiled", False) and (page.imagewidth, page.imagelength) == (w, h):
                        jpeg = _jpeg_page(page, w, h)
                        if jpeg is not None:
                            found[level] = jpeg
                        break
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: OpenSlide alone
        return {}
    return found


class JpegPages(Mapping):
    """level -> :class:`JpegPage` of a file, each page parsed on its first use (a tissue step
    needs one level, feature extraction one or two)."""

    def __init__(self, path: str, level_dimensions):
        self.path, self.level_dimensions = path, [tuple(d) for d in level_dimensions]
        self._pages: dict[int, JpegPage | None] = {}

    def load(self, levels) -> None:
        """Parse the pages of ``levels`` not parsed yet, in one pass over the file."""
        todo = [int(v) for v in levels if 0 <= int(v) < len(self.level_dimensions) and int(v) not in self._pages]
        if todo:
            found = index_jpeg_pages(self.path, self.level_dimensions, todo)
            self._pages.update({level: found.get(level) for level in todo})

    def __getitem__(self, level) -> JpegPage:
        self.load([level])
        page = self._pages.get(int(level))
        if page is None:
            raise KeyError(level)
        return page

    def __iter__(self):
        self.load(range(len(self.level_dimensions)))
        return iter(sorted(level for level, page in self._pages.items() if page is not None))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class TiffJpegReader(OpenSlideReader):
    """Regions of JPEG-tiled levels decoded from the covering stored tiles and cropped; the rest
    through OpenSlide (this class's parent)."""

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike, slide_id: str = "?", colour_fix: str | None = None,
                 record: Mapping[str, Any] | None = None):
        super().__init__(path, slide_id, colour_fix, record)
        self.pages: Mapping[int, JpegPage] = {} if colour_fix else JpegPages(self.path, self.level_dimensions)
        self._checked: dict[int, bool] = {}
        self._fd: int | None = None
        # decoded tiles shared by neighbouring requests (224-px tiles on 240/256-px stored ones):
        # a walk sorted by position reuses the last few, as OpenSlide's own tile cache does
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getstate__(self):
        state = super().__getstate__()
        state["_fd"], state["_cache"] = None, OrderedDict()
        return state

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _tile(self, level: int, page: JpegPage, index: int) -> np.ndarray | None:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        tile = self._decode(page, index)
        if tile is not None:
            self._cache[key] = tile
            if len(self._cache) > TILE_CACHE:
                self._cache.popitem(last=False)
        return tile

    def _decode(self, page: JpegPage, index: int) -> np.ndarray | None:
        import cv2

        data = os.pread(self._file(), int(page.counts[index]), int(page.offsets[index]))
        if page.prefix:          # an abbreviated stream: the page's tables go after its SOI
            data = page.prefix + data[2:]
        if page.photometric == RGB:
            data = data[:2] + ADOBE_RGB + data[2:]
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is None or pixels.shape != (page.tile_h, page.tile_w, 3):
            return None
        return pixels

    def _level_ok(self, level: int) -> bool:
        """Whether ``level`` may be served from its tiles. A page that says RGB may hold streams
        libjpeg would read as YCbCr (Aperio's component ids): one tile of the level is
        compared with OpenSlide's once per reader (inherited by forked workers)."""
        page = self.pages.get(level)
        if page is None:
            return False
        if page.photometric == YCBCR:
            return True
        if level not in self._checked:
            # the first tile: its level-0 position is 0 whatever the downsample (elsewhere a
            # fractional downsample puts tiles at fractional level-0 positions, which OpenSlide
            # resamples)
            w, h = min(page.tile_w, page.width), min(page.tile_h, page.height)
            try:
                fast = self._region(0, 0, level, w, h, 255)
                ref = OpenSlideReader.read_region(self, 0, 0, level, w, h)
                ok = fast is not None and int(np.abs(fast[0].astype(np.int16) - ref).max()) <= PROBE_TOLERANCE
            except Exception:  # noqa: BLE001 - OpenSlide reads it, or reports the error
                ok = False
            self._checked[level] = ok
        return self._checked[level]

    def prepare(self, levels) -> None:
        """Decide now (in the parent process) which of ``levels`` the tiles serve, so that forked
        workers inherit the answer instead of probing again."""
        levels = [int(level) for level in levels]
        if isinstance(self.pages, JpegPages):
            self.pages.load(levels)
        for level in levels:
            self._level_ok(int(level))

    def _region(self, x: int, y: int, level: int, w: int, h: int, background: int):
        """``(rgb, scanned)`` from the tiles, or None when this backend cannot serve it."""
        page = self.pages[level]
        ds = self.level_downsamples[level]
        lx, ly = x / ds, y / ds
        if lx != int(lx) or ly != int(ly):      # a fractional position: OpenSlide resamples it
            return None
        lx, ly = int(lx), int(ly)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, page.width), min(ly + h, page.height)
        inside = x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), background, np.uint8)
        if x1 > x0 and y1 > y0:
            for row in range(y0 // page.tile_h, (y1 - 1) // page.tile_h + 1):
                for col in range(x0 // page.tile_w, (x1 - 1) // page.tile_w + 1):
                    tile = self._tile(level, page, row * page.across + col)
                    if tile is None:
                        return None
                    tx, ty = col * page.tile_w, row * page.tile_h
                    ax, ay = max(x0, tx), max(y0, ty)
                    bx, by = min(x1, tx + page.tile_w), min(y1, ty + page.tile_h)
                    out[ay - ly:by - ly, ax - lx:bx - lx] = tile[ay - ty:by - ty, ax - tx:bx - tx]
        if inside:                 # all of it scanned: a read-only all-True view, no memory
            scanned = np.broadcast_to(np.True_, (h, w))
        else:
            scanned = np.zeros((h, w), bool)
            if x1 > x0 and y1 > y0:    # a region wholly past the level's edge has no scanned pixel
                scanned[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = True
        return out, scanned

    def read_region(self, x: int, y: int, level: int, w: int, h: int, background: int = 255,
                    with_scanned: bool = False):
        x, y, level, w, h = int(x), int(y), int(level), int(w), int(h)
        got = self._region(x, y, level, w, h, background) if self._level_ok(level) else None
        if got is None:
            return super().read_region(x, y, level, w, h, background, with_scanned)
        return got if with_scanned else got[0]

    def close(self) -> None:
        super().close()
        self._cache.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
