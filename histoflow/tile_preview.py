"""The tiling step's preview: the tile grid over the tissue overlay, one panel per resolution,
outlines coloured by tissue fraction (for the report and a quick look at what will be read)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import atomic_path, read_json
from .logs import get_logger
from .tiles_table import _numpy_of

log = get_logger(__name__)


# viridis at 17 evenly spaced stops (matplotlib's values, 0-255), interpolated linearly: within
# 5/255 of the full map, and the preview (drawn in every tile_slide job) needs no matplotlib
VIRIDIS_STOPS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141), (44, 114, 142),
    (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115), (94, 201, 98),
    (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)], dtype=np.float64)


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB (int, 0-255) of ``values`` in [0, 1] on the viridis colour map."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS_STOPS))
    return np.stack([np.interp(v, stops, VIRIDIS_STOPS[:, k]) for k in range(3)], axis=-1).round().astype(int)


PREVIEW_COLUMNS = ("target_mpp", "x", "y", "size0", "tissue_fraction")


def _preview_columns(tiles) -> dict[str, np.ndarray]:
    """The columns the preview draws, as numpy arrays, from a pyarrow Table or a DataFrame."""
    names = tiles.column_names if hasattr(tiles, "column_names") else list(tiles.columns)
    n = tiles.num_rows if hasattr(tiles, "num_rows") else len(tiles)
    out = {}
    for name in PREVIEW_COLUMNS:
        if name not in names:
            out[name] = np.full(n, np.nan)
        elif hasattr(tiles, "column_names"):
            out[name] = _numpy_of(tiles.column(name))
        else:
            out[name] = tiles[name].to_numpy()
    return out


def _outline_pixels(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, box index) of the 1 px outlines of boxes [x0, x1] x [y0, y1] (inclusive),
    box by box in order (top, bottom, left, right): drawing them in one fancy-index assignment
    lets a later box overwrite a shared edge, as drawing them one by one would."""
    n = len(x0)
    # int32: a preview is a few thousand px wide; half the memory of int64 temporaries
    x0, y0, x1, y1 = (np.asarray(a, np.int32) for a in (x0, y0, x1, y1))
    w, h = x1 - x0 + 1, y1 - y0 + 1
    # per box and side: start (col, row), step (dcol, drow), length
    sc = np.stack([x0, x0, x0, x1], axis=1).ravel()
    sr = np.stack([y0, y1, y0, y0], axis=1).ravel()
    dc = np.tile(np.array([1, 1, 0, 0], np.int32), n)
    dr = np.tile(np.array([0, 0, 1, 1], np.int32), n)
    length = np.stack([w, w, h, h], axis=1).ravel()
    total = int(length.sum())
    starts = np.repeat(np.cumsum(length, dtype=np.int32) - length, length)
    step = np.arange(total, dtype=np.int32) - starts
    rows = np.repeat(sr, length) + np.repeat(dr, length) * step
    cols = np.repeat(sc, length) + np.repeat(dc, length) * step
    return rows, cols, np.repeat(np.arange(n, dtype=np.int32), 2 * (w + h))


PREVIEW_HEADER_PX, PREVIEW_GAP_PX = 18, 8


def _preview_background(background: np.ndarray, max_px: int) -> np.ndarray:
    """The thumbnail as uint8 RGB, shrunk so its longer side is at most ``max_px``."""
    from PIL import Image

    base = np.asarray(background, np.uint8)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    base = base[..., :3]
    scale = min(1.0, max_px / max(base.shape[:2])) if max(base.shape[:2]) else 1.0
    if scale < 1.0:
        bg = Image.fromarray(np.ascontiguousarray(base))
        bg = bg.resize((max(1, int(bg.width * scale)), max(1, int(bg.height * scale))), Image.Resampling.BILINEAR)
        base = np.asarray(bg)
    return base


def preview_canvas(background: np.ndarray, n_panels: int, max_px: int = 1600) -> np.ndarray:
    """The preview before any tile is drawn: white, with the thumbnail under each panel's
    header. Apart from the drawing so that the tiling step makes it while the grid is computed."""
    base = _preview_background(background, max_px)
    ph, pw = base.shape[:2]
    out = np.full((ph + PREVIEW_HEADER_PX, n_panels * (pw + PREVIEW_GAP_PX) - PREVIEW_GAP_PX, 3), 255, np.uint8)
    for k in range(n_panels):
        out[PREVIEW_HEADER_PX:, k * (pw + PREVIEW_GAP_PX):k * (pw + PREVIEW_GAP_PX) + pw] = base
    return out


def _has_panels(canvas: np.ndarray, n_panels: int, background: np.ndarray, max_px: int) -> bool:
    """Whether ``canvas`` is :func:`preview_canvas` of this background with ``n_panels`` panels."""
    h, w = np.shape(background)[:2]
    scale = min(1.0, max_px / max(h, w)) if max(h, w) else 1.0
    ph, pw = (max(1, int(h * scale)), max(1, int(w * scale))) if scale < 1.0 else (h, w)
    return canvas.shape == (ph + PREVIEW_HEADER_PX, n_panels * (pw + PREVIEW_GAP_PX) - PREVIEW_GAP_PX, 3)


