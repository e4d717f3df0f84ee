"""Slide classifiers train on honest features (issue 16, item 3): each outer fold's train slides
are scored by inner-fold tile models that did not see them (cross-fitting), as test slides are by
the outer fold's model; training on in-sample features is refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoflow.crossfit import crossfit_models, crossfit_patch_classifier, make_inner_splits, write_inner_splits
from histoflow.errors import InputError
from histoflow.io import write_parquet, write_tsv
from histoflow.patch_classifier import predict_tile_probs, train_patch_classifier
from histoflow.slide_classifier import SlideClassifierSettings, check_honest_training, train_and_predict
from histoflow.slide_features import write_slide_features

DIM = 8
# outer fold 0: 8 train slides (4 patients with two slides each), 2 val, 2 test
SLIDES = [("s0", "p0", 1, "train"), ("s1", "p0", 1, "train"), ("s2", "p1", 0, "train"), ("s3", "p1", 0, "train"),
          ("s4", "p2", 1, "train"), ("s5", "p3", 0, "train"), ("s6", "p4", 1, "train"), ("s7", "p5", 0, "train"),
          ("s8", "p6", 1, "val"), ("s9", "p7", 0, "val"), ("s10", "p8", 1, "test"), ("s11", "p9", 0, "test")]


def splits_table(folds=1):
    rows = []
    for fold in range(folds):
        for sid, pid, y, role in SLIDES:
            rows.append({"slide_id": sid, "patient_id": pid, "label": "tumor" if y else "normal", "y": y, "site": "",
                         "fold": fold, "role": role})
    return pd.DataFrame(rows)


def make_cohort(root, flip=None, seed=0):
    """10 x 10 tiles per slide; on tumour slides the left 3 columns are tumour (features shifted).
    ``flip``: a slide whose tile labels are inverted (nothing else changes)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for sid, _, y_slide, _ in SLIDES:
        xs, ys = np.meshgrid(np.arange(10), np.arange(10))
        y = np.zeros(100, np.int8)
        if y_slide:
            y[xs.ravel() < 3] = 1
        X = rng.normal(size=(100, DIM))
        X[y == 1, :2] += 1.5
        coords = pd.DataFrame({"slide_id": sid, "x": xs.ravel() * 200, "y": ys.ravel() * 200, "target_mpp": 0.5,
                               "tile_px": 100, "size0": 200, "col": xs.ravel(), "row": ys.ravel()})
        table = pa.Table.from_pandas(coords, preserve_index=False)
        feat = pa.FixedSizeListArray.from_arrays(pa.array(X.astype(np.float32).ravel()), DIM)
        write_parquet(root / "features" / f"{sid}.parquet", table.append_column("feature", feat))
        lab = 1 - y if sid == flip else y
        write_parquet(root / "patch_labels" / f"{sid}.parquet", coords.assign(overlap=lab.astype(np.float32), label=lab))
        (root / "slides").mkdir(exist_ok=True)
        (root / "slides" / f"{sid}.json").write_text(f'{{"slide_id": "{sid}", "mpp_x": 0.5}}')
        feats.append(str(root / "features" / f"{sid}.parquet"))
        labels.append(str(root / "patch_labels" / f"{sid}.parquet"))
    write_tsv(root / "splits.tsv", splits_table())
    return feats, labels


def slide_features_of(root, flip=None, crossfit=True):
    """The whole patch-classifier path of fold 0 as the workflow runs it: outer model and its tile
    probabilities, inner splits and cross-fitted probabilities, slide features."""
    feats, labels = make_cohort(root, flip=flip)
    settings = {"model": "logreg", "max_tiles_per_slide": None}
    train_patch_classifier(root / "splits.tsv", 0, feats, labels, settings, 5, root / "model.safetensors", root / "m.json")
    predict_tile_probs(root / "model.safetensors", root / "splits.tsv", 0, feats, root / "fold0.parquet")
    write_inner_splits(root / "splits.tsv", 0, 3, 5, root / "inner.tsv")
    crossfit_patch_classifier(root / "inner.tsv", feats, labels, settings, 5, root / "fold0.crossfit.parquet",
                              root / "inner.json")
    write_slide_features([str(root / "fold0.parquet")], str(root / "splits.tsv"),
                         [str(root / "slides" / f"{s[0]}.json") for s in SLIDES], str(root / "features.parquet"),
                         {}, "patch_classifier", [str(root / "fold0.crossfit.parquet")] if crossfit else None)
    return pd.read_parquet(root / "features.parquet").set_index("slide_id")


