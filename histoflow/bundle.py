"""Model bundles (``{outdir}/models/{model}/``) and predictions of new slides with them.

A bundle is everything needed to score a new slide the way the development run scored its test
slides, stored as data (JSON + safetensors), so loading one runs no pickle and no code:

* ``bundle.json``: the manifest (format version, histoflow version, model name and architecture,
  one entry per fold model with its weights file and sha256, the encoder's name and weights
  checksum, the tiling / feature / stain settings, the target, and the decision threshold with
  its source);
* ``fold{k}.safetensors``: the state dict of fold k's model (feature standardisation buffers
  included).

The ensemble of a bundle is the mean of its fold models' probabilities, judged at the threshold
chosen on the development run's pooled validation predictions (``threshold_source``
pooled_validation, or fixed): the same operating point the metrics use for a holdout ensemble,
never fitted on the slides being predicted.

Which models get a bundle: every MIL model (``mil-<name>``). Slide-level feature classifiers
(``<clf>@<source>``) are refused: their scikit-learn forests and pipelines have no data-only
format in the lock file (pickle/joblib would run code on load; skops is not a dependency), and
their input, tile probabilities from the patch classifier, would need that bundle too.

Target types: the bundle records the config's ``target`` section when there is one (other
target types plug in there), else binary classification with ``positive_label``. The output
columns of a prediction come from :func:`prediction_columns`: ``prob`` for binary (``prob_<class>``,
``risk`` or ``value`` would be the columns of other target types).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "histoflow-model-bundle"
BUNDLE_VERSION = 1
# Settings that change what a tile's features are: a bundle is refused for a config that differs
TILING_KEYS = ("mpp", "tile_px", "overlap_px", "min_tissue_fraction", "max_tiles_per_slide")
FEATURE_KEYS = ("mpp", "dtype", "tta")
PREDICTION_TSV_COLUMNS = ("slide_id", "status", "reason", "n_tiles", "model", "n_models", "threshold",
                          "threshold_source")
EXTERNAL_COLUMNS = ("slide_id", "patient_id", "label", "y", "prob", "fold", "role", "n_tiles", "status")
NOT_BUNDLED = ("slide-level feature classifiers (<clf>@<source>) are not bundled: scikit-learn forests and "
               "pipelines have no data-only format here (pickle would run code on load); predict with a "
               "mil-<model> bundle")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Target: what a model predicts and how its outputs become columns (binary here; see the docstring)

def target_of(config: dict, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The config's ``target`` section if set, else binary classification with positive_label
    (the negative class named after the sheet's other label when there is exactly one)."""
    target = config.get("target") or {}
    if target.get("type", "classification") != "classification" or len(target.get("classes") or ()) > 2:
        return dict(target)
    positive = str(config["positive_label"])
    others = sorted({str(v) for v in (labels or ())} - {positive})
    negative = others[0] if len(others) == 1 else f"not_{positive}"
    return {"type": "classification", "binary": True, "positive_label": positive,
            "classes": [negative, positive], "other_labels": others}