def tile_preview_image(background: np.ndarray, tiles, width: int, height: int, max_px: int = 1600,
                       canvas: np.ndarray | None = None) -> np.ndarray:
    """The tile grid over a slide thumbnail, one panel per resolution (uint8 RGB): outlines
    coloured by tissue fraction (viridis); annotations are not drawn (the tiling step never reads
    them). ``background`` covers the whole slide (``width x height`` level-0 px); ``tiles``: a
    tiles table (pyarrow Table or pandas DataFrame). Drawn with array operations (a slide has thousands of tiles), in place
    in ``canvas`` (:func:`preview_canvas` of ``background``) when it has one panel per resolution."""
    from PIL import Image, ImageDraw

    cols = _preview_columns(tiles)
    mpps = list(dict.fromkeys(cols["target_mpp"].tolist())) or [None]
    if canvas is None or not canvas.flags.c_contiguous or not _has_panels(canvas, len(mpps), background, max_px):
        canvas = preview_canvas(background, len(mpps), max_px)
    out = canvas
    gap, header_h = PREVIEW_GAP_PX, PREVIEW_HEADER_PX
    ph = out.shape[0] - header_h
    pw = (out.shape[1] + gap) // len(mpps) - gap
    sx, sy = pw / max(width, 1), ph / max(height, 1)
    for k, mpp in enumerate(mpps):
        left = k * (pw + gap)
        sel = np.ones(len(cols["x"]), bool) if mpp is None else cols["target_mpp"] == mpp
        n_sel = int(sel.sum())
        if n_sel:
            x, y, size0 = cols["x"][sel], cols["y"][sel], cols["size0"][sel]
            x0 = (x * sx).astype(np.int64)
            y0 = (y * sy).astype(np.int64)
            x1 = np.maximum(((x + size0) * sx).astype(np.int64) - 1, x0)
            y1 = np.maximum(((y + size0) * sy).astype(np.int64) - 1, y0)
            colours = viridis(cols["tissue_fraction"][sel]).astype(np.uint8)
            rows, cc, box = _outline_pixels(x0, y0, x1, y1)
            inside = (rows >= 0) & (rows < ph) & (cc >= 0) & (cc < pw)
            if not inside.all():
                rows, cc, box = rows[inside], cc[inside], box[inside]
            # one flat assignment of 3-byte pixels (out is contiguous): ~2x faster than a 2-D
            # fancy index of RGB rows; a later box still overwrites an earlier one's edge
            at = (rows.astype(np.intp) + header_h) * out.shape[1] + cc + left
            out.reshape(-1).view("V3")[at] = colours.reshape(-1).view("V3")[box]
        # PIL's default font is ASCII only: "um/px"
        label = ("no tiles" if mpp is None else
                 f"{mpp:g} um/px: {n_sel} tiles (outline: tissue fraction, viridis)")
        header = Image.new("RGB", (pw, header_h), (255, 255, 255))
        ImageDraw.Draw(header).text((4, 3), label, fill=(0, 0, 0))
        out[:header_h, left:left + pw] = np.asarray(header)
    return out


def _read_overlay(overlay_jpg) -> np.ndarray | None:
    from PIL import Image

    if not overlay_jpg or not Path(overlay_jpg).exists():
        return None
    with Image.open(overlay_jpg) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _read_overlay_or_none(overlay_jpg) -> np.ndarray | None:
    """:func:`_read_overlay`, None when unreadable: decided later, once the slide's status is
    known (a skipped slide's preview ignores it; an ok slide's preview reads it again and fails)."""
    try:
        return _read_overlay(overlay_jpg)
    except OSError:
        return None


def write_tile_preview(slide_json, tiles, overlay_jpg, out_path, max_px: int = 1600,
                       background: np.ndarray | None = None, canvas: np.ndarray | None = None) -> None:
    """The tile grid drawn over the tissue overlay (for the report and for a quick look at what
    will be extracted). ``tiles``: the tiles Parquet's path, or the table itself. A skipped slide
    gets a small blank image. ``background``: the overlay, when the caller has read it already;
    ``canvas``: its :func:`preview_canvas`, drawn on in place."""
    from PIL import Image

    meta = read_json(slide_json)
    if isinstance(tiles, (str, os.PathLike)):
        import pyarrow.parquet as pq

        tiles = pq.read_table(tiles)
    width, height = int(meta.get("width") or 0), int(meta.get("height") or 0)
    if meta.get("status") != "ok" or not width or not height:
        background = canvas = None
    elif background is None:
        background, canvas = _read_overlay(overlay_jpg), None
    if background is None:
        background = np.full((256, 256, 3), 255, np.uint8)
        width = width or 256
        height = height or 256
    image = tile_preview_image(background, tiles, width, height, max_px, canvas=canvas)
    with atomic_path(out_path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=90)
    log.info("slide %s: tile preview %s (%d x %d px)", meta.get("slide_id"), out_path, image.shape[1], image.shape[0])


