"""Patch classifier on frozen features: learns tumour tiles, trains only on the fold's train slides,
and writes tile probabilities for every slide that heatmaps, lesions and slide features read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoflow.errors import InputError
from histoflow.io import read_json, write_parquet, write_tsv
from histoflow.patch_classifier import (PatchClassifierSettings, load_patch_classifier, predict_tile_probs,
                                        train_patch_classifier)
from histoflow.tile_probs import TILE_PROB_SCHEMA, mil_tile_probs, read_slide_probs, resolve_sources

DIM = 8
ROLES = {"s0": "train", "s1": "train", "s2": "train", "s3": "train", "s4": "val", "s5": "val", "s6": "test", "s7": "test"}


def write_features(path, slide_id, X, n_side):
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    coords = pd.DataFrame({"slide_id": slide_id, "x": xs.ravel() * 200, "y": ys.ravel() * 200, "target_mpp": 0.5,
                           "tile_px": 100, "size0": 200, "col": xs.ravel(), "row": ys.ravel()})
    table = pa.Table.from_pandas(coords, preserve_index=False)
    feat = pa.FixedSizeListArray.from_arrays(pa.array(X.astype(np.float32).ravel()), DIM)
    write_parquet(path, table.append_column("feature", feat))
    return coords


def make_cohort(tmp_path, poison_test=False, seed=0):
    """8 slides of 10x10 tiles; on tumour slides the left 3 columns are tumour, whose features
    are shifted along the first two dimensions."""
    rng = np.random.default_rng(seed)
    feats, labels, rows = [], [], []
    for i, (sid, role) in enumerate(ROLES.items()):
        tumour_slide = i % 2 == 0
        y = np.zeros(100, dtype=np.int8)
        if tumour_slide:
            y[(np.arange(100) % 10) < 3] = 1
        X = rng.normal(size=(100, DIM))
        X[y == 1, :2] += 2.5
        if poison_test and role == "test":
            X = X * 50 + 7  # anything read from test slides would move the model
            y = 1 - y
        coords = write_features(tmp_path / "features" / f"{sid}.parquet", sid, X, 10)
        lab = coords.assign(overlap=y.astype(np.float32), label=y)
        write_parquet(tmp_path / "patch_labels" / f"{sid}.parquet", lab)
        feats.append(str(tmp_path / "features" / f"{sid}.parquet"))
        labels.append(str(tmp_path / "patch_labels" / f"{sid}.parquet"))
        rows.append({"slide_id": sid, "patient_id": f"p{i}", "label": "tumor" if tumour_slide else "normal",
                     "y": int(tumour_slide), "site": "A", "fold": 0, "role": role})
    write_tsv(tmp_path / "splits.tsv", pd.DataFrame(rows))
    return feats, labels


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_learns_separable_tiles_with_high_auc(tmp_path, model):
    feats, labels = make_cohort(tmp_path)
    settings = {"model": model, "epochs": 12, "hidden_dim": 16, "batch_size": 64, "lr": 0.005, "label_smoothing": 0.1}
    metrics = train_patch_classifier(tmp_path / "splits.tsv", 0, feats, labels, settings, 7,
                                     tmp_path / "model.safetensors", tmp_path / "metrics.json")
    assert metrics["val"]["auc"] > 0.9
    assert metrics["test"]["auc"] > 0.9
    assert read_json(tmp_path / "metrics.json")["test"]["n_positive"] == 30
    assert metrics["slides"]["test"] == ["s6", "s7"]


def test_never_trains_on_test_slides(tmp_path):
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    out = {}
    for name, root, poison in (("clean", clean, False), ("poisoned", poisoned, True)):
        feats, labels = make_cohort(root, poison_test=poison)
        train_patch_classifier(root / "splits.tsv", 0, feats, labels, {"model": "logreg"}, 3,
                               root / "model.safetensors", root / "metrics.json")
        out[name] = load_patch_classifier(root / "model.safetensors")
    probe = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32)
    # changing the test slides' features and labels does not change the model at all
    assert np.array_equal(out["clean"].predict_proba(probe), out["poisoned"].predict_proba(probe))
    assert set(out["clean"].info["train_slides"]) == {"s0", "s1", "s2", "s3"}


def test_same_seed_same_model(tmp_path):
    feats, labels = make_cohort(tmp_path)
    probs = []
    for k in range(2):
        train_patch_classifier(tmp_path / "splits.tsv", 0, feats, labels, {"model": "mlp", "epochs": 5, "hidden_dim": 8},
                               11, tmp_path / f"m{k}.safetensors", tmp_path / f"m{k}.json")
        probs.append(load_patch_classifier(tmp_path / f"m{k}.safetensors").predict_proba(np.ones((3, DIM), np.float32)))
    assert np.array_equal(probs[0], probs[1])


def test_one_class_training_set_is_an_actionable_error(tmp_path):
    feats, labels = make_cohort(tmp_path)
    for p in labels:  # nothing annotated as tumour
        t = pq.read_table(p).to_pandas().assign(label=np.int8(0), overlap=np.float32(0))
        write_parquet(p, t)
    with pytest.raises(InputError, match="needs both"):
        train_patch_classifier(tmp_path / "splits.tsv", 0, feats, labels, {}, 1, tmp_path / "m.safetensors", tmp_path / "m.json")


def test_tile_probs_cover_every_slide_with_its_role(tmp_path):
    feats, labels = make_cohort(tmp_path)
    train_patch_classifier(tmp_path / "splits.tsv", 0, feats, labels, {}, 1, tmp_path / "m.safetensors", tmp_path / "m.json")
    out = tmp_path / "tile_probs" / "patch_classifier" / "fold0.parquet"
    predict_tile_probs(tmp_path / "m.safetensors", tmp_path / "splits.tsv", 0, feats, out)
    table = pq.read_table(out)
    assert table.schema.names == TILE_PROB_SCHEMA.names
    frame = table.to_pandas()
    assert frame.groupby("slide_id").size().to_dict() == {s: 100 for s in ROLES}
    assert frame.drop_duplicates("slide_id").set_index("slide_id")["role"].to_dict() == ROLES
    assert frame["prob"].between(0, 1).all()
    rows, fold, role = read_slide_probs([out], "s6")
    assert (fold, role, len(rows)) == (0, "test", 100)


def test_mil_instance_probs_become_tile_probs_and_test_fold_is_preferred(tmp_path):
    base = {"slide_id": "a", "x": [0, 200], "y": [0, 0], "col": [0, 1], "row": [0, 0], "size0": 200, "target_mpp": 0.5}
    paths = []
    for fold, role in ((0, "train"), (1, "test"), (2, "val")):
        scores = pd.DataFrame(base).assign(fold=fold, role=role, attention=[0.3, 0.7], instance_prob=[0.1 * fold, 0.9])
        write_parquet(tmp_path / f"ts{fold}.parquet", scores)
        paths.append(tmp_path / f"tp{fold}.parquet")
        mil_tile_probs(tmp_path / f"ts{fold}.parquet", fold, paths[-1])
    rows, fold, role = read_slide_probs(paths, "a")
    assert (fold, role) == (1, "test")
    assert rows["prob"].tolist() == pytest.approx([0.1, 0.9])
    assert rows["attention"].tolist() == pytest.approx([0.3, 0.7])


def test_source_choice():
    assert resolve_sources("auto", True, ["abmil"])[0] == ["patch_classifier"]
    assert resolve_sources("auto", False, ["abmil", "clam"])[0] == ["mil-abmil", "mil-clam"]
    assert resolve_sources(["mil-abmil"], True, ["abmil"])[0] == ["mil-abmil"]
    with pytest.raises(InputError, match="annotations"):
        resolve_sources(["patch_classifier"], False, ["abmil"])
    with pytest.raises(InputError, match="mil models"):
        resolve_sources(["mil-transmil"], False, ["abmil"])


def test_platt_calibration_undoes_overconfidence():
    """Logits 4x too large (an overconfident classifier): the fitted slope brings them back."""
    from histoflow.patch_classifier import fit_platt

    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    a, b = fit_platt(4 * true_logit, y)
    assert a == pytest.approx(0.25, rel=0.1) and abs(b) < 0.1


def test_platt_calibration_on_separable_val_tiles_keeps_the_ranking():
    """A small, perfectly separated val set must not push every tile to exactly 0 or 1: heatmaps,
    lesion thresholds and average precision need the ranking."""
    from histoflow.patch_classifier import fit_platt

    logits = np.concatenate([np.linspace(-6, -1, 100), np.linspace(2, 8, 9)])
    y = np.r_[np.zeros(100), np.ones(9)].astype(int)
    a, b = fit_platt(logits, y)
    assert 0 < a < 10 and abs(b) < 20
    probs = 1 / (1 + np.exp(-(a * np.linspace(-8, 10, 200) + b)))
    assert len(np.unique(probs)) == 200 and probs.min() > 0 and probs.max() < 1


def test_lesion_share_enriches_only_the_train_slides_sample(tmp_path):
    """patch_classifier.lesion_share: informed sampling of the train slides' labelled tiles
    (lesion tiles preferred); val and test tiles are never sampled, with or without it."""
    feats, labels = make_cohort(tmp_path)
    out = {}
    for share in (None, 0.8):
        settings = {"model": "logreg", "max_tiles_per_slide": 10, "lesion_share": share}
        out[share] = train_patch_classifier(tmp_path / "splits.tsv", 0, feats, labels, settings, 7,
                                            tmp_path / f"m{share}.safetensors", tmp_path / f"m{share}.json")
    # 4 train slides x 10 tiles; the two tumour train slides give 8 lesion tiles each at share 0.8
    assert out[0.8]["train"]["n_tiles"] == out[None]["train"]["n_tiles"] == 40
    assert out[0.8]["train"]["n_positive"] == 16 > out[None]["train"]["n_positive"]
    for role in ("val", "test"):
        for key in ("n_tiles", "n_positive", "n_negative"):
            assert out[0.8][role][key] == out[None][role][key] == {"n_tiles": 200, "n_positive": 30, "n_negative": 170}[key]
    with pytest.raises(InputError, match="lesion_share"):
        PatchClassifierSettings.from_config({"lesion_share": 1.5})


class _Boom:
    """A pickle that runs code when loaded: writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_model_file_is_data_that_round_trips(tmp_path, model):
    import pickle

    from histoflow.patch_classifier import PatchClassifierSettings, assemble, fit_patch_classifier, save_patch_classifier

    feats, labels = make_cohort(tmp_path)
    settings = PatchClassifierSettings.from_config({"model": model, "epochs": 3, "hidden_dim": 8})
    rng = np.random.default_rng(0)
    fitted = fit_patch_classifier(assemble(["s0", "s1", "s2", "s3"], dict(zip([f"s{i}" for i in range(8)], feats)),
                                           dict(zip([f"s{i}" for i in range(8)], labels)), settings, rng),
                                  None, settings, 5)
    fitted.info["fold"] = 0
    path = tmp_path / "model.safetensors"
    save_patch_classifier(fitted, path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and b"histoflow.patch_classifier/1" in data[8:8 + header]   # a JSON header, no pickle
    probe = np.random.default_rng(2).normal(size=(20, DIM)).astype(np.float32)
    loaded = load_patch_classifier(path)
    assert np.array_equal(loaded.predict_proba(probe), fitted.predict_proba(probe))
    assert loaded.kind == model and loaded.platt == fitted.platt and loaded.info["fold"] == 0
    # a pickle in its place is refused, and nothing in it runs
    marker = tmp_path / "ran"
    path.write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(InputError, match="not a histoflow patch classifier"):
        load_patch_classifier(path)
    assert not marker.exists()
