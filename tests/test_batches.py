"""Slide batches (config `slides_per_job`): how a big cohort is cut into jobs, and what a batch job
promises a user: every slide gets the files a per-slide job would write, a rerun redoes only the
slides whose inputs, settings or outputs changed, and a failure keeps the slides already done."""

from __future__ import annotations

import re

import json
import subprocess
import sys
from pathlib import Path

import pytest

from histoflow import slide_jobs
from histoflow.batches import AUTO_BATCHES, AUTO_PER_SLIDE_MAX, run_slide_batch, slide_batches, slides_per_job
from histoflow.errors import HistoflowError, InputError
from histoflow.slide_jobs import SLIDE_STEPS, SlideJob


def test_auto_keeps_a_job_per_slide_for_small_cohorts_and_batches_big_ones():
    assert slides_per_job("auto", 16) == 1
    assert slides_per_job("auto", AUTO_PER_SLIDE_MAX) == 1
    assert slides_per_job("auto", 10_000) == 10_000 // AUTO_BATCHES == 40
    assert len(slide_batches([f"s{i}" for i in range(10_000)], slides_per_job("auto", 10_000))) == AUTO_BATCHES
    assert slides_per_job(7, 10) == 7
    for bad in (0, -1, "many", 2.5, True):
        with pytest.raises(InputError, match="slides_per_job"):
            slides_per_job(bad, 10)


def test_batches_cover_every_slide_once_in_sheet_order_and_appending_keeps_earlier_batches():
    slides = [f"s{i:03d}" for i in range(10)]
    batches = slide_batches(slides, 4)
    assert list(batches) == ["b00000", "b00001", "b00002"]
    assert [s for members in batches.values() for s in members] == slides
    assert batches["b00002"] == ["s008", "s009"]
    grown = slide_batches(slides + ["s010", "s011", "s012"], 4)
    assert grown["b00000"] == batches["b00000"] and grown["b00001"] == batches["b00001"]


@pytest.fixture
def echo_step(monkeypatch):
    """A step that writes its input's text plus a param to its output, and counts its calls."""
    calls: list[str] = []

    def echo(job: SlideJob) -> None:
        if job.params.get("fail_on") == job.slide_id:
            raise RuntimeError(f"broken slide {job.slide_id}")
        calls.append(job.slide_id)
        text = Path(job.input["source"]).read_text() + job.params["suffix"]
        Path(job.output["result"]).write_text(text)

    monkeypatch.setitem(SLIDE_STEPS, "echo", echo)
    return calls


def _jobs(tmp_path: Path, slides: list[str], suffix: str = "!", fail_on: str | None = None) -> list[dict]:
    jobs = []
    for slide in slides:
        source = tmp_path / "in" / f"{slide}.txt"
        if not source.exists():
            source.parent.mkdir(exist_ok=True)
            source.write_text(slide)
        jobs.append({"wildcards": {"slide_id": slide}, "input": {"source": str(source)},
                     "output": {"result": str(tmp_path / "out" / f"{slide}.txt")},
                     "params": {"suffix": suffix, "fail_on": fail_on}, "log": str(tmp_path / "logs" / f"{slide}.log")})
    (tmp_path / "out").mkdir(exist_ok=True)
    return jobs


def test_a_batch_writes_every_slides_outputs_and_a_manifest(tmp_path, echo_step):
    manifest = tmp_path / "batches" / "echo" / "b00000.json"
    run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c"]), manifest, tmp_path / "batch.log")
    assert [(tmp_path / "out" / f"{s}.txt").read_text() for s in "abc"] == ["a!", "b!", "c!"]
    record = json.loads(manifest.read_text())
    assert [s["slide_id"] for s in record["slides"]] == ["a", "b", "c"]
    assert not any(s["reused"] for s in record["slides"])
    assert "c: done" in (tmp_path / "batch.log").read_text()


def test_a_rerun_redoes_only_slides_whose_input_settings_or_output_changed(tmp_path, echo_step):
    manifest = tmp_path / "batches" / "echo" / "b00000.json"
    run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    echo_step.clear()
    run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    assert echo_step == []                                       # nothing changed: all reused
    assert all(s["reused"] for s in json.loads(manifest.read_text())["slides"])

    (tmp_path / "in" / "b.txt").write_text("b, rescanned")       # a new input file
    (tmp_path / "out" / "c.txt").unlink()                        # an output deleted by hand
    run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    assert echo_step == ["b", "c"]
    assert (tmp_path / "out" / "b.txt").read_text() == "b, rescanned!"

    echo_step.clear()
    run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c", "d"], suffix="?"), manifest)
    assert echo_step == ["a", "b", "c", "d"]                     # new settings: every slide


