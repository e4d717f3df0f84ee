"""Command line: ``histoflow demo-cohort`` writes the synthetic demo cohort, ``histoflow where``
says where a run's report, checklist, QC table and MLflow store are."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import HistoflowError


def _demo_cohort(args: argparse.Namespace) -> int:
    from .demo import make_demo_cohort

    t0 = time.perf_counter()
    sheet = make_demo_cohort(args.out, n_slides=args.slides, seed=args.seed, small=args.small,
                             annotations=not args.no_annotations, null_labels=args.null_labels)
    out = sheet.parent
    print(f"demo cohort: {args.slides} slides in {time.perf_counter() - t0:.1f} s")
    print(f"  samples sheet : {sheet}")
    print(f"  demo config   : {out / 'config.yaml'}")
    print(f"  ground truth  : {out / 'truth'}/")
    print(f"run it: snakemake --cores 2 --configfile config.yaml {out / 'config.yaml'}")
    return 0


def where_lines(outdir: str | Path) -> list[str]:
    """One line per artefact of a run in ``outdir``: what it is, where, and whether it exists."""
    out = Path(outdir)
    db = out / "mlflow.db"

    def state(p: Path) -> str:
        return "exists" if p.exists() else "not yet"

    ui = "make mlflow-ui" if out.resolve() == Path("results").resolve() else f"make mlflow-ui OUTDIR={outdir}"
    return [
        f"report        {out / 'report.html'}  [{state(out / 'report.html')}]",
        f"checklist     {out / 'checklist.md'}  [{state(out / 'checklist.md')}]",
        f"QC table      {out / 'qc' / 'slides.tsv'}  [{state(out / 'qc' / 'slides.tsv')}]",
        f"MLflow store  sqlite:///{db}  [{state(db)}]",
        f"MLflow UI     `{ui}` then open http://127.0.0.1:5000",
    ]


def _where(args: argparse.Namespace) -> int:
    print("\n".join(where_lines(args.outdir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-cohort", help="write the synthetic demo cohort (slides, sheet, truth)")
    demo.add_argument("--out", required=True, help="output folder (e.g. demo)")
    demo.add_argument("--slides", type=int, default=16, help="number of slides (default 16)")
    demo.add_argument("--seed", type=int, default=7, help="random seed; same seed => same pixels")
    demo.add_argument("--small", action="store_true", help="~3000 x 2400 px slides (CI) instead of ~8000 x 6000")
    demo.add_argument("--no-annotations", action="store_true", help="write no lesion polygons")
    demo.add_argument("--null-labels", action="store_true",
                      help="null cohort: lesions on every slide, labels by a seeded permutation of the patients "
                           "(half tumor), polygons on tumor-labelled slides only (the permutation guard's cohort)")
    demo.set_defaults(func=_demo_cohort)

    where = sub.add_parser("where", help="where a run's report, checklist, QC table and MLflow store are")
    where.add_argument("--outdir", default="results", help="the run's outdir (default results)")
    where.set_defaults(func=_where)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HistoflowError as err:
        sys.stderr.write(f"histoflow: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
