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
            "features": {"mpp": 1.0, "dtype": "float16", "tta": False, "cpu_autocast": "none"}, "stain_method": "none"}
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


@pytest.mark.parametrize("section,key,value", [("tiling", "tile_px", 224), ("features", "mpp", 0.5),
                                               ("features", "cpu_autocast", "bfloat16")])
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


def test_a_slide_classifier_name_resolves_to_its_bundle():
    from histoflow.bundle import bundle_json_path

    assert str(bundle_json_path("rf@patch_classifier", "results")) == "results/models/rf@patch_classifier/bundle.json"


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


def test_a_development_patient_in_an_external_sheet_is_refused_in_one_line(tmp_path):
    """An external cohort is judged as unseen: a development patient rescanned under a new slide
    id would be scored by models that trained on that patient."""
    from histoflow.config import load_samples
    from histoflow.external import load_extra_sheets

    (tmp_path / "a.svs").write_bytes(b"x")
    dev = _sheet(tmp_path / "dev.tsv", [{"slide_id": "s1", "patient_id": "p1", "label": "tumor", "source": "a.svs"}])
    ext = _sheet(tmp_path / "ext.tsv", [{"slide_id": "e1", "patient_id": "p1", "label": "tumor", "source": "a.svs"}])
    config = {"samples": dev, "external": [{"name": "ext", "samples": ext}], "predict": {}}
    with pytest.raises(InputError, match=r"patient_id 'p1' of external sheet 'ext' is also in the development sheet") as err:
        load_extra_sheets(config, load_samples(config))
    assert "\n" not in str(err.value)
    ok = _sheet(tmp_path / "ok.tsv", [{"slide_id": "e1", "patient_id": "q1", "label": "tumor", "source": "a.svs"}])
    config["external"] = [{"name": "ext", "samples": ok}]
    assert list(load_extra_sheets(config, load_samples(config))) == ["ext"]


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


# ---------------------------------------------------------------------------------------------
# Every target type: a bundle scores as the fold models did, with the target's columns

def _task_rows(kind: str, ys: np.ndarray, i: int) -> dict:
    row = {"slide_id": f"S{i:02d}", "patient_id": f"P{i:02d}", "site": None}
    if kind == "multiclass":
        row["label"] = ["a", "b", "c"][i % 3]
    elif kind == "survival":
        row.update(label="x", time=float(10 - 6 * ys[i] + (i % 5)), event=int(i % 4 != 0))
    else:
        row["label"] = f"{10.0 + 5.0 * ys[i] + (i % 3):.2f}"
    return row


TASK_TARGETS = {"multiclass": {"type": "classification", "classes": "sheet"}, "survival": {"type": "survival"},
                "regression": {"type": "regression"}}


@pytest.fixture(scope="module", params=["multiclass", "survival", "regression"])
def task_bundle(request, tmp_path_factory):
    """Two abmil fold models of a non-binary target (train_fold, as the workflow), and their bundle."""
    from histoflow.bundle import target_of, write_mil_bundle
    from histoflow.mil.train import train_fold
    from histoflow.split import write_splits

    kind = request.param
    root = tmp_path_factory.mktemp(f"bundle_{kind}")
    bags, ys, _ = synthetic_bags(18, seed=5)
    samples, paths = [], []
    for i, bag in enumerate(bags):
        samples.append(_task_rows(kind, ys, i))
        path = root / "features" / f"S{i:02d}.parquet"
        path.parent.mkdir(exist_ok=True)
        _write_features(path, f"S{i:02d}", bag)
        paths.append(str(path))
    config = {"target": TASK_TARGETS[kind], "positive_label": "tumor"}
    write_splits(samples, {"k": 2, "strategy": "holdout", "test_fraction": 0.25}, "tumor", 3,
                 root / "splits.tsv", root / "split.json", target=TASK_TARGETS[kind])
    settings = {"models": ["abmil"], "epochs": 3, "lr": 2e-3, "hidden_dim": DIM, "device": "cpu", "min_epochs": 1}
    preds, ckpts = [], []
    for fold in (0, 1):
        d = root / "mil" / f"fold{fold}"
        train_fold(root / "splits.tsv", paths, "abmil", fold, settings, 1337, "resnet50-trunc", d / "checkpoint.pt",
                   d / "history.tsv", d / "predictions.tsv", d / "tile_scores.parquet",
                   target={**config, "labels": [s["label"] for s in samples]})
        preds.append(str(d / "predictions.tsv"))
        ckpts.append(str(d / "checkpoint.pt"))
    target = target_of(config, [s["label"] for s in samples])
    out = root / "models" / "mil-abmil" / "bundle.json"
    manifest = write_mil_bundle("mil-abmil", ckpts, preds, paths, "resnet50-trunc", SETTINGS, target,
                                {"n_bootstrap": 50}, 1337, None, out)
    return {"kind": kind, "root": root, "paths": paths, "predictions": preds, "samples": samples, "bundle": out,
            "manifest": manifest}


