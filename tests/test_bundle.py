"""Model bundles (histoflow/bundle.py), external-cohort metrics and the extra sheets
(histoflow/external.py): what `predict` and `external` rest on, without running the workflow."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from histoflow.errors import InputError
from test_mil import DIM, _write_features, synthetic_bags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two abmil fold models on synthetic bags, through train_fold as the workflow runs them."""
    from histoflow.mil.train import train_fold
    from histoflow.split import write_splits

    root = tmp_path_factory.mktemp("bundle")
    bags, ys, _ = synthetic_bags(16, seed=3)
    samples, paths = [], []
    for i, (bag, y) in enumerate(zip(bags, ys)):
        sid = f"S{i:02d}"
        samples.append({"slide_id": sid, "patient_id": f"P{i:02d}", "label": "tumor" if y else "normal", "site": None})
        path = root / "features" / f"{sid}.parquet"
        path.parent.mkdir(exist_ok=True)
        _write_features(path, sid, bag)
        paths.append(str(path))
    write_splits(samples, {"k": 2, "strategy": "holdout", "test_fraction": 0.25}, "tumor", 3,
                 root / "splits.tsv", root / "split.json")
    settings = {"models": ["abmil"], "epochs": 3, "lr": 2e-3, "hidden_dim": DIM, "device": "cpu"}
    ckpts, preds = [], []
    for fold in (0, 1):
        d = root / "mil" / f"fold{fold}"
        train_fold(root / "splits.tsv", paths, "abmil", fold, settings, 1337, "resnet50-trunc", d / "checkpoint.pt",
                   d / "history.tsv", d / "predictions.tsv", d / "tile_scores.parquet")
        ckpts.append(str(d / "checkpoint.pt"))
        preds.append(str(d / "predictions.tsv"))
    return {"root": root, "paths": paths, "checkpoints": ckpts, "predictions": preds, "samples": samples}


SETTINGS = {"tiling": {"mpp": [1.0], "tile_px": 112, "overlap_px": 0, "min_tissue_fraction": 0.5,
                       "max_tiles_per_slide": None},
            "features": {"mpp": 1.0, "dtype": "float16", "tta": False}, "stain_method": "none"}
TARGET = {"type": "classification", "binary": True, "positive_label": "tumor", "classes": ["normal", "tumor"]}


@pytest.fixture(scope="module")
def bundle(trained):
    from histoflow.bundle import write_mil_bundle

    out = trained["root"] / "models" / "mil-abmil" / "bundle.json"
    manifest = write_mil_bundle("mil-abmil", trained["checkpoints"], trained["predictions"], trained["paths"],
                                "resnet50-trunc", SETTINGS, TARGET, {"n_bootstrap": 100}, 1337, None, out)
    return out, manifest


def test_a_bundle_is_data_and_loads_without_pickle(bundle, monkeypatch):
    from histoflow.bundle import load_bundle

    out, manifest = bundle
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle.json", "fold0.safetensors", "fold1.safetensors"]
    assert manifest["architecture"]["model"] == "abmil" and manifest["histoflow_version"]
    assert manifest["threshold"]["threshold_source"] in ("pooled_validation", "fixed")

    def refuse(*_a, **_k):
        raise AssertionError("a bundle must load without pickle")

    import torch

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _manifest, models = load_bundle(out.parent)
    assert len(models) == 2


def test_bundle_scores_as_the_fold_models_did(trained, bundle):
    from histoflow.bundle import load_bundle, score_slides

    out, _ = bundle
    _manifest, models = load_bundle(out)
    ids, probs, _counts, _ = score_slides(models, trained["paths"])
    for fold, path in enumerate(trained["predictions"]):
        dev = pd.read_csv(path, sep="\t", dtype={"slide_id": str}).set_index("slide_id").loc[ids, "prob"]
        np.testing.assert_allclose(probs[fold], dev.to_numpy(), atol=1e-6)


def test_bundle_threshold_is_the_metrics_ensemble_threshold(trained, bundle):
    from histoflow.metrics import MetricsSettings, evaluate_model, load_predictions

    res = evaluate_model(load_predictions(trained["predictions"]), MetricsSettings.from_config({"n_bootstrap": 100}), "holdout")
    assert bundle[1]["threshold"]["threshold"] == res["threshold_pooled_validation"]["threshold"]


