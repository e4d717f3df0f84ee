"""`histoflow slurm-check` (and `make install-profile`): a rule or group job asking for more CPUs
or memory than the largest node would sit PENDING for ever on SLURM (reason PartitionConfig), so
it is named before submission, with the fix. sinfo is faked on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from histoflow.slurm_check import check, largest_node

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_sinfo(tmp_path, monkeypatch):
    """Put a `sinfo` on PATH that lists the given nodes ("CPUS MEM_MB" lines) and records its args."""
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def make(*nodes: str) -> Path:
        script = bindir / "sinfo"
        body = "".join(f'echo "{n}"\n' for n in nodes)
        script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/sinfo.args"\n{body}')
        script.chmod(0o755)
        return script

    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return make


def profile(tmp_path: Path, **over) -> Path:
    folder = tmp_path / "slurm"
    shutil.copytree(REPO / "profiles" / "slurm", folder)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg.update(over)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_sinfo_output_is_parsed_to_the_largest_node(fake_sinfo, tmp_path):
    fake_sinfo("4 15000", "16+ 64000+", "8 32000")
    assert largest_node(partition="cpu") == (16, 64000)
    assert (tmp_path / "sinfo.args").read_text().split() == ["-h", "-N", "-o", "%c", "%m", "-p", "cpu"]


def test_a_group_job_wider_than_every_node_is_named_with_its_fix(fake_sinfo, tmp_path):
    fake_sinfo("4 64000", "2 64000")
    warnings = check(profile(tmp_path, cores=8))
    group = [w for w in warnings if w.startswith("group per_slide") and "CPUs" in w]
    assert group, warnings
    assert "8 CPUs" in group[0] and "has 4" in group[0] and "PartitionConfig" in group[0]
    assert "cores: 4" in group[0]
    # with cores: 4 the group job asks for 4 CPUs and fits
    assert not [w for w in check(profile(tmp_path / "b", cores=4)) if "CPUs" in w]


def test_a_rule_with_more_threads_or_memory_than_any_node_is_named(fake_sinfo, tmp_path):
    fake_sinfo("8 12000")
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["mil"]["threads"], cfg["mil"]["mem_mb"] = 16, 8000
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    warnings = check(profile(tmp_path, cores=32), configfiles=[str(tmp_path / "cfg.yaml")])
    assert any(w.startswith("rule train_mil asks for 16 CPUs") for w in warnings), warnings
    assert not any(w.startswith("rule train_mil asks for") and "MB" in w for w in warnings)
    assert any(w.startswith("rule extract_features asks for 16000 MB") for w in warnings), warnings


def test_everything_fits_on_a_big_node(fake_sinfo, tmp_path):
    fake_sinfo("64 512000")
    assert check(profile(tmp_path)) == []


def test_install_profile_warns(fake_sinfo, tmp_path):
    fake_sinfo("2 512000")
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    proc = subprocess.run(["make", "-s", "install-profile", f"HISTOFLOW={sys.executable} -m histoflow.cli"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / ".config" / "snakemake" / "slurm" / "config.yaml").is_file()
    assert "WARNING group per_slide asks for 8 CPUs" in proc.stderr, proc.stderr
