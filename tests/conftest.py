"""Shared test fixtures. Tests read as specifications of what users rely on."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTOFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent
# the weight-checksum cache (histoflow.encoders.checksum_cache_dir): a fresh one per test session,
# inherited by the workflow runs tests start, never the user's ~/.cache
os.environ.setdefault("HISTOFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="histoflow-test-cache-"))


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


OPENSLIDE_FIXTURES = REPO / "tests" / "data" / "openslide-python-1.4.7-fixtures"


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """The real (tiny) slides of openslide-python 1.4.7's sdist `tests/fixtures/`: small.svs,
    boxes.tiff, boxes_0.dcm, boxes_1.dcm, and the broken unreadable.svs / unopenable.tiff.
    Vendored in tests/data/ (LGPL-2.1, see the README there): tests never reach the network."""
    return OPENSLIDE_FIXTURES
