"""What may leave the site: config `privacy.export` (docs/interface.md, "Safety and privacy").

``deidentified`` (the default): everything exported (MLflow params, tags and artifacts, the
checklist, the Snakemake report) carries slide ids, a salted hash of each patient id, the source
kind (url/gdc/local) and md5, and counts; never a patient id, a path, a host name, a query
string or a file name in a reason. ``full`` is an explicit opt-in for a local store: the files
are logged as they are. Local outputs under ``{outdir}`` keep what later stages need (paths).

The salt is generated once per output folder (``{outdir}/.privacy_salt``, mode 600) and never
logged: the same patient hashes the same way across reruns of one result, but the hashes cannot
be reversed by trying likely patient ids without it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pandas as pd

MODES = ("deidentified", "full")
SALT_NAME = ".privacy_salt"
EXPORT_DIR = "mlflow/export"
# columns that hold where a file lives, never exported in deidentified mode
PATH_COLUMNS = ("source", "path", "annotations", "filename", "samples_sheet", "url")
SLIDE_SUFFIXES = ("svs", "tif", "tiff", "ndpi", "vms", "vmu", "mrxs", "scn", "bif", "svslide", "czi", "dcm",
                  "isyntax", "qptiff", "jpg", "jpeg", "png", "xml", "geojson", "json", "tsv", "csv", "txt",
                  "zip", "gz", "part", "pt", "pth", "safetensors", "parquet")

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>|)\]}]+", re.I)
# an absolute or home path: starts at a non-word boundary ('µm/px', 'n/a' are not paths)
_PATH = re.compile(r"(?<![\w.\-/])(?:~|/)[^\s'\"<>|,;()\[\]{}]+")
_FILE = re.compile(r"(?<![\w.-])[\w.-]+\.(?:" + "|".join(SLIDE_SUFFIXES) + r")\b", re.I)
_GDC = re.compile(r"\bgdc:[0-9a-fA-F-]{36}\b")


def export_mode(config: dict) -> str:
    return str((config.get("privacy") or {}).get("export") or "deidentified")


def privacy_salt(outdir: str | os.PathLike) -> bytes:
    """The output folder's salt, created on first use (mode 600, atomically: concurrent jobs
    read the same one)."""
    path = Path(outdir) / SALT_NAME
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{SALT_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)          # fails if another job made it first: theirs is kept
    except FileExistsError:
        pass
    finally:
        from .io import safe_remove

        safe_remove(tmp, path.parent, outdir_check=False)   # our own temporary file
    return bytes.fromhex(path.read_text().strip())


def patient_hash(patient_id: Any, salt: bytes) -> str:
    """``pt_`` + 16 hex of HMAC-SHA256(salt, patient id)."""
    return "pt_" + hmac.new(salt, str(patient_id).encode(), hashlib.sha256).hexdigest()[:16]


def file_name_of(cell: str, slide_id: str | None = None) -> str | None:
    """The file name of a sheet cell (a path or a URL's path), when it looks like one (a dot,
    4+ characters): slide file names often carry a case or patient id (TCGA-AB-1234-01Z.svs).
    None when the name is the row's ``slide_id`` plus an extension: it tells nothing the slide id
    (exported anyway) does not, and the workflow's own outputs are named so (tissue/<id>.geojson)."""
    from urllib.parse import urlsplit

    path = urlsplit(cell).path if "://" in cell else cell
    name = os.path.basename(path.rstrip("/"))
    if slide_id and name.split(".", 1)[0] == str(slide_id):
        return None
    return name if len(name) >= 4 and "." in name.strip(".") else None


def scrub_text(text: str, file_names: bool = True) -> str:
    """Free text (a failure reason) without URLs, paths, GDC ids and (``file_names``) file names.
    Our own sentences (checklist summaries name outputs such as qc/slides.tsv) keep file names."""
    text = _URL.sub("<url>", text)
    text = _GDC.sub("<gdc>", text)
    text = _PATH.sub("<path>", text)
    return _FILE.sub("<file>", text) if file_names else text


def deidentify_config(config: Any, key: str = "") -> Any:
    """The config as exported: secrets redacted, every path, URL and host replaced by its kind."""
    from .checklist import redact

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if not isinstance(value, str) or value == "":
            return value
        if key in ("samples", "outdir", "weights_dir", "tracking_uri", "artifact_location", "reference"):
            return f"<{key}>"
        if value.startswith("local:"):
            return "local:<path>"
        return scrub_text(value)

    return walk(redact(config), key)


