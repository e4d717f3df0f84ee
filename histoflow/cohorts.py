"""Cohort builders: a samples sheet from the GDC API (TCGA) or from the CAMELYON16 layout.

``histoflow gdc-cohort`` asks the GDC ``/files`` endpoint for the SVS slides of some projects
(POST with a ``filters`` JSON, only the fields it needs, paged with ``from``/``size`` until
``data.pagination.total``) and writes one row per slide. ``histoflow camelyon16-cohort`` reads
the challenge's folders as they are downloaded and writes the official train/test split.

Pure functions build the query, turn a hit or a file listing into rows and count what was
dropped; the HTTP request and the file writes sit at the edges (``fetch_gdc_hits``,
``write_sheet``). Neither builder opens a slide.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from typing import TYPE_CHECKING

from . import __version__
from .errors import HistoflowError, InputError

if TYPE_CHECKING:   # download/config import pandas; the CLI parser imports this module's constants
    from .download import DownloadSettings, _Scrubber

log = logging.getLogger("histoflow.cohorts")

GDC_API = "https://api.gdc.cancer.gov"
GDC_STRATEGY = "Diagnostic Slide"    # FFPE diagnostic slides ("Tissue Slide" are frozen sections)
GDC_PAGE_SIZE = 500
PROJECT_FIELD = "cases.project.project_id"
_GDC_FIELDS = ("file_id", "file_name", "md5sum", "cases.submitter_id")
# Values GDC uses for "no value": a case whose only value is one of these has no label.
_MISSING = {"", "not reported", "unknown", "not applicable", "--", "none", "null"}
_SLIDE_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")
SHEET_COLUMNS = ("slide_id", "patient_id", "label", "source", "md5", "site")
# TCGA barcode TCGA-<TSS>-<participant>: the tissue source site, for split.preserve_site
# (site signatures inflate TCGA accuracies: Howard et al., Nat Commun 2021).
_TCGA_TSS = re.compile(r"^TCGA-([A-Z0-9]{2})-", re.I)


@dataclass
class CohortResult:
    """Rows of a sheet plus what was left out, as counts with a reason (never ids in logs)."""

    rows: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        labels = Counter(r["label"] for r in self.rows)
        parts = [f"{len(self.rows)} slides ({', '.join(f'{k} {v}' for k, v in sorted(labels.items()))})"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())))
        else:
            parts.append("none dropped")
        return "; ".join(parts)


# --------------------------------------------------------------------------- GDC: pure parts

def label_field(label_from: str) -> str:
    """``project`` is short for ``cases.project.project_id``; other values are GDC field paths."""
    name = (label_from or "").strip()
    if name == "project":
        return PROJECT_FIELD
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", name):
        raise InputError(f"--label-from {label_from!r} is not a GDC field path; use `project` or a field such as "
                         "cases.diagnoses.primary_diagnosis")
    return name


def gdc_filters(projects: Iterable[str], strategy: str | None = GDC_STRATEGY) -> dict:
    """The ``filters`` JSON: slides (SVS) of ``projects`` with the experimental strategy."""
    projects = sorted({p.strip() for p in projects if p and p.strip()})
    if not projects:
        raise InputError("give at least one --project (e.g. --project TCGA-LUAD --project TCGA-LUSC)")
    content = [{"op": "in", "content": {"field": PROJECT_FIELD, "value": projects}},
               {"op": "=", "content": {"field": "data_format", "value": "SVS"}}]
    if strategy:
        content.append({"op": "=", "content": {"field": "experimental_strategy", "value": strategy}})
    return {"op": "and", "content": content}


def gdc_fields(label_from: str) -> list[str]:
    """Only what a row needs: the file, its case and the label field."""
    return [*_GDC_FIELDS, label_field(label_from)]


def gdc_files_url(endpoint: str | None) -> str:
    """``{endpoint}/files``; an endpoint ending in ``/data`` (config ``download.gdc_endpoint``) or
    ``/files`` is accepted as well."""
    base = (endpoint or GDC_API).strip().rstrip("/")
    if not re.match(r"https?://", base):
        raise InputError(f"--endpoint {endpoint!r} is not an http(s):// URL (the public API is {GDC_API})")
    if base.endswith("/files"):
        return base
    if base.endswith("/data"):
        base = base[: -len("/data")]
    return base + "/files"


def values_at(obj: Any, path: str) -> list[Any]:
    """Every value at a dotted ``path``, walking through lists (GDC nests ``cases`` and
    ``diagnoses`` as lists of objects)."""
    items = obj if isinstance(obj, list) else [obj]
    for key in path.split("."):
        nxt = []
        for item in items:
            if isinstance(item, Mapping) and key in item:
                v = item[key]
                nxt.extend(v if isinstance(v, list) else [v])
        items = nxt
    return [v for v in items if v is not None]


def read_label_map(path: str | os.PathLike) -> dict[str, str]:
    """A value -> label mapping from YAML/JSON (``{value: label}``) or a two-column TSV
    (``value<TAB>label``; ``#`` comments and a ``value<TAB>label`` header are skipped).
    Matching is case-insensitive (keys are case-folded)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--label-map {str(p)!r} does not exist; give a TSV (value<TAB>label) or YAML mapping")
    text = p.read_text(encoding="utf-8")
    pairs: list[tuple[str, str]] = []
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or not data:
            raise InputError(f"--label-map {str(p)!r} is not a mapping `value: label`")
        pairs = [(str(k), str(v)) for k, v in data.items() if v is not None]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) != 2 or not cells[0].strip() or not cells[1].strip():
                raise InputError(f"--label-map {str(p)!r} line {n}: expected `value<TAB>label`, got {line!r}")
            if n == 1 and [c.strip().lower() for c in cells] == ["value", "label"]:
                continue
            pairs.append((cells[0].strip(), cells[1].strip()))
    mapping: dict[str, str] = {}
    for value, lab in pairs:
        key = value.strip().casefold()
        if key in mapping and mapping[key] != lab:
            raise InputError(f"--label-map {str(p)!r}: {value!r} is mapped to both {mapping[key]!r} and {lab!r}")
        mapping[key] = lab
    if not mapping:
        raise InputError(f"--label-map {str(p)!r} holds no mapping")
    return mapping


