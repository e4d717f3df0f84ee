"""The OpenSlide backend (openslide-bin 4.x: SVS, TIFF, NDPI, MRXS, DICOM WSI, ...), as
TRIDENT's OpenSlideWSI. The handle opens lazily: a step that only needs the metadata (given
by the slide's QC record) or pixels another backend serves never pays for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import SlideError
from .base import SlideReader


def _open_openslide(path: Path, slide_id: str):
    """An ``openslide.OpenSlide``, every failure a one-line SlideError."""
    import openslide

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


def detect_vendor(path: str | os.PathLike) -> str | None:
    """OpenSlide's vendor name for a file without opening it as a slide (None: not a slide)."""
    import openslide

    return openslide.OpenSlide.detect_format(str(path))


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide. ``record``: the slide's QC record (slides/{id}.json);
    when given, the metadata come from it and OpenSlide opens on the first pixel read."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike, slide_id: str = "?", colour_fix: str | None = None,
                 record: Mapping[str, Any] | None = None):
        super().__init__(path, slide_id, colour_fix)
        self._slide = None
        if record and record.get("level_dimensions"):
            self.level_dimensions = [tuple(int(v) for v in d) for d in record["level_dimensions"]]
            self.level_downsamples = [float(d) for d in record["level_downsamples"]]
            self.vendor = record.get("vendor")
            self.associated_image_names = list(record.get("associated_images") or [])
            self._props = None
        else:
            slide = self.handle           # opens, or raises a one-line SlideError
            self.level_dimensions = [tuple(int(v) for v in d) for d in slide.level_dimensions]
            self.level_downsamples = [float(d) for d in slide.level_downsamples]
            self._props = dict(slide.properties)
            self.vendor = self._props.get("openslide.vendor") or detect_vendor(self.path)
            self.associated_image_names = sorted(slide.associated_images.keys())   # names only

    @property
    def handle(self):
        if self._slide is None:
            self._slide = _open_openslide(Path(self.path), self.slide_id)
        return self._slide

    @property
    def properties(self) -> Mapping[str, str]:
        if self._props is None:
            self._props = dict(self.handle.properties)
        return self._props

    def _read_rgba(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return np.asarray(self.handle.read_region((x, y), level, (w, h)))

    def __getstate__(self):
        # a reader sent to a spawned worker travels without its handles (reopened there)
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def reset(self) -> None:
        # an OpenSlide handle is unusable after a read error, and a forked worker must not
        # share its parent's: (re)open lazily on the next read
        slide, self._slide = self._slide, None
        if slide is not None:
            try:
                slide.close()
            except Exception:  # noqa: BLE001 - the handle is already broken
                pass
