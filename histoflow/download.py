"""Stage `download`: turn each slide's source into a local file, described by a manifest JSON.

Sources (samples-sheet column ``source``):

- ``http(s)://...``: streamed in chunks into ``dest_dir/<name>.part``; an interrupted transfer
  resumes with an HTTP ``Range`` request (``If-Range`` guards against the file having changed);
  servers that ignore ``Range`` (200 instead of 206) make us restart from byte 0. Transient
  failures (connection errors, timeouts, truncated bodies, 408/429/5xx) are retried with
  exponential backoff; other 4xx fail at once. The md5 is computed while streaming (over the
  whole file when resumed) and checked against the sheet's ``md5``. Only a complete, verified
  file is renamed to its final name; a bad one goes to ``dest_dir/rejected/``.
- ``gdc:<UUID>``: the same, from ``{gdc_endpoint}/{uuid}``, with an optional token sent as
  ``X-Auth-Token``. The token is never logged, written or put in an error message, and it is
  dropped when a redirect leaves the GDC host.
- a local path: linked (symlink), never copied; DICOM (``.dcm``) and VMS files bring their
  folder, MIRAX (``.mrxs``) its data folder, because OpenSlide reads the sibling files.

A complete download leaves a record (``dest_dir/.download.json``) so that re-running the job
(Snakemake deletes the manifest before re-running a rule) re-fetches nothing.
"""

from __future__ import annotations

import dataclasses
import email.message
import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit

from .config import defaults_from_schema
from . import __version__
from .config import source_kind
from .errors import InputError, SlideError
from .io import file_md5, read_json, safe_remove, write_json


def _remove(path: Path) -> None:
    """Delete a file of a slide's download folder ``{outdir}/downloads/<slide>/``: never outside
    the downloads folder (nor the output folder)."""
    safe_remove(path, Path(path).parent.parent)

log = logging.getLogger("histoflow.download")

RECORD_NAME = ".download.json"      # what a complete download left behind (manifest + file stat)
PARTIAL_NAME = ".partial.json"      # which source/name/validator the .part file belongs to
REJECTED_DIR = "rejected"
MAX_REDIRECTS = 10
MAX_RETRY_AFTER_S = 300.0           # a server asking for longer than this is treated as down
PROGRESS_MIN_BYTES = 32 << 20       # progress bars only where a transfer takes a while
# Extensions OpenSlide reads; used to find the slide inside a linked folder.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".dcm")
# Query parameters that carry secrets in pre-signed URLs (S3, Azure SAS, GCS, tokens).
_SECRET_QUERY = re.compile(r"(token|sig|signature|key|secret|password|credential|auth|session)", re.I)


@dataclass(frozen=True)
@defaults_from_schema("download")
class DownloadSettings:
    """Config section ``download`` (see workflow/schemas/config.schema.yaml)."""

    retries: int  # retries after the first attempt (each one resumes)
    backoff_s: float  # wait before retry k is backoff_s * 2**(k-1)
    timeout_s: float  # connect and read timeout of one request
    gdc_endpoint: str
    gdc_token_file: str | None
    gdc_token_env: str
    gdc_md5: bool  # check GDC's own md5 when the sheet gives none
    chunk_bytes: int = 1 << 20          # not a config key: read size of the stream

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "DownloadSettings":
        cfg = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"config key 'download.{unknown[0]}' is unknown; valid keys: "
                             f"{', '.join(sorted(known - {'chunk_bytes'}))}")
        settings = cls(**{k: v for k, v in cfg.items() if v is not None or k == "gdc_token_file"})
        if settings.retries < 0 or settings.backoff_s < 0 or settings.timeout_s <= 0 or settings.chunk_bytes <= 0:
            raise InputError("config keys 'download.retries' and 'download.backoff_s' must be >= 0 and "
                             "'download.timeout_s' > 0 (fix them in config.yaml)")
        return settings


@dataclass
class FetchResult:
    path: Path
    md5: str
    size_bytes: int
    attempts: int
    seconds: float
    resumed: bool
    bytes_transferred: int