def test_a_failing_slide_fails_the_batch_after_the_others_and_the_rerun_redoes_only_it(tmp_path, echo_step):
    manifest = tmp_path / "batches" / "echo" / "b00000.json"
    with pytest.raises(HistoflowError, match=r"1 of 4 slides failed in batch b00000 of echo: c \(log: .*"
                                             r"first error: broken slide c"):
        run_slide_batch("echo", _jobs(tmp_path, ["a", "b", "c", "d"], fail_on="c"), manifest, tmp_path / "batch.log")
    assert not manifest.exists()                 # the batch is not complete, so not marked done
    assert echo_step == ["a", "b", "d"]          # the slides after the broken one still ran
    assert "c: FAILED (broken slide c" in (tmp_path / "batch.log").read_text()
    echo_step.clear()
    jobs = _jobs(tmp_path, ["a", "b", "c", "d"], fail_on="c")
    for job in jobs:                             # the fix changes slide c's job only
        job["params"]["fail_on"] = None if job["wildcards"]["slide_id"] == "c" else "c"
    run_slide_batch("echo", jobs, manifest)
    assert echo_step == ["c"]
    assert manifest.exists()


def test_a_slide_failing_with_a_reason_names_it_in_the_batch_error(tmp_path, monkeypatch):
    """A HistoflowError (bad input a user can fix) keeps its one-line reason up to the terminal."""
    def picky(job: SlideJob) -> None:
        raise InputError(f"slide {job.slide_id!r} has no µm/px; set the sheet's mpp column")

    monkeypatch.setitem(SLIDE_STEPS, "picky", picky)
    with pytest.raises(HistoflowError, match=r"first error: slide 'a' has no µm/px; set the sheet's mpp column"):
        run_slide_batch("picky", _jobs(tmp_path, ["a"]), tmp_path / "m" / "b00000.json")
    assert "has no µm/px" in (tmp_path / "logs" / "a.log").read_text()     # with its traceback


def test_a_step_that_writes_no_output_fails_its_slide(tmp_path, monkeypatch):
    monkeypatch.setitem(SLIDE_STEPS, "lazy", lambda job: None)
    with pytest.raises(HistoflowError, match="1 of 1 slides failed"):
        run_slide_batch("lazy", _jobs(tmp_path, ["a"]), tmp_path / "m" / "b00000.json", tmp_path / "batch.log")
    assert "did not write" in (tmp_path / "batch.log").read_text()
    assert not (tmp_path / "m" / "done" / "a.json").exists()


def test_a_redone_slide_starts_from_a_clean_log_and_no_stale_output(tmp_path, echo_step):
    manifest = tmp_path / "m" / "b00000.json"
    jobs = _jobs(tmp_path, ["a"])
    Path(jobs[0]["log"]).parent.mkdir(parents=True, exist_ok=True)
    Path(jobs[0]["log"]).write_text("an old failure\n")
    run_slide_batch("echo", jobs, manifest)
    assert "an old failure" not in Path(jobs[0]["log"]).read_text()


def test_each_slide_logs_to_its_own_file_as_in_a_per_slide_job(tmp_path, monkeypatch):
    def talk(job: SlideJob) -> None:
        import logging

        logging.getLogger("histoflow.test").info("working on %s", job.slide_id)
        Path(job.output["result"]).write_text("ok")

    monkeypatch.setitem(SLIDE_STEPS, "talk", talk)
    run_slide_batch("talk", _jobs(tmp_path, ["a", "b"]), tmp_path / "m" / "b00000.json")
    assert "working on a" in (tmp_path / "logs" / "a.log").read_text()
    assert "working on a" not in (tmp_path / "logs" / "b.log").read_text()


def test_every_per_slide_rule_has_a_step_and_its_script_runs_it():
    """Per-slide rules and their batch twins run the same step (histoflow.slide_jobs)."""
    rules_dir = Path(__file__).resolve().parent.parent / "workflow" / "rules"
    # rule name -> its script (named after the stage: tile_slide runs scripts/tiling.py)
    script_of = {m.group(1): rules_dir / m.group(2) for smk in rules_dir.glob("*.smk")
                 for m in re.finditer(r'^rule (\w+):\n(?:    .*\n|\n)*?    script:\n        "([^"]+)"',
                                      smk.read_text(), flags=re.M)}
    for rule in SLIDE_STEPS:
        if rule in ("echo", "talk", "lazy", "picky"):
            continue
        assert f'run_slide_job("{rule}", snakemake)' in script_of[rule].resolve().read_text(), rule
    assert set(SLIDE_STEPS) >= {"download_slide", "qc_slide", "detect_tissue", "tile_slide", "export_tile_images",
                                "extract_features", "patch_labels", "heatmap", "detect_lesions"}
    assert slide_jobs.SLIDE_STEPS is SLIDE_STEPS


def test_a_step_imports_what_it_declares_before_it_starts():
    """A rule's process imports its stack first (start-up, paid once per batch job)."""
    code = ("import gc, sys\n"
            "from histoflow.slide_jobs import STEP_IMPORTS, prepare_step\n"
            "prepare_step('detect_tissue')\n"
            "assert all(m in sys.modules for m in STEP_IMPORTS['detect_tissue'])\n"
            "assert set(STEP_IMPORTS) <= set(__import__('histoflow.slide_jobs').slide_jobs.SLIDE_STEPS)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
