"""End to end on a small-lesion cohort (issue 23): an 18-slide ``--small`` demo cohort whose
tumor slides carry lesions of LOW-HIGH of the tissue (``--lesion-fraction``), run with the
config demo-cohort writes for it (SSL views at the tiles' own resolution) at CI size: 112-px
tiles at 1 µm/px, ssl on 112 px tiles with 96 px views, 3 patient folds, gated-attention MIL
only, no slide classifier; rule target ``metrics``.

The margin above chance is stated from the label-permutation null of the run's own
out-of-fold predictions (2000 permutations; tests/test_workflow_targets.py's helper): the AUC
must beat the null's 99th percentile (one-sided p < 0.01).

Status (2026-12-03): written but NOT yet run to completion: the shared machine's heavy lock gave
no slot for it before the deadline, so neither its wall time (target <= ~200 s) nor its margin on
this cohort is measured, and it is marked ``slow`` (out of CI) until it is. To validate: run it
(``pytest -m slow tests/test_workflow_small_lesions.py -s``), then with ``shuffle_labels=True``
in the fixture (it must fail), then drop the ``slow`` mark if it fits CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_workflow_targets import _null_quantile, _test_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]   # slow: unvalidated (module docstring)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LESION_FRACTION = (0.005, 0.03)
CI = {"tiling": {"tile_px": 112}, "split": {"k": 3},
      "ssl": {"image_px": 112, "crop_px": 96, "epochs": 3, "max_tiles": 1024},
      "mil": {"models": ["abmil"], "epochs": 30, "lr": 1e-3}, "metrics": {"n_bootstrap": 200},
      "slide_classifier": {"models": []}}


def run_small_lesion_dag(root: Path, overrides: dict | None = None, shuffle_labels: bool = False) -> dict:
    """The DAG up to metrics on the CI small-lesion cohort; ``shuffle_labels``: the sheet's labels
    permuted over patients (the learning-is-broken control)."""
    import pandas as pd

    from histoflow.demo import make_demo_cohort

    sheet = Path(make_demo_cohort(root / "demo", n_slides=18, seed=7, small=True, progress=False,
                                  lesion_fraction=LESION_FRACTION))
    if shuffle_labels:
        table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
        patients = table.drop_duplicates("patient_id")
        perm = np.random.default_rng(0).permutation(len(patients))
        new = dict(zip(patients["patient_id"], patients["label"].to_numpy()[perm]))
        table["label"] = table["patient_id"].map(new)
        table.to_csv(sheet, sep="\t", index=False)
    outdir = root / "results"
    (root / "ci.yaml").write_text(yaml.safe_dump({"outdir": str(outdir), **CI, **(overrides or {})}))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")
    cmd = [str(BIN / "snakemake"), "--cores", "2", "metrics",
           "--configfile", "config.yaml", str(sheet.parent / "config.yaml"), str(root / "ci.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {"outdir": outdir, "sheet": sheet, "wall_s": time.perf_counter() - t0,
            "metrics": json.loads((outdir / "metrics" / "metrics.json").read_text())}


def auc_and_null99(run: dict, model: str = "abmil") -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    pred = _test_rows(run["outdir"], model)
    y = pred["y"].astype(int).to_numpy()
    p = pred["prob"].to_numpy(float)
    observed = float(roc_auc_score(y, p))
    null99 = _null_quantile(lambda perm: roc_auc_score(y[perm], p), len(y))
    return observed, null99


@pytest.fixture(scope="module")
def small_lesions(tmp_path_factory):
    return run_small_lesion_dag(tmp_path_factory.mktemp("small_lesions"))


def test_small_lesions_are_learned_above_the_permutation_null(small_lesions):
    metrics = small_lesions["metrics"]
    res = metrics["models"]["mil-abmil"]
    assert res["n_slides"] == 18
    observed, null99 = auc_and_null99(small_lesions)
    assert observed == pytest.approx(res["pooled"]["auc"])
    lo, hi = res["ci"]["auc"]
    print(f"small lesions: abmil AUC {observed:.3f} (CI {lo:.3f}-{hi:.3f}), null99 {null99:.3f}, "
          f"wall {small_lesions['wall_s']:.0f} s")
    assert observed > null99, (observed, null99)
