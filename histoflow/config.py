"""Validation of the workflow config and the samples sheet, with one-line, actionable errors.

The JSON schemas in ``workflow/schemas/`` are the single source of truth for keys, types and
defaults; this module turns schema violations and cohort-level mistakes (duplicate slides,
a bad slide id, a missing local file) into one line naming the row/field and the fix.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
# A plain file name: never `.`/`..` or hidden (a slide id is a folder and file name in every
# stage), and short enough for any filesystem once suffixed. The samples schema and
# common.smk's wildcard_constraints carry the same pattern.
SLIDE_ID_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}"
SLIDE_ID_RE = re.compile(f"^{SLIDE_ID_PATTERN}$")
SLIDE_ID_RULE = ("a slide_id must be a plain file name: letters, digits, '.', '_' and '-', "
                 "not starting with '.' (so never '.' or '..'), at most 200 characters")
SAMPLE_COLUMNS = ("slide_id", "patient_id", "label", "source")
OPTIONAL_COLUMNS = ("md5", "mpp", "site", "annotations")


def load_schema(name: str) -> dict:
    return yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


@functools.lru_cache(maxsize=None)
def _config_properties() -> dict:
    return load_schema("config")["properties"]


def section_defaults(section: str) -> dict:
    """The schema default of each key of config section ``section`` (a fresh copy): what a
    settings class gets for a key its caller leaves out. Defaults live in the schema only."""
    import copy

    props = _config_properties()[section].get("properties", {})
    return {key: copy.deepcopy(sub["default"]) for key, sub in props.items() if "default" in sub}


def defaults_from_schema(section: str):
    """Class decorator (under ``@dataclass``): each annotated field without a default of its own
    takes the schema default of ``<section>.<field>`` (lists as tuples), so a settings class
    repeats no default of the schema."""

    def apply(cls):
        defaults = section_defaults(section)
        for name in cls.__dict__.get("__annotations__", {}):
            if name not in cls.__dict__ and name in defaults:
                value = defaults[name]
                setattr(cls, name, tuple(value) if isinstance(value, list) else value)
        return cls

    return apply


def _field_path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def validate_config(config: dict) -> dict:
    """Validate ``config`` in place against the config schema and fill in defaults.

    Raises InputError with one line: the offending key, what is wrong, and where to fix it.
    """
    import jsonschema

    _drop_deprecated(config)   # before the schema check: the schema knows only the current keys
    schema = load_schema("config")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise InputError(f"config key '{_field_path(err)}': {err.message} (fix it in config.yaml or --config)")
    _fill_defaults(config, schema)
    _check_fit_on(config)
    _check_encoders(config)
    _encoder_mpp(config, schema)
    return config


def _encoder_mpp(config: dict, schema: dict) -> None:
    """A named foundation encoder (registry, histoflow/encoders.py) tiles at the µm/px it was
    trained at unless the config says otherwise, and says so.

    "Says otherwise" = features.mpp or tiling.mpp differs from its schema default: config.yaml
    spells the defaults out, so a value equal to the default cannot be told from an unset one and
    counts as unset. With several named encoders trained at different µm/px nothing is changed
    (one features.mpp serves them all); each mismatch is then a warning naming the fix.
    """
    import logging

    from .encoders import trained_mpp

    log = logging.getLogger("histoflow.config")
    features, tiling = config.setdefault("features", {}), config.setdefault("tiling", {})
    named = {n: m for n in features.get("encoders") or () if (m := trained_mpp(n)) is not None}
    if not named:
        return
    props = schema["properties"]
    default_features = props["features"]["properties"]["mpp"]["default"]
    default_tiling = props["tiling"]["properties"]["mpp"]["default"]
    user_set = features.get("mpp") != default_features or list(tiling.get("mpp") or []) != list(default_tiling)
    names = ", ".join(named)
    if len(set(named.values())) == 1 and not user_set:
        mpp = next(iter(named.values()))
        changed = mpp != features.get("mpp")
        if changed:
            features["mpp"], tiling["mpp"] = mpp, [mpp]
        _say(log, logging.WARNING if changed else logging.INFO,
             "features.mpp/tiling.mpp: tiling at %s µm/px, the resolution %s was trained at "
             "(set features.mpp and tiling.mpp to use another)", mpp, names)
        return
    for name, mpp in named.items():
        if abs(float(features.get("mpp")) - mpp) > 0.1 * mpp:
            _say(log, logging.WARNING, "features.mpp is %s µm/px but encoder %s was trained at %s µm/px: its features "
                 "may be off; set features.mpp: %s (and add it to tiling.mpp) unless this is intended",
                 features.get("mpp"), name, mpp, mpp)


def _say(log, level: int, msg: str, *args) -> None:
    """Log, or where no logging is set up (Snakemake's start-up, which drops INFO records of
    library loggers) write one line to stderr as the start-up errors are: said either way."""
    import logging
    import sys

    if log.isEnabledFor(level) and log.hasHandlers():
        log.log(level, msg, *args)
    else:
        sys.stderr.write(f"histoflow: {msg % args}\n")


def _check_fit_on(config: dict) -> None:
    """``fit_on: train_only`` needs slides that are train-role in every fold: only a holdout split
    with one inner fold has them (kfold tests every patient once; holdout with k >= 2 validates
    every non-test patient once). Said at start-up, not after hours of tiling."""
    split = config.get("split", {})
    if split.get("strategy") in ("holdout", "sheet") and split.get("k") == 1:
        return
    used = {"ssl.fit_on": any(str(e).startswith("ssl:") for e in config.get("features", {}).get("encoders", [])),
            "stain.fit_on": config.get("stain", {}).get("method", "none") != "none"}
    for key, in_use in used.items():
        section, name = key.split(".")
        if in_use and config.get(section, {}).get(name) == "train_only":
            raise InputError(f"config key '{key}' is train_only, but split.strategy {split.get('strategy')} with k={split.get('k')} "
                             "leaves no slide train-role in every fold; use split: {strategy: holdout, k: 1} "
                             f"(one fixed test and validation set) or {key}: all")


class Renamed(str):
    """A DEPRECATED_KEYS entry for a key that moved: its value is used as ``<section>.<new name>``."""


# Keys still accepted (old configs, old demo/config.yaml): (section, key) -> why it is ignored, or
# Renamed(new key) for a key whose value now goes by another name. Handled before the schema
# check, so the schema lists only the current keys.
DEPRECATED_KEYS = {
    ("tiling", "annotation_share"): (
        "is deprecated and ignored: bag tiles (tiles/{slide}.parquet) never depend on annotations, "
        "because a lesion-enriched sample of test slides inflates MIL, heatmap and slide-feature "
        "results; to choose the patch classifier's training tiles near lesions (train-role slides "
        "only) set patch_classifier.lesion_share"),
    # one name for the GPUs a rule asks for (features.gpu, mil.gpu)
    ("ssl", "gpus"): Renamed("gpu"),
    # the tile caps: max_tiles_per_slide (per slide), max_tiles (across the cohort)
    ("mil", "max_tiles_train"): Renamed("max_tiles_per_slide"),
    ("stain", "n_reference_tiles"): Renamed("max_tiles"),
}


def _drop_deprecated(config: dict) -> None:
    """Remove deprecated keys from ``config`` (a renamed key's value moves to its new name), one
    warning line each (stderr). config.yaml spells out every default, so the new key is there
    too: the old key's value wins unless the new one was changed from the schema default."""
    import sys

    for (section, key), why in DEPRECATED_KEYS.items():
        if not (isinstance(config.get(section), dict) and key in config[section]):
            continue
        value = config[section].pop(key)
        if not isinstance(why, Renamed):
            sys.stderr.write(f"histoflow: warning: config key '{section}.{key}' {why}\n")
            continue
        default = section_defaults(section).get(why)
        current = config[section].get(why, default)
        if current != default and current != value:
            raise InputError(f"config keys '{section}.{key}' ({value!r}) and '{section}.{why}' ({current!r}) are both "
                             f"set: '{key}' is the old name of '{why}'; keep only {section}.{why}")
        config[section][why] = value
        sys.stderr.write(f"histoflow: warning: config key '{section}.{key}' is deprecated: it is now "
                         f"'{section}.{why}' (used as such); rename it in your config\n")


def _check_encoders(config: dict) -> None:
    """Encoders that would run code or need a package the lock file lacks: refused here, before
    any job, with one line naming features.encoders and the fix."""
    import importlib.util

    from .encoders import TORCHSCRIPT_NEEDS_TRUST, is_torchscript_file, needs_transformers

    features = config.get("features") or {}
    for name in features.get("encoders") or ():
        if (name.startswith("local:") and not features.get("trust_local_code")
                and is_torchscript_file(name[len("local:"):])):
            raise InputError(f"config key 'features.encoders': {name!r}: {TORCHSCRIPT_NEEDS_TRUST}")
        if needs_transformers(name) and importlib.util.find_spec("transformers") is None:
            raise InputError(f"config key 'features.encoders': {name!r} is a Hugging Face transformers model and "
                             "`transformers` is not installed (it is not in requirements.lock): "
                             "pip install transformers (and add it to envs/torch.yaml), or choose another encoder")


def _fill_defaults(instance: dict, schema: dict) -> None:
    """Recursively set schema defaults (what snakemake.utils.validate(set_default=True) does)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            default = sub["default"]
            instance[key] = dict(default) if isinstance(default, dict) else (list(default) if isinstance(default, list) else default)
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _clean_cell(value: Any) -> Any:
    import pandas as pd  # imported here: the per-slide steps that read settings need no pandas

    if value is None:
        return None
    if isinstance(value, float) and pd.isna(value):
        return None
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


def read_samples_sheet(path: str | os.PathLike) -> pd.DataFrame:
    import pandas as pd

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
    Checks run column-wise (a 10,000-slide sheet is validated in well under a second); only a row
    flagged as bad goes through the full per-row check that words the error, so the message is the
    one a row-by-row validation would give for the first bad row.
    """
    import pandas as pd

    sheet = str(sheet_path)
    missing = [c for c in SAMPLE_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"samples sheet {sheet!r} lacks column(s) {', '.join(missing)}: "
                         f"it needs {', '.join(SAMPLE_COLUMNS)} (tab-separated, with a header line)")
    schema = load_schema("samples")
    names = [str(c) for c in frame.columns]
    columns = {name: [_clean_cell(v) for v in frame.iloc[:, j].tolist()] for j, name in enumerate(names)}
    n_rows = len(frame)

    bad_rows = _mpp_unparsable_rows(columns.get("mpp"))
    if "mpp" in columns:
        # the row check below raises for the unparsable ones, which are never used
        columns["mpp"] = [v if v is None or i in bad_rows else float(v) for i, v in enumerate(columns["mpp"])]
    bad_rows |= _schema_flagged_rows(columns, n_rows, schema)
    if bad_rows:
        validator = _samples_validator(schema)
        for i in sorted(bad_rows):
            _check_row(dict(zip(names, frame.iloc[[i]].to_dict("records")[0].values())), i + 1, sheet, validator)

    if "mpp" in columns:
        columns["mpp"] = [_clean_cell(v) for v in columns["mpp"]]   # a "nan" cell means empty
    for col in OPTIONAL_COLUMNS:
        if col not in columns:
            columns[col] = [None] * n_rows
    columns["label"] = [str(v) for v in columns["label"]]
    table = pd.DataFrame(columns, dtype=object)

    dup = table["slide_id"][table["slide_id"].duplicated()]
    if len(dup):
        first = dup.iloc[0]
        rows_with = [i + 1 for i, s in enumerate(table["slide_id"]) if s == first]
        raise InputError(f"samples sheet {sheet!r}: slide_id {first!r} appears in rows {rows_with}; "
                         "each slide needs a unique slide_id")
    # Labels are per slide: one patient may carry a tumour (-01) and a normal (-11) slide (TCGA).
    # Leakage is prevented by the splits (all slides of a patient on one side of every split), so
    # a patient with mixed labels is valid; histoflow.split stratifies by positive-if-any.

    sheet_dir = os.path.dirname(os.path.realpath(sheet))
    dir_cache: dict[str, str] = {}
    sources = []
    for i, (slide, source) in enumerate(zip(columns["slide_id"], columns["source"]), start=1):
        kind = source_kind(source)
        if kind == "local":
            local = _absolute(source, sheet_dir)
            if check_local_files and not os.path.exists(local):
                raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}): local source "
                                 f"{source!r} does not exist; fix the path (relative paths are read "
                                 "from the sheet's folder) or give an http(s):// URL or gdc:<UUID>")
            source = _realpath(local, dir_cache)
        elif kind == "gdc" and not _GDC_RE.fullmatch(source):
            raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}): {source!r} is not "
                             "gdc:<file UUID> (36 characters, e.g. gdc:2f6b6a8e-...)")
        sources.append(source)
    columns["source"] = sources
    columns["annotations"] = [_realpath(_absolute(a, sheet_dir), dir_cache) if a else None
                              for a in columns["annotations"]]
    # object dtype keeps missing cells as None (pandas 3 would turn them into NaN strings)
    return pd.DataFrame(columns, dtype=object).set_index("slide_id", drop=False)