def test_a_tampered_weights_file_is_refused(bundle, tmp_path):
    import shutil

    from histoflow.bundle import load_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle[0].parent, copy)
    data = bytearray((copy / "fold1.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "fold1.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="fold1.safetensors does not match its sha256"):
        load_bundle(copy)


@pytest.mark.parametrize("section,key,value", [("tiling", "tile_px", 224), ("features", "mpp", 0.5)])
def test_a_bundle_with_other_tiling_or_features_is_refused_in_one_line(bundle, section, key, value):
    from histoflow.bundle import check_bundle_config

    mine = json.loads(json.dumps(SETTINGS))
    check_bundle_config(bundle[1], mine, "resnet50-trunc")
    with pytest.raises(InputError, match="encoder 'resnet50-trunc'") as err:
        check_bundle_config(bundle[1], mine, "uni")
    assert "\n" not in str(err.value)
    mine[section][key] = value
    with pytest.raises(InputError, match=rf"{section}\.{key}="):
        check_bundle_config(bundle[1], mine, "resnet50-trunc")


def test_slide_classifiers_are_refused_with_the_reason():
    from histoflow.bundle import bundle_json_path

    with pytest.raises(InputError, match="not bundled"):
        bundle_json_path("rf@patch_classifier", "results")


# ---------------------------------------------------------------------------------------------
# External cohorts: the development threshold, never one fitted on external slides

def test_external_metrics_use_the_development_threshold():
    from histoflow.metrics import MetricsSettings, evaluate_external, evaluate_model

    rng = np.random.default_rng(0)
    rows = []
    for fold in (0, 1):
        for i in range(40):   # development: val probs separate at ~0.3
            y = i % 2
            rows.append({"slide_id": f"D{i}", "patient_id": f"D{i}", "y": y, "fold": fold,
                         "role": "val" if i < 20 else "test", "prob": 0.3 + (0.2 if y else -0.2) + rng.normal(0, .05)})
    dev = pd.DataFrame(rows)
    ext = pd.DataFrame([{"slide_id": f"E{i}", "patient_id": f"E{i // 2}", "y": i % 2, "fold": fold, "role": "external",
                         "prob": 0.8 + (0.1 if i % 2 else -0.1) + rng.normal(0, .02)} for fold in (0, 1) for i in range(30)])
    cfg = MetricsSettings.from_config({"n_bootstrap": 100, "min_val_per_class": 5})
    res = evaluate_external(dev, ext, cfg)
    dev_res = evaluate_model(dev, cfg, "holdout")
    assert res["threshold"] == dev_res["threshold_pooled_validation"]["threshold"] < 0.6
    assert res["threshold_source"] == "pooled_validation"
    assert res["n_slides"] == 30 and res["n_patients"] == 15
    # a threshold fitted on these slides (~0.8) would give ~perfect specificity; the dev one calls all positive
    assert res["pooled"]["auc"] > 0.99 and res["pooled"]["specificity"] == 0.0
    assert {"auc", "balanced_accuracy", "brier"} <= set(res["ci"])


# ---------------------------------------------------------------------------------------------
# Extra sheets: unique slide ids across sheets, predict sheets need slide_id and source only

def _sheet(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return str(path)


def test_a_slide_id_in_two_sheets_is_refused_in_one_line(tmp_path):
    from histoflow.config import load_samples
    from histoflow.external import load_extra_sheets

    (tmp_path / "a.svs").write_bytes(b"x")
    dev = _sheet(tmp_path / "dev.tsv", [{"slide_id": "s1", "patient_id": "p1", "label": "tumor", "source": "a.svs"}])
    ext = _sheet(tmp_path / "ext.tsv", [{"slide_id": "s1", "patient_id": "q1", "label": "tumor", "source": "a.svs"}])
    config = {"samples": dev, "external": [{"name": "ext", "samples": ext}], "predict": {}}
    with pytest.raises(InputError, match=r"slide_id 's1' is in the development sheet .* and in external sheet 'ext'") as err:
        load_extra_sheets(config, load_samples(config))
    assert "\n" not in str(err.value)


def test_a_predict_sheet_needs_only_slide_id_and_source_and_drops_labels(tmp_path):
    from histoflow.config import load_samples
    from histoflow.external import load_extra_sheets

    (tmp_path / "a.svs").write_bytes(b"x")
    dev = _sheet(tmp_path / "dev.tsv", [{"slide_id": "s1", "patient_id": "p1", "label": "tumor", "source": "a.svs"}])
    new = _sheet(tmp_path / "new.tsv", [{"slide_id": "n1", "source": "a.svs", "label": "tumor"}])
    config = {"samples": dev, "external": [], "predict": {"samples": new, "name": "new", "model": "mil-abmil"}}
    extra = load_extra_sheets(config, load_samples(config))
    table = extra["new"]["table"]
    assert extra["new"]["kind"] == "predict" and list(table["slide_id"]) == ["n1"]
    assert table["label"].isna().all() and table["patient_id"].tolist() == ["n1"]
    config["predict"]["name"] = None
    with pytest.raises(InputError, match="predict.name"):
        load_extra_sheets(config, load_samples(config))


def test_a_job_resolves_the_source_cell_of_an_extra_sheet(tmp_path, monkeypatch):
    from histoflow.external import EXTRA_SAMPLES_ENV
    from histoflow.privacy import SAMPLES_ENV, resolve_sheet_value, sheet_reference

    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.svs").write_bytes(b"y")
    dev = _sheet(tmp_path / "dev.tsv", [{"slide_id": "s1", "patient_id": "p1", "label": "tumor", "source": "a.svs"}])
    new = _sheet(tmp_path / "new.tsv", [{"slide_id": "n1", "source": "b.svs"}])
    monkeypatch.setenv(SAMPLES_ENV, dev)
    monkeypatch.setenv(EXTRA_SAMPLES_ENV, new)
    real = str((tmp_path / "b.svs").resolve())
    assert resolve_sheet_value(sheet_reference("source", real), "n1") == real