def prediction_columns(target: dict, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The output columns of an ensemble output ``probs`` (binary: P(positive) per slide)."""
    if target.get("binary", True) and target.get("type", "classification") == "classification":
        return {"prob": np.asarray(probs, dtype=float)}
    raise InputError(f"target type {target.get('type')!r}: predictions with bundles support binary "
                     "classification only in this version")


def predicted_class(target: dict, probs: np.ndarray, threshold: float) -> list[str | None]:
    negative, positive = target["classes"]
    return [None if not np.isfinite(p) else (positive if p >= threshold else negative) for p in probs]


# ---------------------------------------------------------------------------------------------
# Writing a bundle

def _encoder_weights(feature_paths: Sequence[str]) -> str:
    """The encoder weights checksum recorded by the features stage (first slide that has one)."""
    from .features import read_feature_metadata

    for path in feature_paths:
        try:
            value = read_feature_metadata(path).get("histoflow.encoder_weights", "")
        except (OSError, ValueError):
            continue
        if value:
            return value
    return ""


def bundle_settings(config: dict) -> dict[str, Any]:
    """The part of a config a bundle must share with the run predicting with it."""
    tiling = {k: config["tiling"].get(k) for k in TILING_KEYS}
    features = {k: config["features"].get(k) for k in FEATURE_KEYS}
    return {"tiling": json.loads(json.dumps(tiling)), "features": json.loads(json.dumps(features)),
            "stain_method": config.get("stain", {}).get("method", "none")}


def _stain_reference(stain: dict) -> dict:
    """stain.json without the reference image's path (a bundle may leave the site)."""
    kept = {k: v for k, v in stain.items() if k not in ("reference", "reference_source")}
    kept["reference"] = "auto" if stain.get("reference", "auto") == "auto" else "file"
    return kept


def write_mil_bundle(model_name: str, checkpoint_paths: Sequence[str], prediction_paths: Sequence[str],
                     feature_paths: Sequence[str], encoder: str, settings: dict[str, Any], target: dict,
                     metrics_settings: dict | None, seed: int, stain_json: str | None,
                     out_json: str | os.PathLike) -> dict:
    """Rule bundle_mil: ``models/mil-<model>/bundle.json`` and a safetensors file per fold."""
    import torch
    from safetensors.torch import save_file

    from . import __version__
    from .io import atomic_path, read_json, write_json
    from .metrics import MetricsSettings, choose_thresholds, load_predictions

    out_dir = Path(out_json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    folds, arch = [], None
    for path in checkpoint_paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        this = {"model": payload["model"], "in_dim": int(payload["in_dim"]), "hidden_dim": int(payload["hidden_dim"]),
                "dropout": float(payload["dropout"]), "options": payload["options"]}
        if arch is not None and this != arch:
            raise ValueError(f"{path}: fold models of {model_name} differ in architecture")
        arch = this
        fold = int(payload["fold"])
        name = f"fold{fold}.safetensors"
        state = {k: v.detach().cpu().contiguous().clone() for k, v in payload["state_dict"].items()}
        with atomic_path(out_dir / name) as tmp:
            save_file(state, str(tmp), metadata={"model": model_name, "fold": str(fold)})
        folds.append({"fold": fold, "weights": name, "sha256": sha256_of(out_dir / name),
                      "best_epoch": int(payload.get("best_epoch", 0))})
    cfg = MetricsSettings.from_config(metrics_settings, seed)
    per_fold, pooled = choose_thresholds(load_predictions(list(prediction_paths)), cfg)
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "histoflow_version": __version__,
        "model": model_name, "kind": "mil", "architecture": arch,
        "folds": sorted(folds, key=lambda f: f["fold"]),
        "ensemble": "mean of the fold models' probabilities",
        "encoder": {"name": encoder, "weights": _encoder_weights(feature_paths)},
        **settings,
        "stain_reference": _stain_reference(read_json(stain_json)) if stain_json else None,
        "target": target,
        "threshold": {**pooled, "method": cfg.threshold_method,
                      "note": "the ensemble's operating point: chosen on the development run's validation "
                              "predictions of all folds pooled (or fixed); never on predicted slides"},
        "fold_thresholds": {str(k): v for k, v in per_fold.items()},
    }
    write_json(out_json, manifest)
    log.info("%s: bundle of %d fold models, threshold %.4f (%s)", model_name, len(folds), pooled["threshold"],
             pooled["threshold_source"])
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading and checking a bundle

def bundle_json_path(model_or_path: str, outdir: str) -> Path:
    """``predict.model``: a model name as in metrics.json (e.g. mil-abmil) or a bundle folder /
    bundle.json of another outdir."""
    if "@" in model_or_path and not os.path.exists(model_or_path):
        raise InputError(f"config key 'predict.model': {model_or_path!r}: {NOT_BUNDLED}")
    path = Path(model_or_path)
    if path.suffix == ".json" or path.is_dir():
        return path if path.suffix == ".json" else path / "bundle.json"
    if "/" in model_or_path or os.sep in model_or_path:
        raise InputError(f"config key 'predict.model': {model_or_path!r} is neither a model of this run "
                         "(e.g. mil-abmil) nor an existing bundle folder (<outdir>/models/<model>)")
    return Path(outdir) / "models" / model_or_path / "bundle.json"


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "bundle.json"
    if not path.exists():
        raise InputError(f"model bundle {str(path)!r} does not exist; train it first (snakemake models) or fix predict.model")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT or int(manifest.get("format_version", 0)) > BUNDLE_VERSION:
        raise InputError(f"{str(path)!r} is not a histoflow model bundle of format version <= {BUNDLE_VERSION}")
    return manifest


def check_bundle_config(manifest: dict, mine: dict, encoder: str) -> None:
    """One line when the run's encoder, tiling or features (``mine``: bundle_settings of the
    run's config) differ from the bundle's: its model would see features unlike the ones it was
    trained on."""
    want = manifest["encoder"]["name"]
    if want != encoder:
        raise InputError(f"model bundle {manifest['model']} was trained on encoder {want!r} but this config extracts "
                         f"{encoder!r} (mil.encoder / features.encoders); use the bundle's encoder")
    for section in ("tiling", "features"):
        for key, value in manifest[section].items():
            if mine[section].get(key) != value:
                raise InputError(f"model bundle {manifest['model']} was trained with {section}.{key}={value!r} but this "
                                 f"config has {mine[section].get(key)!r}; set {section}.{key} to the bundle's value")
    if manifest.get("stain_method", "none") != mine["stain_method"]:
        raise InputError(f"model bundle {manifest['model']} was trained with stain.method={manifest.get('stain_method')!r} "
                         f"but this config has {mine['stain_method']!r}; set stain.method to the bundle's")



def predict_bundle(predict: dict, run_models: Sequence[str], config: dict, outdir: str, encoder: str) -> str:
    """The bundle.json that config ``predict`` scores with: a model of this run (built by the
    run), or another run's bundle, refused in one line when its settings differ from this run's."""
    model = predict["model"]
    if model in run_models:
        return f"{outdir}/models/{model}/bundle.json"
    if "@" in model:
        raise InputError(f"config key 'predict.model': {model!r}: {NOT_BUNDLED}")
    path = str(bundle_json_path(model, outdir))
    if not os.path.exists(path):
        raise InputError(f"config key 'predict.model': {model!r} is not a model of this run "
                         f"({', '.join(run_models)}) nor an existing bundle folder; fix predict.model")
    check_bundle_config(read_manifest(path), bundle_settings(config), encoder)
    return path

def load_bundle(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, list]:
    """(manifest, fold models in eval mode). Weights are safetensors, checked against their sha256."""
    from safetensors.torch import load_file

    from .mil import build_model

    manifest = read_manifest(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if manifest.get("kind") != "mil":
        raise InputError(f"model bundle {str(folder)!r}: kind {manifest.get('kind')!r} cannot be loaded here")
    arch = manifest["architecture"]
    models = []
    for entry in manifest["folds"]:
        weights = folder / entry["weights"]
        if sha256_of(weights) != entry["sha256"]:
            raise InputError(f"model bundle {str(folder)!r}: {entry['weights']} does not match its sha256 in bundle.json "
                             "(changed or truncated); copy the bundle again")
        model = build_model(arch["model"], arch["in_dim"], arch["hidden_dim"], arch["dropout"], arch["options"])
        model.load_state_dict(load_file(str(weights), device=device))
        model.eval()
        models.append(model)
    return manifest, models


# ---------------------------------------------------------------------------------------------
# Scoring slides with a bundle

def _check_encoder_weights(manifest: dict, feature_paths: Sequence[str]) -> None:
    """The predicted slides' features must come from the bundle's encoder weights (an ssl:
    encoder retrained, or other weights under one name, give other features)."""
    from .features import read_feature_metadata

    want = manifest["encoder"].get("weights") or ""
    for path in feature_paths:
        meta = read_feature_metadata(path)
        got = meta.get("histoflow.encoder_weights", "")
        if want and got and got != want:
            raise InputError(f"slide {Path(path).name.removesuffix('.parquet')!r}: features were extracted with encoder "
                             f"weights {got!r}, the model bundle {manifest['model']} with {want!r}; use the "
                             "bundle's encoder weights")


def _slide_status(slide_json: str, feature_meta: dict, n_tiles: int) -> tuple[str, str]:
    from .io import read_json

    meta = read_json(slide_json) if slide_json and os.path.exists(slide_json) else {}
    if meta.get("status") == "skipped":
        return "skipped", str(meta.get("reason") or "skipped at QC")
    if feature_meta.get("histoflow.status") == "skipped":
        return "skipped", feature_meta.get("histoflow.reason") or "features skipped"
    if n_tiles == 0:
        return "skipped", "no tissue tiles"
    return "ok", ""


def score_slides(models: list, feature_paths: Sequence[str], want_tiles: bool = False,
                 device: str = "cpu") -> tuple[list[str], np.ndarray, list[int], list[pd.DataFrame]]:
    """(slide ids, probs [n_folds, n_slides] (NaN for an empty bag), tile counts, per-slide tile
    tables with the fold-mean instance probability and attention when ``want_tiles``)."""
    from .mil.data import read_bag
    from .mil.train import predict_proba, tile_scores

    ids, counts, tiles = [], [], []
    probs = np.full((len(models), len(feature_paths)), np.nan)
    for j, path in enumerate(feature_paths):
        bag = read_bag(path, dtype="float32")
        slide_id = Path(path).name.removesuffix(".parquet")
        ids.append(slide_id)
        counts.append(len(bag))
        for i, model in enumerate(models):
            probs[i, j] = predict_proba(model, [bag.features], device)[0]
        if want_tiles and len(bag):
            att, inst = zip(*(tile_scores(model, bag.features, device) for model in models))
            frame = pd.DataFrame({c: bag.coords[c].to_numpy() for c in ("x", "y", "col", "row", "size0", "target_mpp")})
            frame.insert(0, "slide_id", slide_id)
            frame["fold"], frame["role"] = -1, "predict"
            frame["prob"] = np.mean(inst, axis=0).astype("float32")
            frame["attention"] = np.mean(att, axis=0).astype("float32")
            tiles.append(frame)
    return ids, probs, counts, tiles


def predict_external(bundle_json: str, rows: list[dict], feature_paths: Sequence[str], positive_label: str,
                     out_tsv: str | os.PathLike) -> pd.DataFrame:
    """Rule predict_external: every fold model of the bundle scores every slide of an external
    cohort; one row per (slide, fold) with role ``external`` (metrics average them per slide)."""
    from .io import write_tsv

    manifest, models = load_bundle(bundle_json)
    _check_encoder_weights(manifest, feature_paths)
    ids, probs, counts, _ = score_slides(models, feature_paths)
    by_id = {str(r["slide_id"]): r for r in rows}
    frames = []
    for i, entry in enumerate(manifest["folds"]):
        frames.append(pd.DataFrame({
            "slide_id": ids, "patient_id": [str(by_id[s]["patient_id"]) for s in ids],
            "label": [str(by_id[s]["label"]) for s in ids],
            "y": [int(str(by_id[s]["label"]) == str(positive_label)) for s in ids],
            "prob": probs[i], "fold": entry["fold"], "role": "external", "n_tiles": counts,
            "status": ["ok" if c else "no_tiles" for c in counts]}))
    table = pd.concat(frames, ignore_index=True)[list(EXTERNAL_COLUMNS)]
    write_tsv(out_tsv, table)
    log.info("%s: %d external slides scored by %d fold models", manifest["model"], len(ids), len(models))
    return table


def predict_slides(bundle_json: str, slide_ids: Sequence[str], feature_paths: Sequence[str],
                   slide_jsons: Sequence[str], tissue_jsons: Sequence[str], tissue_pngs: Sequence[str],
                   out_tsv: str | os.PathLike, out_tiles: str | os.PathLike, heatmap_dir: str | os.PathLike,
                   heatmap_settings: dict | None) -> pd.DataFrame:
    """Rule predict: ``predictions/{name}/slides.tsv`` (one row per slide: the ensemble's output
    columns, the predicted class at the bundle's threshold, or the QC status of a skipped slide),
    ``tile_scores.parquet`` and a heatmap per slide. The sheet's labels are never read."""
    from .features import read_feature_metadata
    from .heatmaps import heatmap_for_slide
    from .io import write_parquet, write_tsv

    manifest, models = load_bundle(bundle_json)
    _check_encoder_weights(manifest, feature_paths)
    ids, probs, counts, tiles = score_slides(models, feature_paths, want_tiles=True)
    if list(ids) != [str(s) for s in slide_ids]:
        raise ValueError("features paths and slide ids differ in order")
    mean = np.nanmean(probs, axis=0) if len(models) > 1 else probs[0]
    target, threshold = manifest["target"], manifest["threshold"]
    table = pd.DataFrame({"slide_id": ids})
    status = [_slide_status(sj, read_feature_metadata(fp), n) for sj, fp, n in zip(slide_jsons, feature_paths, counts)]
    table["status"] = [s for s, _ in status]
    table["reason"] = [r for _, r in status]
    table["n_tiles"] = counts
    for name, values in prediction_columns(target, mean).items():
        table[name] = values
    table["predicted_class"] = predicted_class(target, mean, threshold["threshold"])
    table["model"] = manifest["model"]
    table["n_models"] = int(np.isfinite(probs).sum(axis=0).max()) if len(ids) else len(models)
    table["threshold"] = threshold["threshold"]
    table["threshold_source"] = threshold["threshold_source"]
    write_tsv(out_tsv, table)
    tile_table = (pd.concat(tiles, ignore_index=True) if tiles else
                  pd.DataFrame(columns=["slide_id", "x", "y", "col", "row", "size0", "target_mpp", "fold", "role",
                                        "prob", "attention"]))
    tile_table = tile_table.astype({"slide_id": str, "x": "int64", "y": "int64", "col": "int32", "row": "int32",
                                    "size0": "int32", "target_mpp": "float64", "fold": "int32", "role": str,
                                    "prob": "float32", "attention": "float32"})
    write_parquet(out_tiles, tile_table, metadata={"histoflow.model": manifest["model"]})
    os.makedirs(heatmap_dir, exist_ok=True)
    for slide_id, sj, tj, tp in zip(ids, slide_jsons, tissue_jsons, tissue_pngs):
        heatmap_for_slide(slide_id, manifest["model"], [str(out_tiles)], sj, tj, tp,
                          Path(heatmap_dir) / f"{slide_id}.png", Path(heatmap_dir) / f"{slide_id}.geojson",
                          heatmap_settings or {})
    log.info("%s: %d slides predicted (%d skipped)", manifest["model"], len(ids), int((table["status"] != "ok").sum()))
    return table
