"""Running the workflow from a test: one `snakemake` call and one `check`, shared by the DAG
tests (tests/test_workflow_*.py), so each runs Snakemake the same way: the venv's executables
first on PATH, a fixed hash seed (reruns identical), from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def workflow_env() -> dict[str, str]:
    """The environment a workflow run (or `histoflow report`) gets in tests."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")


def snakemake(args: list[str], configs: list[Path], timeout: int = 1500) -> subprocess.CompletedProcess:
    """`snakemake --cores 2 <args> --configfile config.yaml <configs>` (args: targets and flags)."""
    exe = BIN / "snakemake"
    cmd = [str(exe) if exe.exists() else "snakemake", "--cores", "2", *args,
           "--configfile", "config.yaml", *map(str, configs)]
    return subprocess.run(cmd, cwd=REPO, env=workflow_env(), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> None:
    """The run succeeded; otherwise the failure shows the tails of its output and its errors."""
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
