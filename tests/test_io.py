"""Atomic writes: a killed job leaves only names that the half-written-file check recognises."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from histoflow.io import atomic_path, is_temporary, leftover_temporaries, write_json

KILLED_WRITER = """
import os, signal, sys
from histoflow.io import write_json, atomic_path
write_json(sys.argv[1] + "/done.json", {"ok": True})
with atomic_path(sys.argv[1] + "/sub/features.parquet") as tmp:
    tmp.write_bytes(b"PAR1 half of a table")
    os.kill(os.getpid(), signal.SIGKILL)   # a job killed mid-write (OOM, scancel, node failure)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_check_finds(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "sub" / "features.parquet").exists()   # never renamed into place
    left = leftover_temporaries(tmp_path)
    assert [p.parent.name for p in left] == ["sub"], left
    assert left[0].name.startswith(".features.parquet.") and left[0].name.endswith(".part.parquet")
    # the check the e2e test used before: it never matched the project's own temporary names
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith(".part"))]


@pytest.mark.parametrize("name", ["a.json", "slides.tsv", "P01-part.svs", "mil.part2.json", "report.html"])
def test_finished_outputs_are_not_taken_for_temporaries(tmp_path, name):
    write_json(tmp_path / "x.json", {})
    (tmp_path / name).write_text("x")
    assert not is_temporary(name) and leftover_temporaries(tmp_path) == []


def test_every_temporary_kind_the_project_writes_is_recognised(tmp_path):
    with atomic_path(tmp_path / "slide.json") as tmp:
        assert is_temporary(tmp.name)
    with atomic_path(tmp_path / "mask.png", suffix="") as tmp:
        assert is_temporary(tmp.name)
    folder = Path(tempfile.mkdtemp(prefix=".S1.", suffix=".part", dir=tmp_path))   # tiling's image folders
    assert is_temporary(folder.name)
    assert is_temporary("S1.svs.part") and is_temporary(".partial.json")          # downloads in progress
