"""Command line: ``histoflow demo-cohort`` writes the synthetic demo cohort, ``histoflow where``
says where a run's report, checklist, QC table and MLflow store are, ``histoflow gdc-cohort`` and
``histoflow camelyon16-cohort`` write the samples sheet of a TCGA or CAMELYON16 cohort,
``histoflow encoders [--build]`` lists (and builds offline) the named foundation encoders,
``histoflow report PATH`` writes the Snakemake report as ``privacy.export`` allows,
``histoflow slurm-check`` warns of jobs that no SLURM node can run."""

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
                             annotations=not args.no_annotations, null_labels=args.null_labels, task=args.task,
                             lesion_fraction=args.lesion_fraction, mixed_mpp=args.mixed_mpp)
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
    # the link that opens the experiment on its training runs (MLflow's UI defaults to GenAI)
    page = ""
    try:
        import json

        page = json.loads((out / "mlflow" / "logged.json").read_text()).get("ui_path") or ""
    except (OSError, ValueError):
        pass
    return [
        f"report        {out / 'report.html'}  [{state(out / 'report.html')}]",
        f"checklist     {out / 'checklist.md'}  [{state(out / 'checklist.md')}]",
        f"QC table      {out / 'qc' / 'slides.tsv'}  [{state(out / 'qc' / 'slides.tsv')}]",
        f"MLflow store  sqlite:///{db}  [{state(db)}]",
        f"MLflow UI     `{ui}` then open http://127.0.0.1:5000/{page}",
    ]


def _where(args: argparse.Namespace) -> int:
    print("\n".join(where_lines(args.outdir)))
    return 0


def _report(result, out: Path) -> None:
    """What was written: counts (no patient or file id; only the public CAMELYON16 exclusions are named)."""
    print(f"{out}: {result.summary()}")
    for note in result.notes:
        print(f"  note: {note}")


def _gdc_cohort(args: argparse.Namespace) -> int:
    import logging

    from .cohorts import SHEET_COLUMNS, gdc_cohort, write_sheet
    from .download import DownloadSettings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = DownloadSettings.from_config({"retries": args.retries, "timeout_s": args.timeout,
                                             "gdc_token_file": args.token_file, "gdc_token_env": args.token_env})
    result = gdc_cohort(args.project, label_from=args.label_from, label_map=args.label_map,
                        strategy=args.strategy or None, endpoint=args.endpoint, settings=settings,
                        page_size=args.page_size)
    _report(result, write_sheet(result, args.out, SHEET_COLUMNS))
    return 0


def _camelyon16_cohort(args: argparse.Namespace) -> int:
    from .cohorts import camelyon16_rows, write_sheet

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)   # paths are written relative to its real folder
    result = camelyon16_rows(args.root, out.parent, absolute=args.absolute, annotations=not args.no_annotations,
                             reference=args.reference)
    _report(result, write_sheet(result, out, ("slide_id", "patient_id", "label", "source", "split", "annotations")))
    return 0


def _encoders(args: argparse.Namespace) -> int:
    from .encoders import ENCODER_COLUMNS, encoder_rows

    def progress(row: dict) -> None:   # one line per model while the builds run (minutes for all)
        sys.stderr.write(f"{row['name']}: {row['checked']}"
                         + (f" in {row['seconds']} s" if "seconds" in row else "") + "\n")

    rows = encoder_rows(build=args.build, only=args.only, progress=progress if args.build else None)
    print("\t".join(ENCODER_COLUMNS))
    for row in rows:
        print("\t".join(str(row[c]) for c in ENCODER_COLUMNS))
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from .report_plugin import run_report

    return run_report(args.path, args.snakemake_args)


