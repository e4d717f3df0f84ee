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

Which models get a bundle: every model of metrics.json. MIL models (``mil-<name>``) as above;
slide-level feature classifiers (``<clf>@<source>``, e.g. ``rf@patch_classifier``) hold each
fold's scikit-learn / scikit-survival pipeline as a skops file (types checked against an allow
list before loading, no pickle) beside the fold's tile-probability model and the slide-feature
settings (:mod:`histoflow.slide_bundle`).

Target types (histoflow.targets): the bundle records the run's target (binary: ``positive_label``
and the class names; multi-class: the class order; survival: the time/event columns; regression:
each fold's standardisation of the value). A slide's ensemble output is the mean over the fold
models of: P(positive) (binary), the softmax class probabilities (multi-class), the risk (survival,
higher = earlier event) or the value on the label's scale (regression). Columns
(:func:`prediction_columns`): ``prob``; ``prob_<class>``; ``risk``; ``value``. The operating point
(``threshold``): binary, the pooled-validation threshold; multi-class, none (``argmax``); survival,
the risk-group cut-off (mean over folds of the median risk of each fold's *training* slides,
``train_median_risk``, as the development metrics use); regression, none.
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
FEATURE_KEYS = ("mpp", "dtype", "tta", "cpu_autocast")  # cpu_autocast changes the features
PREDICTION_TSV_COLUMNS = ("slide_id", "status", "reason", "n_tiles", "model", "n_models", "threshold",
                          "threshold_source")
EXTERNAL_COLUMNS = ("slide_id", "patient_id", "label", "y", "prob", "fold", "role", "n_tiles", "status")  # binary


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Target: what a model predicts and how its outputs become columns (binary here; see the docstring)

