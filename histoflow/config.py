"""Validation of the workflow config and the samples sheet, with one-line, actionable errors.

The JSON schemas in ``workflow/schemas/`` are the single source of truth for keys, types and
defaults; this module turns schema violations and cohort-level mistakes (duplicate slides,
a patient with two labels, a missing local file) into one line naming the row/field and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
SLIDE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SAMPLE_COLUMNS = ("slide_id", "patient_id", "label", "source")
OPTIONAL_COLUMNS = ("md5", "mpp", "site", "annotations")


def load_schema(name: str) -> dict:
    return yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


def _field_path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def validate_config(config: dict) -> dict:
    """Validate ``config`` in place against the config schema and fill in defaults.

    Raises InputError with one line: the offending key, what is wrong, and where to fix it.
    """
    import jsonschema

    schema = load_schema("config")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise InputError(f"config key '{_field_path(err)}': {err.message} (fix it in config.yaml or --config)")
    _fill_defaults(config, schema)
    return config


def _fill_defaults(instance: dict, schema: dict) -> None:
    """Recursively set schema defaults (what snakemake.utils.validate(set_default=True) does)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            default = sub["default"]
            instance[key] = dict(default) if isinstance(default, dict) else (list(default) if isinstance(default, list) else default)
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _clean_cell(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and pd.isna(value):
        return None
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


def read_samples_sheet(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"samples sheet {str(path)!r} does not exist (set `samples:` in config.yaml; `make demo` writes demo/samples.tsv)")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def validate_samples(frame: pd.DataFrame, sheet_path: str | os.PathLike = "samples.tsv",
                     check_local_files: bool = True) -> pd.DataFrame:
    """Check the samples sheet row by row and as a cohort; return it indexed by ``slide_id``.

    Each problem raises InputError naming the row (1-based, header excluded), the slide and the fix.
    """
    import jsonschema

    sheet = str(sheet_path)
    missing = [c for c in SAMPLE_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"samples sheet {sheet!r} lacks column(s) {', '.join(missing)}: "
                         f"it needs {', '.join(SAMPLE_COLUMNS)} (tab-separated, with a header line)")
    schema = load_schema("samples")
    validator = jsonschema.Draft202012Validator(schema)
    sheet_dir = Path(sheet).resolve().parent
    rows = []
    for i, raw in enumerate(frame.to_dict("records"), start=1):
        row = {k: _clean_cell(v) for k, v in raw.items()}
        slide = row.get("slide_id") or f"<row {i}>"
        if row.get("mpp") is not None:
            try:
                row["mpp"] = float(row["mpp"])
            except ValueError:
                raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}): mpp {row['mpp']!r} is not a number "
                                 "(give µm/px at level 0, e.g. 0.25, or leave it empty)") from None
        for err in validator.iter_errors(row):
            field = _field_path(err)
            if field == "slide_id" and err.validator == "pattern":
                fix = "use only letters, digits, '.', '_' and '-' (it becomes a file name)"
            elif err.validator == "required":
                fix = "fill in every required column: " + ", ".join(SAMPLE_COLUMNS)
            else:
                fix = "correct the cell"
            raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}), field '{field}': {err.message}; {fix}")
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in OPTIONAL_COLUMNS:
        if col not in table.columns:
            table[col] = None
    table["label"] = table["label"].astype(str)

    dup = table["slide_id"][table["slide_id"].duplicated()]
    if len(dup):
        first = dup.iloc[0]
        rows_with = [i + 1 for i, s in enumerate(table["slide_id"]) if s == first]
        raise InputError(f"samples sheet {sheet!r}: slide_id {first!r} appears in rows {rows_with}; "
                         "each slide needs a unique slide_id")
    labels = table.groupby("patient_id")["label"].nunique()
    conflicted = labels[labels > 1]
    if len(conflicted):
        patient = conflicted.index[0]
        seen = sorted(table.loc[table["patient_id"] == patient, "label"].unique())
        raise InputError(f"samples sheet {sheet!r}: patient {patient!r} has slides labelled {seen}; "
                         "all slides of one patient must share one label (splits are by patient)")

    resolved = []
    for i, row in enumerate(table.to_dict("records"), start=1):
        row = {k: _clean_cell(v) for k, v in row.items()}
        source = row["source"]
        kind = source_kind(source)
        if kind == "local":
            local = Path(source).expanduser()
            if not local.is_absolute():
                local = (sheet_dir / local)
            source = str(local.resolve())
            if check_local_files and not local.exists():
                raise InputError(f"samples sheet {sheet!r} row {i} (slide {row['slide_id']!r}): local source "
                                 f"{row['source']!r} does not exist; fix the path (relative paths are read "
                                 "from the sheet's folder) or give an http(s):// URL or gdc:<UUID>")
        elif kind == "gdc" and not re.fullmatch(r"gdc:[0-9a-fA-F-]{36}", source):
            raise InputError(f"samples sheet {sheet!r} row {i} (slide {row['slide_id']!r}): {source!r} is not "
                             "gdc:<file UUID> (36 characters, e.g. gdc:2f6b6a8e-...)")
        if row.get("annotations"):
            ann = Path(row["annotations"]).expanduser()
            if not ann.is_absolute():
                ann = sheet_dir / ann
            row["annotations"] = str(ann.resolve())
        row["source"] = source
        resolved.append(row)
    # object dtype keeps missing cells as None (pandas 3 would turn them into NaN strings)
    return pd.DataFrame(resolved, dtype=object).set_index("slide_id", drop=False)


def source_kind(source: str) -> str:
    """``url`` for http(s)://, ``gdc`` for gdc:<UUID>, ``local`` otherwise."""
    if source.startswith(("http://", "https://")):
        return "url"
    if source.startswith("gdc:"):
        return "gdc"
    return "local"


def load_samples(config: dict, check_local_files: bool = True) -> pd.DataFrame:
    frame = read_samples_sheet(config["samples"])
    return validate_samples(frame, config["samples"], check_local_files=check_local_files)