def _slurm_check(args: argparse.Namespace) -> int:
    from .slurm_check import check

    warnings = check(args.profile, args.workflow_profile, args.configfile, sinfo=args.sinfo, partition=args.partition)
    for line in warnings:
        sys.stderr.write(f"histoflow slurm-check: WARNING {line}\n")
    if not warnings:
        print("histoflow slurm-check: every rule and group job fits on the largest node")
    return 1 if warnings else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-cohort", help="write the synthetic demo cohort (slides, sheet, truth)")
    demo.add_argument("--out", required=True, help="output folder (e.g. demo)")
    demo.add_argument("--slides", type=int, default=16, help="number of slides (default 16)")
    demo.add_argument("--seed", type=int, default=7, help="random seed; same seed => same pixels")
    demo.add_argument("--task", choices=["binary", "multiclass", "survival", "regression"], default="binary",
                      help="what the cohort's target is (default binary, tumour vs normal): multiclass = three tissue "
                           "patterns, survival = event times driven by lesion burden, regression = lesion burden (%%)")
    demo.add_argument("--small", action="store_true", help="~3000 x 2400 px slides (CI) instead of ~8000 x 6000")
    demo.add_argument("--no-annotations", action="store_true", help="write no lesion polygons")
    demo.add_argument("--null-labels", action="store_true",
                      help="null cohort: lesions on every slide, labels by a seeded permutation of the patients "
                           "(half tumor), polygons on tumor-labelled slides only (the permutation guard's cohort)")
    demo.add_argument("--lesion-fraction", metavar="LOW-HIGH", default=None,
                      help="small-lesion cohort: each tumor slide's lesion covers a fraction of its tissue drawn "
                           "log-uniform in [LOW, HIGH] (e.g. 0.005-0.03), as 1-4 small foci; truth/ records it")
    demo.add_argument("--mixed-mpp", action="store_true",
                      help="half the slides of each label scanned at 40x (0.25 um/px level 0), the others at 20x")
    demo.set_defaults(func=_demo_cohort)

    where = sub.add_parser("where", help="where a run's report, checklist, QC table and MLflow store are")
    where.add_argument("--outdir", default="results", help="the run's outdir (default results)")
    where.set_defaults(func=_where)

    from .cohorts import GDC_API, GDC_PAGE_SIZE, GDC_STRATEGY

    gdc = sub.add_parser("gdc-cohort", help="samples sheet of TCGA slides from the GDC API (one row per SVS file)")
    gdc.add_argument("--project", action="append", required=True, help="GDC project id, repeatable (TCGA-LUAD)")
    gdc.add_argument("--label-from", default="project",
                     help="`project` (the project id) or a GDC field path, e.g. cases.diagnoses.primary_diagnosis")
    gdc.add_argument("--label-map", help="TSV (value<TAB>label) or YAML mapping value -> label; other values are dropped")
    gdc.add_argument("--strategy", default=GDC_STRATEGY,
                     help=f'experimental_strategy (default "{GDC_STRATEGY}"; "Tissue Slide" for frozen sections; "" for any)')
    gdc.add_argument("--endpoint", default=GDC_API, help=f"GDC API base URL or a mirror (default {GDC_API})")
    gdc.add_argument("--out", required=True, help="samples sheet to write (TSV)")
    gdc.add_argument("--token-file", help="GDC token file (controlled data); default: the variable --token-env")
    gdc.add_argument("--token-env", default="GDC_TOKEN", help="environment variable holding the token (default GDC_TOKEN)")
    gdc.add_argument("--page-size", type=int, default=GDC_PAGE_SIZE, help=f"hits asked per page (default {GDC_PAGE_SIZE})")
    gdc.add_argument("--retries", type=int, default=5, help="retries of a failed request (default 5)")
    gdc.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    gdc.set_defaults(func=_gdc_cohort)

    c16 = sub.add_parser("camelyon16-cohort", help="samples sheet of CAMELYON16 (official train/test split, annotations)")
    c16.add_argument("--root", required=True, help="the CAMELYON16 folder (holding training/ and testing/)")
    c16.add_argument("--out", required=True, help="samples sheet to write (TSV)")
    c16.add_argument("--reference", help="the test labels (default: testing/reference.csv)")
    c16.add_argument("--absolute", action="store_true", help="absolute paths (default: relative to the sheet's folder)")
    c16.add_argument("--no-annotations", action="store_true", help="leave the annotations column empty")
    c16.set_defaults(func=_camelyon16_cohort)

    enc = sub.add_parser("encoders", help="the named foundation encoders (TSV); --build builds each offline and measures it")
    enc.add_argument("--build", action="store_true",
                     help="build each architecture with random weights (no download), count parameters and run "
                          "one forward pass at its input size: dim and params_m are then measured")
    enc.add_argument("--only", action="append", metavar="NAME", help="only this model (repeatable), e.g. uni")
    enc.set_defaults(func=_encoders)

    rep = sub.add_parser("report", help="the Snakemake report (.html or .zip) without paths or URLs under "
                                        "privacy.export: deidentified (snakemake --report would carry them)")
    rep.add_argument("path", help="report to write, e.g. results/report.html")
    rep.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                     help="passed to snakemake as they are, e.g. --configfile config.yaml demo/config.yaml")
    rep.set_defaults(func=_report_cmd)

    slurm = sub.add_parser("slurm-check", help="warn of rules / group jobs asking for more CPUs or memory than "
                                               "sinfo's largest node (SLURM would keep them PENDING for ever)")
    slurm.add_argument("--profile", default="profiles/slurm", help="the slurm profile folder (default profiles/slurm)")
    slurm.add_argument("--workflow-profile", help="the workflow profile folder (default profiles/default)")
    slurm.add_argument("--configfile", nargs="+", help="config files as given to snakemake (default config.yaml)")
    slurm.add_argument("--partition", help="only this partition's nodes (sinfo -p)")
    slurm.add_argument("--sinfo", default="sinfo", help=argparse.SUPPRESS)
    slurm.set_defaults(func=_slurm_check)
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