def target_of(config: dict, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The run's target as a bundle records it: binary classification with positive_label (the
    negative class named after the sheet's other label when there is exactly one), else the
    Target's description (type, kind, classes or time/event columns, loss, primary metric)."""
    from .targets import Target

    task = Target.from_config(config, labels=labels)
    if not task.binary:
        return task.describe()
    positive = str(task.positive_label)
    others = sorted({str(v) for v in (labels or ())} - {positive})
    negative = others[0] if len(others) == 1 else f"not_{positive}"
    return {"type": "classification", "binary": True, "positive_label": positive,
            "classes": [negative, positive], "other_labels": others}


def task_of(target: dict):
    """The :class:`histoflow.targets.Target` of a bundle's ``target`` record."""
    from .targets import Target

    kind = target.get("kind") or ("binary" if target.get("binary", True) else "multiclass")
    if target.get("type", "classification") == "classification" and kind == "binary":
        return Target(classes=tuple(target.get("classes") or ("other", target["positive_label"])),
                      positive_label=str(target["positive_label"]))
    if kind == "multiclass":
        return Target(classes=tuple(str(c) for c in target["classes"]))
    if target.get("type") == "survival":
        return Target(type="survival", time_column=target.get("time_column", "time"),
                      event_column=target.get("event_column", "event"),
                      horizons=tuple(float(h) for h in target.get("horizons") or ()))
    if target.get("type") == "regression":
        return Target(type="regression")
    raise InputError(f"model bundle target {target!r} is not a target type of this histoflow version")


def prediction_columns(target: dict, outputs: np.ndarray) -> dict[str, np.ndarray]:
    """The output columns of an ensemble's outputs per slide (``outputs``: [n] or, multi-class,
    [n, classes]): prob (binary), prob_<class>, risk or value."""
    task = task_of(target)
    outputs = np.asarray(outputs, dtype=float)
    if task.multiclass:
        return {f"prob_{c}": outputs[:, k] for k, c in enumerate(task.classes)}
    return {task.score_columns[0]: outputs.reshape(len(outputs), -1)[:, 0] if outputs.size else outputs.reshape(0)}


def predicted_class(target: dict, outputs: np.ndarray, threshold: float | None) -> list[str | None]:
    """Binary: the class at the threshold; multi-class: the argmax class; survival: the risk
    group (high above the cut-off); regression: none (the value is the prediction)."""
    task = task_of(target)
    outputs = np.asarray(outputs, dtype=float)
    if task.multiclass:
        return [None if not np.isfinite(row).all() else task.classes[int(np.argmax(row))] for row in outputs]
    if task.type == "regression" or threshold is None:
        return [None] * len(outputs)
    if task.type == "survival":
        return [None if not np.isfinite(p) else ("high_risk" if p > threshold else "low_risk") for p in outputs]
    negative, positive = target["classes"]
    return [None if not np.isfinite(p) else (positive if p >= threshold else negative) for p in outputs]


def _operating_point(task, prediction_paths: Sequence[str], metrics_settings: dict | None, seed: int) -> tuple[dict, dict]:
    """(pooled operating point, per-fold ones) of a non-binary model (see the module docstring)."""
    from .metrics import _risk_cutoffs, load_predictions

    if task.type == "survival":
        table = load_predictions(list(prediction_paths), required=("slide_id", "fold", "role", "risk"))
        cutoffs = _risk_cutoffs(table)
        pooled = {"threshold": float(np.mean(list(cutoffs.values()))) if cutoffs else 0.0,
                  "threshold_source": "train_median_risk",
                  "rule": "risk > threshold = high_risk: the mean over folds of each fold's training slides' median risk"}
        return pooled, {str(k): {"threshold": v, "threshold_source": "train_median_risk"} for k, v in cutoffs.items()}
    source = "argmax" if task.multiclass else "none"
    return {"threshold": None, "threshold_source": source}, {}


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

    out_dir = Path(out_json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    folds, arch = [], None
    for path in checkpoint_paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        this = {"model": payload["model"], "in_dim": int(payload["in_dim"]), "hidden_dim": int(payload["hidden_dim"]),
                "dropout": float(payload["dropout"]), "options": payload["options"],
                "n_out": int(payload.get("n_out", 1))}
        if arch is not None and this != arch:
            raise ValueError(f"{path}: fold models of {model_name} differ in architecture")
        arch = this
        fold = int(payload["fold"])
        name = f"fold{fold}.safetensors"
        state = {k: v.detach().cpu().contiguous().clone() for k, v in payload["state_dict"].items()}
        with atomic_path(out_dir / name) as tmp:
            save_file(state, str(tmp), metadata={"model": model_name, "fold": str(fold)})
        entry = {"fold": fold, "weights": name, "sha256": sha256_of(out_dir / name),
                 "best_epoch": int(payload.get("best_epoch", 0))}
        if "y_mean" in payload:   # regression: the fold model outputs (value - y_mean) / y_std
            entry.update(y_mean=float(payload["y_mean"]), y_std=float(payload["y_std"]))
        folds.append(entry)
    task, pooled, per_fold = bundle_operating_point(target, prediction_paths, metrics_settings, seed)
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "histoflow_version": __version__,
        "model": model_name, "kind": "mil", "architecture": arch,
        "folds": sorted(folds, key=lambda f: f["fold"]),
        "ensemble": {"binary": "mean of the fold models' probabilities",
                     "multiclass": "mean of the fold models' softmax class probabilities",
                     "survival": "mean of the fold models' risks",
                     "regression": "mean of the fold models' values (each de-standardised with its fold's y_mean / y_std)"}[task.kind],
        "encoder": {"name": encoder, "weights": _encoder_weights(feature_paths)},
        **settings,
        "stain_reference": _stain_reference(read_json(stain_json)) if stain_json else None,
        "target": target,
        "threshold": pooled,
        "fold_thresholds": {str(k): v for k, v in per_fold.items()},
    }
    write_json(out_json, manifest)
    log.info("%s: bundle of %d fold models, threshold %s (%s)", model_name, len(folds), pooled["threshold"],
             pooled["threshold_source"])
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading and checking a bundle

def bundle_json_path(model_or_path: str, outdir: str) -> Path:
    """``predict.model``: a model name as in metrics.json (e.g. mil-abmil) or a bundle folder /
    bundle.json of another outdir."""
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



def predict_bundle(predict: dict, run_models: dict[str, str], config: dict, outdir: str,
                   encoder: str) -> tuple[str, str]:
    """(bundle.json, encoder of its features) that config ``predict`` scores with: a model of
    this run (``run_models``: model name -> its encoder; built by the run), or another run's
    bundle, refused in one line when its settings differ from this run's. ``encoder``: the MIL
    encoder, which another run's MIL bundle must share; another run's slide classifier needs its
    encoder among features.encoders."""
    model = predict["model"]
    if model in run_models:
        return f"{outdir}/models/{model}/bundle.json", run_models[model]
    path = str(bundle_json_path(model, outdir))
    if not os.path.exists(path):
        raise InputError(f"config key 'predict.model': {model!r} is not a model of this run "
                         f"({', '.join(run_models)}) nor an existing bundle folder; fix predict.model")
    manifest = read_manifest(path)
    if manifest.get("kind") == "slide_classifier" and manifest["encoder"]["name"] in config["features"]["encoders"]:
        encoder = manifest["encoder"]["name"]
    check_bundle_config(manifest, bundle_settings(config), encoder)
    return path, encoder

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
        model = build_model(arch["model"], arch["in_dim"], arch["hidden_dim"], arch["dropout"], arch["options"],
                            n_out=int(arch.get("n_out", 1)))
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


def _fold_output(model, bag: np.ndarray, task, entry: dict, device: str) -> np.ndarray:
    """One fold model's output for a bag on the prediction scale: [1] or [classes]."""
    from .mil.train import predict_logits, softmax

    out = predict_logits(model, [bag], device)
    if task.binary:
        return 1.0 / (1.0 + np.exp(-out.reshape(1)))
    if task.multiclass:
        return softmax(out.reshape(1, -1))[0]
    if task.type == "regression":
        return out.reshape(1) * float(entry.get("y_std", 1.0)) + float(entry.get("y_mean", 0.0))
    return out.reshape(1)


def score_slides(models: list, feature_paths: Sequence[str], want_tiles: bool = False,
                 device: str = "cpu", target: dict | None = None,
                 folds: Sequence[dict] | None = None) -> tuple[list[str], np.ndarray, list[int], list[pd.DataFrame]]:
    """(slide ids, outputs [n_folds, n_slides] (multi-class: [n_folds, n_slides, classes]; NaN
    for an empty bag), tile counts, per-slide tile tables with the fold-mean instance score and
    attention when ``want_tiles``; multi-class tiles also get prob_<class>, prob the largest).
    ``target``: the bundle's target record (None: binary); ``folds``: its fold entries."""
    from .mil.data import read_bag
    from .mil.train import tile_scores

    task = task_of(target or {"positive_label": "positive"})
    folds = list(folds or [{} for _ in models])
    ids, counts, tiles = [], [], []
    shape = (len(models), len(feature_paths)) + ((task.n_out,) if task.multiclass else ())
    outputs = np.full(shape, np.nan)
    for j, path in enumerate(feature_paths):
        bag = read_bag(path, dtype="float32")
        slide_id = Path(path).name.removesuffix(".parquet")
        ids.append(slide_id)
        counts.append(len(bag))
        if not len(bag):
            continue
        for i, model in enumerate(models):
            value = _fold_output(model, bag.features, task, folds[i], device)
            outputs[i, j] = value if task.multiclass else value[0]
        if want_tiles:
            att, inst = zip(*(tile_scores(model, bag.features, device) for model in models))
            frame = pd.DataFrame({c: bag.coords[c].to_numpy() for c in ("x", "y", "col", "row", "size0", "target_mpp")})
            frame.insert(0, "slide_id", slide_id)
            frame["fold"], frame["role"] = -1, "predict"
            inst = np.mean(inst, axis=0)
            if inst.ndim == 2:   # multi-class: P(tile is evidence of each class)
                for k, c in enumerate(task.classes):
                    frame[f"prob_{c}"] = inst[:, k].astype("float32")
                inst = inst.max(1)
            frame["prob"] = inst.astype("float32")
            frame["attention"] = np.mean(att, axis=0).astype("float32")
            tiles.append(frame)
    return ids, outputs, counts, tiles


def score_bundle(bundle_json: str, feature_paths: Sequence[str], slide_jsons: Sequence[str] | None = None,
                 want_tiles: bool = False) -> tuple[dict, list[str], np.ndarray, list[int], list[pd.DataFrame]]:
    """(manifest, slide ids, outputs [n_folds, n_slides(, classes)], tile counts, tile tables) of
    any bundle: MIL (:func:`score_slides`) or slide classifier (needs ``slide_jsons`` for the
    slides' µm/px: :func:`histoflow.slide_bundle.score_slides`)."""
    if read_manifest(bundle_json).get("kind") == "slide_classifier":
        from . import slide_bundle

        manifest, models = slide_bundle.load_slide_classifier_bundle(bundle_json)
        _check_encoder_weights(manifest, feature_paths)
        if slide_jsons is None or len(slide_jsons) != len(feature_paths):
            raise ValueError("a slide-classifier bundle needs each slide's slides/<id>.json")
        ids, outputs, counts, tiles = slide_bundle.score_slides(manifest, models, feature_paths, slide_jsons,
                                                                want_tiles=want_tiles)
        return manifest, ids, outputs, counts, tiles
    manifest, models = load_bundle(bundle_json)
    _check_encoder_weights(manifest, feature_paths)
    ids, outputs, counts, tiles = score_slides(models, feature_paths, want_tiles=want_tiles, target=manifest["target"],
                                               folds=manifest["folds"])
    return manifest, ids, outputs, counts, tiles


def external_columns(target: dict) -> list[str]:
    """Columns of an external cohort's predictions.tsv for a bundle's target."""
    task = task_of(target)
    if task.binary:
        return list(EXTERNAL_COLUMNS)
    keys = ["time", "event"] if task.type == "survival" else []
    return ["slide_id", "patient_id", "label", "y", *keys, *task.score_columns, "fold", "role", "n_tiles", "status"]


def predict_external(bundle_json: str, rows: list[dict], feature_paths: Sequence[str], positive_label: str | None,
                     out_tsv: str | os.PathLike, slide_jsons: Sequence[str] | None = None) -> pd.DataFrame:
    """Rule predict_external: every fold model of the bundle scores every slide of an external
    cohort; one row per (slide, fold) with role ``external`` (metrics average them per slide).
    The targets (y, and time/event for survival) are encoded as the bundle's target defines."""
    from .io import write_tsv

    manifest, ids, outputs, counts, _ = score_bundle(bundle_json, feature_paths, slide_jsons)
    target = manifest["target"]
    task = task_of(target)
    by_id = {str(r["slide_id"]): r for r in rows}
    sheet = pd.DataFrame([by_id[s] for s in ids]).reset_index(drop=True)
    encoded = task.encode(sheet.assign(slide_id=sheet["slide_id"].astype(str)))
    frames = []
    for i, entry in enumerate(manifest["folds"]):
        frame = pd.DataFrame({"slide_id": ids, "patient_id": sheet["patient_id"].astype(str),
                              "label": sheet["label"].astype(str), "y": encoded["y"].to_numpy()})
        if task.type == "survival":
            frame["time"], frame["event"] = encoded["time"].to_numpy(), encoded["event"].to_numpy()
        for name, values in prediction_columns(target, outputs[i]).items():
            frame[name] = values
        frame["fold"], frame["role"], frame["n_tiles"] = entry["fold"], "external", counts
        frame["status"] = ["ok" if c else "no_tiles" for c in counts]
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)[external_columns(target)]
    write_tsv(out_tsv, table)
    log.info("%s: %d external slides scored by %d fold models", manifest["model"], len(ids), len(manifest["folds"]))
    return table