_GDC_RE = re.compile(r"gdc:[0-9a-fA-F-]{36}")
# Top-level keywords the column-wise check understands; any other makes every row go through
# jsonschema (slow but exact), so a schema edit can never be silently skipped.
_ROW_KEYWORDS = {"$schema", "$id", "title", "description", "type", "properties", "required"}


def _samples_validator(schema: dict):
    import jsonschema

    return jsonschema.Draft202012Validator(schema)


def _mpp_unparsable_rows(values: list | None) -> set[int]:
    bad = set()
    for i, v in enumerate(values or ()):
        if v is not None:
            try:
                float(v)
            except (TypeError, ValueError):
                bad.add(i)
    return bad


def _schema_flagged_rows(columns: dict[str, list], n_rows: int, schema: dict) -> set[int]:
    """Rows (0-based) that may violate the row schema, checked one column at a time.

    Each property's sub-schema is checked by jsonschema once per distinct value, which is what
    ``properties`` does row by row; a row is flagged if any of its cells fails.
    """
    import jsonschema

    if set(schema) - _ROW_KEYWORDS or schema.get("type", "object") != "object":
        return set(range(n_rows))
    if any(key not in columns for key in schema.get("required", ())):
        return set(range(n_rows))
    flagged: set[int] = set()
    for name, sub in schema.get("properties", {}).items():
        if name not in columns:
            continue
        check = jsonschema.Draft202012Validator(sub).is_valid
        verdict: dict[tuple, bool] = {}
        for i, value in enumerate(columns[name]):
            try:
                key = (type(value), value)   # 1, 1.0 and True differ for JSON Schema
                ok = verdict.get(key)
                if ok is None:
                    ok = verdict[key] = check(value)
            except TypeError:   # an unhashable cell (a frame built in Python): check it alone
                ok = check(value)
            if not ok:
                flagged.add(i)
    return flagged


