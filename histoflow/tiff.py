"""A whole low-resolution TIFF page, read without a TIFF library: the tissue mask's fast path.

A pyramidal TIFF (generic tiled TIFF, Aperio SVS) stores each level as a page of JPEG tiles.
For the one small level the tissue step reads whole, parsing the page's directory and handing
each tile's JPEG stream to OpenCV's decoder (libjpeg-turbo) costs about half of what libvips'
``tiffload`` does (its per-region pipeline, ~24 ms of CPU for 35 tiles where the decoding is ~6),
with the same pixels. Only the plainest layout is read here: 8-bit RGB or YCbCr JPEG tiles,
interleaved, decoded in the colour space the TIFF's photometric tag gives (as libtiff, libvips
and OpenSlide do; a stream whose markers say otherwise gets an Adobe marker that says so, or,
when its markers contradict the tag, is left alone). Anything else returns None and the caller
reads the page with libvips or OpenSlide.

TIFF 6.0 and BigTIFF, either byte order. Nothing here reads more than the directories, their
tile tables and one page's tile bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

# TIFF tags used here
WIDTH, LENGTH, BITS, COMPRESSION, PHOTOMETRIC = 256, 257, 258, 259, 262
SAMPLES, PLANAR, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTE_COUNTS, JPEG_TABLES = 277, 284, 322, 323, 324, 325, 347
JPEG, RGB, YCBCR = 7, 2, 6                   # Compression and PhotometricInterpretation values

_TYPES = {1: "B", 3: "H", 4: "I", 7: "B", 16: "Q"}   # BYTE, SHORT, LONG, UNDEFINED, LONG8


@dataclass(frozen=True)
class TiffPage:
    """One TIFF directory's numeric tags (values as arrays; JPEGTables as uint8)."""
    index: int
    tags: dict[int, np.ndarray]

    def value(self, tag: int, default: int | None = None) -> int | None:
        values = self.tags.get(tag)
        return default if values is None or len(values) == 0 else int(values[0])

    @property
    def size(self) -> tuple[int, int] | None:
        width, length = self.value(WIDTH), self.value(LENGTH)
        return None if width is None or length is None else (width, length)

    @property
    def tiled(self) -> bool:
        return TILE_WIDTH in self.tags and TILE_OFFSETS in self.tags and TILE_BYTE_COUNTS in self.tags


def read_tiff_pages(path: str | os.PathLike, last_page: int, arrays: tuple[int, ...] = (TILE_BYTE_COUNTS,),
                    arrays_of_last: tuple[int, ...] = (TILE_OFFSETS, TILE_BYTE_COUNTS, JPEG_TABLES, BITS)
                    ) -> list[TiffPage] | None:
    """Directories 0..``last_page`` of a TIFF file, or None when it is not a TIFF, has fewer
    pages or cannot be parsed. Values that do not fit in their directory entry (arrays) are read
    only for the tags in ``arrays`` (every page) and ``arrays_of_last`` (the last page): a 40x
    slide's level-0 tile tables are megabytes that most callers never need."""
    try:
        with open(path, "rb") as handle:
            order = {b"II": "<", b"MM": ">"}[handle.read(2)]
            magic = struct.unpack(order + "H", handle.read(2))[0]
            if magic == 42:
                (offset,) = struct.unpack(order + "I", handle.read(4))
                count_fmt, entry_size, value_size, offset_fmt = "H", 12, 4, "I"
            elif magic == 43:
                handle.read(4)                                    # bytesize 8, padding
                (offset,) = struct.unpack(order + "Q", handle.read(8))
                count_fmt, entry_size, value_size, offset_fmt = "Q", 20, 8, "Q"
            else:
                return None
            pages = []
            for index in range(last_page + 1):
                if offset == 0:
                    return None                                   # fewer pages than asked for
                handle.seek(offset)
                n = struct.unpack(order + count_fmt, handle.read(struct.calcsize(count_fmt)))[0]
                entries = handle.read(n * entry_size)
                (offset,) = struct.unpack(order + offset_fmt, handle.read(value_size))
                wanted = arrays_of_last if index == last_page else arrays
                tags = {}
                for i in range(n):
                    entry = entries[i * entry_size:(i + 1) * entry_size]
                    tag, kind = struct.unpack(order + "HH", entry[:4])
                    if kind not in _TYPES:
                        continue
                    (count,) = struct.unpack(order + offset_fmt, entry[4:4 + value_size])
                    dtype = np.dtype(_TYPES[kind]).newbyteorder(order)
                    raw = entry[4 + value_size:]
                    if count * dtype.itemsize > value_size:       # stored elsewhere: an offset
                        if tag not in wanted:
                            continue
                        (where,) = struct.unpack(order + offset_fmt, raw)
                        handle.seek(where)
                        raw = handle.read(count * dtype.itemsize)
                    values = np.frombuffer(raw[:count * dtype.itemsize], dtype=dtype)
                    if len(values) < count:
                        return None                               # truncated file
                    tags[tag] = values
                pages.append(TiffPage(index, tags))
            return pages
    except (OSError, KeyError, struct.error, ValueError):
        return None


def has_missing_tiles(pages: list[TiffPage]) -> bool:
    """True when a tiled page lists a tile with no bytes (a sparse scan)."""
    return any(TILE_WIDTH in page.tags and TILE_BYTE_COUNTS in page.tags and not page.tags[TILE_BYTE_COUNTS].all()
               for page in pages)


