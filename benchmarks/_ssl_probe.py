"""A quick proxy for SSL settings on a small-lesion demo cohort (issue 23): train ``ssl:<arch>``
on a finished run's tiles with the given ``ssl:`` overrides, embed labelled tiles, and score a
linear probe against the truth tile labels (patch_labels/, from the lesion polygons) by
patient-grouped cross-validation: tile AUC, and slide AUC of the max tile probability.

    python benchmarks/_ssl_probe.py RUN_OUTDIR COHORT_DIR '{"image_px": 224, "crop_px": 96}' [--seed 1]

Not part of `make bench` (leading underscore): it needs a run's tiles and patch labels.
Labels of test slides are used only to score the probe, never to train the SSL encoder
(which, as in the workflow, sees every slide's tiles unlabelled: ssl.fit_on all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    import torch

    from histoflow.config import section_defaults
    from histoflow.ssl import SSLSettings, choose_tiles, embed, pretrain, read_training_tiles
    from histoflow.tiling import read_tiles_table

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("cohort")
    ap.add_argument("overrides", nargs="?", default="{}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--probe-per-slide", type=int, default=120)
    ap.add_argument("--mpp", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    run, cohort = Path(args.run), Path(args.cohort)
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str)
    paths = {r.slide_id: str(cohort / r.source) for r in sheet.itertuples()}
    patient = dict(zip(sheet["slide_id"], sheet["patient_id"]))
    label = dict(zip(sheet["slide_id"], sheet["label"]))
    tables = {s: read_tiles_table(run / "tiles" / f"{s}.parquet") for s in sheet["slide_id"]
              if (run / "tiles" / f"{s}.parquet").exists()}
    overrides = json.loads(args.overrides)
    cfg = SSLSettings.from_config({**section_defaults("ssl"), "hed_sigma": 0.05, **overrides}, arch=overrides.get("arch", "resnet-tiny"))
    t0 = time.perf_counter()
    chosen = choose_tiles(list(tables.values()), cfg.max_tiles, args.mpp, args.seed)
    tiles = read_training_tiles(chosen, paths, cfg.image_px, progress=False)
    t_read = time.perf_counter() - t0
    net, hist, (mean, std) = pretrain(tiles, cfg, args.seed, progress=False)
    t_train = time.perf_counter() - t0 - t_read
    # every tile is embedded; the probe trains on the labelled tiles (label >= 0) of the other
    # folds' patients and scores all tiles of the held-out ones (truth selects no tile)
    rows = []
    for s, table in tables.items():
        labels = pd.read_parquet(run / "patch_labels" / f"{s}.parquet")
        rows.append(table.merge(labels[["x", "y", "label"]], on=["x", "y"], how="left"))
    probe = pd.concat(rows, ignore_index=True).sort_values(["slide_id", "y", "x"], kind="stable").reset_index(drop=True)
    probe["label"] = probe["label"].fillna(-1).astype(int)
    ptiles = read_training_tiles(probe, paths, cfg.image_px, progress=False)
    feats = embed(net, ptiles, mean, std)
    y = probe["label"].to_numpy()
    groups = probe["slide_id"].map(patient).to_numpy()
    prob = np.zeros(len(y))
    for tr, te in GroupKFold(4).split(feats, y, groups):
        tr = tr[y[tr] >= 0]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        clf.fit(feats[tr], y[tr])
        prob[te] = clf.predict_proba(feats[te])[:, 1]
    probe["prob"] = prob
    slide = probe.groupby("slide_id")["prob"].max()
    ys = np.array([label[s] == "tumor" for s in slide.index])
    known = y >= 0
    y, prob = y[known], prob[known]
    out = {"overrides": overrides, "seed": args.seed, "n_ssl_tiles": int(len(chosen)),
           "n_probe_tiles": int(len(y)), "n_pos_tiles": int(y.sum()),
           "tile_auc": float(roc_auc_score(y, prob)), "slide_auc_max_tile": float(roc_auc_score(ys, slide.to_numpy())),
           "ssl_read_s": round(t_read, 1), "ssl_train_s": round(t_train, 1),
           "final_loss": float(hist["loss"].iloc[-1]), "feature_std": float(hist["feature_std"].iloc[-1])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
