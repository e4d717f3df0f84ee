"""Bundles of the slide-level feature classifiers (``models/<clf>@<source>/``) and their scoring
of new slides.

A slide classifier scores a slide in three steps, each fold model of the development run in
turn: its tile-probability source (the fold's patch classifier, or the fold's MIL model's instance
probabilities) scores every tile, :func:`histoflow.slide_features.slide_features` turns the tile
probabilities into the slide's features (the run's thresholds and mode bins), and the fold's
classifier scores those. So the bundle holds both fold models of every fold:

* ``fold{k}.skops``: the fold's fitted scikit-learn / scikit-survival pipeline (skops format:
  loaded by :func:`load_estimator`, which refuses any type outside :data:`TRUSTED_TYPES` before
  anything is built, so loading runs no pickle and no foreign code);
* ``source_fold{k}.safetensors``: the fold's tile model (patch classifier: its safetensors file as
  written by histoflow.patch_classifier; MIL: the fold model's state dict);
* ``bundle.json``: as a MIL bundle's (encoder name and weights checksum, tiling / feature / stain
  settings, target, threshold and its source, histoflow version), plus ``kind: slide_classifier``,
  the classifier, the source and its architecture, the slide-feature settings and the feature
  columns in the order the classifiers were fitted on.

The ensemble is, as for MIL bundles, the mean over the fold pipelines' outputs. A development test
slide scored by its fold gets its development prediction: the same tile model, the same features
(tile probabilities rounded to float32 as the tile-probability tables store them) and the same
classifier.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

# The types beyond skops' own defaults (scikit-learn estimators, numpy arrays) that the
# pipelines of histoflow.slide_classifier hold, listed exactly: a module prefix would also trust
# e.g. numpy.save inside a FunctionTransformer. Anything else is refused before loading.
TRUSTED_TYPES = frozenset({
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
    "sksurv.ensemble.boosting.GradientBoostingSurvivalAnalysis",
    "sksurv.ensemble.forest.RandomSurvivalForest",
    "sksurv.ensemble.survival_loss.CoxPH",
    "sksurv.functions.StepFunction",
    "sksurv.linear_model.coxph.BreslowEstimator",
    "sksurv.linear_model.coxph.CoxPHSurvivalAnalysis",
    "sksurv.tree.tree.SurvivalTree",
})


def dump_estimator(model, path: str | os.PathLike) -> None:
    """A fitted pipeline as a skops file, written atomically."""
    import skops.io as sio

    from .io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(sio.dumps(model))


def load_estimator(path: str | os.PathLike):
    """The pipeline of :func:`dump_estimator`; InputError, before anything is built, when the
    file holds a type outside :data:`TRUSTED_TYPES` (a tampered or foreign file)."""
    import skops.io as sio

    data = Path(path).read_bytes()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as err:   # not a skops file (zip + schema): skops raises several types
        raise InputError(f"{str(path)!r} is not a skops model file ({err}); copy the bundle again") from None
    refused = [t for t in untrusted if t not in TRUSTED_TYPES]
    if refused:
        raise InputError(f"{str(path)!r} holds the untrusted type {refused[0]!r} (only the estimator types of "
                         "histoflow's slide classifiers are loaded); use a bundle written by histoflow")
    return sio.loads(data, trusted=untrusted)


# ---------------------------------------------------------------------------------------------
# Writing

def write_slide_classifier_bundle(model_name: str, classifier: str, source: str, model_paths: Sequence[str],
                                  prediction_paths: Sequence[str], features_table: str,
                                  source_models: Sequence[str], mil_bundle: str | None,
                                  feature_paths: Sequence[str], encoder: str, settings: dict[str, Any],
                                  slide_feature_settings: dict | None, target: dict, metrics_settings: dict | None,
                                  seed: int, stain_json: str | None, out_json: str | os.PathLike) -> dict:
    """Rule bundle_slide_classifier: ``models/<clf>@<source>/bundle.json``, the fold pipelines
    (``fold{k}.skops``) and the fold tile models (``source_fold{k}.safetensors``).
    ``source_models``: patch_classifier/fold{k}/model.safetensors per fold (patch-classifier
    source), or the MIL bundle's fold weights with ``mil_bundle`` its bundle.json."""
    import pyarrow.parquet as pq

    from . import __version__
    from .bundle import (BUNDLE_FORMAT, BUNDLE_VERSION, _encoder_weights, _stain_reference, bundle_operating_point,
                         sha256_of)
    from .io import atomic_path, read_json, write_json
    from .slide_classifier import feature_columns
    from .slide_features import SlideFeatureSettings

    out_dir = Path(out_json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(model_paths) != len(source_models):
        raise ValueError(f"{model_name}: {len(model_paths)} fold classifiers but {len(source_models)} tile models")
    if mil_bundle:
        mil = read_json(mil_bundle)
        source_info = {"name": source, "kind": "mil", "architecture": mil["architecture"]}
        source_folds = [int(f["fold"]) for f in mil["folds"]]
    else:
        source_info = {"name": source, "kind": "patch_classifier"}
        source_folds = list(range(len(source_models)))
    folds = []
    for k, (clf_path, src_path) in enumerate(zip(model_paths, source_models)):
        fold = source_folds[k]
        entries = {}
        for role, src in (("weights", clf_path), ("source_weights", src_path)):
            name = f"fold{fold}.skops" if role == "weights" else f"source_fold{fold}.safetensors"
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(src, tmp)
            entries[role], entries[role.replace("weights", "sha256")] = name, sha256_of(out_dir / name)
        folds.append({"fold": fold, **entries})
    columns = feature_columns(pq.read_schema(features_table).empty_table().to_pandas())
    task, pooled, per_fold = bundle_operating_point(target, prediction_paths, metrics_settings, seed)
    sf = SlideFeatureSettings.from_config(slide_feature_settings)
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "histoflow_version": __version__,
        "model": model_name, "kind": "slide_classifier", "classifier": classifier, "source": source_info,
        "folds": sorted(folds, key=lambda f: f["fold"]),
        "ensemble": "mean over the folds of: the fold's tile model scores the tiles, slide features from those "
                    "tile probabilities, the fold's slide classifier scores the features",
        "slide_features": {"thresholds": list(sf.thresholds), "mode_bins": sf.mode_bins},
        "feature_columns": columns,
        "encoder": {"name": encoder, "weights": _encoder_weights(feature_paths)},
        **settings,
        "stain_reference": _stain_reference(read_json(stain_json)) if stain_json else None,
        "target": target,
        "threshold": pooled,
        "fold_thresholds": {str(k): v for k, v in per_fold.items()},
    }
    write_json(out_json, manifest)
    log.info("%s: bundle of %d fold classifiers and tile models, threshold %s (%s)", model_name, len(folds),
             pooled["threshold"], pooled["threshold_source"])
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading and scoring