class Exporter:
    """Turns local outputs into what may be exported under the config's `privacy.export`."""

    def __init__(self, outdir: str | os.PathLike, config: dict, samples_path: str | os.PathLike | None = None):
        self.outdir = Path(outdir)
        self.mode = export_mode(config)
        self.samples_path = str(samples_path) if samples_path else None
        self.full = self.mode == "full"
        self._salt: bytes | None = None
        self._sheet: pd.DataFrame | None = None
        self._tokens: list[tuple[re.Pattern, str]] | None = None

    # -- the sheet and what must never appear
    @property
    def salt(self) -> bytes:
        if self._salt is None:
            self._salt = privacy_salt(self.outdir)
        return self._salt

    def sheet(self) -> pd.DataFrame:
        if self._sheet is None:
            frame = pd.DataFrame(columns=["slide_id", "patient_id", "label", "source"])
            if self.samples_path and Path(self.samples_path).is_file():
                from .config import read_samples_sheet

                frame = read_samples_sheet(self.samples_path)
            self._sheet = frame
        return self._sheet

    def patient(self, patient_id: Any) -> str:
        return patient_hash(patient_id, self.salt)

    def _known(self) -> list[tuple[re.Pattern, str]]:
        """The sheet's own identifiers (sources, annotation paths, patient ids, URL hosts) as
        patterns, longest first: the safety net behind the generic rules of scrub_text."""
        if self._tokens is None:
            from urllib.parse import urlsplit

            sheet = self.sheet()
            slides = set(sheet.get("slide_id", pd.Series(dtype=str)).astype(str))
            literal: dict[str, str] = {}
            for col in ("source", "annotations"):
                for value in sheet.get(col, pd.Series(dtype=str)).astype(str):
                    if value:
                        literal[value] = f"<{col}>"
                        literal[os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(self.samples_path or ".")),
                                                              os.path.expanduser(value)))] = f"<{col}>"
                        host = urlsplit(value).hostname if "://" in value else None
                        if host:
                            literal[host] = "<host>"
            tokens = [(re.compile(re.escape(k)), v) for k, v in sorted(literal.items(), key=lambda kv: -len(kv[0]))]
            # a source's file name alone ("x.svs" of "slides/x.svs"), as a whole token
            ids = sheet["slide_id"].astype(str) if "slide_id" in sheet else pd.Series([None] * len(sheet))
            names = {file_name_of(str(v), sid): f"<{col}>" for col in ("source", "annotations")
                     for v, sid in zip(sheet.get(col, pd.Series([""] * len(sheet))).astype(str), ids) if v}
            names.pop(None, None)
            tokens += [(re.compile(rf"(?<![A-Za-z0-9_.-]){re.escape(k)}(?![A-Za-z0-9_-])"), v)
                       for k, v in sorted(names.items(), key=lambda kv: -len(kv[0]))]
            # patient ids in free text: whole tokens only, never part of a number ("0.1234"), and
            # only ids distinctive enough (4+ characters) not to rewrite ordinary counts
            for pid in set(sheet.get("patient_id", pd.Series(dtype=str)).astype(str)) - slides:
                if len(pid) >= 4:
                    tokens.append((re.compile(rf"(?<![A-Za-z0-9_.-]){re.escape(pid)}(?![A-Za-z0-9_-]|\.\d)"),
                                   self.patient(pid)))
            self._tokens = tokens
        return self._tokens

    def text(self, text: str, file_names: bool = True) -> str:
        """Free text as exported (``file_names=False`` for our own sentences and params)."""
        if self.full:
            return text
        for pattern, repl in self._known():
            text = pattern.sub(repl, text)
        return scrub_text(text, file_names)

    def value(self, value: Any) -> Any:
        return self.text(value, file_names=False) if isinstance(value, str) else value

    def frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """A table as exported: patient_id -> patient_hash, path columns -> dropped (a source
        becomes its kind), free text scrubbed."""
        if self.full:
            return frame
        frame = frame.copy()
        if "patient_id" in frame:
            at = list(frame.columns).index("patient_id")
            hashes = [self.patient(p) for p in frame.pop("patient_id")]
            frame.insert(at, "patient_hash", hashes)
        if "source" in frame and "source_kind" not in frame:
            from .config import source_kind

            frame["source_kind"] = [source_kind(str(s)) for s in frame["source"]]
        frame = frame.drop(columns=[c for c in PATH_COLUMNS if c in frame])
        for col in frame.columns:
            if not pd.api.types.is_numeric_dtype(frame[col]):   # object or pandas' string dtype
                frame[col] = [self.text(v) if isinstance(v, str) else v for v in frame[col]]
        return frame

    # -- files
    def artifact(self, path: str | os.PathLike) -> str:
        """The file to export for ``path``: itself (full mode, images), or a de-identified copy
        under ``{outdir}/mlflow/export/`` (tables and text)."""
        path = Path(path)
        if self.full:
            return str(path)
        try:
            rel = path.resolve().relative_to(self.outdir.resolve())
        except ValueError:
            rel = Path("external") / path.name
        dest = self.outdir / EXPORT_DIR / rel
        suffix = path.suffix.lower()
        from .io import write_text, write_tsv   # atomic: a killed job never leaves half a copy

        if self.samples_path and path.resolve() == Path(self.samples_path).resolve():
            write_tsv(dest.with_name("samples.deidentified.tsv"), self.frame(self.sheet()))
            return str(dest.with_name("samples.deidentified.tsv"))
        if suffix == ".tsv":
            write_tsv(dest, self.frame(pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)))
            return str(dest)
        if suffix in (".json", ".md", ".txt", ".log", ".yaml", ".yml", ".rst", ".html", ".geojson", ".xml"):
            text = path.read_text(errors="replace")
            if suffix == ".json":
                try:
                    text = json.dumps(self._json(json.loads(text)), indent=2, sort_keys=True) + "\n"
                except ValueError:
                    text = self.text(text)
            else:
                text = self.text(text)
            write_text(dest, text)
            return str(dest)
        return str(path)   # images and binary tables: pixels and numbers, no text from the sheet

    def _json(self, obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in PATH_COLUMNS and isinstance(v, str):
                    continue
                if k == "patient_id":
                    out["patient_hash"] = self.patient(v)
                    continue
                out[k] = self._json(v, k)
            return out
        if isinstance(obj, list):
            return [self._json(v, key) for v in obj]
        return self.text(obj) if isinstance(obj, str) else obj


# --------------------------------------------------------------------------------------------
# Sheet references: a rule's params name a cell of the samples sheet, not its value, where the
# value must not reach .snakemake/metadata, logs or the report (a signed URL's query string, a
# local path); the job reads the value from the sheet ($HISTOFLOW_SAMPLES, set by common.smk).

SAMPLES_ENV = "HISTOFLOW_SAMPLES"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def sheet_reference(column: str, value: Any) -> str | None:
    """``sheet:<column>:<kind>:<sha256 prefix>`` for a non-empty cell (the hash makes a changed
    cell rerun the job, the kind says url/gdc/local for a source), None for an empty one."""
    if value is None or (isinstance(value, float) and value != value) or str(value) == "":
        return None
    value = str(value)
    if column == "source":
        from .config import source_kind

        kind = source_kind(value)
    else:
        kind = "file"
    return f"sheet:{column}:{kind}:{_digest(value)}"


_SHEETS: dict[tuple, pd.DataFrame] = {}


def _cached_sheet(path: str, loader) -> pd.DataFrame:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _SHEETS:
        if len(_SHEETS) > 8:
            _SHEETS.clear()
        _SHEETS[key] = loader(path)
    return _SHEETS[key]


def resolve_sheet_value(value: Any, slide_id: str, samples_path: str | None = None) -> Any:
    """The sheet cell a :func:`sheet_reference` names (other values are returned as they are)."""
    if not (isinstance(value, str) and value.startswith("sheet:")):
        return value
    from .config import load_samples
    from .errors import InputError

    _, column, _kind, digest = value.split(":", 3)
    path = samples_path or os.environ.get(SAMPLES_ENV)
    if not path:
        raise InputError(f"slide {slide_id!r}: params name the samples sheet's {column!r} cell but "
                         f"${SAMPLES_ENV} is not set (run the step through the workflow)")
    sheet = _cached_sheet(path, lambda p: load_samples({"samples": p}, check_local_files=False))
    if slide_id not in sheet.index and samples_path is None:
        # an external cohort's or predict sheet's slide (histoflow.external): slide ids are
        # unique across the sheets, so the first sheet holding it is its own
        from .external import EXTRA_SAMPLES_ENV, load_sheet_any

        for extra in filter(None, os.environ.get(EXTRA_SAMPLES_ENV, "").split(os.pathsep)):
            candidate = _cached_sheet(extra, load_sheet_any)   # check_local_files=False
            if slide_id in candidate.index:
                sheet = candidate
                break
    cell = sheet.loc[slide_id, column] if slide_id in sheet.index else None
    if cell is None or _digest(str(cell)) != digest:
        raise InputError(f"slide {slide_id!r}: the samples sheet's {column!r} cell changed since the workflow "
                         "was planned; run snakemake again")
    return str(cell)


def config_digest(config: dict) -> str:
    """A short hash of the whole config: a rule's params can trigger a rerun on any config change
    without showing the config (its paths, its secrets) in .snakemake/metadata or the report."""
    return _digest(json.dumps(config, sort_keys=True, default=str))


def exported_config(config: dict) -> dict:
    """The config as MLflow params carry it: secrets redacted always; paths, URLs and hosts too
    unless privacy.export is full."""
    from .checklist import redact

    return redact(config) if export_mode(config) == "full" else deidentify_config(config)


def exported_model_spec(spec: dict, exporter: "Exporter") -> dict:
    """A nested model run (histoflow.mlflow) with its artifacts as exported (predictions with
    patient hashes instead of patient ids)."""
    return {**spec, "artifacts": [exporter.artifact(p) for p in spec.get("artifacts", [])],
            "folds": [{**f, "artifacts": [exporter.artifact(p) for p in f.get("artifacts", [])]}
                      for f in spec.get("folds", [])]}
