"""A slide id can never reach outside its folder, and no delete can leave the output folder."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from histoflow.config import validate_samples
from histoflow.errors import InputError
from histoflow.io import OUTDIR_ENV, safe_remove


def frame(*slide_ids: str) -> pd.DataFrame:
    return pd.DataFrame([{"slide_id": s, "patient_id": f"p{i}", "label": "tumor", "source": "https://example.org/a.svs"}
                         for i, s in enumerate(slide_ids)])


@pytest.mark.parametrize("bad", [".", "..", ".hidden", "x" * 201])
def test_sheet_refuses_a_slide_id_that_is_not_a_plain_file_name(bad):
    with pytest.raises(InputError) as err:
        validate_samples(frame("ok1", bad), "samples.tsv", check_local_files=False)
    msg = str(err.value)
    assert "\n" not in msg and "row 2" in msg and "slide_id" in msg
    assert "plain file name" in msg and "200 characters" in msg


def test_sheet_accepts_plain_ids_up_to_200_characters():
    ids = ["S1", "a.b_c-d", "x" * 200, "1..2", "-dash"]
    assert list(validate_samples(frame(*ids), check_local_files=False).index) == ids


def test_wildcard_constraint_is_the_sheet_pattern(repo_root):
    import re

    from histoflow.config import SLIDE_ID_PATTERN, load_schema

    assert load_schema("samples")["properties"]["slide_id"]["pattern"] == f"^{SLIDE_ID_PATTERN}$"
    common = (repo_root / "workflow" / "rules" / "common.smk").read_text()
    assert re.search(r"slide_id=SLIDE_ID_PATTERN", common)


def test_safe_remove_refuses_paths_outside_the_root(tmp_path):
    outdir, victim = tmp_path / "results", tmp_path / "precious"
    (outdir / "tile_images" / "s1").mkdir(parents=True)
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    for bad in [outdir, outdir / "tile_images" / "..", outdir / "..", victim, outdir / ".." / "precious"]:
        with pytest.raises(ValueError):
            safe_remove(bad, outdir)
    link = outdir / "link"   # a link inside is removed, never its target
    os.symlink(victim, link)
    assert safe_remove(link, outdir) and not link.exists() and (victim / "keep.txt").exists()
    os.symlink(victim, outdir / "via")   # a path through a link that leaves the root is refused
    with pytest.raises(ValueError):
        safe_remove(outdir / "via" / "keep.txt", outdir)
    assert safe_remove(outdir / "tile_images" / "s1", outdir) and not (outdir / "tile_images" / "s1").exists()
    assert (victim / "keep.txt").exists() and outdir.is_dir()


def test_safe_remove_in_a_job_never_leaves_the_output_folder(tmp_path, monkeypatch):
    outdir, victim = tmp_path / "results", tmp_path / "precious"
    outdir.mkdir()
    (victim / "sub").mkdir(parents=True)
    monkeypatch.setenv(OUTDIR_ENV, str(outdir))
    with pytest.raises(ValueError):
        safe_remove(victim / "sub", victim)   # the caller's root is not enough outside the outdir
    assert (victim / "sub").is_dir()


def _tiling_inputs(tmp_path):
    from test_tiling import run_tiling

    out, _ = run_tiling(tmp_path, np.ones((4, 4), bool), 1000, 1000, {"mpp": [0.5]}, status="skipped")
    return tmp_path / "s1.slide.json", out


@pytest.mark.parametrize("crafted, in_job_only", [("tile_images/..", False), ("tile_images/../..", False),
                                                  ("../precious", True)])
def test_export_tile_images_with_a_crafted_folder_deletes_nothing(tmp_path, monkeypatch, crafted, in_job_only):
    from histoflow.tiling import export_tile_images

    outdir = tmp_path / "results"
    (outdir / "tile_images").mkdir(parents=True)
    (outdir / "keep.txt").write_text("results")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("other")
    slide_json, tiles = _tiling_inputs(outdir)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    # a library call (a '..' name is refused), and a workflow job (common.smk sets the env: nothing
    # outside the output folder)
    for env in ((str(outdir),) if in_job_only else (None, str(outdir))):
        if env:
            monkeypatch.setenv(OUTDIR_ENV, env)
        with pytest.raises(InputError) as err:
            export_tile_images(slide_json, tiles, outdir / crafted, "png")
        assert "\n" not in str(err.value)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_export_tile_images_in_a_job_refuses_a_folder_outside_the_outdir(tmp_path, monkeypatch):
    from histoflow.tiling import export_tile_images

    outdir = tmp_path / "results"
    outdir.mkdir()
    slide_json, tiles = _tiling_inputs(outdir)
    victim = tmp_path / "elsewhere" / "s1"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("x")
    monkeypatch.setenv(OUTDIR_ENV, str(outdir))
    with pytest.raises(InputError):
        export_tile_images(slide_json, tiles, victim, "png")
    assert (victim / "keep.txt").read_text() == "x"
    # inside the output folder it still replaces the slide's folder
    folder = outdir / "tile_images" / "s1"
    folder.mkdir(parents=True)
    (folder / "old.png").write_bytes(b"")
    assert export_tile_images(slide_json, tiles, folder, "png") == 0 and not (folder / "old.png").exists()


def test_every_delete_goes_through_safe_remove(repo_root):
    import re

    calls = re.compile(r"\brmtree\(|\.unlink\(|os\.remove\(|\.rmdir\(|os\.rmdir\(|os\.removedirs\(")
    offenders = []
    for folder in ("histoflow", "workflow/scripts"):
        for path in sorted((repo_root / folder).rglob("*.py")):
            if path.relative_to(repo_root).as_posix() == "histoflow/io.py":
                continue
            offenders += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if calls.search(line)]
    assert offenders == []
