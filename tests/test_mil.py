"""MIL models and training: learning is real, scores explain it, runs are reproducible."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from histoflow.errors import InputError
from histoflow.mil import MODELS, build_model
from histoflow.mil.train import (MILSettings, collect_model, fit, load_checkpoint, predict_proba, roc_auc,
                                 tile_scores, train_fold)
from histoflow.mil.transmil import FullAttention, NystromAttention
from histoflow.split import write_splits

DIM = 32


def synthetic_bags(n_bags: int, seed: int, dim: int = DIM):
    """Bags of 50-200 N(0, I) instances; positive bags hide 5-20 % instances shifted along 8 dims."""
    rng = np.random.default_rng(seed)
    shift = np.zeros(dim)
    shift[:8] = 1.5
    bags, ys, truth = [], [], []
    for i in range(n_bags):
        y = i % 2
        n = int(rng.integers(50, 201))
        x = rng.normal(size=(n, dim))
        t = np.zeros(n, dtype=bool)
        if y:
            idx = rng.choice(n, max(1, round(rng.uniform(0.05, 0.2) * n)), replace=False)
            x[idx] += shift
            t[idx] = True
        bags.append(x.astype(np.float16))
        ys.append(y)
        truth.append(t)
    return bags, np.array(ys), truth


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)  # the test machine is shared; one thread is also the deterministic baseline
    train, train_y, _ = synthetic_bags(40, seed=1)
    test, test_y, test_truth = synthetic_bags(30, seed=2)
    return {"train": train[:32], "train_y": train_y[:32], "val": train[32:], "val_y": train_y[32:],
            "test": test, "test_y": test_y, "test_truth": test_truth}


def quick_settings(model: str, **kw) -> MILSettings:
    epochs = 5 if model == "transmil" else 8
    base = dict(models=(model,), epochs=epochs, lr=5e-3, patience=100, hidden_dim=DIM, dropout=0.1,
                transmil={"attention": "full", "heads": 4})
    base.update(kw)
    return MILSettings(**base)


@pytest.fixture(scope="module")
def fitted(data):
    out = {}
    for name in MODELS:
        out[name] = fit(name, data["train"], data["train_y"], data["val"], data["val_y"], quick_settings(name),
                        seed=0, progress=False)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_learns_to_separate_held_out_bags(name, data, fitted):
    probs = predict_proba(fitted[name].model, data["test"])
    assert roc_auc(data["test_y"], probs) >= 0.85


@pytest.mark.parametrize("name", list(MODELS))
def test_tile_scores_are_an_attention_distribution_and_probabilities(name, data, fitted):
    model = fitted[name].model
    for bag in data["test"][:3] + [data["test"][0][:1]]:  # a one-tile bag too
        att, prob = tile_scores(model, bag)
        assert att.shape == prob.shape == (len(bag),)
        assert np.all(att >= 0) and att.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.all((prob >= 0) & (prob <= 1))


def _instance_auc(model, data, which: int) -> float:
    pos = [i for i, y in enumerate(data["test_y"]) if y]
    scores = np.concatenate([tile_scores(model, data["test"][i])[which] for i in pos])
    truth = np.concatenate([data["test_truth"][i] for i in pos])
    return roc_auc(truth, scores)


def test_abmil_attention_and_instance_scores_point_at_the_positive_tiles(data, fitted):
    model = fitted["abmil"].model
    assert _instance_auc(model, data, which=1) > 0.8  # instance probability
    assert _instance_auc(model, data, which=0) > 0.8  # attention


@pytest.mark.parametrize("name", ["clam_sb", "dsmil", "max"])
def test_instance_heads_rank_positive_tiles_first(name, data, fitted):
    assert _instance_auc(fitted[name].model, data, which=1) > 0.75


def test_same_seed_gives_identical_predictions(data):
    runs = [fit("clam_sb", data["train"], data["train_y"], data["val"], data["val_y"], quick_settings("clam_sb", epochs=3),
                seed=42, progress=False) for _ in range(2)]
    a, b = (predict_proba(r.model, data["test"]) for r in runs)
    np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(runs[0].history, runs[1].history)
    other = fit("clam_sb", data["train"], data["train_y"], data["val"], data["val_y"], quick_settings("clam_sb", epochs=3),
                seed=43, progress=False)
    assert not np.array_equal(a, predict_proba(other.model, data["test"]))


def test_training_bags_are_capped_at_max_tiles_per_slide(data, monkeypatch):
    seen = []
    original = MODELS["mean"].training_loss

    def spy(self, x, y, w):
        seen.append(x.shape[0])
        return original(self, x, y, w)

    monkeypatch.setattr(MODELS["mean"], "training_loss", spy)
    fit("mean", data["train"], data["train_y"], [], [], quick_settings("mean", epochs=1, max_tiles_per_slide=40), 0, progress=False)
    assert len(seen) == len(data["train"]) and max(seen) == 40


def test_early_stopping_keeps_the_best_validation_epoch(data):
    result = fit("abmil", data["train"], data["train_y"], data["val"], data["val_y"],
                 quick_settings("abmil", epochs=30, lr=5e-2, patience=2, min_epochs=1), seed=0, progress=False)
    hist = result.history
    assert len(hist) < 30  # stopped early
    assert result.best_epoch == int(hist.loc[hist["val_loss"].idxmin(), "epoch"])
    assert list(hist.columns[:4]) == ["epoch", "train_loss", "val_loss", "val_auc"]


def test_balanced_sampler_trains_on_an_imbalanced_cohort(data):
    keep = [i for i, y in enumerate(data["train_y"]) if y == 0 or i < 8]  # 4 positives vs 16 negatives
    bags = [data["train"][i] for i in keep]
    result = fit("abmil", bags, data["train_y"][keep], [], [], quick_settings("abmil", balance="sampler", epochs=15),
                 seed=0, progress=False)
    assert roc_auc(data["test_y"], predict_proba(result.model, data["test"])) >= 0.8


def test_learning_does_not_depend_on_the_encoder_feature_scale(data):
    """Encoders differ in feature scale (ResNet means ~10, ViT ~0.1): training standardises."""
    scaled = lambda bags: [(b.astype(np.float32) * 40 + 200).astype(np.float16) for b in bags]  # noqa: E731
    result = fit("abmil", scaled(data["train"]), data["train_y"], [], [], quick_settings("abmil"), seed=0, progress=False)
    assert roc_auc(data["test_y"], predict_proba(result.model, scaled(data["test"]))) >= 0.85


def test_single_class_training_set_is_refused(data):
    neg = [b for b, y in zip(data["train"], data["train_y"]) if y == 0]
    with pytest.raises(InputError, match="one class"):
        fit("mean", neg, [0] * len(neg), [], [], quick_settings("mean"), 0, progress=False)


def test_nystrom_attention_is_exact_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    nys = NystromAttention(dim=16, heads=2, dropout=0.0, landmarks=10, pinv_iterations=20)
    full = FullAttention(dim=16, heads=2, dropout=0.0)
    full.load_state_dict({k: v for k, v in nys.state_dict().items() if not k.startswith("res_conv")})
    torch.nn.init.zeros_(nys.res_conv.weight)  # drop the residual conv branch to compare attention alone
    x = torch.randn(10, 16)
    torch.testing.assert_close(nys(x), full(x), atol=1e-4, rtol=1e-3)


def test_transmil_nystrom_handles_bags_of_any_size():
    model = build_model("transmil", DIM, 32, 0.0).eval()
    for n in (1, 7, 65, 300):
        assert torch.isfinite(model(torch.randn(n, DIM)))


# ------------------------------------------------------------------ rule-level: files users read

def _write_features(path, slide_id, feats):
    n = len(feats)
    flat = pa.array(feats.astype(np.float16).reshape(-1))
    table = pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "x": pa.array(np.arange(n) * 256, pa.int64()), "y": pa.array(np.zeros(n), pa.int64()),
        "target_mpp": pa.array(np.full(n, 0.5)), "tile_px": pa.array(np.full(n, 256), pa.int32()),
        "size0": pa.array(np.full(n, 256), pa.int32()), "col": pa.array(np.arange(n), pa.int32()),
        "row": pa.array(np.zeros(n), pa.int32()),
        "feature": pa.FixedSizeListArray.from_arrays(flat, DIM),
    })
    pq.write_table(table, path)


def test_train_fold_and_collect_write_complete_outputs(tmp_path):
    bags, ys, _ = synthetic_bags(14, seed=7)
    samples, paths = [], []
    for i, (bag, y) in enumerate(zip(bags, ys)):
        sid = f"S{i:02d}"
        samples.append({"slide_id": sid, "patient_id": f"P{i // 2 if i < 4 else i}", "label": "tumor" if y else "normal",
                        "site": None})
        if sid == "S13":
            bag = bag[:0]  # skipped upstream: an empty features table
        path = tmp_path / "features" / f"{sid}.parquet"
        path.parent.mkdir(exist_ok=True)
        _write_features(path, sid, bag)
        paths.append(str(path))
    samples[13]["label"], samples[12]["label"] = "normal", "tumor"
    write_splits(samples, {"k": 2, "val_fraction": 0.25}, "tumor", 3, tmp_path / "splits.tsv", tmp_path / "split.json")
    settings = {"models": ["abmil"], "epochs": 4, "lr": 2e-3, "hidden_dim": DIM, "device": "cpu"}
    outs = {}
    for fold in (0, 1):
        d = tmp_path / "mil" / "abmil" / f"fold{fold}"
        outs[fold] = {k: d / f for k, f in [("checkpoint", "checkpoint.pt"), ("history", "history.tsv"),
                                             ("predictions", "predictions.tsv"), ("tile_scores", "tile_scores.parquet")]}
        train_fold(tmp_path / "splits.tsv", paths, "abmil", fold, settings, 1337, "resnet50-trunc",
                   outs[fold]["checkpoint"], outs[fold]["history"], outs[fold]["predictions"], outs[fold]["tile_scores"])

    preds = pd.read_csv(outs[0]["predictions"], sep="\t")
    assert list(preds.columns) == ["slide_id", "patient_id", "label", "y", "prob", "fold", "role", "n_tiles"]
    assert len(preds) == 14 and preds.set_index("slide_id").loc["S13", "n_tiles"] == 0
    assert np.isnan(preds.set_index("slide_id").loc["S13", "prob"])  # no tiles -> no probability, no crash
    assert preds.drop(13)["prob"].between(0, 1).all()

    scores = pq.read_table(outs[0]["tile_scores"]).to_pandas()
    assert {"slide_id", "x", "y", "col", "row", "size0", "target_mpp", "fold", "role", "attention", "instance_prob"} <= set(scores)
    assert len(scores) == sum(len(b) for b in bags[:13])
    np.testing.assert_allclose(scores.groupby("slide_id")["attention"].sum(), 1.0, atol=1e-4)

    model, meta = load_checkpoint(outs[0]["checkpoint"])
    assert meta["model"] == "abmil" and meta["fold"] == 0 and meta["encoder"] == "resnet50-trunc"
    again = predict_proba(model, [bags[0]])[0]
    assert again == pytest.approx(preds.loc[0, "prob"], abs=1e-6)  # the checkpoint is the model that scored

    collect_model("abmil", [outs[f]["predictions"] for f in (0, 1)], [outs[f]["history"] for f in (0, 1)],
                  tmp_path / "oof.tsv", tmp_path / "curves.png", tmp_path / "summary.json")
    oof = pd.read_csv(tmp_path / "oof.tsv", sep="\t")
    assert (oof["role"] == "test").all() and sorted(oof["slide_id"]) == sorted(s["slide_id"] for s in samples)
    assert (tmp_path / "curves.png").stat().st_size > 5000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_test_slides"] == 14 and set(summary["auc_per_fold"]) == {"0", "1"}


# ------------------------------------------------------------------ small-lesion training options (issue 23)

def _spy_training_bags(monkeypatch, model: str) -> list[torch.Tensor]:
    seen = []
    original = MODELS[model].training_loss

    def spy(self, x, y, w):
        seen.append(x.detach().clone())
        return original(self, x, y, w)

    monkeypatch.setattr(MODELS[model], "training_loss", spy)
    return seen


def test_tile_dropout_drops_that_share_of_each_training_bag(data, monkeypatch):
    seen = _spy_training_bags(monkeypatch, "mean")
    fit("mean", data["train"], data["train_y"], [], [], quick_settings("mean", epochs=2, tile_dropout=0.5), 0, progress=False)
    sizes = {len(b) for b in data["train"]}
    kept = sum(len(x) for x in seen) / (2 * sum(len(b) for b in data["train"]))
    assert 0.4 < kept < 0.6 and not {len(x) for x in seen} <= sizes  # about half the tiles, bags not whole


def test_feature_noise_perturbs_training_tiles_by_that_many_feature_sds(data, monkeypatch):
    seen = _spy_training_bags(monkeypatch, "mean")
    bags = [b[:50 + 10 * i] for i, b in enumerate(data["train"][:4])]  # one length each: the spy matches by length
    fit("mean", bags, data["train_y"][:4], [], [], quick_settings("mean", epochs=1, feature_noise=0.5), 0, progress=False)
    by_size = {len(b): torch.as_tensor(b.astype(np.float32)) for b in bags}
    diffs = torch.cat([(x - by_size[len(x)]).flatten() for x in seen])
    # the synthetic features have SD ~1, so the added noise has SD ~0.5
    assert 0.4 < float(diffs.std()) < 0.6


def test_augmentation_is_training_only_and_deterministic(data):
    settings = quick_settings("abmil", epochs=2, tile_dropout=0.3, feature_noise=0.2)
    a, b = (fit("abmil", data["train"], data["train_y"], [], [], settings, 5, progress=False) for _ in range(2))
    pa_, pb = predict_proba(a.model, data["test"]), predict_proba(b.model, data["test"])
    np.testing.assert_array_equal(pa_, pb)
    np.testing.assert_array_equal(pa_, predict_proba(a.model, data["test"]))  # inference sees the full, clean bag


@pytest.mark.parametrize("name", list(MODELS))
def test_instance_logits_are_one_per_tile_on_the_slide_scale(name):
    torch.manual_seed(0)
    model = build_model(name, DIM, 32, 0.0, {"attention": "full", "heads": 4} if name == "transmil" else None).eval()
    x = torch.randn(37, DIM)
    with torch.no_grad():
        logits = model.instance_logits(x)
    assert logits.shape == (37,) and torch.isfinite(logits).all()
    if name in ("mean", "abmil", "clam_sb"):  # a linear slide head: the slide logit is a weighted mean of these
        assert float(logits.min()) - 1e-5 <= float(model(x).detach()) <= float(logits.max()) + 1e-5
    if name == "max":
        assert float(model(x).detach()) == pytest.approx(float(logits.max()), abs=1e-6)
    multi = build_model(name, DIM, 32, 0.0, {"attention": "full", "heads": 4} if name == "transmil" else None, n_out=3).eval()
    assert multi.instance_logits(x).shape == (37, 3)


def test_topk_instance_loss_is_the_task_loss_of_the_k_largest_instance_logits():
    from histoflow.mil.train import topk_instance_loss

    model = MODELS["max"](DIM, 16, 0.0).eval()
    x = torch.randn(20, DIM)
    top3 = torch.topk(model.instance_logits(x), 3).values.mean()
    for y in (0.0, 1.0):
        expect = torch.nn.functional.binary_cross_entropy_with_logits(top3, torch.tensor(y))
        torch.testing.assert_close(topk_instance_loss(model, x, torch.tensor(y), 3), expect)
    assert torch.isfinite(topk_instance_loss(model, x[:2], torch.tensor(1.0), 3))  # k > n tiles: all tiles


def test_topk_weight_adds_the_instance_loss_to_training(data):
    """With the same seed, the first epoch's training loss grows by topk_weight x the instance loss."""
    def first_loss(weight):
        s = quick_settings("abmil", epochs=1, lr=1e-9, dropout=0.0, topk_weight=weight)
        return fit("abmil", data["train"], data["train_y"], [], [], s, 0, progress=False).history["train_loss"][0]
    base, with_topk = first_loss(0.0), first_loss(1.0)
    assert with_topk > base + 0.1  # a positive BCE per bag (and class weights of ~1)


