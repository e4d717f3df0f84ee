"""Slide-classifier bundles (histoflow/slide_bundle.py): a bundle of ``<clf>@<source>`` scores a
slide as the development fold models did (tile model -> slide features -> classifier), loads
without pickle, and refuses a file holding a type outside its allow list."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoflow.errors import InputError
from test_mil import DIM, synthetic_bags

SETTINGS = {"tiling": {"mpp": [1.0], "tile_px": 112, "overlap_px": 0, "min_tissue_fraction": 0.5,
                       "max_tiles_per_slide": None},
            "features": {"mpp": 1.0, "dtype": "float16", "tta": False, "cpu_autocast": "none"}, "stain_method": "none"}
TARGET = {"type": "classification", "binary": True, "positive_label": "tumor", "classes": ["normal", "tumor"]}
SF = {"thresholds": [0.5, 0.9], "mode_bins": 10}


def _write_features(path, slide_id, feats, width=12):
    """A features table on a 2-D tile grid (regions need neighbours in both directions)."""
    n = len(feats)
    col, row = np.arange(n) % width, np.arange(n) // width
    table = pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "x": pa.array(col * 256, pa.int64()), "y": pa.array(row * 256, pa.int64()),
        "target_mpp": pa.array(np.full(n, 0.5)), "tile_px": pa.array(np.full(n, 256), pa.int32()),
        "size0": pa.array(np.full(n, 256), pa.int32()), "col": pa.array(col, pa.int32()),
        "row": pa.array(row, pa.int32()),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.astype(np.float16).reshape(-1)), DIM),
    })
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """Per fold: a patch classifier on the synthetic bags' tiles, its tile probabilities, the
    slide features and two slide classifiers (rf, logreg), as the workflow's rules write them."""
    from histoflow.patch_classifier import (PatchClassifierSettings, TileSet, fit_patch_classifier,
                                            predict_tile_probs, save_patch_classifier)
    from histoflow.slide_classifier import write_slide_classifier
    from histoflow.slide_features import write_slide_features
    from histoflow.split import write_splits

    root = tmp_path_factory.mktemp("slide_bundle")
    bags, ys, truth = synthetic_bags(20, seed=4)
    samples, paths, jsons = [], [], []
    (root / "features").mkdir()
    (root / "slides").mkdir()
    for i, (bag, y) in enumerate(zip(bags, ys)):
        sid = f"S{i:02d}"
        samples.append({"slide_id": sid, "patient_id": f"P{i:02d}", "label": "tumor" if y else "normal", "site": None})
        _write_features(root / "features" / f"{sid}.parquet", sid, bag)
        (root / "slides" / f"{sid}.json").write_text(json.dumps({"slide_id": sid, "mpp_x": 0.5, "status": "ok"}))
        paths.append(str(root / "features" / f"{sid}.parquet"))
        jsons.append(str(root / "slides" / f"{sid}.json"))
    write_splits(samples, {"k": 2, "strategy": "kfold"}, "tumor", 3, root / "splits.tsv", root / "split.json")
    splits = pd.read_csv(root / "splits.tsv", sep="\t", dtype={"slide_id": str})
    pc = PatchClassifierSettings.from_config({"model": "logreg"})
    source_models, prob_paths = [], []
    for fold in (0, 1):
        train = set(splits[(splits["fold"] == fold) & (splits["role"] == "train")]["slide_id"])
        idx = [i for i, s in enumerate(samples) if s["slide_id"] in train]
        X = np.concatenate([bags[i] for i in idx]).astype(np.float32)
        t = np.concatenate([truth[i] for i in idx]).astype(np.int8)
        model = fit_patch_classifier(TileSet(X, t, t.astype(float), np.zeros(len(t), dtype=object)), None, pc, 7 + fold)
        path = root / "patch_classifier" / f"fold{fold}" / "model.safetensors"
        path.parent.mkdir(parents=True)
        save_patch_classifier(model, path)
        source_models.append(str(path))
        prob_paths.append(str(root / "tile_probs" / f"fold{fold}.parquet"))
        predict_tile_probs(path, root / "splits.tsv", fold, paths, prob_paths[-1])
    table = root / "slide_features.parquet"
    write_slide_features(prob_paths, str(root / "splits.tsv"), jsons, str(table), SF, "patch_classifier")
    # no cross-fitting here (what is tested is the scoring of held-out slides): mark the train
    # rows as if cross-fitted so the honesty check lets the classifiers train
    frame = pd.read_parquet(table)
    train_rows = frame["role"] == "train"
    frame.loc[train_rows, "tile_probs_model"] = "fold" + frame.loc[train_rows, "fold"].astype(str) + ".inner0"
    frame.to_parquet(table)
    out = {"root": root, "paths": paths, "jsons": jsons, "samples": samples, "source_models": source_models,
           "table": str(table), "splits": splits}
    for clf in ("rf", "logreg"):
        d = root / "slide_classifier" / clf
        d.mkdir(parents=True)
        models = [str(d / f"fold{k}.skops") for k in (0, 1)]
        write_slide_classifier(str(table), str(d / "predictions.tsv"), str(d / "importances.tsv"), clf,
                               {"n_estimators": 50}, 1337, model_paths=models)
        out[clf] = {"models": models, "predictions": str(d / "predictions.tsv")}
    return out


