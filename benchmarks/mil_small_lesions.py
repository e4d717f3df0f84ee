"""MIL training variants side by side on one run's features and patient folds (issue 23).

Loads ``<outdir>/splits/splits.tsv`` and ``<outdir>/features/<slug>/*.parquet`` of a finished
run (the `mil` target's inputs) and, for every (variant, model, fold), trains with
``histoflow.mil.train.fit`` - the DAG's own code path - on the fold's train/val slides, scores
the fold's test slides, and reports the out-of-fold (pooled) slide AUC with its patient-bootstrap
95 % CI per model and variant. A variant is a set of ``mil:`` overrides, e.g.
``--variant base= --variant topk='{"topk_weight": 0.5}'`` (JSON; empty = the config's settings).
``--permute`` shuffles the labels within the training/validation slides of every fold (the null).
``--thin-lesions ANNOTATIONS_DIR:N`` makes a small-lesion proxy from a large-lesion run: each
positive slide keeps at most N of its tiles that overlap its lesion polygons (geojson, level-0
px; seeded random choice) and all its lesion-free tiles (a quick stand-in while a small-lesion
cohort's features are not there; the issue's figures are on a real small-lesion cohort).

    python benchmarks/mil_small_lesions.py --outdir results \
        --models mean max abmil --variant base= --variant aug='{"tile_dropout": 0.5}' --jobs 2

Writes a TSV (one row per variant x model) to ``--out`` when given. Bounded memory: the bags of
one cohort as float16, shared by forked workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histoflow.mil.data import feature_slug, load_bags  # noqa: E402
from histoflow.mil.train import MILSettings, fit, fold_seed, predict_proba, roc_auc  # noqa: E402
from histoflow.split import read_splits  # noqa: E402

_BAGS: dict = {}
_SPLITS: pd.DataFrame | None = None


def _job(args: tuple) -> dict:
    variant, overrides, model, fold, seed, base, permute = args
    import torch

    torch.set_num_threads(1)
    part = _SPLITS[_SPLITS["fold"] == fold]
    settings = MILSettings.from_config({**base, **overrides})

    def select(role: str):
        rows = part[part["role"] == role]
        return [_BAGS[s].features for s in rows["slide_id"]], rows["y"].to_numpy().astype(int), rows

    tx, ty, _ = select("train")
    vx, vy, _ = select("val")
    sx, sy, srows = select("test")
    if permute:
        rng = np.random.default_rng([seed, fold, 99])
        both = rng.permutation(np.concatenate([ty, vy]))
        ty, vy = both[: len(ty)], both[len(ty):]
    t0 = time.time()
    result = fit(model, tx, ty, vx, vy, settings, fold_seed(seed, fold), progress=False)
    prob = predict_proba(result.model, sx)
    return {"variant": variant, "model": model, "fold": fold, "seed": seed, "slide_id": list(srows["slide_id"]),
            "patient_id": list(srows["patient_id"]), "y": list(sy), "prob": list(prob), "best_epoch": result.best_epoch,
            "epochs_run": len(result.history), "seconds": time.time() - t0}


def thin_lesions(bags: dict, splits: pd.DataFrame, annotations: Path, keep: int, seed: int = 0) -> dict:
    """Positive slides keep at most ``keep`` lesion-overlapping tiles (see the module doc)."""
    import shapely
    from shapely.geometry import box, shape

    positive = set(splits.loc[splits["y"] == 1, "slide_id"])
    out = {}
    for sid, bag in bags.items():
        path = annotations / f"{sid}.geojson"
        if sid not in positive or not path.exists():
            out[sid] = bag
            continue
        lesion = shapely.union_all([shape(f["geometry"]) for f in json.loads(path.read_text())["features"]])
        c = bag.coords
        hit = np.array([lesion.intersects(box(x, y, x + s, y + s)) for x, y, s in zip(c["x"], c["y"], c["size0"])])
        rng = np.random.default_rng([seed, int.from_bytes(sid.encode()[-4:], "little")])
        chosen = rng.permutation(np.flatnonzero(hit))[:keep]
        rows = np.sort(np.concatenate([np.flatnonzero(~hit), chosen]))
        out[sid] = type(bag)(slide_id=sid, coords=c.iloc[rows].reset_index(drop=True), features=bag.features[rows])
    return out


def _init(outdir: str, encoder: str | None, thin: str | None = None) -> None:
    global _BAGS, _SPLITS
    _SPLITS = read_splits(Path(outdir) / "splits" / "splits.tsv")
    feat_root = Path(outdir) / "features"
    slug = feature_slug(encoder) if encoder else sorted(p.name for p in feat_root.iterdir() if p.is_dir())[0]
    _BAGS = load_bags(sorted((feat_root / slug).glob("*.parquet")))
    if thin:
        folder, _, n = thin.rpartition(":")
        _BAGS = thin_lesions(_BAGS, _SPLITS, Path(folder), int(n))


def summarise(rows: list[dict], n_boot: int = 1000) -> pd.DataFrame:
    from histoflow.metrics import bootstrap_ci

    keys = ("slide_id", "patient_id", "y", "prob")
    long = pd.DataFrame([{"variant": r["variant"], "model": r["model"], "seed": r["seed"], "fold": r["fold"],
                          **dict(zip(keys, values))} for r in rows for values in zip(*(r[k] for k in keys))])
    out = []
    for (variant, model), g in long.groupby(["variant", "model"], sort=False):
        # per seed: the pooled out-of-fold AUC; "ens": the seeds' mean probability per slide
        per_seed = [roc_auc(s["y"].to_numpy(), s["prob"].to_numpy()) for _, s in g.groupby("seed")]
        # the mean of per-fold AUCs: tells a ranking within folds from calibration shifts between folds
        fold_auc = [roc_auc(f["y"].to_numpy(), f["prob"].to_numpy()) for _, f in g.groupby(["seed", "fold"])]
        ens = g.groupby(["slide_id", "patient_id", "y"], as_index=False)["prob"].mean()
        ci = bootstrap_ci(ens["y"].to_numpy(), ens["prob"].to_numpy(), ens["patient_id"].to_numpy(), 0.5, n_boot)["auc"]
        meta = [r for r in rows if r["variant"] == variant and r["model"] == model]
        out.append({"variant": variant, "model": model, "n_seeds": len(per_seed),
                    "auc_seed_mean": float(np.nanmean(per_seed)), "auc_seed_min": float(np.nanmin(per_seed)),
                    "auc_seed_max": float(np.nanmax(per_seed)), "auc_seed_ensemble": roc_auc(ens["y"].to_numpy(), ens["prob"].to_numpy()),
                    "ci_low": ci[0], "ci_high": ci[1], "auc_fold_mean": float(np.nanmean(fold_auc)),
                    "best_epoch_mean": float(np.mean([r["best_epoch"] for r in meta])),
                    "seconds": float(np.sum([r["seconds"] for r in meta]))})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", default=os.environ.get("HISTOFLOW_MIL_BENCH_OUTDIR"),
                    help="a finished run's outdir (default $HISTOFLOW_MIL_BENCH_OUTDIR; none: skipped, as in `make bench`)")
    ap.add_argument("--encoder", default=None, help="features slug source (default: the first features/ folder)")
    ap.add_argument("--models", nargs="+", default=["mean", "max", "abmil", "clam_sb", "transmil", "dsmil"])
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON of mil overrides (repeatable)")
    ap.add_argument("--base", default="{}", help="JSON mil settings every variant starts from (default: schema defaults)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--folds", nargs="+", type=int, default=None)
    ap.add_argument("--permute", action="store_true", help="label-permutation null (train/val labels shuffled per fold)")
    ap.add_argument("--thin-lesions", default=None, metavar="ANNOTATIONS_DIR:N")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.outdir or not (Path(args.outdir) / "splits" / "splits.tsv").exists():
        print("mil_small_lesions: skipped (no --outdir with splits/splits.tsv and features/)")
        return pd.DataFrame()
    variants = []
    for spec in args.variant or ["base="]:
        name, _, js = spec.partition("=")
        variants.append((name, json.loads(js) if js.strip() else {}))
    base = json.loads(args.base)
    _init(args.outdir, args.encoder, args.thin_lesions)
    folds = args.folds if args.folds is not None else sorted(_SPLITS["fold"].unique())
    jobs = [(v, o, m, f, s, base, args.permute) for v, o in variants for m in args.models for s in args.seeds for f in folds]
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:  # forked: the bags are shared, not copied
            rows = list(pool.map(_job, jobs))
    else:
        rows = [_job(j) for j in jobs]
    table = summarise(rows)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(jobs)} fits in {time.time() - t0:.0f} s")
    if args.out:
        table.to_csv(args.out, sep="\t", index=False)
        pd.DataFrame(rows).to_json(Path(args.out).with_suffix(".rows.json"), orient="records")
    return table


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
