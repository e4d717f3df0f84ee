"""Cross-fitted tile probabilities, so that the classic slide classifiers train on honest features.

A slide classifier (RF/GB/LR on slide features, :mod:`histoflow.slide_classifier`) of outer
fold k trains on the fold's train-role slides and is tested on its test-role slides. The test
slides' tile probabilities come from fold k's tile model, which never saw them; the train
slides' would come from that same model, fitted on them: in-sample probabilities, sharper than
anything a test slide gets, so the slide classifier learns a feature scale that test slides do
not have. Instead, the outer fold's train-role patients are dealt into ``n_inner`` stratified
inner folds; inner model (k, j) is trained exactly as fold k's model (same val slides for
calibration / early stopping) but without inner group j, and scores group j's slides. Every
train-role slide of fold k is then scored by a model that did not see it, like a test slide.

Inner splits are a split table (:mod:`histoflow.split` format, ``fold`` = inner fold j) with an
extra ``outer_fold`` column: role ``train`` = outer train minus group j, ``val`` = the outer
fold's val slides, ``test`` = group j (the slides this inner model scores). Outer test slides
are not in it at all, so nothing of theirs reaches an inner model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .errors import InputError
from .io import write_parquet, write_tsv

log = logging.getLogger("histoflow.crossfit")

# slide_features' provenance column: which model scored the tiles a row's features come from
PROVENANCE = "tile_probs_model"


def inner_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold``'s inner split and inner models (distinct from the outer seeds)."""
    return int(seed) + 7919 * (int(fold) + 1)



def mil_job_fold(wildcards, seed: int) -> tuple[int, int, bool]:
    """(fold of the split table, seed, is inner) of a MIL training job: train_mil trains outer fold
    ``{fold}`` with the run's seed; train_mil_inner trains inner fold ``{inner}`` of the outer
    fold's inner split table, with a seed of its own so inner models differ from the outer ones."""
    inner = getattr(wildcards, "inner", None)
    if inner is None:
        return int(wildcards.fold), int(seed), False
    return int(inner), inner_seed(seed, int(wildcards.fold)), True

def make_inner_splits(splits: pd.DataFrame, fold: int, n_inner: int, seed: int) -> pd.DataFrame:
    """The inner split table of outer fold ``fold`` (see the module docstring). Patients, not
    slides, are dealt into groups (a patient's slides are scored by one inner model), stratified
    by the patient's label (positive if any slide is)."""
    from .split import assign_partitions

    part = splits[splits["fold"].astype(int) == int(fold)]
    if part.empty:
        raise InputError(f"splits have no rows for fold {fold}; check split.k")
    train = part[part["role"] == "train"]
    patients = train.groupby("patient_id", sort=True)["y"].max()
    n, n_inner = len(patients), int(n_inner)
    if n < n_inner:
        raise InputError(f"fold {fold}: {n} training patient(s) for slide_classifier.inner_folds={n_inner} inner "
                         f"folds; set slide_classifier.inner_folds <= {n} (at least 2) or use fewer folds (split.k)")
    values = patients.to_numpy(dtype=float)
    # strata: the class (binary / multi-class index, survival event); a regression value: none
    classes = np.all(values == np.round(values)) and values.min() >= 0 and values.max() < 100
    strata = values.astype(int) if classes else np.zeros(n, dtype=int)
    counts = np.zeros((n, max(2, int(strata.max()) + 1)), dtype=np.int64)
    counts[np.arange(n), strata] = 1
    group = dict(zip(patients.index, assign_partitions(counts, n_inner, np.random.default_rng(inner_seed(seed, fold)))))
    frames = []
    for j in range(n_inner):
        inner = part[part["role"].isin(["train", "val"])].copy()
        in_group = inner["patient_id"].map(group).eq(j) & inner["role"].eq("train")
        inner.loc[in_group, "role"] = "test"
        inner["fold"] = j
        inner["outer_fold"] = int(fold)
        if classes and inner.loc[inner["role"] == "train", "y"].nunique() < 2:
            raise InputError(f"fold {fold}, inner fold {j}: the inner training slides hold one class only; "
                             "set slide_classifier.inner_folds lower or add patients")
        frames.append(inner)
    table = pd.concat(frames, ignore_index=True)
    check_inner_splits(table)
    return table


def check_inner_splits(table: pd.DataFrame) -> None:
    """No patient in two roles of an inner fold; every outer train slide scored exactly once."""
    for j, part in table.groupby("fold"):
        roles = part.groupby("patient_id")["role"].nunique()
        if (roles > 1).any():
            raise InputError(f"inner fold {j}: patient {roles[roles > 1].index[0]!r} is in several roles")
    scored = table.loc[table["role"] == "test", "slide_id"]
    if scored.duplicated().any():
        raise InputError(f"inner splits: slide {scored[scored.duplicated()].iloc[0]!r} is scored by two inner models")


def write_inner_splits(splits_path: str | os.PathLike, fold: int, n_inner: int, seed: int,
                       out_path: str | os.PathLike) -> pd.DataFrame:
    """Rule `make_inner_splits`: ``splits/inner/fold{k}.tsv``."""
    from .split import read_splits

    table = make_inner_splits(read_splits(splits_path), fold, n_inner, seed)
    write_tsv(out_path, table)
    for j, part in table.groupby("fold"):
        log.info("fold %s inner %s: %s", fold, j, ", ".join(f"{r} {n}" for r, n in part["role"].value_counts().items()))
    return table


def read_inner_splits(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "label": str, "site": str},
                       keep_default_na=False)