def _bundle(dev, clf, folder):
    from histoflow.slide_bundle import write_slide_classifier_bundle

    out = folder / "bundle.json"
    manifest = write_slide_classifier_bundle(f"{clf}@patch_classifier", clf, "patch_classifier", dev[clf]["models"],
                                             [dev[clf]["predictions"]], dev["table"], dev["source_models"], None,
                                             dev["paths"], "resnet50-trunc", SETTINGS, SF, TARGET,
                                             {"n_bootstrap": 50}, 1337, None, out)
    return out, manifest


@pytest.fixture(scope="module", params=["rf", "logreg"])
def bundle(request, dev):
    folder = dev["root"] / "models" / f"{request.param}@patch_classifier"
    out, manifest = _bundle(dev, request.param, folder)
    return {"clf": request.param, "json": out, "manifest": manifest}


def test_the_bundle_holds_both_models_of_every_fold_as_data(bundle):
    folder = bundle["json"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "fold0.skops", "fold1.skops",
                                                        "source_fold0.safetensors", "source_fold1.safetensors"]
    m = bundle["manifest"]
    assert m["kind"] == "slide_classifier" and m["classifier"] == bundle["clf"]
    assert m["source"] == {"name": "patch_classifier", "kind": "patch_classifier"}
    assert m["slide_features"] == SF and "t50_tumour_pct" in m["feature_columns"]
    assert "tile_probs_model" not in m["feature_columns"] and "y" not in m["feature_columns"]
    assert m["threshold"]["threshold_source"] in ("pooled_validation", "fixed") and m["histoflow_version"]
    assert m["tiling"] == SETTINGS["tiling"] and m["encoder"]["name"] == "resnet50-trunc"


