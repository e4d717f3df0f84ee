"""DAG benchmark: how long `snakemake -n` takes for a 1,000 and a 10,000-slide cohort.

    .venv/bin/python benchmarks/dag.py [--slides 1000 10000] [--slides-per-job auto 1]
                                       [--target all] [--profile PROFILE]

A cluster user's first command on a big cohort is a dry run; it must stay well under a minute
(target: < 30 s for 10,000 slides). The samples sheet points at symlinks to one tiny pyramidal
TIFF, so the sheet's checks (local files exist) run for real without 10,000 real slides.
Each run is a fresh `snakemake` process (start-up, parsing, sheet validation, DAG building and
job listing all count). `--profile profiles/slurm` builds the group jobs too (needs `sinfo`).
`--slides-per-job auto 1` times the default (slide batches above 500 slides) beside one job
per slide and step.
Prints a table and writes benchmarks/results/dag.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "dag.json"
BIN = Path(sys.executable).parent


def make_cohort(root: Path, n_slides: int) -> Path:
    """samples.tsv with n_slides rows (2 slides per patient, balanced labels), each a symlink."""
    import pyvips

    tiny = root / "tiny.tiff"
    if not tiny.exists():
        img = pyvips.Image.black(512, 512, bands=3).new_from_image([230, 200, 220]).cast("uchar")
        img.tiffsave(str(tiny), tile=True, pyramid=True, compression="jpeg", xres=2000, yres=2000)
    links = root / f"slides_{n_slides}"
    links.mkdir(exist_ok=True)
    lines = ["slide_id\tpatient_id\tlabel\tsource"]
    for i in range(n_slides):
        link = links / f"s{i:05d}.tiff"
        if not link.is_symlink():
            link.symlink_to(tiny)
        lines.append(f"s{i:05d}\tP{i // 2:05d}\t{'tumor' if (i // 2) % 2 else 'normal'}\t{link.relative_to(root)}")
    sheet = root / f"samples_{n_slides}.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def time_dry_run(root: Path, sheet: Path, target: str, profile: str | None, slides_per_job: str) -> dict:
    configfile = root / f"{sheet.stem}.yaml"
    configfile.write_text(yaml.safe_dump({"samples": str(sheet), "outdir": str(root / f"results_{sheet.stem}"),
                                          "slides_per_job": slides_per_job if slides_per_job == "auto"
                                          else int(slides_per_job)}))
    cmd = [str(BIN / "snakemake"), target, "-n", "--quiet", "rules",
           "--configfile", "config.yaml", str(configfile)]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed for {sheet.name}:\n{proc.stderr[-3000:]}")
    jobs = 0
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    return {"seconds": round(seconds, 2), "jobs": jobs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--target", default="all", help="rule to dry-run (default: the whole DAG)")
    parser.add_argument("--profile", default=None, help="extra --profile, e.g. profiles/slurm")
    parser.add_argument("--slides-per-job", nargs="+", default=["auto", "1"],
                        help="config slides_per_job values to time (auto: batches above 500 slides; 1: a job per slide)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="histoflow-dag-") as tmp:
        root = Path(tmp)
        for n in args.slides:
            start = time.perf_counter()
            sheet = make_cohort(root, n)
            setup = round(time.perf_counter() - start, 2)
            for per_job in args.slides_per_job:
                result = {"slides": n, "slides_per_job": per_job, "target": args.target, "profile": args.profile,
                          "cohort_setup_s": setup, **time_dry_run(root, sheet, args.target, args.profile, per_job)}
                rows.append(result)
                print(f"{n:>7,} slides  slides_per_job {per_job:>4}  snakemake -n {args.target}: "
                      f"{result['seconds']:7.1f} s  ({result['jobs']:,} jobs)", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "python": platform.python_version(), "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
