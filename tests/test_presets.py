"""Presets (presets/<name>.yaml): each one is a valid config layer that plans on a sheet of its
cohort's shape, states its published figures with their source, and a run shows "published vs
this run" (histoflow.presets.compare_published) in checklist item 11."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histoflow.presets import PRESET_DIR, compare_published, preset_names

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PRESETS = ("camelyon16", "tcga-nsclc", "tcga-rcc", "tcga-brca")


def _metrics(auc=0.95, lo=0.90, hi=0.99, model="mil-transmil", metric="auc") -> dict:
    return {"best_model": model, "models": {model: {"pooled": {metric: auc}, "ci": {metric: [lo, hi]}},
                                            "mil-mean": {"pooled": {metric: 0.7}, "ci": {metric: [0.6, 0.8]}}}}


# --- the comparison -----------------------------------------------------------------------------

def test_a_published_value_inside_the_ci_is_said_to_be_inside():
    (row,) = compare_published([{"metric": "auc", "model": "mil-transmil", "value": 0.9309, "source": "TransMIL"}],
                               _metrics())
    assert row["inside"] is True and row["status"] == "inside CI"
    assert (row["value"], row["ci_low"], row["ci_high"], row["published"]) == (0.95, 0.90, 0.99, 0.9309)


def test_a_published_value_outside_the_ci_is_said_to_be_outside_and_which_side():
    above, below = compare_published(
        [{"metric": "auc", "model": "mil-mean", "value": 0.9309, "source": "s"},
         {"metric": "auc", "model": "mil-mean", "value": 0.55, "source": "s"}], _metrics())
    assert above["inside"] is False and above["status"] == "above CI"
    assert below["inside"] is False and below["status"] == "below CI"
    # the CI's ends count as inside
    (edge,) = compare_published([{"metric": "auc", "model": "mil-mean", "value": 0.8, "source": "s"}], _metrics())
    assert edge["inside"] is True


def test_best_names_the_runs_best_model_and_a_missing_model_or_metric_is_not_in_this_run():
    best, missing_model, missing_metric = compare_published(
        [{"metric": "auc", "model": "best", "value": 0.994, "source": "JAMA"},
         {"metric": "auc", "model": "mil-clam_sb", "value": 0.9, "source": "s"},
         {"metric": "auc_macro", "model": "mil-transmil", "value": 0.98, "source": "s"}], _metrics())
    assert best["run_model"] == "mil-transmil" and best["inside"] is False
    assert missing_model["inside"] is None and missing_model["status"] == "not in this run"
    assert missing_metric["inside"] is None and missing_metric["status"] == "not in this run"


def test_froc_is_read_from_the_lesion_metrics_and_has_no_ci():
    # lesions/<source>/metrics.json as lesion_metrics writes it; a source without ground truth has no score
    lesions = {"patch_classifier": {"source": "patch_classifier", "froc": {"available": True, "froc_score": 0.61}},
               "mil-abmil": {"source": "mil-abmil", "froc": {"available": True, "froc_score": 0.70}},
               "mil-mean": {"source": "mil-mean", "froc": {"available": False, "reason": "no ground-truth lesion"}}}
    named, best = compare_published([{"metric": "froc_score", "model": "patch_classifier", "value": 0.807, "source": "s"},
                                     {"metric": "froc_score", "model": "best", "value": 0.807, "source": "s"}],
                                    _metrics(), lesions)
    assert named["value"] == 0.61 and named["inside"] is None and named["status"] == "no CI"
    assert best["run_model"] == "mil-abmil" and best["value"] == 0.70


def test_multiclass_macro_auc_is_compared():
    (row,) = compare_published([{"metric": "auc_macro", "model": "mil-transmil", "value": 0.9882, "source": "s"}],
                               _metrics(0.97, 0.95, 0.99, metric="auc_macro"))
    assert row["inside"] is True


# --- the presets --------------------------------------------------------------------------------

def _layered(name: str) -> dict:
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()))
    return config


def test_every_preset_is_there_validates_and_states_its_sources():
    from histoflow.config import validate_config

    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        config = validate_config(_layered(name))
        assert config["preset"] == name
        assert config["tiling"]["tile_px"] == 256 and config["features"]["mpp"] == 0.5
        for entry in config["published"]:
            assert entry["source"].strip() and 0 < entry["value"] <= 1
            assert entry["metric"] in ("auc", "auc_macro", "froc_score")
            if entry["model"].startswith("mil-"):
                assert entry["model"][4:] in config["mil"]["models"], (name, entry)
    assert _layered("camelyon16")["split"]["strategy"] == "sheet"
    assert _layered("tcga-rcc")["target"]["classes"] == ["TCGA-KIRC", "TCGA-KIRP", "TCGA-KICH"]


def _sheet(tmp: Path, name: str) -> Path:
    """A tiny sheet of the preset's cohort shape (as camelyon16-cohort / gdc-cohort write them)."""
    rows = []
    if name == "camelyon16":
        (tmp / "slides").mkdir()
        for i, (label, split) in enumerate([("normal", "train")] * 4 + [("tumor", "train")] * 4
                                           + [("normal", "test"), ("tumor", "test"), ("tumor", "test")]):
            slide = f"{'test' if split == 'test' else label}_{i:03d}"
            (tmp / "slides" / f"{slide}.tif").write_bytes(b"")   # planning only: never opened
            ann = f"slides/{slide}.xml" if label == "tumor" else ""
            if ann:
                (tmp / ann).write_text("<ASAP_Annotations/>")
            rows.append({"slide_id": slide, "patient_id": slide, "label": label, "source": f"slides/{slide}.tif",
                         "split": split, "annotations": ann})
    else:
        labels = {"tcga-nsclc": ["TCGA-LUAD", "TCGA-LUSC"], "tcga-rcc": ["TCGA-KIRC", "TCGA-KIRP", "TCGA-KICH"],
                  "tcga-brca": ["IDC", "ILC"]}[name]
        n = 10 if name == "tcga-brca" else 4   # enough patients of each class for the preset's k folds
        for c, label in enumerate(labels):
            for i in range(n):
                case = f"TCGA-{c:02d}-{i:04d}"
                rows.append({"slide_id": f"{case}-01Z-00-DX1", "patient_id": case, "label": label,
                             "source": f"gdc:{c:08d}-0000-4000-8000-{i:012d}"})
    sheet = tmp / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_plans_on_a_sheet_of_its_shape(name, tmp_path):
    sheet = _sheet(tmp_path, name)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", "rules", "--configfile", "config.yaml",
                           f"presets/{name}.yaml", "--config", f"samples={sheet}", f"outdir={tmp_path / 'results'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    planned = proc.stdout + proc.stderr
    assert "train_mil" in planned and "checklist" in planned
    if name == "camelyon16":   # lesion annotations: patch classifier and FROC
        assert "train_patch_classifier" in planned and "lesion_metrics" in planned


