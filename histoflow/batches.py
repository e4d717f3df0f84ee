"""Slide batches: the per-slide steps of many slides in one job, for cohorts of thousands.

Snakemake's planning cost grows with the number of jobs and each SLURM job costs scheduling
time (figures: docs/benchmarks.md, `dag`), so a 10,000-slide cohort cut into one job per slide
and step (~70,000 jobs) is slow to plan and floods the queue. With `slides_per_job` > 1 each
per-slide rule `<rule>` gets a twin `<rule>_batch` (generated in workflow/rules/batches.smk): one
job per batch of consecutive sheet rows, running the per-slide rule's own script for each slide
(`histoflow.slide_jobs.run_slide_script`) and writing the same per-slide files, plus a manifest
`{outdir}/batches/<rule>/.../<batch>.json` that downstream rules depend on.

A rerun of a batch job (a slide failed, the batch's membership or settings changed) redoes only
the slides whose result is not current: after each slide, a stamp `.../done/<slide_id>.json`
records a fingerprint of its inputs (paths, sizes, mtimes), params and outputs; a slide whose
stamp matches and whose outputs are unchanged since is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputError
from .slide_jobs import SlideJob, as_snakemake, prepare_step, run_slide_script

# `slides_per_job: auto`: one job per slide up to this many slides (small cohorts keep per-slide
# reruns and per-slide report entries), else about AUTO_BATCHES batches per step
AUTO_PER_SLIDE_MAX = 500
AUTO_BATCHES = 250


# `auto` with a large encoder (>= 100 M parameters) or GPU features jobs: a features job loads
# its model once, so one job per slide would reload (and re-page) a 0.3-2.5 GB model per slide;
# then at least this many slides share a job (a 20-slide cohort: one job)
AUTO_LARGE_MODEL_PER_JOB = 25


def slides_per_job(setting: int | str, n_slides: int, large_model: bool = False) -> int:
    """How many slides one job of a per-slide step takes (1 = a job per slide).

    ``auto``: one job per slide up to 500 slides, else about 250 batches per step; with
    ``large_model`` (see :func:`histoflow.encoder_registry.features_model_is_large`) at least
    AUTO_LARGE_MODEL_PER_JOB slides (or the whole cohort, if smaller) per job, so the model
    loads once per batch of slides. An integer is taken as it is."""
    if setting == "auto":
        per_job = 1 if n_slides <= AUTO_PER_SLIDE_MAX else math.ceil(n_slides / AUTO_BATCHES)
        if large_model:
            per_job = max(per_job, min(max(n_slides, 1), AUTO_LARGE_MODEL_PER_JOB))
        return per_job
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise InputError(f"config slides_per_job: {setting!r} is not 'auto' or an integer >= 1")
    return setting


def batch_id(index: int) -> str:
    return f"b{index:05d}"


def slide_batches(slide_ids: Sequence[str], per_job: int) -> dict[str, list[str]]:
    """Consecutive sheet rows in batches of `per_job` (the last may be smaller): with a fixed
    `per_job`, appending slides to the sheet leaves every earlier batch as it was (with `auto`
    the size grows every 250 slides; the slides' stamps then spare the work, not the jobs)."""
    if per_job < 1:
        raise ValueError("per_job must be >= 1")
    return {batch_id(i // per_job): list(slide_ids[i:i + per_job]) for i in range(0, len(slide_ids), per_job)}


def _stat(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ["missing"]
    return ["dir"] if os.path.isdir(path) else [st.st_size, st.st_mtime_ns]


def _paths(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def fingerprint(rule: str, job: SlideJob) -> str:
    """What a slide's result depends on: the step, its params, and its input files as they are now."""
    payload = {"rule": rule, "wildcards": job.wildcards, "input": job.input, "output": job.output,
               "params": job.params, "input_stat": {p: _stat(p) for p in _paths(job.input.values())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _outputs_stat(job: SlideJob) -> dict[str, list[Any]]:
    return {p: _stat(p) for p in _paths(job.output.values())}


def is_current(stamp_path: Path, rule: str, job: SlideJob) -> bool:
    """True when the slide's stamp matches its inputs and params and no output changed since."""
    try:
        stamp = json.loads(stamp_path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    outputs = _outputs_stat(job)
    return (stamp.get("fingerprint") == fingerprint(rule, job) and stamp.get("outputs") == outputs
            and all(s != ["missing"] for s in outputs.values()))


def _remove_outputs(job: SlideJob) -> None:
    """What Snakemake does before a job runs: no stale output or log survives a redo. Each is
    removed only inside its own stage folder (and, in a job, the output folder)."""
    from .io import safe_remove

    for path in [*_paths(job.output.values()), *([job.log] if job.log else [])]:
        if os.path.lexists(path):
            safe_remove(path, Path(path).parent)


def run_slide_batch(rule: str, script: str | os.PathLike, jobs: Sequence[dict[str, Any]],
                    manifest_path: str | os.PathLike, log_path: str | os.PathLike | None = None,
                    threads: int = 1) -> dict[str, Any]:
    """Run per-slide rule `rule`'s script for each slide of a batch job (dicts of SlideJob fields,
    in sheet order).

    Each slide logs to its own file, as in a per-slide job; the batch log gets the progress and
    one line per slide. A failing slide does not stop the others (with `on_error: skip` the
    steps record a skip themselves); after the last slide the batch fails, naming the failed
    slides and their logs, without a manifest, and a rerun redoes only those (stamps).
    """
    from tqdm import tqdm

    from .errors import HistoflowError
    from .io import safe_remove, write_json

    prepare_step(rule)
    manifest_path = Path(manifest_path)
    done_dir = manifest_path.parent / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path or os.devnull, "a", buffering=1) as log:
        for fields in tqdm(jobs, desc=f"{rule} {manifest_path.stem}", unit="slide", file=log, mininterval=5):
            job = SlideJob(**{**fields, "threads": threads})
            stamp = done_dir / f"{job.slide_id}.json"
            start = time.perf_counter()
            reused = is_current(stamp, rule, job)
            if not reused:
                safe_remove(stamp, done_dir)
                _remove_outputs(job)
                try:
                    run_slide_script(script, as_snakemake(job))   # it logs to job.log itself
                    missing = [p for p in _paths(job.output.values()) if not os.path.exists(p)]
                    if missing:
                        raise HistoflowError(f"slide {job.slide_id!r}: step {rule} did not write {missing[0]}")
                except (Exception, SystemExit) as err:
                    # log_to turns a HistoflowError into SystemExit(1); the reason is its context
                    cause = err.__context__ if isinstance(err, SystemExit) and err.__context__ else err
                    failed.append((job, str(cause) or type(cause).__name__))
                    print(f"{job.slide_id}: FAILED ({failed[-1][1]}; log: {job.log})", file=log)
                    continue
                write_json(stamp, {"fingerprint": fingerprint(rule, job), "outputs": _outputs_stat(job)})
            seconds = round(time.perf_counter() - start, 3)
            print(f"{job.slide_id}: {'reused (current)' if reused else f'done in {seconds} s'}", file=log)
            records.append({"slide_id": job.slide_id, "reused": reused, "seconds": seconds,
                            "outputs": job.output})
    if failed:
        names = ", ".join(f"{j.slide_id} (log: {j.log})" for j, _ in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise HistoflowError(f"{len(failed)} of {len(jobs)} slides failed in batch {manifest_path.stem} of "
                             f"{rule}: {names}; first error: {failed[0][1]}; the other slides are done and "
                             f"a rerun redoes only the failed ones")
    manifest = {"rule": rule, "batch": manifest_path.stem, "slides": records}
    write_json(manifest_path, manifest)
    return manifest