def _checked(folder: Path, name: str, sha256: str) -> Path:
    from .bundle import sha256_of

    path = folder / name
    if not path.exists() or sha256_of(path) != sha256:
        raise InputError(f"model bundle {str(folder)!r}: {name} does not match its sha256 in bundle.json "
                         "(changed, truncated or missing); copy the bundle again")
    return path


def load_slide_classifier_bundle(path: str | os.PathLike) -> tuple[dict, list[tuple[Any, Any]]]:
    """(manifest, per fold: (tile model, slide pipeline)). Tile models: a PatchClassifier or a MIL
    model in eval mode; every file is checked against its sha256, the pipelines' types against
    :data:`TRUSTED_TYPES`."""
    from .bundle import read_manifest

    manifest = read_manifest(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if manifest.get("kind") != "slide_classifier":
        raise InputError(f"model bundle {str(folder)!r}: kind {manifest.get('kind')!r} is not a slide classifier")
    source = manifest["source"]
    models = []
    for entry in manifest["folds"]:
        pipeline = load_estimator(_checked(folder, entry["weights"], entry["sha256"]))
        src = _checked(folder, entry["source_weights"], entry["source_sha256"])
        if source["kind"] == "patch_classifier":
            from .patch_classifier import load_patch_classifier

            tile_model = load_patch_classifier(src)
        else:
            from safetensors.torch import load_file

            from .mil import build_model

            arch = source["architecture"]
            tile_model = build_model(arch["model"], arch["in_dim"], arch["hidden_dim"], arch["dropout"],
                                     arch["options"], n_out=int(arch.get("n_out", 1)))
            tile_model.load_state_dict(load_file(str(src), device="cpu"))
            tile_model.eval()
        models.append((tile_model, pipeline))
    return manifest, models


def _tile_probs(tile_model, kind: str, features: np.ndarray) -> np.ndarray:
    """Tile probabilities as the development tile-probability tables hold them (float32)."""
    if kind == "patch_classifier":
        return np.asarray(tile_model.predict_proba(features), dtype=np.float32)
    from .mil.train import tile_scores

    _att, inst = tile_scores(tile_model, features, "cpu")
    if inst.ndim == 2:   # multi-class MIL: prob is the largest class probability (histoflow.tile_probs)
        inst = inst.max(1) if len(inst) else np.zeros(0)
    return np.asarray(inst, dtype=np.float32)


def _pipeline_output(pipeline, x: np.ndarray, task) -> np.ndarray:
    """One fold pipeline's output for one slide's features: [1] or [classes]."""
    if task.binary:
        return pipeline.predict_proba(x)[:, 1]
    if task.multiclass:
        prob = np.zeros(task.n_out)
        prob[pipeline[-1].classes_.astype(int)] = pipeline.predict_proba(x)[0]
        return prob
    return np.asarray(pipeline.predict(x), dtype=float).reshape(1)


def score_slides(manifest: dict, models: list, feature_paths: Sequence[str], slide_jsons: Sequence[str],
                 want_tiles: bool = False) -> tuple[list[str], np.ndarray, list[int], list[pd.DataFrame]]:
    """As :func:`histoflow.bundle.score_slides` for a slide-classifier bundle: (slide ids,
    outputs [n_folds, n_slides] (multi-class: [.., classes]; NaN for a slide without tiles), tile
    counts, per-slide tile tables with the fold-mean tile probability when ``want_tiles``)."""
    from .bundle import task_of
    from .io import read_json
    from .mil.data import read_bag
    from .slide_features import SlideFeatureSettings, grid_step_um, slide_features

    task = task_of(manifest["target"])
    sf = SlideFeatureSettings.from_config(manifest["slide_features"])
    columns = list(manifest["feature_columns"])
    kind = manifest["source"]["kind"]
    shape = (len(models), len(feature_paths)) + ((task.n_out,) if task.multiclass else ())
    outputs = np.full(shape, np.nan)
    ids, counts, tiles = [], [], []
    for j, (path, slide_json) in enumerate(zip(feature_paths, slide_jsons)):
        bag = read_bag(path, dtype="float32")
        slide_id = Path(path).name.removesuffix(".parquet")
        ids.append(slide_id)
        counts.append(len(bag))
        if not len(bag):
            continue
        mpp = float(read_json(slide_json).get("mpp_x") or 0.0)
        coords = bag.coords
        cell = grid_step_um(coords, mpp)
        fold_probs = []
        for i, (tile_model, pipeline) in enumerate(models):
            probs = _tile_probs(tile_model, kind, bag.features)
            fold_probs.append(probs)
            feats = slide_features(coords["col"].to_numpy(), coords["row"].to_numpy(), probs.astype(float), cell, sf)
            x = np.asarray([[feats[c] for c in columns]], dtype=float)
            value = _pipeline_output(pipeline, x, task)
            outputs[i, j] = value if task.multiclass else value[0]
        if want_tiles:
            frame = pd.DataFrame({c: coords[c].to_numpy() for c in ("x", "y", "col", "row", "size0", "target_mpp")})
            frame.insert(0, "slide_id", slide_id)
            frame["fold"], frame["role"] = -1, "predict"
            frame["prob"] = np.mean(fold_probs, axis=0).astype("float32")
            frame["attention"] = np.float32(np.nan)
            tiles.append(frame)
    return ids, outputs, counts, tiles