def test_a_bundle_scores_every_slide_as_its_fold_models_did(dev, bundle, monkeypatch):
    """predict_external: every (slide, fold) gets the probability the development fold's
    classifier gave it (tile model, slide features and classifier rebuilt from the bundle), and
    loading runs no pickle."""
    from histoflow.bundle import predict_external

    def refuse(*_a, **_k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    out = dev["root"] / f"ext_{bundle['clf']}.tsv"
    table = predict_external(str(bundle["json"]), dev["samples"], dev["paths"], "tumor", out, slide_jsons=dev["jsons"])
    dev_pred = pd.read_csv(dev[bundle["clf"]]["predictions"], sep="\t", dtype={"slide_id": str})
    merged = table.merge(dev_pred, on=["slide_id", "fold"], suffixes=("", "_dev"))
    assert len(merged) == len(table) == 2 * len(dev["samples"])
    np.testing.assert_allclose(merged["prob"], merged["prob_dev"], rtol=0, atol=1e-9)
    assert merged["prob"].std() > 0.05   # not a constant that matches by luck


def test_predict_slides_with_a_slide_classifier_bundle(dev, bundle, tmp_path):
    """slides.tsv: the mean over folds of the fold pipelines, classed at the bundle's threshold."""
    from histoflow.bundle import predict_slides

    png = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(png)
    tissue = tmp_path / "t.json"
    tissue.write_text("{}")
    n = 4
    slides = predict_slides(str(bundle["json"]), [s["slide_id"] for s in dev["samples"][:n]], dev["paths"][:n],
                            dev["jsons"][:n], [None] * n, [None] * n, tmp_path / "slides.tsv",
                            tmp_path / "tiles.parquet", tmp_path / "heatmaps", {})
    dev_pred = pd.read_csv(dev[bundle["clf"]]["predictions"], sep="\t", dtype={"slide_id": str})
    mean = dev_pred.groupby("slide_id")["prob"].mean()
    for sid, p in zip(slides["slide_id"], slides["prob"]):
        assert p == pytest.approx(mean[sid], abs=1e-9)
    t = bundle["manifest"]["threshold"]["threshold"]
    assert list(slides["predicted_class"]) == ["tumor" if p >= t else "normal" for p in slides["prob"]]
    assert (slides["model"] == f"{bundle['clf']}@patch_classifier").all() and (slides["n_models"] == 2).all()
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png")) == sorted(f"{s}.png" for s in slides["slide_id"])


def test_a_skops_file_with_an_untrusted_type_is_refused(dev, tmp_path):
    """A fold file swapped for one holding a foreign type (its sha256 updated too) is refused
    before anything is built."""
    import skops.io as sio
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from histoflow.bundle import sha256_of
    from histoflow.slide_bundle import load_estimator, load_slide_classifier_bundle

    folder = tmp_path / "rf@patch_classifier"
    out, manifest = _bundle(dev, "rf", folder)
    assert load_estimator(folder / "fold0.skops") is not None
    evil = make_pipeline(FunctionTransformer(func=shutil.rmtree))
    (folder / "fold0.skops").write_bytes(sio.dumps(evil))
    with pytest.raises(InputError, match="untrusted type 'shutil.rmtree'"):
        load_estimator(folder / "fold0.skops")
    manifest["folds"][0]["sha256"] = sha256_of(folder / "fold0.skops")
    out.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="untrusted type"):
        load_slide_classifier_bundle(out)


def test_a_function_of_a_trusted_package_is_refused_too(tmp_path):
    """numpy.save in a FunctionTransformer: a type from numpy, yet no estimator histoflow writes."""
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from histoflow.slide_bundle import load_estimator

    evil = make_pipeline(FunctionTransformer(func=np.save, kw_args={"arr": np.zeros(1)}), LogisticRegression())
    (tmp_path / "fold0.skops").write_bytes(sio.dumps(evil))
    with pytest.raises(InputError, match="untrusted type 'numpy.save'"):
        load_estimator(tmp_path / "fold0.skops")