def test_monitor_none_trains_every_epoch_and_keeps_the_last(data):
    settings = quick_settings("abmil", epochs=12, lr=5e-2, patience=2, min_epochs=1, monitor="none")
    result = fit("abmil", data["train"], data["train_y"], data["val"], data["val_y"], settings, 0, progress=False)
    assert len(result.history) == 12 and result.best_epoch == 12
    assert result.history["val_loss"].notna().all()  # still reported for the curves
    again = fit("abmil", data["train"], data["train_y"], [], [], settings, 0, progress=False)
    np.testing.assert_array_equal(predict_proba(result.model, data["test"]), predict_proba(again.model, data["test"]))


@pytest.mark.parametrize("name", list(MODELS))
def test_bag_center_makes_every_model_blind_to_a_slide_wide_shift(name, data):
    """mil.bag_center: a shift of every tile of a slide (stain drift, scanner) changes nothing."""
    settings = quick_settings(name, epochs=2, bag_center=True)
    model = fit(name, data["train"], data["train_y"], [], [], settings, 0, progress=False).model
    bags = data["test"][:6]
    shift = np.random.default_rng(0).normal(0, 3, DIM)
    shifted = [(b.astype(np.float32) + shift).astype(np.float32) for b in bags]
    clean = [b.astype(np.float32) for b in bags]
    np.testing.assert_allclose(predict_proba(model, shifted), predict_proba(model, clean), atol=1e-4)
    np.testing.assert_allclose(tile_scores(model, shifted[0])[1], tile_scores(model, clean[0])[1], atol=1e-4)


