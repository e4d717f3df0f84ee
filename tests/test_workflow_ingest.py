"""End to end: a small demo cohort through download -> slide_qc -> tissue -> tiles with Snakemake."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from workflow_run import check, snakemake

pytestmark = pytest.mark.e2e

TILE_COLUMNS = ["slide_id", "x", "y", "read_level", "read_w", "read_h", "target_mpp", "tile_px",
                "tissue_fraction", "col", "row", "size0"]


def run_snakemake(targets: list[str], configfile: Path, *extra: str, timeout: int = 900):
    """The workflow on ``targets`` with the shared run (tests/workflow_run.py)."""
    return snakemake([*targets, *extra], [configfile], timeout=timeout)


def write_config(path: Path, samples: Path, outdir: Path, **over) -> Path:
    cfg = {"samples": str(samples), "outdir": str(outdir),
           "tiling": {"mpp": [0.5, 2.0], "tile_px": 128, "min_tissue_fraction": 0.5}}
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    demo = pytest.importorskip("histoflow.demo", reason="histoflow.demo (demo cohort generator) not built yet")
    for module in ("download", "slide_qc", "tissue"):
        pytest.importorskip(f"histoflow.{module}", reason=f"histoflow.{module} not built yet")
    root = tmp_path_factory.mktemp("ingest")
    sheet = Path(demo.make_demo_cohort(root / "demo", 3, 11, small=True))
    return root, sheet


@pytest.fixture(scope="module")
def tiled(cohort):
    root, sheet = cohort
    outdir = root / "results"
    configfile = write_config(root / "e2e.yaml", sheet, outdir)
    proc = run_snakemake(["tiles"], configfile)
    check(proc)
    return outdir, sheet, configfile


def test_every_slide_gets_a_tile_table_with_tiles_and_the_schema(tiled):
    outdir, sheet, _ = tiled
    slides = pd.read_csv(sheet, sep="\t", dtype=str)["slide_id"].tolist()
    assert len(slides) >= 3
    for slide_id in slides:
        path = outdir / "tiles" / f"{slide_id}.parquet"
        table = pq.read_table(path)
        assert table.schema.names[:len(TILE_COLUMNS)] == TILE_COLUMNS
        frame = table.to_pandas()
        assert len(frame) > 0, f"{slide_id}: no tiles"
        assert set(frame["target_mpp"]) == {0.5, 2.0}
        assert (frame["slide_id"] == slide_id).all() and (frame["tissue_fraction"] >= 0.5).all()
        meta = table.schema.metadata
        assert float(meta[b"histoflow.mpp_x"]) > 0
        slide = pd.read_json(outdir / "slides" / f"{slide_id}.json", typ="series")
        assert (frame["x"] + frame["size0"] <= int(slide["width"])).all()
        assert (frame["y"] + frame["size0"] <= int(slide["height"])).all()
        assert (outdir / "tiles" / f"{slide_id}.preview.jpg").stat().st_size > 0


def test_second_run_has_nothing_to_do(tiled):
    outdir, _, configfile = tiled
    before = {p: p.stat().st_mtime_ns for p in (outdir / "tiles").glob("*.parquet")}
    proc = run_snakemake(["tiles"], configfile)
    check(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert before == {p: p.stat().st_mtime_ns for p in (outdir / "tiles").glob("*.parquet")}


def test_qc_target_writes_the_cohort_table(tiled):
    outdir, sheet, configfile = tiled
    check(run_snakemake(["qc"], configfile))
    qc = pd.read_csv(outdir / "qc" / "slides.tsv", sep="\t")
    slides = pd.read_csv(sheet, sep="\t", dtype=str)["slide_id"].tolist()
    assert sorted(qc["slide_id"]) == sorted(slides)
    assert (qc["status"] == "ok").all()


def test_corrupt_slide_is_skipped_with_a_reason_and_the_rest_goes_on(cohort, tmp_path):
    root, sheet = cohort
    garbage = tmp_path / "broken.tiff"
    garbage.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(20_000))  # a TIFF header, then noise
    frame = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    first = frame.iloc[0]
    broken = {c: "" for c in frame.columns}
    broken.update(slide_id="broken-01", patient_id="patient-broken", label=first["label"], source=str(garbage))
    if "mpp" in frame.columns:
        broken["mpp"] = "0.5"
    frame = pd.concat([frame, pd.DataFrame([broken])], ignore_index=True)
    # sources of the demo rows are relative to the demo folder: keep the sheet there
    bad_sheet = sheet.parent / "samples_with_broken.tsv"
    frame.to_csv(bad_sheet, sep="\t", index=False)
    outdir = tmp_path / "results"
    configfile = write_config(tmp_path / "skip.yaml", bad_sheet, outdir, on_error="skip")
    check(run_snakemake(["qc"], configfile))
    qc = pd.read_csv(outdir / "qc" / "slides.tsv", sep="\t", keep_default_na=False).set_index("slide_id")
    assert qc.loc["broken-01", "status"] == "skipped"
    assert len(str(qc.loc["broken-01", "reason"])) > 0
    assert (qc.drop(index="broken-01")["status"] == "ok").all()
    tiles = pq.read_table(outdir / "tiles" / "broken-01.parquet")
    assert tiles.num_rows == 0 and tiles.schema.names[:len(TILE_COLUMNS)] == TILE_COLUMNS


@pytest.fixture(scope="module")
def batched(cohort, tiled):
    """The same cohort with slides_per_job: 2 (batches of 2 + 1 slides), to `qc`."""
    root, sheet = cohort
    outdir = root / "results_batched"
    configfile = write_config(root / "batched.yaml", sheet, outdir, slides_per_job=2)
    proc = run_snakemake(["qc"], configfile)
    check(proc)
    return outdir, configfile, proc


def test_slide_batches_write_the_same_per_slide_files_as_per_slide_jobs(tiled, batched):
    """Cutting the cohort into batch jobs changes how work is scheduled, never what it computes."""
    per_slide, batch_out = tiled[0], batched[0]
    names = sorted(p.relative_to(per_slide) for p in per_slide.glob("t*/*") if p.is_file())
    assert any(n.suffix == ".parquet" for n in names) and any(n.suffix == ".geojson" for n in names)
    for name in names:
        assert (batch_out / name).read_bytes() == (per_slide / name).read_bytes(), name
    for meta in sorted((per_slide / "slides").glob("*.json")):
        assert (batch_out / "slides" / meta.name).read_text().replace(str(batch_out), "OUT") == \
            meta.read_text().replace(str(per_slide), "OUT"), meta.name


def test_slide_batches_run_one_job_per_batch_and_step(batched):
    _, _, proc = batched
    log = proc.stdout + proc.stderr
    for rule in ("download_slide_batch", "qc_slide_batch", "detect_tissue_batch", "tile_slide_batch"):
        assert re.search(rf"^{rule}\s+2$", log, flags=re.M), rule
    assert not re.search(r"^(qc_slide|detect_tissue|tile_slide)\s+\d+$", log, flags=re.M)


def test_a_deleted_per_slide_file_is_redone_by_its_batch_alone(batched):
    """A batch job reruns when one of its slides' files is gone, and redoes only that slide."""
    outdir, configfile, _ = batched
    keep = {p.name: p.stat().st_mtime_ns for p in (outdir / "tiles").glob("*.parquet")}
    victim = sorted(keep)[0]
    (outdir / "tiles" / victim).unlink()
    proc = run_snakemake(["qc"], configfile)
    check(proc)
    assert re.search(r"^tile_slide_batch\s+1$", proc.stdout + proc.stderr, flags=re.M)
    assert (outdir / "tiles" / victim).is_file()
    again = {p.name: p.stat().st_mtime_ns for p in (outdir / "tiles").glob("*.parquet")}
    assert {n: t for n, t in again.items() if n != victim} == {n: t for n, t in keep.items() if n != victim}
    # the first batch holds the first two slides of the sheet: the victim was redone, its partner reused
    manifest = json.loads((outdir / "batches" / "tile_slide" / "b00000.json").read_text())
    assert [(s["slide_id"], s["reused"]) for s in manifest["slides"]] == [
        (Path(victim).stem, False), (Path(sorted(keep)[1]).stem, True)]
    proc = run_snakemake(["qc"], configfile)
    check(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # and again: a second deletion of the same file is noticed too
    (outdir / "tiles" / victim).unlink()
    check(run_snakemake(["qc"], configfile))
    assert (outdir / "tiles" / victim).is_file()
    proc = run_snakemake(["qc"], configfile)
    check(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_batch_job_never_asks_for_more_time_than_batch_max_runtime(batched):
    """Partitions cap time limits: a batch asks for at most batch_max_runtime minutes (and resumes
    after its last finished slide when it runs out)."""
    _, configfile, _ = batched
    proc = run_snakemake(["qc"], configfile, "-n", "--forceall", "--config", "batch_max_runtime=11")
    check(proc)
    jobs = [(m.group(1), m.group(2)) for block in (proc.stdout + proc.stderr).split("\n\n")
            if (m := re.search(r"rule (\w+_batch):(?s:.*?)runtime=(\d+)", block))]
    assert {rule for rule, _ in jobs} >= {"qc_slide_batch", "detect_tissue_batch", "tile_slide_batch"}
    assert all(int(minutes) <= 11 for _, minutes in jobs) and any(int(m) == 11 for _, m in jobs), jobs