def test_inner_splits_hold_each_train_patient_out_exactly_once_and_never_hold_outer_test_slides():
    splits = splits_table(folds=1)
    inner = make_inner_splits(splits, 0, 3, seed=1)
    assert sorted(inner["fold"].unique()) == [0, 1, 2] and (inner["outer_fold"] == 0).all()
    train = {s for s, _, _, r in SLIDES if r == "train"}
    held = inner[inner["role"] == "test"]
    assert sorted(held["slide_id"]) == sorted(train)                      # each train slide held out once
    assert not set(inner["slide_id"]) & {"s10", "s11"}                     # outer test slides: absent
    assert (inner.loc[inner["slide_id"].isin(["s8", "s9"]), "role"] == "val").all()
    for j, part in inner.groupby("fold"):
        assert part.groupby("patient_id")["role"].nunique().max() == 1     # patients never split
        assert set(part.loc[part["role"] == "train", "slide_id"]) == train - set(part.loc[part["role"] == "test", "slide_id"])
        assert part.loc[part["role"] == "train", "y"].nunique() == 2
    with pytest.raises(InputError, match="inner_folds"):
        make_inner_splits(splits, 0, 9, seed=1)                            # more inner folds than patients


def test_train_slide_features_come_from_a_model_that_did_not_see_the_slide(tmp_path):
    """Flip the tile labels of one train slide: its own (training) slide features must not move,
    because the model that scored it never trained on it. In-sample features (the outer model's,
    or an inner model that kept the slide) would move."""
    target = "s0"
    clean = slide_features_of(tmp_path / "clean")
    flipped = slide_features_of(tmp_path / "flipped", flip=target)
    row_clean, row_flipped = clean.loc[target], flipped.loc[target]
    assert row_clean["role"] == "train" and row_clean["tile_probs_model"].startswith("fold0.inner")
    cols = [c for c in clean.columns if c not in ("patient_id", "y", "fold", "role", "tile_probs_model")]
    assert np.allclose(row_clean[cols].to_numpy(float), row_flipped[cols].to_numpy(float))
    # the model that scored it did not train on it, by the crossfit record too
    j = row_clean["tile_probs_model"].split(".inner")[1]
    record = crossfit_models(tmp_path / "clean" / "fold0.crossfit.parquet")[j]
    assert target in record["scored"] and target not in record["trained_on"]
    # the test has power: the in-sample path moves with the flip
    insample_clean = slide_features_of(tmp_path / "in_clean", crossfit=False)
    insample_flipped = slide_features_of(tmp_path / "in_flipped", flip=target, crossfit=False)
    assert not np.allclose(insample_clean.loc[target, cols].to_numpy(float),
                           insample_flipped.loc[target, cols].to_numpy(float))
    # every train row is cross-fitted and val/test rows come from the outer model
    assert clean.loc[clean["role"] == "train", "tile_probs_model"].str.startswith("fold0.inner").all()
    assert (clean.loc[clean["role"] != "train", "tile_probs_model"] == "fold0").all()


def test_slide_classifier_refuses_in_sample_training_features(tmp_path):
    table = slide_features_of(tmp_path / "in", crossfit=False).reset_index()
    with pytest.raises(InputError, match="in-sample"):
        check_honest_training(table)
    with pytest.raises(InputError, match="in-sample"):
        train_and_predict(table, "logreg", SlideClassifierSettings(), seed=0)
    honest = slide_features_of(tmp_path / "cf").reset_index()
    preds, _ = train_and_predict(honest, "logreg", SlideClassifierSettings(), seed=0)
    assert len(preds) == len(SLIDES)


