"""End to end (small): the official-split strategy, an external cohort and the `predict` target.

A small demo cohort with a `split` column (train / val / test by patient, as CAMELYON16's
official split) trains abmil (split.strategy: sheet, one fold); a second demo cohort (another
seed, its slide ids prefixed) is an external cohort; a predict sheet with only slide_id and
source (plus a nonsense label column, which must be ignored) holds two of the external slides
and two development test slides under new ids. What users rely on:

* every model is written as a bundle (bundle.json + safetensors, no pickle on load);
* predictions/<name>/slides.tsv scores each slide as the trained fold models do: the same
  probability for a development slide as its prediction in the development run, and for an
  external slide as in the external cohort's predictions;
* metrics.json external.<cohort>.<model> has the same metrics and CIs, at the development
  threshold with its threshold_source (never fitted on external slides);
* external and predict slides never reach the split, the SSL encoder or a stain reference.
About 5 minutes on 2 idle cores (22 on a shared, loaded machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_run import check, snakemake

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def _official_split(sheet: pd.DataFrame) -> pd.Series:
    """Per patient and label: the first patient test, the second val, the rest train."""
    side = {}
    for _, group in sheet.groupby("label"):
        for i, patient in enumerate(sorted(group["patient_id"].unique())):
            side[patient] = "test" if i == 0 else ("val" if i == 1 else "train")
    return sheet["patient_id"].map(side)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from histoflow.demo import make_demo_cohort

    root = tmp_path_factory.mktemp("predict")
    dev_sheet = Path(make_demo_cohort(root / "dev", n_slides=12, seed=7, small=True, progress=False))
    dev = pd.read_csv(dev_sheet, sep="\t", dtype=str)
    dev["split"] = _official_split(dev)
    dev.to_csv(dev_sheet, sep="\t", index=False)

    ext_sheet = Path(make_demo_cohort(root / "ext", n_slides=4, seed=11, small=True, progress=False))
    ext = pd.read_csv(ext_sheet, sep="\t", dtype=str).drop(columns=["annotations"], errors="ignore")
    ext["slide_id"] = "ext_" + ext["slide_id"]
    ext["patient_id"] = "X" + ext["patient_id"]
    ext["source"] = [str((ext_sheet.parent / s).resolve()) for s in ext["source"]]
    ext_renamed = root / "external.tsv"
    ext.to_csv(ext_renamed, sep="\t", index=False)

    dev_test = dev[dev["split"] == "test"].head(2)
    new = pd.DataFrame({
        "slide_id": ["new_" + s for s in [*ext["slide_id"].head(2), *dev_test["slide_id"]]],
        "source": [*ext["source"].head(2), *[str((dev_sheet.parent / s).resolve()) for s in dev_test["source"]]],
        "label": "banana",   # labels in a predict sheet are ignored
    })
    predict_sheet = root / "new.tsv"
    new.to_csv(predict_sheet, sep="\t", index=False)

    outdir = root / "results"
    ci = {"outdir": str(outdir), "tiling": {"tile_px": 112},
          "split": {"strategy": "sheet", "k": 1},
          "ssl": {"epochs": 3, "max_tiles": 1024},
          "mil": {"models": ["abmil"], "epochs": 20}, "metrics": {"n_bootstrap": 200},
          "slide_classifier": {"models": []},
          "external": [{"name": "ext", "samples": str(ext_renamed)}],
          "predict": {"samples": str(predict_sheet), "name": "new", "model": "mil-abmil"}}
    (root / "ci.yaml").write_text(yaml.safe_dump(ci))
    configs = [dev_sheet.parent / "config.yaml", root / "ci.yaml"]
    check(snakemake(["models", "predict", "metrics"], configs))
    return {"root": root, "outdir": outdir, "configs": configs, "dev": dev, "ext": ext, "new": new,
            "dev_test": list(dev_test["slide_id"])}


def test_official_split_is_used_as_given(run):
    splits = pd.read_csv(run["outdir"] / "splits" / "splits.tsv", sep="\t", dtype=str)
    assert set(splits["fold"]) == {"0"}
    given = dict(zip(run["dev"]["slide_id"], run["dev"]["split"]))
    assert dict(zip(splits["slide_id"], splits["role"])) == given
    assert not set(splits["slide_id"]) & (set(run["ext"]["slide_id"]) | set(run["new"]["slide_id"]))


def test_every_model_is_a_bundle_without_pickle(run):
    from histoflow.bundle import load_bundle

    folder = run["outdir"] / "models" / "mil-abmil"
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "fold0.safetensors"]
    manifest = json.loads((folder / "bundle.json").read_text())
    assert manifest["encoder"]["name"] == "ssl:resnet-tiny" and manifest["encoder"]["weights"]
    assert manifest["threshold"]["threshold_source"] in ("pooled_validation", "fixed")
    assert manifest["tiling"]["tile_px"] == 112 and manifest["target"]["positive_label"] == "tumor"
    assert manifest["histoflow_version"]
    _manifest, models = load_bundle(folder)
    assert len(models) == 1


def test_predictions_match_the_trained_models(run):
    slides = pd.read_csv(run["outdir"] / "predictions" / "new" / "slides.tsv", sep="\t")
    assert list(slides["slide_id"]) == list(run["new"]["slide_id"])
    assert (slides["status"] == "ok").all() and slides["prob"].notna().all()
    assert "label" not in slides.columns and "banana" not in slides.to_csv(sep="\t")
    prob = dict(zip(slides["slide_id"], slides["prob"]))
    dev_pred = pd.read_csv(run["outdir"] / "mil" / "abmil" / "fold0" / "predictions.tsv", sep="\t")
    dev_prob = dev_pred.groupby("slide_id")["prob"].mean()
    for slide in run["dev_test"]:
        assert prob["new_" + slide] == pytest.approx(dev_prob[slide], abs=1e-6)
    ext_pred = pd.read_csv(run["outdir"] / "external" / "ext" / "mil-abmil" / "predictions.tsv", sep="\t")
    ext_prob = ext_pred.groupby("slide_id")["prob"].mean()
    for slide in run["ext"]["slide_id"].head(2):
        assert prob["new_" + slide] == pytest.approx(ext_prob[slide], abs=1e-6)
    manifest = json.loads((run["outdir"] / "models" / "mil-abmil" / "bundle.json").read_text())
    t = manifest["threshold"]["threshold"]
    assert (slides["threshold"] == t).all()
    assert list(slides["predicted_class"]) == ["tumor" if p >= t else "normal" for p in slides["prob"]]
    heatmaps = run["outdir"] / "predictions" / "new" / "heatmaps"
    assert {p.name for p in heatmaps.glob("*.png")} == {f"{s}.png" for s in slides["slide_id"]}


def test_external_metrics_at_the_development_threshold(run):
    metrics = json.loads((run["outdir"] / "metrics" / "metrics.json").read_text())
    ext = metrics["external"]["ext"]["mil-abmil"]
    dev = metrics["models"]["mil-abmil"]
    assert ext["n_slides"] == len(run["ext"]) and ext["n_patients"] == run["ext"]["patient_id"].nunique()
    assert set(ext["ci"]) == set(dev["ci"]) and np.isfinite(ext["pooled"]["auc"])
    # never refitted on the external slides: the development ensemble's threshold and source
    assert ext["threshold"] == dev["threshold_pooled_validation"]["threshold"]
    assert ext["threshold_source"] == dev["threshold_pooled_validation"]["threshold_source"]
    manifest = json.loads((run["outdir"] / "models" / "mil-abmil" / "bundle.json").read_text())
    assert ext["threshold"] == manifest["threshold"]["threshold"]
    assert (run["outdir"] / "metrics" / "external" / "ext.tsv").exists()


def test_extra_slides_never_reach_cohort_fits(run):
    """The jobs the SSL encoder and a stain reference depend on (a dry-run DAG with stain
    normalisation switched on): development slides only."""
    stain = run["root"] / "stain.yaml"
    stain.write_text(yaml.safe_dump({"stain": {"method": "macenko"}}))
    proc = snakemake(["--forceall", "--dag", "dot", str(run["outdir"] / "stain" / "stain.json"),
                       str(run["outdir"] / "ssl" / "resnet-tiny" / "encoder.pt")], [*run["configs"], stain], timeout=300)
    check(proc)
    dag = proc.stdout
    assert all(s in dag for s in run["dev"]["slide_id"])
    extra = [*run["ext"]["slide_id"], *run["new"]["slide_id"]]
    assert not [s for s in extra if s in dag]


def test_a_bundle_of_another_run_predicts_only_with_matching_settings(run):
    """predict.model may name another outdir's bundle folder; its tiling must match (planning only)."""
    bundle = run["outdir"] / "models" / "mil-abmil"
    other = {"outdir": str(run["root"] / "other"), "external": [],
             "predict": {"samples": str(run["root"] / "new.tsv"), "name": "new", "model": str(bundle)}}
    same = run["root"] / "other_same.yaml"
    same.write_text(yaml.safe_dump(other))
    proc = snakemake(["-n", "predict"], [*run["configs"], same], timeout=300)
    check(proc)
    assert "predict_slides" in proc.stdout
    differ = run["root"] / "other_differ.yaml"
    differ.write_text(yaml.safe_dump({**other, "tiling": {"tile_px": 224}}))
    proc = snakemake(["-n", "predict"], [*run["configs"], differ], timeout=300)
    assert proc.returncode != 0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("histoflow:")]
    assert line and "tiling.tile_px=112" in line[0], proc.stderr[-2000:]
