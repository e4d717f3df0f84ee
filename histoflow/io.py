"""File I/O at the edges: atomic writes, JSON, Parquet, greyscale PNG, md5.

Every output is written to a temporary file in the destination directory and renamed into
place, so a killed job never leaves a half-written file that looks complete (rename is atomic
on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


# Temporary names: ``atomic_path`` writes ``.{name}.{random}.part{ext}`` beside the target
# (tempfile.mkstemp's random part: [a-z0-9_]); tiling's image folders are ``.{name}.{random}.part``,
# downloads in progress ``{name}.part`` with ``.partial.json``. ``is_temporary`` recognises all of
# them, so a check for half-written files (the e2e test) matches what is really written.
TEMP_MARK = ".part"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]+\.part(\.[^.]+)?$|\.part$|^\.partial\.json$")


def temp_affixes(name: str, suffix: str) -> tuple[str, str]:
    """(prefix, suffix) of the temporary file ``atomic_path`` makes for a target called ``name``."""
    return f".{name}.", f"{TEMP_MARK}{suffix}"


def is_temporary(name: str) -> bool:
    """True for a file or folder name that only a write in progress (or a killed one) leaves."""
    return bool(_TEMP_NAME.search(name))


def leftover_temporaries(root: str | os.PathLike) -> list[Path]:
    """Every temporary file or folder under ``root`` (a finished run leaves none)."""
    return sorted(p for p in Path(root).rglob("*") if is_temporary(p.name))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final extension (some writers, e.g. pyvips or matplotlib,
    choose the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
    prefix, tmp_suffix = temp_affixes(path.name, suffix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=tmp_suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; results on a shared cluster must be group-readable like any file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as err:
        safe_remove(tmp_path, tmp_path.parent, outdir_check=False)   # our own mkstemp file; also gives back the space a full disk needs
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            from .errors import OutputError

            raise OutputError(err.errno, f"cannot write {path}: {os.strerror(err.errno)} (disk full, quota or "
                                         "file-size limit); nothing was written there: free space or raise the "
                                         "limit, then rerun") from None
        raise


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


# common.smk exports the run's output folder to every job: no delete in a job may leave it.
OUTDIR_ENV = "HISTOFLOW_OUTDIR"


def inside_root(path: str | os.PathLike, root: str | os.PathLike, action: str = "delete",
                outdir_check: bool = True) -> str:
    """The resolved ``path`` (last component not followed) if it lies strictly inside ``root``
    and, in a workflow job, inside the output folder ($HISTOFLOW_OUTDIR); ValueError otherwise."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"refusing to {action} {str(path)!r}: not a plain file name inside {str(root)!r}")
    real = os.path.join(os.path.realpath(path.parent), path.name)
    roots = [root, *([os.environ[OUTDIR_ENV]] if outdir_check and os.environ.get(OUTDIR_ENV) else [])]
    for folder in roots:
        real_root = os.path.realpath(folder)
        if real == real_root or os.path.commonpath([real, real_root]) != real_root:
            raise ValueError(f"refusing to {action} {str(path)!r}: it is not inside {str(folder)!r}")
    return real


def safe_remove(path: str | os.PathLike, root: str | os.PathLike, missing_ok: bool = True,
                outdir_check: bool = True) -> bool:
    """Delete ``path`` (a file, a link, or a folder with its contents) only if it lies strictly
    inside ``root`` (and the output folder, see :func:`inside_root`); every delete in histoflow
    goes through here.

    A crafted path such as ``tile_images/..`` or ``/etc`` is refused (ValueError) before anything
    is touched. The parent folders are resolved (symlinks, ``..``); the last component is not
    followed, so a link is removed, never its target. Returns whether something was removed.
    """
    import shutil

    real = inside_root(path, root, "delete", outdir_check)
    if os.path.isdir(real) and not os.path.islink(real):
        shutil.rmtree(real)
        return True
    try:
        os.unlink(real)
        return True
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """NaN/inf become null: strict JSON readers (browsers, jq) reject them."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.floating):
        return _finite(float(obj))
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, table, metadata: dict[str, str] | None = None) -> None:
    """Write a pyarrow Table (or pandas DataFrame) atomically; ``metadata`` goes in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file, streamed (slides are gigabytes): slide QC, downloads and the demo."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def write_tsv(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def read_grey_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG (a tissue mask) as a 2-D uint8 array, converted to 8-bit grey if it is not; a
    damaged file raises ``OSError``."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img if img.mode == "L" else img.convert("L"))