def predict_slides(bundle_json: str, slide_ids: Sequence[str], feature_paths: Sequence[str],
                   slide_jsons: Sequence[str], tissue_jsons: Sequence[str], tissue_pngs: Sequence[str],
                   out_tsv: str | os.PathLike, out_tiles: str | os.PathLike, heatmap_dir: str | os.PathLike,
                   heatmap_settings: dict | None) -> pd.DataFrame:
    """Rule predict: ``predictions/{name}/slides.tsv`` (one row per slide: the ensemble's output
    columns, the predicted class at the bundle's operating point (multi-class: argmax; survival:
    the risk group; regression: none), or the QC status of a skipped slide),
    ``tile_scores.parquet`` and a heatmap per slide (multi-class: a panel per class). The
    sheet's labels are never read."""
    from .features import read_feature_metadata
    from .heatmaps import heatmap_for_slide
    from .io import write_parquet, write_tsv

    manifest, ids, outputs, counts, tiles = score_bundle(bundle_json, feature_paths, slide_jsons, want_tiles=True)
    target, threshold = manifest["target"], manifest["threshold"]
    task = task_of(target)
    n_folds = len(manifest["folds"])
    if list(ids) != [str(s) for s in slide_ids]:
        raise ValueError("features paths and slide ids differ in order")
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # an empty bag: NaN in every fold
            mean = np.nanmean(outputs, axis=0) if n_folds > 1 else outputs[0]
    table = pd.DataFrame({"slide_id": ids})
    status = [_slide_status(sj, read_feature_metadata(fp), n) for sj, fp, n in zip(slide_jsons, feature_paths, counts)]
    table["status"] = [s for s, _ in status]
    table["reason"] = [r for _, r in status]
    table["n_tiles"] = counts
    for name, values in prediction_columns(target, mean).items():
        table[name] = values
    table["predicted_class"] = predicted_class(target, mean, threshold.get("threshold"))
    table["model"] = manifest["model"]
    finite = np.isfinite(outputs if outputs.ndim == 2 else outputs[..., 0])
    table["n_models"] = int(finite.sum(axis=0).max()) if len(ids) else n_folds
    table["threshold"] = threshold.get("threshold")
    table["threshold_source"] = threshold["threshold_source"]
    write_tsv(out_tsv, table)
    # slide classifiers: the tile map is the source's tile probability (one panel)
    class_cols = [f"prob_{c}" for c in task.classes] if task.multiclass and manifest.get("kind") == "mil" else []
    columns = ["slide_id", "x", "y", "col", "row", "size0", "target_mpp", "fold", "role", "prob", "attention", *class_cols]
    tile_table = pd.concat(tiles, ignore_index=True) if tiles else pd.DataFrame(columns=columns)
    tile_table = tile_table.astype({"slide_id": str, "x": "int64", "y": "int64", "col": "int32", "row": "int32",
                                    "size0": "int32", "target_mpp": "float64", "fold": "int32", "role": str,
                                    "prob": "float32", "attention": "float32",
                                    **{c: "float32" for c in class_cols}})[columns]
    write_parquet(out_tiles, tile_table, metadata={"histoflow.model": manifest["model"],
                                                   "histoflow.target": task.kind})
    os.makedirs(heatmap_dir, exist_ok=True)
    for slide_id, sj, tj, tp in zip(ids, slide_jsons, tissue_jsons, tissue_pngs):
        heatmap_for_slide(slide_id, manifest["model"], [str(out_tiles)], sj, tj, tp,
                          Path(heatmap_dir) / f"{slide_id}.png", Path(heatmap_dir) / f"{slide_id}.geojson",
                          heatmap_settings or {}, target=task.kind if manifest.get("kind") == "mil" else "binary")
    log.info("%s: %d slides predicted (%d skipped)", manifest["model"], len(ids), int((table["status"] != "ok").sum()))
    return table


def bundle_operating_point(target: dict, prediction_paths, metrics_settings: dict | None, seed: int):
    """(task, pooled, per_fold): a bundle's operating point from the development run's
    validation predictions (binary: thresholds; other tasks: :func:`_operating_point`)."""
    from .metrics import MetricsSettings, choose_thresholds, load_predictions

    task = task_of(target)
    if task.binary:
        cfg = MetricsSettings.from_config(metrics_settings, seed)
        per_fold, pooled = choose_thresholds(load_predictions(list(prediction_paths)), cfg)
        pooled = {**pooled, "method": cfg.threshold_method,
                  "note": "the ensemble's operating point: chosen on the development run's validation "
                          "predictions of all folds pooled (or fixed); never on predicted slides"}
    else:
        pooled, per_fold = _operating_point(task, prediction_paths, metrics_settings, seed)
    return task, pooled, per_fold
