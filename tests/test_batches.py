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

from histoflow.batches import AUTO_BATCHES, AUTO_PER_SLIDE_MAX, run_slide_batch, slide_batches, slides_per_job
from histoflow.errors import HistoflowError, InputError


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


def _script(tmp_path: Path, name: str, body: str) -> Path:
    """A per-slide rule's script (as in workflow/scripts/): unpacks `snakemake`, logs to its log."""
    script = tmp_path / "scripts" / f"{name}.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text("from pathlib import Path\nfrom histoflow.logs import first_log, log_to\n\n"
                      "with log_to(first_log(snakemake)):\n" + "".join(f"    {line}\n" for line in body.splitlines()))
    return script


class _Calls:
    """The slides a step ran for (the script appends to a file: it runs in the batch's globals)."""

    def __init__(self, path: Path):
        self.path = path

    def __eq__(self, other):
        return (self.path.read_text().split() if self.path.exists() else []) == other

    def __repr__(self):
        return repr(self.path.read_text().split() if self.path.exists() else [])

    def clear(self):
        self.path.unlink(missing_ok=True)


@pytest.fixture
def echo_step(tmp_path):
    """A script that writes its input's text plus a param to its output, and records its calls."""
    calls = tmp_path / "calls.txt"
    script = _script(tmp_path, "echo", f"""\
if snakemake.params.fail_on == snakemake.wildcards.slide_id:
    raise RuntimeError(f"broken slide {{snakemake.wildcards.slide_id}}")
with open({str(calls)!r}, "a") as calls:
    print(snakemake.wildcards.slide_id, file=calls)
text = Path(snakemake.input.source).read_text() + snakemake.params.suffix
Path(snakemake.output.result).write_text(text)""")
    recorded = _Calls(calls)
    recorded.script = script
    return recorded


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
    run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c"]), manifest, tmp_path / "batch.log")
    assert [(tmp_path / "out" / f"{s}.txt").read_text() for s in "abc"] == ["a!", "b!", "c!"]
    record = json.loads(manifest.read_text())
    assert [s["slide_id"] for s in record["slides"]] == ["a", "b", "c"]
    assert not any(s["reused"] for s in record["slides"])
    assert "c: done" in (tmp_path / "batch.log").read_text()


def test_a_rerun_redoes_only_slides_whose_input_settings_or_output_changed(tmp_path, echo_step):
    manifest = tmp_path / "batches" / "echo" / "b00000.json"
    run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    echo_step.clear()
    run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    assert echo_step == []                                       # nothing changed: all reused
    assert all(s["reused"] for s in json.loads(manifest.read_text())["slides"])

    (tmp_path / "in" / "b.txt").write_text("b, rescanned")       # a new input file
    (tmp_path / "out" / "c.txt").unlink()                        # an output deleted by hand
    run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c", "d"]), manifest)
    assert echo_step == ["b", "c"]
    assert (tmp_path / "out" / "b.txt").read_text() == "b, rescanned!"

    echo_step.clear()
    run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c", "d"], suffix="?"), manifest)
    assert echo_step == ["a", "b", "c", "d"]                     # new settings: every slide


def test_a_failing_slide_fails_the_batch_after_the_others_and_the_rerun_redoes_only_it(tmp_path, echo_step):
    manifest = tmp_path / "batches" / "echo" / "b00000.json"
    with pytest.raises(HistoflowError, match=r"1 of 4 slides failed in batch b00000 of echo: c \(log: .*"
                                             r"first error: broken slide c"):
        run_slide_batch("echo", echo_step.script, _jobs(tmp_path, ["a", "b", "c", "d"], fail_on="c"), manifest, tmp_path / "batch.log")
    assert not manifest.exists()                 # the batch is not complete, so not marked done
    assert echo_step == ["a", "b", "d"]          # the slides after the broken one still ran
    assert "c: FAILED (broken slide c" in (tmp_path / "batch.log").read_text()
    echo_step.clear()
    jobs = _jobs(tmp_path, ["a", "b", "c", "d"], fail_on="c")
    for job in jobs:                             # the fix changes slide c's job only
        job["params"]["fail_on"] = None if job["wildcards"]["slide_id"] == "c" else "c"
    run_slide_batch("echo", echo_step.script, jobs, manifest)
    assert echo_step == ["c"]
    assert manifest.exists()


def test_a_slide_failing_with_a_reason_names_it_in_the_batch_error(tmp_path, monkeypatch):
    """A HistoflowError (bad input a user can fix) keeps its one-line reason up to the terminal."""
    picky = _script(tmp_path, "picky", "from histoflow.errors import InputError\n"
                    "raise InputError(f\"slide {snakemake.wildcards.slide_id!r} has no µm/px; set the sheet's mpp column\")")
    with pytest.raises(HistoflowError, match=r"first error: slide 'a' has no µm/px; set the sheet's mpp column"):
        run_slide_batch("picky", picky, _jobs(tmp_path, ["a"]), tmp_path / "m" / "b00000.json")
    assert "has no µm/px" in (tmp_path / "logs" / "a.log").read_text()     # with its traceback


def test_a_step_that_writes_no_output_fails_its_slide(tmp_path, monkeypatch):
    lazy = _script(tmp_path, "lazy", "pass")
    with pytest.raises(HistoflowError, match="1 of 1 slides failed"):
        run_slide_batch("lazy", lazy, _jobs(tmp_path, ["a"]), tmp_path / "m" / "b00000.json", tmp_path / "batch.log")
    assert "did not write" in (tmp_path / "batch.log").read_text()
    assert not (tmp_path / "m" / "done" / "a.json").exists()


def test_a_redone_slide_starts_from_a_clean_log_and_no_stale_output(tmp_path, echo_step):
    manifest = tmp_path / "m" / "b00000.json"
    jobs = _jobs(tmp_path, ["a"])
    Path(jobs[0]["log"]).parent.mkdir(parents=True, exist_ok=True)
    Path(jobs[0]["log"]).write_text("an old failure\n")
    run_slide_batch("echo", echo_step.script, jobs, manifest)
    assert "an old failure" not in Path(jobs[0]["log"]).read_text()


def test_each_slide_logs_to_its_own_file_as_in_a_per_slide_job(tmp_path, monkeypatch):
    talk = _script(tmp_path, "talk", "import logging\n"
                   "logging.getLogger('histoflow.test').info('working on %s', snakemake.wildcards.slide_id)\n"
                   "Path(snakemake.output.result).write_text('ok')")
    run_slide_batch("talk", talk, _jobs(tmp_path, ["a", "b"]), tmp_path / "m" / "b00000.json")
    assert "working on a" in (tmp_path / "logs" / "a.log").read_text()
    assert "working on a" not in (tmp_path / "logs" / "b.log").read_text()


def test_a_step_imports_what_it_declares_before_it_starts():
    """A rule's process imports its stack first (start-up, paid once per batch job)."""
    code = ("import gc, sys\n"
            "from histoflow.slide_jobs import STEP_IMPORTS, prepare_step\n"
            "prepare_step('detect_tissue')\n"
            "assert all(m in sys.modules for m in STEP_IMPORTS['detect_tissue'])\n"
            "assert set(STEP_IMPORTS) <= {'qc_slide', 'detect_tissue', 'tile_slide'}\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