def _check_row(raw: dict, i: int, sheet: str, validator) -> None:
    """The full check of one row (1-based ``i``): raises InputError worded for the user."""
    row = {k: _clean_cell(v) for k, v in raw.items()}
    slide = row.get("slide_id") or f"<row {i}>"
    if row.get("mpp") is not None:
        try:
            row["mpp"] = float(row["mpp"])
        except (TypeError, ValueError):
            raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}): mpp {row['mpp']!r} is not a number "
                             "(give µm/px at level 0, e.g. 0.25, or leave it empty)") from None
    for err in validator.iter_errors(row):
        field = _field_path(err)
        if field == "slide_id" and err.validator == "pattern":
            fix = f"rename it ({SLIDE_ID_RULE})"
        elif err.validator == "required":
            fix = "fill in every required column: " + ", ".join(SAMPLE_COLUMNS)
        else:
            fix = "correct the cell"
        raise InputError(f"samples sheet {sheet!r} row {i} (slide {slide!r}), field '{field}': {err.message}; {fix}")


def _absolute(path: str, base_dir: str) -> str:
    """``path`` with ~ expanded, relative paths read from ``base_dir``."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _realpath(path: str, dir_cache: dict[str, str], depth: int = 0) -> str:
    """``os.path.realpath`` with the parent folders' resolution cached across calls.

    realpath lstat()s every component of every path; a cohort's slides share a few folders, so
    resolving each folder once and then only the file name is the same answer at a fraction of
    the system calls. Paths with '..' (whose meaning depends on symlinks) use plain realpath.
    """
    if depth > 32 or ".." in path.split(os.sep):
        return os.path.realpath(path)
    path = os.path.normpath(path)
    head, tail = os.path.split(path)
    if not tail:
        return os.path.realpath(path)
    real_head = dir_cache.get(head)
    if real_head is None:
        real_head = dir_cache[head] = os.path.realpath(head)
    full = os.path.join(real_head, tail)
    try:
        is_link = stat.S_ISLNK(os.lstat(full).st_mode)
    except OSError:
        return full   # missing: realpath (non-strict) keeps the name as it is
    if not is_link:
        return full
    try:
        target = os.readlink(full)
    except OSError:
        return os.path.realpath(full)
    return _realpath(os.path.join(real_head, target), dir_cache, depth + 1)


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