# --- end to end at CI size ----------------------------------------------------------------------

@pytest.mark.e2e
def test_camelyon16_preset_runs_end_to_end_and_says_published_vs_this_run(tmp_path):
    """The camelyon16 preset on a 12-slide --small demo cohort with an official-style split
    column. Swapped for CI size (the rest is the preset's): the encoder (ssl:resnet-tiny trained
    on the cohort, 3 epochs, instead of ResNet50-trunc, whose ImageNet weights are a download),
    112-px tiles at the demo's 1.0 µm/px (small slides, small lesions), two of the six MIL
    models, 30 epochs, no feature-based slide classifiers, 200 bootstrap resamples."""
    import json

    from histoflow.demo import make_demo_cohort

    sheet = make_demo_cohort(tmp_path / "demo", n_slides=12, seed=7, small=True, progress=False)
    samples = pd.read_csv(sheet, sep="\t", keep_default_na=False)
    patients = sorted(samples["patient_id"].unique())
    test_patients = set(patients[::3])   # a third of the patients as the "official" test set
    samples["split"] = ["test" if p in test_patients else "train" for p in samples["patient_id"]]
    samples.to_csv(sheet, sep="\t", index=False)
    ci = {"samples": str(sheet), "outdir": str(tmp_path / "results"),
          "tiling": {"mpp": [1.0], "tile_px": 112}, "features": {"mpp": 1.0, "encoders": ["ssl:resnet-tiny"]},
          "ssl": {"epochs": 3, "max_tiles": 1024},
          "split": {"val_fraction": 0.25},
          "mil": {"models": ["transmil", "abmil"], "epochs": 30, "patience": 5},
          "slide_classifier": {"models": []}, "metrics": {"n_bootstrap": 200}}
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(ci))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "2", "--configfile", "config.yaml",
                           "presets/camelyon16.yaml", str(tmp_path / "ci.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = tmp_path / "results"
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    assert {"mil-transmil", "mil-abmil"} <= set(metrics["models"])
    assert metrics["models"]["mil-transmil"]["n_slides"] == int((samples["split"] == "test").sum())
    froc = json.loads((out / "lesions" / "patch_classifier" / "metrics.json").read_text())["froc"]
    assert froc["available"] and 0 <= froc["froc_score"] <= 1
    checklist = (out / "checklist.md").read_text()
    line = next(s for s in checklist.splitlines() if "Published vs this run (preset camelyon16)" in s)
    lo, hi = metrics["models"]["mil-transmil"]["ci"]["auc"]
    assert f"auc of mil-transmil: published 0.9309" in line and f"95% CI {lo:.3f}-{hi:.3f}" in line
    assert ("inside CI" if lo <= 0.9309 <= hi else "CI") in line
    assert f"froc_score of patch_classifier: published 0.807" in line and f"this run {froc['froc_score']:.3f}: no CI" in line
    assert "auc of best = " in line   # the run's best model, named


def test_a_preset_with_a_named_foundation_encoder_says_its_resolution_at_start_up(tmp_path):
    """``features={encoders: [uni]}`` on the camelyon16 preset: Snakemake's own output says the
    tiles are at uni's µm/px (item 4: a run with a foundation encoder says so)."""
    sheet = _sheet(tmp_path, "camelyon16")
    (tmp_path / "uni.yaml").write_text(yaml.safe_dump({"features": {"encoders": ["uni"]}}))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", "rules", "--configfile", "config.yaml",
                           "presets/camelyon16.yaml", str(tmp_path / "uni.yaml"), "--config", f"samples={sheet}",
                           f"outdir={tmp_path / 'results'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tiling at 0.5 µm/px, the resolution uni was trained at" in proc.stderr


def test_a_best_model_row_says_it_was_picked_on_the_test_slides():
    from histoflow.presets import format_row

    row = {"metric": "auc", "model": "best", "run_model": "mil-abmil", "published": 0.994, "source": "JAMA 2017",
           "value": 0.95, "ci_low": 0.9, "ci_high": 0.99, "status": "below CI"}
    assert "optimistic" in format_row(row)
    assert "optimistic" not in format_row({**row, "model": "mil-abmil"})


def test_the_checklist_names_the_configured_ci_level():
    from histoflow.checklist import _ci_label
    from histoflow.presets import format_row

    assert _ci_label({"settings": {"ci": 0.9}}) == "90%" and _ci_label({}) == "95%"
    row = {"metric": "auc", "model": "mil-abmil", "run_model": "mil-abmil", "published": 0.93, "source": "x",
           "value": 0.9, "ci_low": 0.8, "ci_high": 0.97, "status": "inside CI"}
    assert "(90% CI 0.800-0.970)" in format_row(row, _ci_label({"settings": {"ci": 0.9}}))