def test_every_target_type_is_bundled_and_scores_as_its_fold_models(task_bundle):
    """Each fold model of the bundle gives, for every slide, the output that fold's
    predictions.tsv holds (softmax probabilities, risk, or the value de-standardised with that
    fold's training mean/SD), in the external cohort's columns."""
    from histoflow.bundle import external_columns, predict_external

    kind, manifest = task_bundle["kind"], task_bundle["manifest"]
    assert manifest["target"]["kind"] == kind
    assert manifest["threshold"]["threshold_source"] == {"multiclass": "argmax", "survival": "train_median_risk",
                                                         "regression": "none"}[kind]
    cols = {"multiclass": ["prob_a", "prob_b", "prob_c"], "survival": ["risk"], "regression": ["value"]}[kind]
    out = task_bundle["root"] / "ext.tsv"
    table = predict_external(str(task_bundle["bundle"]), task_bundle["samples"], task_bundle["paths"], None, out)
    assert list(table.columns) == external_columns(manifest["target"])
    for fold, path in enumerate(task_bundle["predictions"]):
        dev = pd.read_csv(path, sep="\t", dtype={"slide_id": str}).set_index("slide_id")
        mine = table[table["fold"] == fold].set_index("slide_id").loc[dev.index]
        np.testing.assert_allclose(mine[cols].to_numpy(float), dev[cols].to_numpy(float), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mine["y"].to_numpy(float), dev["y"].to_numpy(float))
    if kind == "multiclass":
        np.testing.assert_allclose(table[cols].sum(axis=1), 1.0, atol=1e-6)


def test_external_metrics_of_every_target_type(task_bundle):
    """metrics.json external.<cohort>.<model> for a non-binary target: same metric names and CIs
    as the development model, the fold models' mean per slide, each slide once."""
    from histoflow.bundle import predict_external
    from histoflow.metrics import write_target_metrics
    from histoflow.targets import Target

    kind = task_bundle["kind"]
    root = task_bundle["root"]
    ext = root / "ext_metrics.tsv"
    predict_external(str(task_bundle["bundle"]), task_bundle["samples"], task_bundle["paths"], None, ext)
    task = Target.from_config({"target": TASK_TARGETS[kind]}, labels=[s["label"] for s in task_bundle["samples"]])
    plots = {"multiclass": {"roc": "roc.png", "pr": "pr.png", "calibration": "cal.png", "confusion_tsv": "c.tsv",
                            "confusion_png": "c.png"}, "survival": {"km": "km.png"}, "regression": {"scatter": "s.png"}}[kind]
    payload = write_target_metrics({"mil-abmil": task_bundle["predictions"]}, task, str(root / "m.json"), str(root / "m.tsv"),
                                   {k: str(root / v) for k, v in plots.items()}, {"n_bootstrap": 50}, 1,
                                   strategy="holdout", external={"ext": {"mil-abmil": str(ext)}},
                                   external_tsvs={"ext": str(root / "ext_cmp.tsv")})
    rec, dev = payload["external"]["ext"]["mil-abmil"], payload["models"]["mil-abmil"]
    assert rec["n_slides"] == len(task_bundle["samples"]) and rec["n_patients"] == len(task_bundle["samples"])
    assert set(rec["ci"]) == set(dev["ci"]) and np.isfinite(rec["pooled"][task.primary_metric])
    assert rec["method"]["test_prediction"].startswith("external cohort: each slide's output is the mean of the 2")
    # each external slide's score is the mean of the two fold models' outputs
    table = pd.read_csv(ext, sep="\t")
    col = task.score_columns[0]
    assert rec["pooled"] == pytest.approx(
        __import__("histoflow.metrics", fromlist=["_metrics_of"])._metrics_of(
            task, table.groupby(["slide_id", "patient_id", "y", *(["time", "event"] if kind == "survival" else [])],
                                as_index=False)[task.score_columns].mean(), rec.get("horizons", [])), nan_ok=True)
    assert (root / "ext_cmp.tsv").exists() and col
    json.dumps(payload)


