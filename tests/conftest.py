"""Shared test fixtures. Tests read as specifications of what users rely on."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTOFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real slides beside the project (developers and CI have them, users do not)."""
    if not (SHARED_DATA / "slides").is_dir():
        pytest.skip(f"real test slides not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def snakemake_exe() -> str:
    exe = BIN / "snakemake"
    return str(exe) if exe.exists() else (shutil.which("snakemake") or "snakemake")


OPENSLIDE_SDIST = "openslide-python==1.4.7"


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """The real (tiny) slides in openslide-python's sdist `tests/fixtures/`: small.svs, boxes.tiff,
    boxes_0.dcm, and the broken unreadable.svs / unopenable.tiff. Downloaded once with pip into
    ~/.cache/histoflow-test (env HISTOFLOW_TEST_CACHE overrides); skipped when pip cannot reach PyPI."""
    import subprocess
    import tarfile
    import tempfile

    cache = Path(os.environ.get("HISTOFLOW_TEST_CACHE", Path.home() / ".cache" / "histoflow-test"))
    dest = cache / "openslide-python-1.4.7-fixtures"
    if (dest / "small.svs").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   "--disable-pip-version-check", "-q", OPENSLIDE_SDIST, "-d", tmp],
                                  capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"cannot run pip download {OPENSLIDE_SDIST}: {err}")
        archives = list(Path(tmp).glob("openslide*python-1.4.7.tar.gz"))
        if proc.returncode != 0 or not archives:
            pytest.skip(f"pip download {OPENSLIDE_SDIST} failed (no registry?): {proc.stderr.strip()[-200:]}")
        staging = Path(tmp) / "fixtures"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 4 and parts[1:3] == ("tests", "fixtures"):
                    with tar.extractfile(member) as src:
                        (staging / parts[3]).write_bytes(src.read())
        if not (staging / "small.svs").is_file():
            pytest.skip(f"{archives[0].name} has no tests/fixtures/small.svs")
        try:
            staging.rename(dest)  # atomic: parallel test sessions never see a half-extracted folder
        except OSError:
            if not (dest / "small.svs").is_file():
                raise
    return dest