def _jpeg_markers(stream: bytes) -> tuple[bool, int | None, tuple[int, int, int]] | None:
    """(JFIF marker seen, Adobe transform flag or None, the 3 component ids) of a JPEG stream,
    from its marker segments up to the first scan; None for a stream that is not 3-component
    JPEG or is cut short."""
    at, jfif, adobe, ids = 2, False, None, None
    if stream[:2] != b"\xff\xd8":
        return None
    while at + 4 <= len(stream):
        if stream[at] != 0xFF:
            return None
        marker = stream[at + 1]
        if marker == 0xFF:                                       # fill byte
            at += 1
            continue
        length = (stream[at + 2] << 8) | stream[at + 3]
        segment = stream[at + 4:at + 2 + length]
        if marker == 0xE0 and segment[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker in (0xC0, 0xC1, 0xC2):                        # baseline, extended, progressive
            if len(segment) < 6 or segment[5] != 3:
                return None
            ids = (segment[6], segment[9], segment[12])
        elif marker == 0xDA:                                      # start of scan
            break
        at += 2 + length
    return None if ids is None else (jfif, adobe, ids)


def libjpeg_colour_space(stream: bytes) -> str | None:
    """``"ycbcr"`` or ``"rgb"``: how libjpeg reads a 3-component JPEG stream, by its markers
    (JFIF: YCbCr; Adobe: by its transform flag; else component ids 'R','G','B': RGB, otherwise
    YCbCr), as ``jdapimin.c`` decides; None for another kind of stream."""
    markers = _jpeg_markers(stream)
    if markers is None:
        return None
    jfif, adobe, ids = markers
    if jfif:
        return "ycbcr"
    if adobe is not None:
        return "rgb" if adobe == 0 else "ycbcr"
    return "rgb" if ids == (82, 71, 66) else "ycbcr"


# An Adobe APP14 segment (version 100, no flags) whose transform flag tells libjpeg the colour
# space: 0 = RGB (no conversion), 1 = YCbCr
_ADOBE = {"rgb": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00",
          "ycbcr": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"}


def stream_in_colour_space(stream: bytes, wanted: str) -> bytes | None:
    """``stream`` as libjpeg must read it to decode in colour space ``wanted`` (what the TIFF's
    photometric tag says, and libtiff tells libjpeg): unchanged when its markers already say
    so; with an Adobe segment added when it has none that says otherwise (e.g. an Aperio RGB
    tile, whose component ids 1, 2, 3 would make libjpeg convert it from YCbCr); None when its
    JFIF or Adobe marker contradicts ``wanted``."""
    markers = _jpeg_markers(stream)
    if markers is None:
        return None
    if libjpeg_colour_space(stream) == wanted:
        return stream
    jfif, adobe, _ = markers
    if jfif or adobe is not None:
        return None
    return stream[:2] + _ADOBE[wanted] + stream[2:]


def read_jpeg_page(path: str | os.PathLike, page: TiffPage) -> np.ndarray | None:
    """The page as uint8 RGB ``(length, width, 3)``, decoded tile by tile by OpenCV, or None
    when the page is not 8-bit RGB/YCbCr JPEG tiles whose streams libjpeg reads in the colour
    space the photometric tag gives (the caller then reads it with libvips or OpenSlide)."""
    import cv2

    size = page.size
    bits = page.tags.get(BITS)
    if (size is None or not page.tiled or page.value(COMPRESSION) != JPEG or page.value(SAMPLES) != 3
            or page.value(PLANAR, 1) != 1 or bits is None or not (bits == 8).all()
            or page.value(PHOTOMETRIC) not in (RGB, YCBCR)):
        return None
    width, length = size
    tile_w, tile_l = page.value(TILE_WIDTH), page.value(TILE_LENGTH, page.value(TILE_WIDTH))
    across, down = -(-width // tile_w), -(-length // tile_l)
    offsets = page.tags[TILE_OFFSETS].astype(np.int64)
    counts = page.tags[TILE_BYTE_COUNTS].astype(np.int64)
    if len(offsets) != across * down or len(counts) != len(offsets) or not counts.all():
        return None
    tables = page.tags.get(JPEG_TABLES)
    head = b"" if tables is None else tables.tobytes()
    if head and (head[:2] != b"\xff\xd8" or head[-2:] != b"\xff\xd9"):
        return None
    wanted = "ycbcr" if page.value(PHOTOMETRIC) == YCBCR else "rgb"
    start, end = int(offsets.min()), int((offsets + counts).max())
    with open(path, "rb") as handle:
        if end - start <= 2 * int(counts.sum()) + (1 << 20):     # the page's tiles lie together: one read
            handle.seek(start)
            blob = handle.read(end - start)
            tiles = [blob[o - start:o - start + c] for o, c in zip(offsets.tolist(), counts.tolist())]
        else:
            tiles = []
            for o, c in zip(offsets.tolist(), counts.tolist()):
                handle.seek(o)
                tiles.append(handle.read(c))
    if not hasattr(cv2, "IMREAD_COLOR_RGB"):                      # OpenCV before 4.10
        return None
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    out = np.empty((length, width, 3), np.uint8)
    for k, tile in enumerate(tiles):
        if len(tile) < 4 or tile[:2] != b"\xff\xd8":
            return None
        stream = stream_in_colour_space(head[:-2] + tile[2:] if head else tile, wanted)  # tables first
        if stream is None:
            return None
        pixels = cv2.imdecode(np.frombuffer(stream, np.uint8), flags)
        if pixels is None or pixels.shape != (tile_l, tile_w, 3):
            return None
        y, x = (k // across) * tile_l, (k % across) * tile_w
        out[y:y + tile_l, x:x + tile_w] = pixels[:length - y, :width - x]
    return out