def test_predict_slides_of_every_target_type(task_bundle, tmp_path):
    """predictions/<name>/slides.tsv for a non-binary bundle: the fold models' mean output per
    slide, the predicted class at the bundle's operating point (argmax class; risk group at the
    training-median cut-off; none for a value), per-class tile scores and a heatmap per slide."""
    from histoflow.bundle import predict_slides
    from histoflow.io import write_json

    kind, manifest = task_bundle["kind"], task_bundle["manifest"]
    paths = task_bundle["paths"][:4]
    ids = [f"S{i:02d}" for i in range(4)]
    slide_jsons = []
    for sid in ids:
        write_json(tmp_path / f"{sid}.json", {"slide_id": sid, "status": "ok", "path": str(tmp_path / "absent.svs"),
                                              "width": 60000, "height": 600})
        slide_jsons.append(str(tmp_path / f"{sid}.json"))
    table = predict_slides(str(task_bundle["bundle"]), ids, paths, slide_jsons, [""] * 4, [""] * 4,
                           tmp_path / "slides.tsv", tmp_path / "tiles.parquet", tmp_path / "heatmaps", {"dpi": 20})
    cols = {"multiclass": ["prob_a", "prob_b", "prob_c"], "survival": ["risk"], "regression": ["value"]}[kind]
    folds = [pd.read_csv(p, sep="\t", dtype={"slide_id": str}).set_index("slide_id") for p in task_bundle["predictions"]]
    expected = np.mean([f.loc[ids, cols].to_numpy(float) for f in folds], axis=0)
    np.testing.assert_allclose(table[cols].to_numpy(float), expected, rtol=1e-5, atol=1e-5)
    if kind == "multiclass":
        assert list(table["predicted_class"]) == [["a", "b", "c"][k] for k in expected.argmax(1)]
        tiles = pd.read_parquet(tmp_path / "tiles.parquet")
        assert set(cols) <= set(tiles.columns)
        np.testing.assert_allclose(tiles["prob"], tiles[cols].max(axis=1), atol=1e-6)
    elif kind == "survival":
        cut = manifest["threshold"]["threshold"]
        assert list(table["predicted_class"]) == ["high_risk" if r > cut else "low_risk" for r in expected[:, 0]]
    else:
        assert table["predicted_class"].isna().all()
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png")) == [f"{s}.png" for s in ids]


def test_a_bundle_records_every_feature_setting_that_changes_the_features():
    """bfloat16 CPU autocast changes the features' numbers: a bundle says which it was trained on,
    so a run extracting the other way is refused (check_bundle_config)."""
    from histoflow.bundle import bundle_settings, check_bundle_config

    base = {"tiling": dict(SETTINGS["tiling"]), "features": {**SETTINGS["features"], "cpu_autocast": "none"}}
    trained = {"model": "mil-abmil", "encoder": {"name": "resnet50-trunc"}, **bundle_settings(base)}
    assert trained["features"]["cpu_autocast"] == "none"
    other = bundle_settings({**base, "features": {**base["features"], "cpu_autocast": "bfloat16"}})
    with pytest.raises(InputError, match=r"features\.cpu_autocast="):
        check_bundle_config(trained, other, "resnet50-trunc")