class DownloadError(Exception):
    """One-line reason a download failed; never carries a token."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


# --------------------------------------------------------------------------- small pure helpers

def redact_url(url: str) -> str:
    """The URL without user:password and with secret-looking query values replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def sanitize_filename(name: str, fallback: str = "slide") -> str:
    """A safe file name: last path component, only ``[A-Za-z0-9._-]``, no leading dot or dash,
    the extension kept (OpenSlide picks some formats by it), at most 180 characters."""
    def clean(text: str) -> str:
        text = unquote(text or "").replace("\\", "/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".-")

    name = clean(name)
    if not name.strip("_.") or name == REJECTED_DIR:
        name = clean(fallback) or "slide"
    if name.endswith(".part"):  # would collide with our partial files
        name = name[: -len(".part")] + "_part"
    if len(name) > 180:
        suffix = "".join(Path(name).suffixes[-2:])[:20]
        name = name[: 180 - len(suffix)] + suffix
    return name


def filename_from_headers(content_disposition: str | None) -> str | None:
    """The file name a ``Content-Disposition`` header gives (RFC 6266, ``filename*`` first)."""
    if not content_disposition:
        return None
    msg = email.message.Message()
    msg["content-disposition"] = content_disposition
    name = msg.get_filename()
    return name or None


def choose_filename(url: str, final_url: str, content_disposition: str | None, fallback: str) -> str:
    """Content-Disposition, else the URL's last path component that has an extension."""
    for candidate in (filename_from_headers(content_disposition),
                      urlsplit(url).path.rsplit("/", 1)[-1],
                      urlsplit(final_url).path.rsplit("/", 1)[-1]):
        if candidate and Path(unquote(candidate)).suffix:
            return sanitize_filename(candidate, fallback)
    return sanitize_filename(urlsplit(url).path.rsplit("/", 1)[-1], fallback)


def backoff_seconds(retry: int, backoff_s: float, retry_after: float | None = None) -> float:
    """Wait before retry number ``retry`` (1-based): exponential, or what the server asked."""
    wait = backoff_s * (2 ** (retry - 1))
    if retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER_S))
    return wait


def parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes start-end/total`` -> (start, total or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def read_gdc_token(settings: DownloadSettings) -> str | None:
    """The GDC token from ``gdc_token_file`` or the variable named by ``gdc_token_env``."""
    if settings.gdc_token_file:
        path = Path(settings.gdc_token_file).expanduser()
        if not path.is_file():
            raise DownloadError(f"GDC token file {str(path)!r} (config download.gdc_token_file) does not exist; "
                                "download a token from the GDC portal (user menu > Download Token) and point the key at it")
        token = path.read_text().strip()
        if not token:
            raise DownloadError(f"GDC token file {str(path)!r} is empty; download a fresh token from the GDC portal")
        return token
    token = os.environ.get(settings.gdc_token_env or "", "").strip()
    return token or None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- HTTP

class _Scrubber:
    """Replaces secrets (the token, passwords and signatures of every URL seen) in any text that
    may reach a log, a manifest or an error message."""

    def __init__(self, secrets: list[str], url: str):
        self.secrets = [s for s in secrets if s]
        self.urls: dict[str, str] = {}
        self.add_url(url)

    def add_url(self, url: str) -> None:
        parts = urlsplit(url)
        self.urls[url] = redact_url(url)
        self.secrets += [v for k, v in parse_qsl(parts.query) if _SECRET_QUERY.search(k) and len(v) > 3]
        if parts.password:
            self.secrets.append(parts.password)

    def __call__(self, text: str) -> str:
        for url, safe in self.urls.items():
            text = text.replace(url, safe)
        for secret in sorted(set(self.secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


def _get(session, url: str, headers: dict, secret_headers: dict, timeout: float, scrub: _Scrubber):
    """GET following redirects by hand so that secret headers are sent only to the origin host
    over the origin scheme (requests drops Authorization on a host change, not X-Auth-Token)."""
    origin = urlsplit(url)
    for _ in range(MAX_REDIRECTS + 1):
        here = urlsplit(url)
        send = dict(headers)
        if (here.scheme, here.netloc) == (origin.scheme, origin.netloc):
            send.update(secret_headers)
        resp = session.get(url, headers=send, stream=True, timeout=(timeout, timeout), allow_redirects=False)
        if resp.is_redirect:
            url = urljoin(url, resp.headers["Location"])
            scrub.add_url(url)
            resp.close()
            continue
        return resp, url
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects; check the URL")


def _iter_body(resp, chunk_bytes: int):
    """The body as it arrives. read1 hands over every byte received before a connection breaks
    (read(amt) would buffer them and lose them with the exception), so a resume starts there."""
    while block := resp.raw.read1(chunk_bytes, decode_content=True):
        yield block


def _retry_after(resp) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _status_error(status: int, safe_url: str, kind: str, had_token: bool, settings: DownloadSettings) -> DownloadError:
    if kind == "gdc" and status in (401, 403):
        if had_token:
            return DownloadError(f"GDC refused the token (HTTP {status}) for {safe_url}: access is controlled and the "
                                 "token is expired (they last 30 days) or lacks this project's dbGaP authorisation; "
                                 "download a fresh token from the GDC portal")
        return DownloadError(f"GDC file {safe_url} is controlled-access (HTTP {status}); give a token: put it in a "
                             "file and set download.gdc_token_file, or export the environment variable "
                             f"{settings.gdc_token_env!r} (config download.gdc_token_env)")
    if status in (401, 403):
        return DownloadError(f"HTTP {status} (access denied) for {safe_url}; the URL needs credentials or has expired")
    if status in (404, 410):
        return DownloadError(f"HTTP {status} (not found) for {safe_url}; check the `source` column of the samples sheet")
    return DownloadError(f"HTTP {status} for {safe_url}; the server refused the request")


def _read_partial(dest_dir: Path, label: str) -> tuple[Path | None, dict]:
    """The .part file left by an earlier attempt at this same source, or (None, {})."""
    meta_path = dest_dir / PARTIAL_NAME
    meta: dict = {}
    if meta_path.exists():
        try:
            meta = read_json(meta_path)
        except ValueError:
            meta = {}
    part = dest_dir / f"{meta.get('filename', '')}.part" if meta.get("filename") else None
    if meta.get("source") == label and part is not None and part.is_file():
        return part, meta
    for stray in dest_dir.glob("*.part"):  # another source's leftovers are never used
        _remove(stray)
    _remove(meta_path)
    return None, {}


def _reject(path: Path, dest_dir: Path, name: str) -> Path:
    rejected = dest_dir / REJECTED_DIR
    rejected.mkdir(parents=True, exist_ok=True)
    target = rejected / name
    os.replace(path, target)
    return target


def fetch_http(url: str, dest_dir: str | os.PathLike, settings: DownloadSettings, *, slide_id: str,
               expected_md5: str | None = None, kind: str = "url", token: str | None = None,
               label: str | None = None) -> FetchResult:
    """Download ``url`` into ``dest_dir``, resuming a ``.part`` left by an earlier attempt.

    Returns the final path and its md5; raises DownloadError (one line, no secrets) when the
    file cannot be had or does not match ``expected_md5`` (then it is kept in ``rejected/``).
    """
    import requests
    import urllib3
    from tqdm import tqdm

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    label = label or redact_url(url)
    scrub = _Scrubber([token or ""], url)
    secret_headers = {"X-Auth-Token": token} if token else {}
    # identity: md5 and Content-Length are about the bytes on disk, not a gzip-decoded stream
    base_headers = {"User-Agent": f"histoflow/{__version__}", "Accept-Encoding": "identity"}
    part, meta = _read_partial(dest_dir, label)
    resumed = False
    transferred = 0
    start = time.monotonic()
    attempt = 0
    with requests.Session() as session:
        while True:
            attempt += 1
            offset = part.stat().st_size if part is not None and part.exists() else 0
            headers = dict(base_headers)
            if offset:
                headers["Range"] = f"bytes={offset}-"
                validator = meta.get("etag") if not str(meta.get("etag", "W/")).startswith("W/") else meta.get("last_modified")
                if validator:
                    headers["If-Range"] = validator
            try:
                resp, final_url = _get(session, url, headers, secret_headers, settings.timeout_s, scrub)
                with resp:
                    status = resp.status_code
                    if status == 416 and part is not None:  # the .part is no prefix of this file: start over
                        _remove(part)
                        part = None
                        raise _Retryable("HTTP 416 for the resumed range; restarting from byte 0")
                    if status in (408, 429) or status >= 500:
                        raise _Retryable(f"HTTP {status}", _retry_after(resp))
                    if not 200 <= status < 300:
                        raise _status_error(status, label, kind, bool(token), settings)
                    name = choose_filename(url, final_url, resp.headers.get("Content-Disposition"), slide_id)
                    length = resp.headers.get("Content-Length")
                    length = int(length) if length and length.isdigit() else None
                    if status == 206 and offset:
                        crange = parse_content_range(resp.headers.get("Content-Range"))
                        if crange is None or crange[0] != offset:
                            _remove(part)
                            part = None
                            raise _Retryable("server answered a different byte range; restarting from byte 0")
                        total = crange[1] if crange[1] is not None else (offset + length if length is not None else None)
                        if part.name != f"{name}.part":  # the server renamed the file: follow it
                            part = part.rename(dest_dir / f"{name}.part")
                            meta = dict(meta, filename=name)
                            write_json(dest_dir / PARTIAL_NAME, meta)
                        resumed = True
                        log.info("%s: resuming at byte %d of %s", slide_id, offset, total if total is not None else "?")
                    else:
                        if offset:
                            log.info("%s: server ignored the Range request (HTTP %d); restarting from byte 0", slide_id, status)
                            _remove(part)
                        offset, resumed = 0, False
                        total = length
                        if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
                            total = None  # Content-Length counts encoded bytes; urllib3 checks those
                        part = dest_dir / f"{name}.part"
                        meta = {"source": label, "filename": name, "etag": resp.headers.get("ETag"),
                                "last_modified": resp.headers.get("Last-Modified")}
                        write_json(dest_dir / PARTIAL_NAME, meta)
                    if total is not None:
                        free = shutil.disk_usage(dest_dir).free
                        if free < total - offset:
                            raise DownloadError(f"not enough disk space in {str(dest_dir)!r}: the file needs "
                                                f"{_human(total - offset)}, {_human(free)} free; free space or set `outdir`")
                    digest = hashlib.md5()
                    if offset:  # md5 over the whole file: the part first, then the stream
                        with open(part, "rb") as handle:
                            while block := handle.read(8 << 20):
                                digest.update(block)
                    size = offset
                    with open(part, "ab" if offset else "wb") as handle, tqdm(
                            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=slide_id, mininterval=10, disable=total is None or total < PROGRESS_MIN_BYTES) as bar:
                        for chunk in _iter_body(resp, settings.chunk_bytes):
                            handle.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            transferred += len(chunk)
                            bar.update(len(chunk))
                    if total is not None and size < total:
                        raise _Retryable(f"connection closed after {size} of {total} bytes")
                    if total is not None and size > total:
                        bad = _reject(part, dest_dir, name)
                        raise DownloadError(f"server sent {size} bytes but announced {total}; the file is kept in "
                                            f"{str(bad)!r}; check the source")
                    break
            except DownloadError:
                raise
            except (_Retryable, requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                    OSError) as err:
                if isinstance(err, OSError) and not isinstance(err, (ConnectionError, TimeoutError, socket.timeout,
                                                                      requests.RequestException)):
                    raise DownloadError(f"cannot write in {str(dest_dir)!r}: {err}") from None
                reason = scrub(str(err) if isinstance(err, _Retryable) else f"{type(err).__name__}: {err}")
                if attempt > settings.retries:
                    raise DownloadError(f"gave up on {label} after {attempt} attempt(s): {reason}; "
                                        "the partial file is kept and the next run resumes it "
                                        "(raise download.retries for a flaky connection)") from None
                wait = backoff_seconds(attempt, settings.backoff_s, getattr(err, "retry_after", None))
                log.warning("%s: attempt %d failed (%s); retrying in %.1f s", slide_id, attempt, reason, wait)
                time.sleep(wait)
    md5 = digest.hexdigest()
    if expected_md5 and md5.lower() != expected_md5.lower():
        bad = _reject(part, dest_dir, name)
        _remove(dest_dir / PARTIAL_NAME)
        raise DownloadError(f"md5 mismatch: the download has {md5}, expected {expected_md5.lower()}; the file is kept "
                            f"in {str(bad)!r} and not used; check the md5 column or the source")
    final = dest_dir / name
    os.replace(part, final)
    _remove(dest_dir / PARTIAL_NAME)
    seconds = time.monotonic() - start
    log.info("%s: %s (%s) in %.1f s, %d attempt(s)%s, md5 %s", slide_id, final.name, _human(size), seconds,
             attempt, ", resumed" if resumed else "", md5)
    return FetchResult(path=final, md5=md5, size_bytes=size, attempts=attempt, seconds=seconds,
                       resumed=resumed, bytes_transferred=transferred)


def gdc_expected_md5(uuid: str, settings: DownloadSettings, token: str | None) -> str | None:
    """GDC's recorded md5 of a file (``files`` endpoint beside the data endpoint), or None."""
    import requests

    base = settings.gdc_endpoint.rstrip("/")
    if not base.endswith("/data"):
        return None
    url = f"{base[: -len('/data')]}/files/{uuid}"
    headers = {"User-Agent": f"histoflow/{__version__}"}
    if token:
        headers["X-Auth-Token"] = token
    try:
        resp = requests.get(url, params={"fields": "md5sum,file_size,file_name"}, headers=headers,
                            timeout=settings.timeout_s, allow_redirects=False)
        if resp.status_code != 200:
            return None
        md5 = (resp.json().get("data") or {}).get("md5sum")
    except (requests.RequestException, ValueError):
        return None
    return md5 if isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5) else None


# --------------------------------------------------------------------------- local files

def _symlink(target: Path, link: Path) -> None:
    """Point ``link`` at ``target``, atomically replacing an older link."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.exists() and not link.is_symlink():
        raise DownloadError(f"{str(link)!r} exists and is not a link; remove it so the source can be linked")
    tmp = link.parent / f".{link.name}.link-{os.getpid()}"
    _remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _slide_in_folder(folder: Path) -> Path | None:
    """The file to open in a slide folder: a single non-DICOM slide file, else the first .dcm."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    non_dicom = [p for p in files if p.suffix.lower() != ".dcm"]
    if non_dicom:
        return non_dicom[0]
    return files[0] if files else None


def link_local(source: str | os.PathLike, dest_dir: str | os.PathLike, *, slide_id: str,
               expected_md5: str | None = None) -> tuple[Path, int, str | None]:
    """Link a local slide into ``dest_dir``; returns (path to open, size in bytes, md5 or None).

    The md5 is computed only when ``expected_md5`` is given (slides are big).
    """
    # abspath, not resolve(): a link into a content-addressed store (DVC, git-annex) would lose its name
    src = Path(os.path.abspath(os.path.expanduser(str(source))))
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        raise DownloadError(f"local source {str(src)!r} does not exist; fix the `source` column (relative paths are "
                            "read from the samples sheet's folder)")
    suffix = src.suffix.lower()
    links: list[Path] = []
    if src.is_dir():
        inner = _slide_in_folder(src)
        if inner is None:
            raise DownloadError(f"folder {str(src)!r} holds no slide file ({', '.join(SLIDE_EXTENSIONS)}); "
                                "point `source` at the slide file")
        links.append(dest_dir / src.name)
        _symlink(src, links[-1])
        path, size = links[-1] / inner.name, _tree_size(src)
    elif suffix in (".dcm", ".vms", ".vmu"):  # OpenSlide reads the sibling files of the series
        links.append(dest_dir / src.parent.name)
        _symlink(src.parent, links[-1])
        path, size = links[-1] / src.name, _tree_size(src.parent)
    else:
        path = dest_dir / src.name
        links.append(path)
        _symlink(src, path)
        size = src.stat().st_size
        data_dir = src.with_suffix("")
        if suffix == ".mrxs" and data_dir.is_dir():  # MIRAX keeps its tiles in a same-named folder
            links.append(dest_dir / data_dir.name)
            _symlink(data_dir, links[-1])
            size += _tree_size(data_dir)
    md5 = None
    if expected_md5:
        md5 = file_md5(path)
        if md5 != expected_md5.lower():
            for link in links:  # a file that fails its check is never left where it would be used
                _remove(link)
            raise DownloadError(f"md5 mismatch: local file {str(src)!r} has {md5}, the sheet says "
                                f"{expected_md5.lower()}; check the md5 column or the file")
    return path, size, md5


# --------------------------------------------------------------------------- the stage

def _reusable(record: dict | None, label: str, expected_md5: str | None, stat: list | None = None) -> bool:
    """Whether an earlier complete download/link of the same source still stands."""
    if not record or record.get("manifest", {}).get("status") != "ok":
        return False
    manifest = record["manifest"]
    if manifest.get("source") != label or not manifest.get("path"):
        return False
    path = Path(manifest["path"])
    if not path.exists():
        return False
    if expected_md5 and (manifest.get("md5") or "").lower() != expected_md5.lower():
        return False
    if manifest.get("source_kind") == "local":
        return stat is not None and record.get("stat") == stat
    return path.stat().st_size == manifest.get("size_bytes")


def _local_stat(source: str) -> list:
    st = os.stat(os.path.expanduser(source))
    return [st.st_size, st.st_mtime_ns]


def download_slide(slide_id: str, source: str, dest_dir: str | os.PathLike, manifest_path: str | os.PathLike,
                   md5: str | None, settings: Mapping[str, Any] | DownloadSettings | None,
                   on_error: str = "fail") -> dict:
    """Fetch or link one slide and write ``manifest_path`` (docs/interface.md, downloads/{slide_id}.json).

    ``on_error="fail"`` raises SlideError (one line); ``"skip"`` writes a manifest with status
    ``failed`` and the reason, so that slide_qc marks the slide skipped and the cohort goes on.
    ``source`` may name the sheet cell instead of holding it (common.smk's `sheet_ref`: a signed
    URL stays out of Snakemake's metadata); it is read from the sheet here. Returns the manifest.
    """
    from .privacy import resolve_sheet_value

    source = resolve_sheet_value(source, slide_id)
    if on_error not in ("fail", "skip"):
        raise InputError(f"config key 'on_error' is {on_error!r}; use fail or skip")
    if not isinstance(settings, DownloadSettings):
        settings = DownloadSettings.from_config(settings)
    # pandas gives NaN/None for an empty md5 cell
    md5 = (md5.strip().lower() or None) if isinstance(md5, str) else None
    dest_dir = Path(dest_dir)
    source = str(source).strip()
    kind = source_kind(source)
    label = redact_url(source) if kind == "url" else source
    manifest: dict[str, Any] = {
        "slide_id": slide_id, "status": "ok", "reason": None, "source_kind": kind, "source": label,
        "path": None, "filename": None, "md5": None, "md5_checked": False, "size_bytes": None,
        "download_seconds": 0.0, "attempts": 0, "resumed": False, "reused": False,
    }
    record_path = dest_dir / RECORD_NAME
    record = None
    for candidate in (record_path, Path(manifest_path)):
        try:
            data = read_json(candidate)
            record = data if "manifest" in data else {"manifest": data}
            break
        except (OSError, ValueError):
            continue
    try:
        stat = _local_stat(source) if kind == "local" and os.path.exists(os.path.expanduser(source)) else None
        if _reusable(record, label, md5, stat):
            manifest = dict(record["manifest"], reused=True)
            log.info("%s: %s is already complete (same source%s); nothing fetched", slide_id,
                     manifest["path"], " and md5" if md5 else "")
        elif kind == "local":
            path, size, got_md5 = link_local(source, dest_dir, slide_id=slide_id, expected_md5=md5)
            manifest.update(path=str(path.absolute()), filename=path.name, md5=got_md5, md5_checked=md5 is not None,
                            size_bytes=size)
            log.info("%s: linked %s -> %s (%s)", slide_id, path, source, _human(size))
        else:
            token = None
            url = source
            expected = md5
            if kind == "gdc":
                uuid = source.split(":", 1)[1].strip()
                url = f"{settings.gdc_endpoint.rstrip('/')}/{uuid}"
                token = read_gdc_token(settings)
                log.info("%s: GDC file %s via %s (%s token)", slide_id, uuid, settings.gdc_endpoint,
                         "with a" if token else "without")
                if expected is None and settings.gdc_md5:
                    expected = gdc_expected_md5(uuid, settings, token)
                    if expected:
                        log.info("%s: checking against GDC's md5 %s", slide_id, expected)
                    else:
                        log.warning("%s: GDC's md5 could not be read; the md5 is recorded but not checked", slide_id)
            result = fetch_http(url, dest_dir, settings, slide_id=slide_id, expected_md5=expected, kind=kind,
                                token=token, label=label)
            manifest.update(path=str(result.path.absolute()), filename=result.path.name, md5=result.md5,
                            md5_checked=expected is not None, size_bytes=result.size_bytes,
                            download_seconds=round(result.seconds, 3), attempts=result.attempts,
                            resumed=result.resumed)
        if not manifest["reused"]:
            write_json(record_path, {"manifest": manifest, "stat": stat})
    except DownloadError as err:
        reason = str(err)
        if on_error == "fail":
            raise SlideError(slide_id, reason) from None
        log.warning("%s: download failed, slide skipped (on_error: skip): %s", slide_id, reason)
        manifest.update(status="failed", reason=reason, path=None)
    write_json(manifest_path, manifest)
    return manifest
