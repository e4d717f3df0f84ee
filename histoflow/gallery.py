"""A bounded selection of per-slide figures for the Snakemake report.

A report with one heatmap per slide and source grows with the cohort (~200 kB a heatmap: 500
slides x 2 sources is 200 MB of page). The report shows the heatmaps of the first
``heatmaps.report_slides`` slides of the sheet instead, copied into one folder per source that
the report lists file by file; every heatmap stays on disk in ``heatmaps/{source}/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .io import safe_remove


def copy_gallery(paths: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Copy ``paths`` (``<slide_id>.png`` files) into ``out_dir``, which appears complete or not
    at all (written beside it, then renamed). Returns the copies."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    safe_remove(tmp, out.parent)                   # a previous attempt's leftovers (our own folder)
    tmp.mkdir(parents=True)
    for path in paths:
        shutil.copyfile(path, tmp / Path(path).name)
    safe_remove(out, out.parent)
    os.replace(tmp, out)
    return sorted(out.iterdir())
