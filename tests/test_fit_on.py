"""ssl.fit_on / stain.fit_on: what an unsupervised cohort-level fit may see.

``all`` (default) fits on every slide, test slides included (unlabelled, transductive; the
checklist says so); ``train_only`` only on slides that are train-role in every fold, and a split
that has none is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoflow.errors import InputError
from histoflow.io import write_json, write_parquet
from histoflow.split import SplitSettings, make_splits, slides_to_fit, train_in_every_fold, write_splits

N_PATIENTS = 12


def samples() -> pd.DataFrame:
    return pd.DataFrame([{"slide_id": f"S{p:02d}", "patient_id": f"P{p:02d}", "label": "tumor" if p % 2 else "normal"}
                         for p in range(N_PATIENTS)])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 small tiled TIFFs (0.5 µm/px tags), their slides/{id}.json (real slide QC), a tiles
    table each, and a holdout split with k = 1 (the split that has train-only slides)."""
    import tifffile

    from histoflow.slide_qc import write_slide_metadata

    root = tmp_path_factory.mktemp("cohort")
    slide_jsons, tiles = [], []
    for i, sid in enumerate(samples()["slide_id"]):
        rng = np.random.default_rng(i)
        # H&E-ish texture, a different stain strength per slide
        od = rng.gamma(2.0, 0.2, (256, 256, 1)) * np.array([0.65, 0.70, 0.29]) * (0.6 + 0.05 * i) \
            + rng.gamma(2.0, 0.2, (256, 256, 1)) * np.array([0.07, 0.99, 0.11])
        rgb = np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)
        path = root / f"{sid}.tiff"
        tifffile.imwrite(path, rgb, tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4),
                         resolutionunit="CENTIMETER")
        manifest = root / f"{sid}.manifest.json"
        write_json(manifest, {"slide_id": sid, "status": "ok", "path": str(path)})
        sj = root / "slides" / f"{sid}.json"
        write_slide_metadata(sid, manifest, sj)
        xs = [(x, y) for y in range(0, 256, 64) for x in range(0, 256, 64)]
        frame = pd.DataFrame({"slide_id": sid, "x": [x for x, _ in xs], "y": [y for _, y in xs], "read_level": 0,
                              "read_w": 64, "read_h": 64, "target_mpp": 0.5, "tile_px": 64, "tissue_fraction": 1.0,
                              "col": [x // 64 for x, _ in xs], "row": [y // 64 for _, y in xs], "size0": 64,
                              "annotation_fraction": np.float32(np.nan)})
        for col in ("x", "y", "read_level", "read_w", "read_h", "tile_px", "col", "row", "size0"):
            frame[col] = frame[col].astype("int64")
        tp = root / "tiles" / f"{sid}.parquet"
        write_parquet(tp, frame)
        slide_jsons.append(str(sj))
        tiles.append(str(tp))
    split = {"strategy": "holdout", "k": 1, "test_fraction": 0.25, "val_fraction": 0.25}
    table = write_splits(samples(), split, "tumor", 0, root / "splits" / "splits.tsv", root / "splits" / "split.json")
    train = set(train_in_every_fold(table))
    assert 0 < len(train) < N_PATIENTS
    kfold = write_splits(samples(), {"k": 3}, "tumor", 0, root / "kfold" / "splits.tsv", root / "kfold" / "split.json")
    return {"root": root, "slides": slide_jsons, "tiles": tiles, "splits": str(root / "splits" / "splits.tsv"),
            "kfold": str(root / "kfold" / "splits.tsv"), "train": train, "table": table}


def test_train_only_is_the_slides_train_role_in_every_fold(cohort):
    table = cohort["table"]
    keep = slides_to_fit("train_only", cohort["splits"], "ssl.fit_on")
    assert keep == cohort["train"]
    not_train = set(table.loc[table["role"] != "train", "slide_id"])
    assert not_train and not (keep & not_train)
    assert slides_to_fit("all", None, "ssl.fit_on") is None


@pytest.mark.parametrize("split", [{"k": 3}, {"strategy": "holdout", "k": 3}])
def test_a_split_without_train_only_slides_is_a_one_line_error(tmp_path, split):
    write_splits(samples(), split, "tumor", 0, tmp_path / "splits.tsv", tmp_path / "split.json")
    with pytest.raises(InputError) as err:
        slides_to_fit("train_only", tmp_path / "splits.tsv", "stain.fit_on")
    msg = str(err.value)
    assert "stain.fit_on" in msg and "holdout" in msg and "k: 1" in msg and "\n" not in msg


def _fit_stain(cohort, tmp_path, fit_on, splits=None):
    from histoflow.stain import fit_stain_for_cohort

    return fit_stain_for_cohort(cohort["slides"], cohort["tiles"], str(tmp_path / "stain.json"), str(tmp_path / "ref.png"),
                                {"method": "macenko", "fit_on": fit_on, "max_tiles": 500}, seed=0, mpp=0.5,
                                splits_tsv=splits)


def test_stain_reference_train_only_never_comes_from_a_validation_or_test_slide(cohort, tmp_path):
    info = _fit_stain(cohort, tmp_path, "train_only", cohort["splits"])
    assert info["fit_on"] == "train_only" and info["n_fit_slides"] == len(cohort["train"])
    assert info["n_candidates"] == 16 * len(cohort["train"])   # every tile of the train-only slides, no other
    assert info["reference_tile"]["slide_id"] in cohort["train"]
    every = _fit_stain(cohort, tmp_path, "all")
    assert every["fit_on"] == "all" and every["n_fit_slides"] == N_PATIENTS and every["n_candidates"] == 16 * N_PATIENTS
    with pytest.raises(InputError, match="stain.fit_on"):
        _fit_stain(cohort, tmp_path, "train_only", cohort["kfold"])


def _run_ssl(cohort, tmp_path, monkeypatch, ssl: dict, hed_jitter=0.05, splits=None):
    import torch

    import histoflow.ssl as ssl_mod

    seen = {}
    real_read = ssl_mod.read_training_tiles

    def spy(chosen, paths, image_px, *args, **kwargs):
        seen["slides"] = set(chosen["slide_id"])
        return real_read(chosen, paths, image_px, *args, **kwargs)

    monkeypatch.setattr(ssl_mod, "read_training_tiles", spy)
    settings = {"epochs": 1, "batch_size": 8, "max_tiles": 48, "image_px": 32, "device": "cpu", **ssl}
    ssl_mod.run_ssl_pretrain(cohort["slides"], cohort["tiles"], str(tmp_path / "encoder.pt"), str(tmp_path / "training.tsv"),
                             str(tmp_path / "training.png"), settings, "resnet-tiny", seed=0, default_mpp=0.5,
                             splits_tsv=splits, stain_hed_jitter=hed_jitter)
    ckpt = torch.load(tmp_path / "encoder.pt", weights_only=True)
    return seen["slides"], pd.read_csv(tmp_path / "training.tsv", sep="\t"), ckpt


def test_ssl_train_only_never_sees_a_validation_or_test_slide(cohort, tmp_path, monkeypatch):
    slides, history, ckpt = _run_ssl(cohort, tmp_path, monkeypatch, {"fit_on": "train_only"}, splits=cohort["splits"])
    assert slides == cohort["train"]
    assert set(history["fit_on"]) == {"train_only"} and set(history["n_fit_slides"]) == {len(cohort["train"])}
    assert ckpt["fit_on"] == "train_only" and ckpt["n_slides"] == len(cohort["train"])
    slides, history, _ = _run_ssl(cohort, tmp_path, monkeypatch, {"fit_on": "all"})
    assert len(slides) == N_PATIENTS and set(history["fit_on"]) == {"all"}


def test_stain_augment_hed_jitter_is_the_jitter_of_the_ssl_views(cohort, tmp_path, monkeypatch):
    """stain.augment.hed_jitter is applied (SSL training views) unless ssl.hed_sigma overrides it."""
    import histoflow.ssl as ssl_mod

    sigmas = []
    real_jitter = ssl_mod.hed_jitter_batch

    def spy(x, a, b):
        sigmas.append(float((a - 1).abs().max()))
        return real_jitter(x, a, b)

    monkeypatch.setattr(ssl_mod, "hed_jitter_batch", spy)
    _, history, ckpt = _run_ssl(cohort, tmp_path, monkeypatch, {"hed_sigma": None}, hed_jitter=0.3)
    assert ckpt["settings"]["hed_sigma"] == 0.3 and set(history["hed_sigma"]) == {0.3}
    assert sigmas and 0.2 < max(sigmas) <= 0.3          # the views were jittered with it
    sigmas.clear()
    _, _, ckpt = _run_ssl(cohort, tmp_path, monkeypatch, {"hed_sigma": 0.01}, hed_jitter=0.3)
    assert ckpt["settings"]["hed_sigma"] == 0.01 and max(sigmas) <= 0.01


def _checklist_text(outdir: Path, config: dict) -> dict[int, str]:
    from histoflow.checklist import collect_checklist

    return {it.number: " ".join(it.summary) for it in collect_checklist(str(outdir), config, "samples.tsv")}


@pytest.mark.parametrize("fit_on", ["all", "train_only"])
def test_checklist_says_in_words_what_saw_the_test_slides(tmp_path, fit_on):
    (tmp_path / "ssl" / "resnet-tiny").mkdir(parents=True)
    pd.DataFrame({"epoch": [1], "loss": [1.0], "fit_on": [fit_on], "n_fit_slides": [5 if fit_on != "all" else 12],
                  "hed_sigma": [0.05]}).to_csv(tmp_path / "ssl" / "resnet-tiny" / "training.tsv", sep="\t", index=False)
    write_json(tmp_path / "stain" / "stain.json", {"method": "macenko", "reference": "auto", "reference_source": "auto",
                                                   "fit_on": fit_on, "n_fit_slides": 12 if fit_on == "all" else 5})
    config = {"features": {"encoders": ["ssl:resnet-tiny"]}, "stain": {"method": "macenko", "fit_on": fit_on},
              "ssl": {"fit_on": fit_on}, "tiling": {}}
    text = _checklist_text(tmp_path, config)
    if fit_on == "all":
        assert "test slides included" in text[3] and "ssl:resnet-tiny" in text[3] and "stain reference" in text[3]
        assert "test slides included" in text[4] and "test slides included" in text[6]
    else:
        assert "test slides included" not in " ".join(text[n] for n in (3, 4, 6))
        assert "train-role in every fold" in text[4] and "train-role in every fold" in text[6]
    assert "HED stain jitter sigma 0.05" in text[6] and "training views only" in text[6]


@pytest.mark.parametrize("key", ["ssl", "stain"])
def test_train_only_with_a_split_that_cannot_have_train_only_slides_is_refused_at_start(key):
    from histoflow.config import validate_config

    base = {"samples": "x.tsv", "features": {"encoders": ["ssl:resnet-tiny"]}, "stain": {"method": "macenko"}}
    config = {**base, key: {**base.get(key, {}), "fit_on": "train_only"}}
    with pytest.raises(InputError, match=f"{key}.fit_on") as err:
        validate_config(json.loads(json.dumps(config)))
    assert "holdout" in str(err.value) and "\n" not in str(err.value)
    ok = validate_config({**json.loads(json.dumps(config)), "split": {"strategy": "holdout", "k": 1}})
    assert ok[key]["fit_on"] == "train_only"
    validate_config(json.loads(json.dumps(base)))   # the default (all) never needs a particular split
