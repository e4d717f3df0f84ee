"""One slide's step outside its own job: a batch job (`slides_per_job` > 1, `histoflow.batches`)
runs the per-slide rule's own script for each of its slides (`run_slide_script`), with the
inputs, outputs and params the per-slide rule would give it (`SlideJob`), so a slide's outputs do
not depend on how the cohort was cut into jobs and the step lives in the stage's script alone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# every script's log_to (stdlib only): loaded with this module, not inside a step's timing
from . import logs as _logs  # noqa: F401


@dataclass(frozen=True)
class SlideJob:
    """What a rule gives one slide's step: named inputs, outputs and params, as plain values
    (a path, or a list of paths for list inputs), the wildcards, the log file and the threads."""

    wildcards: dict[str, str]
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    threads: int = 1

    @property
    def slide_id(self) -> str:
        return self.wildcards["slide_id"]


class _Named(SimpleNamespace):
    """A rule's named inputs/outputs/params/wildcards as a script reads them (``snakemake.input.slide``)."""

    def items(self):
        return vars(self).items()


def as_snakemake(job: SlideJob) -> SimpleNamespace:
    """The ``snakemake`` object a per-slide rule's script gets, rebuilt from a batch's `SlideJob`
    (named items only: a batch twin refuses rules with unnamed ones, common.smk)."""
    return SimpleNamespace(wildcards=_Named(**job.wildcards), input=_Named(**job.input),
                           output=_Named(**job.output), params=_Named(**job.params),
                           log=[job.log] if job.log else [], threads=job.threads)


@functools.lru_cache(maxsize=None)
def _compiled(script: str):
    return compile(Path(script).read_text(), script, "exec")


def run_slide_script(script: str | os.PathLike, snakemake) -> None:
    """Run a per-slide rule's script (workflow/scripts/<stage>.py) for one slide, in this process,
    with ``snakemake`` (Snakemake's object, or `as_snakemake` of a batch's job). The script is the
    slide's step: a batch job runs it for each of its slides, so the outputs do not depend on how
    the cohort was cut into jobs, and a new per-slide stage writes no step function anywhere."""
    exec(_compiled(str(script)), {"__name__": "__main__", "__file__": str(script), "snakemake": snakemake})


# What a step imports before it starts, per rule: the import is then the process's start-up (paid
# once per batch job, before the first slide). benchmarks/ingest.py times the steps the same way.
STEP_IMPORTS: dict[str, tuple[str, ...]] = {
    "qc_slide": ("histoflow.slide_qc", "histoflow.wsi", "openslide", "PIL.Image"),
    # a JPEG-tiled TIFF's level is indexed by tifffile and decoded by OpenCV; OpenSlide (and its
    # progress bar; other formats) is imported when a slide needs it
    "detect_tissue": ("histoflow.tissue", "histoflow.wsi", "tifffile", "histoflow.geojson", "cv2", "shapely",
                      "concurrent.futures"),
    # PIL.Image.open loads the Bmp/Gif/Jpeg/Ppm/Png plugins on its first call; the tile sample
    # draws from numpy.random
    "tile_slide": ("histoflow.tiling", "PIL.Image", "PIL.ImageDraw", "PIL.BmpImagePlugin", "PIL.GifImagePlugin",
                   "PIL.JpegImagePlugin", "PIL.PpmImagePlugin", "PIL.PngImagePlugin", "numpy.random",
                   "pyarrow", "pyarrow.parquet", "histoflow.wsi", "concurrent.futures"),
}


_PREPARED: set[str] = set()


def prepare_step(rule: str) -> None:
    """Import what step ``rule`` needs: the set-up of a rule's process before its first slide. Once
    per rule and process: a batch job calls it for every slide."""
    import importlib

    if rule in _PREPARED:
        return
    for module in STEP_IMPORTS.get(rule, ()):
        importlib.import_module(module)
    _PREPARED.add(rule)
