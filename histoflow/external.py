"""The sheets beside the development sheet: external cohorts (config ``external``) and the
slides to predict (config ``predict.samples``).

Their slides run through the same per-slide stages (download, QC, tissue, tiles, features) into
the same per-slide folders as the development slides, so a slide id must be unique across all
sheets (a collision is refused in one line: two slides would share one features file). They
never enter the split, and so never training, thresholds, tile selection or the cohort-level
fits (stain reference, SSL encoder), which read the development slides only.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pandas as pd

from .errors import InputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PREDICT_COLUMNS = ("slide_id", "source")
# the env var naming the extra sheets for jobs (histoflow.privacy.resolve_sheet_value)
EXTRA_SAMPLES_ENV = "HISTOFLOW_EXTRA_SAMPLES"


def load_predict_sheet(path: str) -> pd.DataFrame:
    """A sheet of slides to predict: only slide_id and source are needed; labels, if present,
    are dropped (never read), and each slide is its own patient."""
    from .config import read_samples_sheet, validate_samples

    frame = read_samples_sheet(path)
    missing = [c for c in PREDICT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"predict sheet {path!r} lacks column(s) {', '.join(missing)}: it needs slide_id and source "
                         "(tab-separated, with a header line)")
    frame = frame.drop(columns=[c for c in ("label", "split") if c in frame.columns])
    frame["label"] = "unlabelled"
    if "patient_id" not in frame.columns:
        frame["patient_id"] = frame["slide_id"]
    table = validate_samples(frame, path)
    table["label"] = None
    return table


def load_sheet_any(path: str, check_local_files: bool = False) -> pd.DataFrame:
    """A development or external sheet as load_samples reads it, or a predict sheet (no labels)."""
    from .config import read_samples_sheet, validate_samples

    frame = read_samples_sheet(path)
    if "label" in frame.columns and "patient_id" in frame.columns:
        return validate_samples(frame, path, check_local_files=check_local_files)
    return load_predict_sheet(path)


def load_extra_sheets(config: dict, development: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """{cohort name: {"kind": external|predict, "samples": path, "table": DataFrame}} of the
    external cohorts and the predict sheet, checked: names unique and plain, every slide id
    unique across all sheets (development included)."""
    from .config import load_samples

    found: dict[str, dict[str, Any]] = {}
    owner = {str(s): "the development sheet (samples)" for s in development["slide_id"]}
    # an external cohort is judged as unseen: a patient of the development sheet (rescanned
    # under a new slide id) or of another external cohort would be counted twice
    patients = {str(p): "the development sheet (samples)" for p in development["patient_id"]}

    def add(name: str, kind: str, path: str, table: pd.DataFrame, key: str) -> None:
        if not NAME_RE.match(str(name)):
            raise InputError(f"config key '{key}': name {name!r} must be a plain name (letters, digits, '_', '-', "
                             "at most 64 characters); it is a folder name")
        if name in found:
            raise InputError(f"config key '{key}': name {name!r} is used twice; give each cohort its own name")
        for slide in table["slide_id"]:
            slide = str(slide)
            if slide in owner:
                raise InputError(f"slide_id {slide!r} is in {owner[slide]} and in {kind} sheet {name!r} ({path}); "
                                 "slide ids must be unique across all sheets (they share the per-slide folders): "
                                 "rename one (e.g. prefix the cohort name)")
            owner[slide] = f"{kind} sheet {name!r}"
        if kind == "external":
            for patient in dict.fromkeys(str(p) for p in table["patient_id"]):
                if patient in patients:
                    raise InputError(f"patient_id {patient!r} of external sheet {name!r} is also in {patients[patient]}; "
                                     "an external cohort must hold only unseen patients: drop its slides from one sheet")
                patients[patient] = f"external sheet {name!r}"
        found[name] = {"kind": kind, "samples": path, "table": table}

    for i, entry in enumerate(config.get("external") or []):
        table = load_samples({"samples": entry["samples"]})
        add(entry["name"], "external", entry["samples"], table, f"external.{i}.name")
    predict = config.get("predict") or {}
    if predict.get("samples"):
        if not predict.get("name"):
            raise InputError("config key 'predict.name': predict.samples is set but predict.name is not; name the "
                             "prediction (its folder predictions/<name>/)")
        if not predict.get("model"):
            raise InputError("config key 'predict.model': predict.samples is set but predict.model is not; give a model "
                             "of this run as in metrics.json (e.g. mil-abmil) or a bundle folder")
        add(predict["name"], "predict", predict["samples"], load_predict_sheet(predict["samples"]), "predict.name")
    return found


def extra_sheet_paths(extra: dict[str, dict[str, Any]]) -> str:
    return os.pathsep.join(os.path.abspath(e["samples"]) for e in extra.values())