def test_mil_crossfit_scores_each_train_slide_with_the_inner_model_that_held_it_out(tmp_path):
    """The MIL path (rules train_mil_inner + crossfit_tile_probs_mil): inner MIL models trained on
    the inner split, and each train slide's cross-fitted tile probabilities are the instance
    probabilities of the inner model for which it was a held-out (test) slide."""
    from histoflow.crossfit import crossfit_mil, inner_seed
    from histoflow.mil.train import train_fold

    rng = np.random.default_rng(3)
    paths = []
    for sid, _, y, _ in SLIDES:
        n = 12
        X = rng.normal(size=(n, DIM)) + (1.5 if y else 0.0) * (np.arange(n) < 4)[:, None]
        coords = pd.DataFrame({"slide_id": sid, "x": np.arange(n) * 256, "y": 0, "target_mpp": 0.5, "tile_px": 256,
                               "size0": 256, "col": np.arange(n), "row": 0})
        table = pa.Table.from_pandas(coords, preserve_index=False)
        feat = pa.FixedSizeListArray.from_arrays(pa.array(X.astype(np.float32).ravel()), DIM)
        write_parquet(tmp_path / "features" / f"{sid}.parquet", table.append_column("feature", feat))
        paths.append(str(tmp_path / "features" / f"{sid}.parquet"))
    write_tsv(tmp_path / "splits.tsv", splits_table())
    inner = write_inner_splits(tmp_path / "splits.tsv", 0, 3, 5, tmp_path / "inner.tsv")
    settings = {"models": ["abmil"], "epochs": 2, "min_epochs": 1, "hidden_dim": DIM, "device": "cpu"}
    scores = []
    for j in range(3):
        d = tmp_path / f"inner{j}"
        train_fold(tmp_path / "inner.tsv", paths, "abmil", j, settings, inner_seed(5, 0), "enc", d / "c.pt",
                   d / "h.tsv", d / "p.tsv", d / "tile_scores.parquet")
        preds = pd.read_csv(d / "p.tsv", sep="\t")
        assert not set(preds["slide_id"]) & {"s10", "s11"}                 # outer test slides never seen
        scores.append(d / "tile_scores.parquet")
    cf = crossfit_mil(tmp_path / "inner.tsv", scores, tmp_path / "fold0.crossfit.parquet", "mil-abmil")
    assert sorted(cf["slide_id"].unique()) == sorted(s for s, _, _, r in SLIDES if r == "train")
    assert (cf["role"] == "train").all() and (cf["fold"] == 0).all()
    record = crossfit_models(tmp_path / "fold0.crossfit.parquet")
    for sid, part in cf.groupby("slide_id"):
        j = int(part["inner_fold"].iloc[0])
        assert sid in record[str(j)]["scored"] and sid not in record[str(j)]["trained_on"]
        role = inner[(inner["fold"] == j) & (inner["slide_id"] == sid)]["role"].item()
        assert role == "test"                                              # held out by that inner model
        own = pq.read_table(scores[j]).to_pandas().query("slide_id == @sid")
        np.testing.assert_array_equal(part.sort_values("x")["prob"].to_numpy(), own.sort_values("x")["instance_prob"].to_numpy())


def test_one_mil_script_trains_outer_and_inner_folds():
    """train_mil.py serves train_mil and train_mil_inner: an inner job trains fold {inner} of the
    inner split table with the inner seed (distinct from the outer models'), an outer job fold {fold}."""
    from types import SimpleNamespace

    from histoflow.crossfit import inner_seed, mil_job_fold

    assert mil_job_fold(SimpleNamespace(fold="2"), 1337) == (2, 1337, False)
    assert mil_job_fold(SimpleNamespace(fold="2", inner="1"), 1337) == (1, inner_seed(1337, 2), True)
    assert inner_seed(1337, 2) != 1337