def test_a_tampered_slide_classifier_file_is_refused(dev, tmp_path):
    from histoflow.slide_bundle import load_slide_classifier_bundle

    folder = tmp_path / "logreg@patch_classifier"
    out, _ = _bundle(dev, "logreg", folder)
    with open(folder / "source_fold1.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="source_fold1.safetensors does not match its sha256"):
        load_slide_classifier_bundle(out)


def test_every_slide_model_type_round_trips_through_skops():
    """rf / gb / logreg and their regression and survival twins: the loaded pipeline predicts
    exactly as the fitted one."""
    from sksurv.util import Surv

    from histoflow.slide_bundle import dump_estimator, load_estimator
    from histoflow.slide_classifier import (SlideClassifierSettings, make_classifier, make_regressor,
                                            make_survival_model)

    settings = SlideClassifierSettings.from_config({"n_estimators": 20})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    targets = {make_classifier: (X[:, 0] > 0).astype(int), make_regressor: X[:, 1],
               make_survival_model: Surv.from_arrays(event=rng.random(40) < 0.7, time=rng.exponential(size=40) + 0.1)}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for make, y in targets.items():
            for name in ("rf", "gb", "logreg"):
                model = make(name, settings, 0).fit(X, y)
                path = Path(tmp) / f"{make.__name__}_{name}.skops"
                dump_estimator(model, path)
                np.testing.assert_array_equal(load_estimator(path).predict(X), model.predict(X))


def test_predict_bundle_accepts_a_slide_classifier_of_the_run():
    from histoflow.bundle import predict_bundle

    path, encoder = predict_bundle({"model": "rf@patch_classifier"}, {"mil-abmil": "uni", "rf@patch_classifier": "ctp"},
                                   {}, "results", "uni")
    assert (path, encoder) == ("results/models/rf@patch_classifier/bundle.json", "ctp")


def test_a_survival_slide_classifier_on_mil_tile_probabilities_scores_as_in_development(dev, tmp_path):
    """Source mil-abmil (the fold MIL models' instance probabilities), target survival (random
    survival forest, scikit-survival): the bundle rebuilds both and gives every (slide, fold) its
    development risk."""
    from histoflow.bundle import predict_external, target_of, write_mil_bundle
    from histoflow.mil.train import train_fold
    from histoflow.slide_bundle import write_slide_classifier_bundle
    from histoflow.slide_classifier import write_slide_classifier
    from histoflow.slide_features import write_slide_features
    from histoflow.split import write_splits
    from histoflow.tile_probs import mil_tile_probs

    target_cfg = {"type": "survival"}
    samples = [{**s, "label": "x", "time": float(5 + 3 * (i % 4) + (i % 3)), "event": int(i % 5 != 0)}
               for i, s in enumerate(dev["samples"])]
    write_splits(samples, {"k": 2, "strategy": "kfold"}, "tumor", 3, tmp_path / "splits.tsv", tmp_path / "split.json",
                 target=target_cfg)
    target = {"target": target_cfg, "positive_label": "tumor", "labels": [s["label"] for s in samples]}
    ckpts, preds, probs = [], [], []
    for fold in (0, 1):
        d = tmp_path / "mil" / f"fold{fold}"
        train_fold(tmp_path / "splits.tsv", dev["paths"], "abmil", fold,
                   {"models": ["abmil"], "epochs": 2, "lr": 2e-3, "hidden_dim": DIM, "device": "cpu", "min_epochs": 1},
                   1337, "resnet50-trunc", d / "checkpoint.pt", d / "history.tsv", d / "predictions.tsv",
                   d / "tile_scores.parquet", target=target)
        ckpts.append(str(d / "checkpoint.pt"))
        preds.append(str(d / "predictions.tsv"))
        probs.append(str(tmp_path / "tile_probs" / f"fold{fold}.parquet"))
        (tmp_path / "tile_probs").mkdir(exist_ok=True)
        mil_tile_probs(d / "tile_scores.parquet", fold, probs[-1])
    bundle_target = target_of({"target": target_cfg}, [s["label"] for s in samples])
    mil_json = tmp_path / "models" / "mil-abmil" / "bundle.json"
    write_mil_bundle("mil-abmil", ckpts, preds, dev["paths"], "resnet50-trunc", SETTINGS, bundle_target,
                     {"n_bootstrap": 20}, 1337, None, mil_json)
    table = tmp_path / "slide_features.parquet"
    write_slide_features(probs, str(tmp_path / "splits.tsv"), dev["jsons"], str(table), SF, "mil-abmil")
    frame = pd.read_parquet(table)
    train_rows = frame["role"] == "train"
    frame.loc[train_rows, "tile_probs_model"] = "fold" + frame.loc[train_rows, "fold"].astype(str) + ".inner0"
    frame.to_parquet(table)
    d = tmp_path / "slide_classifier"
    d.mkdir()
    models = [str(d / f"fold{k}.skops") for k in (0, 1)]
    write_slide_classifier(str(table), str(d / "predictions.tsv"), str(d / "importances.tsv"), "rf",
                           {"n_estimators": 30}, 1337, target=target, model_paths=models)
    out = tmp_path / "models" / "rf@mil-abmil" / "bundle.json"
    manifest = write_slide_classifier_bundle("rf@mil-abmil", "rf", "mil-abmil", models, [str(d / "predictions.tsv")],
                                             str(table), [str(mil_json.parent / f"fold{k}.safetensors") for k in (0, 1)],
                                             str(mil_json), dev["paths"], "resnet50-trunc", SETTINGS, SF,
                                             bundle_target, {"n_bootstrap": 20}, 1337, None, out)
    assert manifest["source"]["kind"] == "mil" and manifest["threshold"]["threshold_source"] == "train_median_risk"
    ext = predict_external(str(out), samples, dev["paths"], None, tmp_path / "ext.tsv", slide_jsons=dev["jsons"])
    dev_pred = pd.read_csv(d / "predictions.tsv", sep="\t", dtype={"slide_id": str})
    merged = ext.merge(dev_pred, on=["slide_id", "fold"], suffixes=("", "_dev"))
    assert len(merged) == 2 * len(samples)
    np.testing.assert_allclose(merged["risk"], merged["risk_dev"], rtol=0, atol=1e-9)
    assert merged["risk"].std() > 0