def _models_metadata(table: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """Per inner model: the slides it was trained on and the slides it scored (the evidence the
    leak test reads)."""
    return {str(j): {"trained_on": sorted(part.loc[part["role"] == "train", "slide_id"]),
                     "scored": sorted(part.loc[part["role"] == "test", "slide_id"])}
            for j, part in table.groupby("fold")}


def assemble_crossfit(inner_splits_path: str | os.PathLike, inner_prob_paths: list[str | os.PathLike] | None,
                      frames: list[pd.DataFrame] | None, out_path: str | os.PathLike, source: str) -> pd.DataFrame:
    """``tile_probs/{source}/fold{k}.crossfit.parquet``: the outer fold's train-role slides, each
    scored by the inner model that held it out. Rows: the tile-probability schema with ``fold`` =
    the outer fold and ``role`` = train (the slide's outer role), plus ``inner_fold``. Inputs: each
    inner model's tile probabilities (all roles; only its held-out, inner ``test``, rows are kept),
    as paths or frames in inner-fold order."""
    from .tile_probs import to_tile_prob_table

    table = read_inner_splits(inner_splits_path)
    outer = int(table["outer_fold"].iloc[0])
    parts = []
    sources = frames if frames is not None else [pq.read_table(p).to_pandas() for p in inner_prob_paths or []]
    for j, frame in enumerate(sources):
        held_out = set(table.loc[(table["fold"] == j) & (table["role"] == "test"), "slide_id"])
        rows = frame[frame["slide_id"].isin(held_out)].copy()
        rows["fold"], rows["role"], rows["inner_fold"] = outer, "train", j
        parts.append(rows)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    out = to_tile_prob_table(frame)
    import pyarrow as pa

    inner = frame["inner_fold"].to_numpy(np.int16) if len(frame) else np.zeros(0, np.int16)
    out = out.append_column("inner_fold", pa.array(inner, pa.int16()))
    write_parquet(out_path, out, metadata={"histoflow.source": source, "histoflow.outer_fold": str(outer),
                                           "histoflow.crossfit": json.dumps(_models_metadata(table), sort_keys=True)})
    log.info("fold %d: %d tiles of %d train slides cross-fitted by %d inner models", outer, len(frame),
             frame["slide_id"].nunique() if len(frame) else 0, table["fold"].nunique())
    return frame


def crossfit_models(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """The ``histoflow.crossfit`` metadata of a cross-fitted table: inner fold -> trained_on/scored."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"histoflow.crossfit", b"{}"))


def crossfit_patch_classifier(inner_splits_path: str | os.PathLike, feature_paths: list[str], label_paths: list[str],
                              settings, seed: int, out_path: str | os.PathLike,
                              metrics_out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Rule `crossfit_patch_classifier`: the inner patch classifiers of one outer fold (trained
    as :func:`histoflow.patch_classifier.train_patch_classifier` trains the outer one), each
    scoring only the train slides it held out. Cheap (logreg by default): one job per outer fold."""
    from .io import write_json
    from .patch_classifier import (PatchClassifierSettings, _by_stem, assemble, fit_patch_classifier, read_features,
                                   tile_metrics)

    settings = settings if isinstance(settings, PatchClassifierSettings) else PatchClassifierSettings.from_config(settings)
    table = read_inner_splits(inner_splits_path)
    outer = int(table["outer_fold"].iloc[0])
    feats, labels = _by_stem(feature_paths), _by_stem(label_paths)
    frames, metrics = [], {"outer_fold": outer, "inner": {}}
    for j, part in table.groupby("fold", sort=True):
        j = int(j)
        s = inner_seed(seed, outer) + j
        slides = {r: sorted(part.loc[part["role"] == r, "slide_id"]) for r in ("train", "val", "test")}
        rng = np.random.default_rng(s)
        train = assemble(slides["train"], feats, labels, settings, rng)
        val = assemble(slides["val"], feats, labels, settings, rng, subsample=False)
        model = fit_patch_classifier(train, val, settings, s)
        rows = []
        for sid in slides["test"]:
            if sid not in feats:
                continue
            coords, X = read_features(feats[sid])
            if not len(coords):
                continue
            coords = coords.copy()
            coords["slide_id"], coords["prob"] = sid, model.predict_proba(X)
            rows.append(coords)
        frames.append(pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["slide_id"]))
        held = assemble(slides["test"], feats, labels, settings, rng, subsample=False)
        metrics["inner"][str(j)] = {"slides": slides, "held_out": tile_metrics(held.y, model.predict_proba(held.X))}
        log.info("fold %d inner %d: trained on %d slides (%d tiles), scored %d held-out slides", outer, j,
                 len(slides["train"]), train.n, len(slides["test"]))
    if metrics_out:
        write_json(metrics_out, metrics)
    return assemble_crossfit(inner_splits_path, None, frames, out_path, "patch_classifier")


def crossfit_mil(inner_splits_path: str | os.PathLike, tile_score_paths: list[str | os.PathLike],
                 out_path: str | os.PathLike, source: str) -> pd.DataFrame:
    """Rule `crossfit_tile_probs_mil`: the inner MIL models' instance probabilities (their
    ``tile_scores.parquet``, in inner-fold order) of the train slides each held out."""
    frames = []
    for path in tile_score_paths:
        frame = pq.read_table(path).to_pandas()
        if "instance_prob" not in frame.columns:
            raise InputError(f"{str(path)!r} lacks column 'instance_prob'; rebuild the inner MIL models")
        frames.append(frame.rename(columns={"instance_prob": "prob"}))
    return assemble_crossfit(inner_splits_path, None, frames, out_path, source)