def test_bag_center_standardises_by_the_within_slide_spread(data):
    """With mil.bag_center the features are scaled by the spread of tiles around their own
    slide's mean: slide-wide shifts of SD 10 must not inflate the scale (without centring they do)."""
    rng = np.random.default_rng(3)
    bags = [(b.astype(np.float64) + rng.normal(0, 10, DIM)).astype(np.float32) for b in data["train"]]
    within = np.sqrt(np.mean(np.concatenate([np.square(b - b.mean(0)) for b in bags]), axis=0))
    centred = fit("mean", bags, data["train_y"], [], [], quick_settings("mean", epochs=1, bag_center=True), 0,
                  progress=False).model
    np.testing.assert_allclose(centred.feature_std.numpy(), within, rtol=1e-3)
    plain = fit("mean", bags, data["train_y"], [], [], quick_settings("mean", epochs=1), 0, progress=False).model
    assert float(plain.feature_std.mean()) > 3 * float(within.mean())


def test_bag_center_survives_the_checkpoint_and_old_checkpoints_load_uncentred(data, tmp_path):
    from histoflow.mil.train import save_checkpoint

    settings = quick_settings("abmil", epochs=1, bag_center=True)
    result = fit("abmil", data["train"], data["train_y"], [], [], settings, 0, progress=False)
    save_checkpoint(tmp_path / "c.pt", result, "abmil", settings, {})
    model, _ = load_checkpoint(tmp_path / "c.pt")
    assert bool(model.bag_center)
    np.testing.assert_allclose(predict_proba(model, data["test"][:4]), predict_proba(result.model, data["test"][:4]))
    old = {k: v for k, v in result.model.state_dict().items() if k != "bag_center"}
    fresh = build_model("abmil", DIM, DIM, 0.1)
    fresh.load_state_dict(old)  # a checkpoint from before mil.bag_center: strict load still works
    assert not bool(fresh.bag_center)