def slide_id_from_name(file_name: str) -> str:
    """The file name without ``.svs``, with characters a path cannot carry replaced by ``_``."""
    name = re.sub(r"\.svs$", "", file_name.strip(), flags=re.I)
    return _SLIDE_ID_BAD.sub("_", name).strip("_") or "slide"


def hit_label(hit: Mapping, field_path: str, label_map: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """(label, None) or (None, reason it has none). All values of a case (several diagnoses)
    must agree; a value not in the map drops the slide (a benchmark's classes must be exact)."""
    path = field_path[len("cases."):] if field_path.startswith("cases.") else field_path
    source = hit.get("cases") if field_path.startswith("cases.") else hit
    raw = sorted({str(v).strip() for v in values_at(source, path)} - {""})
    raw = [v for v in raw if v.casefold() not in _MISSING]
    if not raw:
        return None, f"without a value for {field_path}"
    if label_map is not None:
        unmapped = [v for v in raw if v.casefold() not in label_map]
        if unmapped:
            return None, "whose value is not in the label map"
        labels = sorted({label_map[v.casefold()] for v in raw})
    else:
        labels = raw
    if len(labels) > 1:
        return None, f"with conflicting values of {field_path}"
    return labels[0], None


def rows_from_hits(hits: Iterable[Mapping], label_from: str = "project",
                   label_map: Mapping[str, str] | None = None) -> CohortResult:
    """Sheet rows from GDC ``/files`` hits, sorted by slide_id; duplicates resolved.

    The same file_id twice (pages overlapping while the index changes) is one row. Two file_ids
    with one file name: if their md5 agree they are the same image and one row is kept (the
    smallest file_id); if not, InputError (two different slides would share a slide_id).
    """
    field_path = label_field(label_from)
    result = CohortResult(rows=[])
    seen_ids: set[str] = set()
    by_slide: dict[str, dict] = {}
    for hit in hits:
        file_id = str(hit.get("file_id") or "").strip()
        name = str(hit.get("file_name") or "").strip()
        if not file_id or not name:
            result.dropped["files without file_id or file_name"] += 1
            continue
        if file_id in seen_ids:
            result.dropped["repeated file_id (same file listed twice)"] += 1
            continue
        seen_ids.add(file_id)
        patients = sorted({str(v).strip() for v in values_at(hit.get("cases") or [], "submitter_id")} - {""})
        if len(patients) != 1:
            result.dropped[f"files linked to {'no' if not patients else 'several'} cases"] += 1
            continue
        lab, why = hit_label(hit, field_path, label_map)
        if lab is None:
            result.dropped[f"slides {why}"] += 1
            continue
        md5 = str(hit.get("md5sum") or "").strip().lower() or None
        tss = _TCGA_TSS.match(patients[0])
        row = {"slide_id": slide_id_from_name(name), "patient_id": patients[0], "label": lab,
               "source": f"gdc:{file_id}", "md5": md5, "site": tss.group(1).upper() if tss else None}
        other = by_slide.get(row["slide_id"])
        if other is not None:
            if other["md5"] and md5 and other["md5"] != md5:
                raise InputError(f"GDC lists two different files named {name!r} ({other['source']} and gdc:{file_id}, "
                                 "md5 differ); they would share a slide_id: narrow the query (--strategy) or report it "
                                 "to the GDC help desk")
            result.dropped["duplicate file names with the same md5 (one kept)"] += 1
            if row["source"] < other["source"]:
                by_slide[row["slide_id"]] = row
            continue
        by_slide[row["slide_id"]] = row
    result.rows = [by_slide[k] for k in sorted(by_slide)]
    return result


# --------------------------------------------------------------------------- GDC: the request

def _post_json(session, url: str, body: dict, headers: dict, settings: DownloadSettings, scrub: _Scrubber) -> dict:
    """POST with retries on connection errors, timeouts, 408/429/5xx (download.py's backoff)."""
    import requests

    from .download import DownloadError, _retry_after, _Retryable, backoff_seconds, redact_url

    attempt = 0
    while True:
        attempt += 1
        try:
            resp = session.post(url, json=body, headers=headers, timeout=(settings.timeout_s, settings.timeout_s),
                                allow_redirects=False)
            status = resp.status_code
            if status in (408, 429) or status >= 500:
                raise _Retryable(f"HTTP {status}", _retry_after(resp))
            if 300 <= status < 400:
                raise DownloadError(f"{redact_url(url)} redirects (HTTP {status}); give --endpoint the final API URL")
            if status in (401, 403):
                raise DownloadError(f"GDC refused the request (HTTP {status}) at {redact_url(url)}: "
                                    + ("the token is expired or lacks access; download a fresh one from the GDC portal"
                                       if "X-Auth-Token" in headers else "a token may be needed (--token-file or GDC_TOKEN)"))
            if status != 200:
                message = ""
                try:
                    message = str(resp.json().get("message") or "")[:300]
                except ValueError:
                    pass
                raise DownloadError(scrub(f"GDC answered HTTP {status} at {redact_url(url)}"
                                          + (f": {message}" if message else "") + "; check --project, --strategy and --label-from"))
            try:
                return resp.json()
            except ValueError:
                raise DownloadError(f"{redact_url(url)} did not answer JSON; check --endpoint (the GDC API, not the portal)") from None
        except DownloadError:
            raise
        except (_Retryable, requests.RequestException) as err:
            reason = scrub(str(err) if isinstance(err, _Retryable) else f"{type(err).__name__}: {err}")
            if attempt > settings.retries:
                raise DownloadError(f"gave up on {redact_url(url)} after {attempt} attempt(s): {reason}") from None
            wait = backoff_seconds(attempt, settings.backoff_s, getattr(err, "retry_after", None))
            log.warning("GDC query attempt %d failed (%s); retrying in %.1f s", attempt, reason, wait)
            time.sleep(wait)


def fetch_gdc_hits(projects: Iterable[str], *, label_from: str = "project", strategy: str | None = GDC_STRATEGY,
                   endpoint: str | None = None, settings: DownloadSettings | None = None,
                   page_size: int = GDC_PAGE_SIZE) -> list[dict]:
    """All hits of the query, page after page. The offset advances by the number of hits a page
    actually held (a server may send fewer than ``size``) until ``data.pagination.total``."""
    import requests

    from .download import DownloadError, DownloadSettings, _Scrubber, read_gdc_token, redact_url

    settings = settings or DownloadSettings()
    if page_size < 1:
        raise InputError("--page-size must be >= 1")
    url = gdc_files_url(endpoint)
    token = read_gdc_token(settings)
    headers = {"User-Agent": f"histoflow/{__version__}", "Accept": "application/json"}
    if token:
        headers["X-Auth-Token"] = token
    scrub = _Scrubber([token] if token else [], url)
    body = {"filters": gdc_filters(projects, strategy), "fields": ",".join(gdc_fields(label_from)),
            "format": "JSON", "size": page_size, "from": 0, "sort": "file_name:asc"}
    log.info("GDC query %s (%s token): %s", redact_url(url), "with a" if token else "without",
             json.dumps(body["filters"], sort_keys=True))
    hits: list[dict] = []
    seen: set[str] = set()
    total: int | None = None
    with requests.Session() as session:
        while total is None or len(hits) < total:
            body["from"] = len(hits)
            answer = _post_json(session, url, body, headers, settings, scrub)
            data = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(data, dict) or not isinstance(data.get("hits"), list):
                raise DownloadError(f"{redact_url(url)} did not answer in the GDC shape (data.hits); check --endpoint")
            for warning in (answer.get("warnings") or {}).items():
                log.warning("GDC warning: %s", scrub(str(warning)))
            try:
                total = int((data.get("pagination") or {})["total"])
            except (KeyError, TypeError, ValueError):
                raise DownloadError(f"{redact_url(url)} gave no data.pagination.total; check --endpoint") from None
            page = data["hits"]
            if not page and len(hits) < total:
                raise DownloadError(f"GDC returned an empty page after {len(hits)} of {total} files; run again "
                                    "(the index may be updating)")
            ids = {str(h.get("file_id")) for h in page if isinstance(h, dict)}
            if page and ids <= seen:   # a server ignoring `from` would repeat page 1 until `total`
                raise DownloadError(f"{redact_url(url)} sent the same files again for from={len(hits)}; it does not "
                                    "page with from/size: use the GDC API or a mirror that does")
            seen |= ids
            hits.extend(page)
            log.info("GDC: %d of %d files", len(hits), total)
    return hits


def gdc_cohort(projects: Iterable[str], *, label_from: str = "project", label_map: str | os.PathLike | None = None,
               strategy: str | None = GDC_STRATEGY, endpoint: str | None = None,
               settings: DownloadSettings | None = None, page_size: int = GDC_PAGE_SIZE) -> CohortResult:
    """Query the GDC and turn the hits into sheet rows (see ``rows_from_hits``)."""
    from .download import DownloadError

    mapping = read_label_map(label_map) if label_map else None
    field_path = label_field(label_from)
    try:
        hits = fetch_gdc_hits(projects, label_from=label_from, strategy=strategy, endpoint=endpoint,
                              settings=settings, page_size=page_size)
    except DownloadError as err:   # one line, token-free already
        raise HistoflowError(f"GDC query failed: {err}") from None
    result = rows_from_hits(hits, label_from, mapping)
    if hits and not result.rows:
        raise InputError(f"none of the {len(hits)} GDC files gave a label ({result.summary()}); check --label-from "
                         f"{field_path!r} and --label-map")
    if not hits:
        raise InputError("GDC found no slide for this query; check the project ids (e.g. TCGA-LUAD) and "
                         f"--strategy {strategy!r} (\"Diagnostic Slide\" or \"Tissue Slide\")")
    return result


# --------------------------------------------------------------------------- CAMELYON16

# Documented by the organisers (see docs/interface.md, "Building a sheet"):
# normal_086 was a tumour slide, re-released as tumor_111 (not a slide of its own);
# test_049 is a duplicate slide, removed from both the slide-level and the lesion-level task;
# test_114 is not exhaustively annotated, removed from the lesion-level task (FROC) only.
C16_DROPPED = {"normal_086": "normal_086 (re-released as tumor_111)",
               "test_049": "test_049 (duplicate slide, removed by the organisers)"}
C16_NO_LESION_EVAL = {"test_114": "test_114 annotations left out (not exhaustive; organisers excluded it from FROC)"}
_C16_NAME = re.compile(r"^(normal|tumor|test)_(\d{3})$", re.I)
_TIFF = (".tif", ".tiff")


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{lower-case stem: path}`` of the files in ``folder`` (not recursive)."""
    if not folder.is_dir():
        return {}
    return {p.stem.lower(): p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def _first_dir(base: Path, names: Iterable[str]) -> Path | None:
    """The first of ``base/<name>`` that exists, matching names case-insensitively."""
    if not base.is_dir():
        return None
    children = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


def _annotation_files(part: Path) -> tuple[dict[str, Path], list[Path]]:
    """XML annotations of ``training`` or ``testing``: ``lesion_annotations/`` (what unpacking
    ``lesion_annotations.zip`` into a folder of its name gives; also ``annotations/``, one nested
    folder of the same name, or the XMLs unpacked beside the zip). Returns (files, zips found)."""
    found: dict[str, Path] = {}
    folder = _first_dir(part, ("lesion_annotations", "annotations", "Lesion_annotations", "Ground_Truth"))
    candidates = [part]
    if folder is not None:
        candidates.append(folder)
        inner = _first_dir(folder, ("lesion_annotations", "annotations", "xml"))
        if inner is not None:
            candidates.append(inner)
    for c in candidates:
        for stem, p in _files(c, (".xml",)).items():
            found.setdefault(stem, p)
    zips = sorted(p for p in part.glob("*.zip") if "annotation" in p.name.lower()) if part.is_dir() else []
    return found, zips


def _read_reference(path: Path) -> dict[str, str]:
    """testing/reference.csv: ``test_001,Tumor,Macro,Primary`` / ``test_002,Normal`` (a header line
    is skipped). Returns ``{test_xxx: tumor|normal}``."""
    labels: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for n, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0]:
                continue
            lab = cells[1].lower() if len(cells) > 1 else ""
            if lab not in ("tumor", "normal"):
                if n == 1:   # a header such as image,type,...
                    continue
                raise InputError(f"{str(path)!r} line {n}: label {cells[1] if len(cells) > 1 else ''!r} is neither "
                                 "Tumor nor Normal; use the reference.csv shipped with CAMELYON16")
            labels[Path(cells[0]).stem.lower()] = lab
    return labels


def camelyon16_rows(root: str | os.PathLike, sheet_dir: str | os.PathLike | None = None, *,
                    absolute: bool = False, annotations: bool = True, reference: str | os.PathLike | None = None) -> CohortResult:
    """Rows of the CAMELYON16 sheet from the layout under ``root``.

    Accepted layout (names matched case-insensitively, ``.tif`` or ``.tiff``)::

        training/normal/normal_XXX.tif    label normal, split train
        training/tumor/tumor_XXX.tif      label tumor,  split train
        testing/images/test_XXX.tif       split test, label from testing/reference.csv
        training/lesion_annotations/tumor_XXX.xml, testing/lesion_annotations/test_XXX.xml
                                          (or annotations/, a nested folder of the same name,
                                           or the XMLs unpacked beside lesion_annotations.zip)

    ``patient_id`` is the slide_id: each CAMELYON16 slide comes from a different patient.
    ``source``/``annotations`` are relative to ``sheet_dir`` (how histoflow reads local paths)
    unless ``absolute``. The organisers' exclusions are applied (``C16_DROPPED``,
    ``C16_NO_LESION_EVAL``) and counted.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"--root {str(root)!r} is not a folder; point it at the CAMELYON16 folder "
                         "(the one holding training/ and testing/)")
    training = _first_dir(root, ("training",))
    testing = _first_dir(root, ("testing",))
    if training is None and testing is None:
        raise InputError(f"--root {str(root)!r} holds neither training/ nor testing/; point it at the CAMELYON16 "
                         "folder as downloaded (training/normal, training/tumor, testing/images, testing/reference.csv)")
    # realpath of the folders, as validate_samples reads relative paths from the sheet's real folder
    base = os.path.realpath(sheet_dir) if sheet_dir is not None else None

    def where(p: Path) -> str:
        full = os.path.join(os.path.realpath(p.parent), p.name)   # the file itself may be a link: keep its name
        if absolute or base is None:
            return full
        try:
            return os.path.relpath(full, base)
        except ValueError:   # another drive (Windows): keep it absolute
            return full

    result = CohortResult(rows=[])
    slides: list[tuple[str, Path, str, str]] = []   # (slide_id, path, label, split)
    ann: dict[str, Path] = {}
    zips: list[Path] = []
    if training is not None:
        for sub, lab in (("normal", "normal"), ("tumor", "tumor")):
            folder = _first_dir(training, (sub,))
            files = _files(folder, _TIFF) if folder is not None else {}
            if folder is None:
                result.notes.append(f"no training/{sub}/ folder")
            for stem, p in files.items():
                slides.append((stem, p, lab, "train"))
        a, z = _annotation_files(training)
        ann.update(a)
        if z and not a:
            zips += z
    else:
        result.notes.append("no training/ folder: test slides only")
    if testing is not None:
        folder = _first_dir(testing, ("images",)) or testing
        tests = _files(folder, _TIFF)
        ref_path = Path(reference) if reference else None
        if ref_path is None:
            ref_dir = [testing] + [d for d in (_first_dir(testing, ("Ground_Truth", "evaluation")),) if d]
            ref_path = next((d / n for d in ref_dir for n in ("reference.csv", "Reference.csv") if (d / n).is_file()), None)
        if tests and (ref_path is None or not ref_path.is_file()):
            raise InputError(f"{str(testing)!r} has test slides but no reference.csv (the test labels); put the "
                             "challenge's testing/reference.csv there or pass --reference FILE")
        ref = _read_reference(ref_path) if tests else {}
        for stem, p in tests.items():
            if stem not in ref:
                raise InputError(f"test slide {p.name!r} is not in {str(ref_path)!r}; use the reference.csv shipped "
                                 "with CAMELYON16 (one row per test slide)")
            slides.append((stem, p, ref[stem], "test"))
        missing = sorted(set(ref) - set(tests) - set(C16_DROPPED))
        if missing:
            result.notes.append(f"{len(missing)} slide(s) listed in reference.csv have no image under {folder.name}/")
        a, z = _annotation_files(testing)
        ann.update(a)
        if z and not a:
            zips += z
    else:
        result.notes.append("no testing/ folder: no test slides")

    for stem, p, lab, split in slides:
        m = _C16_NAME.match(stem)
        expected = "test" if split == "test" else lab   # the folder must agree with the name
        if not m or m.group(1).lower() != expected:
            raise InputError(f"{str(p)!r} is not a CAMELYON16 {expected} slide (its folder holds {expected}_XXX.tif); "
                             "move other files out of the challenge's folders")
    tumour_without = 0
    if annotations and zips:   # a part whose annotations are still zipped
        z = zips[0]
        raise InputError(f"{str(z)!r} is not unpacked: run `unzip {z} -d {z.with_suffix('')}` "
                         "(or pass --no-annotations)")
    for stem, p, lab, split in sorted(slides, key=lambda s: s[0]):
        if stem in C16_DROPPED:
            result.dropped[C16_DROPPED[stem]] += 1
            continue
        a = ann.get(stem) if annotations and lab == "tumor" else None
        if stem in C16_NO_LESION_EVAL:
            if a is not None:
                result.notes.append(C16_NO_LESION_EVAL[stem])
            a = None
        elif annotations and lab == "tumor" and a is None:
            tumour_without += 1
        result.rows.append({"slide_id": stem, "patient_id": stem, "label": lab, "source": where(p),
                            "split": split, "annotations": where(a) if a is not None else None})
    if tumour_without:
        result.notes.append(f"{tumour_without} tumour slide(s) without an annotation XML (no lesion ground truth)")
    if not result.rows:
        raise InputError(f"no CAMELYON16 slide under {str(root)!r} (expected training/normal/normal_XXX.tif, "
                         "training/tumor/tumor_XXX.tif, testing/images/test_XXX.tif)")
    return result


# --------------------------------------------------------------------------- writing

def write_sheet(result: CohortResult, out: str | os.PathLike, columns: Iterable[str]) -> Path:
    """Validate the rows as histoflow will read them, then write the TSV atomically."""
    import pandas as pd

    from .config import validate_samples
    from .io import write_tsv

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)   # relative paths ("../x") resolve only from a folder that exists
    frame = pd.DataFrame(result.rows, columns=list(columns), dtype=object).fillna("")
    validate_samples(frame, out, check_local_files=True)
    write_tsv(out, frame)
    return out
