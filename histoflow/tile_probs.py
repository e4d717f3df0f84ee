"""Tumour probability per tile, one table per source and fold, for heatmaps, lesions and slide
features. Sources: ``patch_classifier`` (needs annotations) and ``mil-<model>`` (MIL instance
probabilities). This module decides which sources a run uses and reads/writes the tables.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .io import write_json, write_parquet

log = logging.getLogger("histoflow.tile_probs")

TILE_PROB_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("x", pa.int64()), ("y", pa.int64()), ("col", pa.int32()), ("row", pa.int32()),
    ("size0", pa.int32()), ("target_mpp", pa.float64()), ("fold", pa.int16()), ("role", pa.string()),
    ("prob", pa.float32()), ("attention", pa.float32()),
])


def resolve_sources(setting: str | list[str], has_annotations: bool, mil_models: list[str]) -> tuple[list[str], str]:
    """The tile-probability sources to build, and why (for ``tile_probs/sources.json``).

    ``auto``: the patch classifier when the sheet has annotations (tile-level supervision beats
    weak slide labels), else every configured MIL model's instance probabilities.
    """
    if setting == "auto" or setting == ["auto"]:
        if has_annotations:
            return ["patch_classifier"], "auto: the samples sheet has annotations, so a patch classifier is trained on annotated tiles"
        if mil_models:
            return [f"mil-{m}" for m in mil_models], ("auto: no annotations in the samples sheet, so tile probabilities are "
                                                      "the MIL models' instance probabilities")
        return [], "auto: no annotations and no MIL model configured, so no tile probabilities (heatmaps/lesions off)"
    sources = [setting] if isinstance(setting, str) else list(setting)
    for s in sources:
        if s == "patch_classifier":
            if not has_annotations:
                raise InputError("config tile_probs.sources lists patch_classifier but no slide in the samples sheet has "
                                 "`annotations`; add annotation files or use auto / mil-<model>")
        elif s.startswith("mil-"):
            if s[4:] not in mil_models:
                raise InputError(f"config tile_probs.sources lists {s!r} but mil models are {mil_models}; "
                                 "use mil-<one of them>")
        else:
            raise InputError(f"config tile_probs.sources: unknown source {s!r}; use auto, patch_classifier or mil-<model>")
    return sources, "configured in tile_probs.sources"


def write_sources_json(out_path: str | os.PathLike, sources: list[str], reason: str, has_annotations: bool,
                       mil_models: list[str]) -> None:
    write_json(out_path, {"sources": sources, "reason": reason, "has_annotations": has_annotations,
                          "mil_models": mil_models})


def to_tile_prob_table(frame: pd.DataFrame, classes: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """The tile-probability table; multi-class ``classes`` add a float32 ``prob_<class>`` column
    each (prob is then the largest of them: evidence of any class)."""
    frame = frame.copy()
    if "attention" not in frame:
        frame["attention"] = np.nan
    schema = TILE_PROB_SCHEMA
    for c in classes:
        schema = schema.append(pa.field(f"prob_{c}", pa.float32()))
    frame = frame.reindex(columns=schema.names)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def class_columns(frame: pd.DataFrame) -> list[str]:
    """The per-class tile probability columns (multi-class targets) of a tile-probability table."""
    return [c for c in frame.columns if c.startswith("prob_")]


def mil_tile_probs(tile_scores_path: str | os.PathLike, fold: int, out_path: str | os.PathLike) -> pd.DataFrame:
    """``tile_probs/mil-<model>/fold{k}.parquet`` from the MIL fold's ``tile_scores.parquet``
    (prob = instance_prob, attention kept for heatmaps)."""
    frame = pq.read_table(tile_scores_path).to_pandas()
    missing = {"slide_id", "x", "y", "col", "row", "size0", "target_mpp", "role", "instance_prob"} - set(frame.columns)
    if missing:
        raise InputError(f"{str(tile_scores_path)!r} lacks column(s) {sorted(missing)}; rebuild the mil stage")
    frame = frame.rename(columns={"instance_prob": "prob"})
    frame["fold"] = int(fold)
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(tile_scores_path).metadata or {}).items()
            if k.decode().startswith("histoflow.") and k.decode() in ("histoflow.target", "histoflow.classes")}
    classes = meta["histoflow.classes"].split("\t") if meta.get("histoflow.classes") else []
    # multi-class: the per-class instance probabilities (instance_prob_<k>) by class name
    frame = frame.rename(columns={f"instance_prob_{k}": f"prob_{c}" for k, c in enumerate(classes)})
    write_parquet(out_path, to_tile_prob_table(frame, classes),
                  metadata={"histoflow.source": f"mil:{tile_scores_path}", **meta})
    return frame


def target_kind(path: str | os.PathLike) -> str:
    """binary | multiclass | survival | regression: the target a tile-probability (or tile
    score) table was written for (schema metadata ``histoflow.target``; absent = binary)."""
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"histoflow.target", b"binary").decode()


def read_slide_probs(fold_paths: list[str | os.PathLike], slide_id: str,
                     mean_over_test_folds: bool = False) -> tuple[pd.DataFrame, int | None, str | None]:
    """The tiles of one slide from the fold in which it is a test slide (its held-out
    prediction); if no fold holds it as test, the one holding it as val, then any. Returns the
    rows, the fold and the role (None, None for a slide with no tiles anywhere).

    ``mean_over_test_folds`` (holdout: a test slide is test in every fold): the mean probability
    (and attention) over all folds in which it is a test slide, returned with fold -1."""
    best: tuple[int, pd.DataFrame, int, str] | None = None
    tests: list[pd.DataFrame] = []
    rank = {"test": 0, "val": 1, "train": 2}
    for path in fold_paths:
        frame = pq.read_table(path, filters=[("slide_id", "=", slide_id)]).to_pandas()
        if frame.empty:
            continue
        role = str(frame["role"].iloc[0])
        fold = int(frame["fold"].iloc[0])
        r = rank.get(role, 3)
        if best is None or r < best[0]:
            best = (r, frame, fold, role)
        if r == 0:
            if not mean_over_test_folds:
                break
            tests.append(frame)
    if len(tests) > 1:
        keys = ["slide_id", "x", "y", "col", "row", "size0", "target_mpp"]
        values = ["prob", "attention", *class_columns(tests[0].drop(columns=["prob"]))]
        mean = pd.concat(tests, ignore_index=True).groupby(keys, sort=False, as_index=False)[values].mean()
        mean["fold"], mean["role"] = -1, "test"
        return mean.reindex(columns=[*TILE_PROB_SCHEMA.names, *values[2:]]), -1, "test"
    if best is None:
        return pd.DataFrame(columns=TILE_PROB_SCHEMA.names), None, None
    if best[3] != "test":
        log.warning("slide %s is no fold's test slide; using fold %d where it is %s (optimistic)", slide_id, best[2], best[3])
    return best[1].reset_index(drop=True), best[2], best[3]
