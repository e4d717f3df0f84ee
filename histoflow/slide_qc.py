"""Slide metadata and QC: what every later stage needs to know about a slide, checked once.

Per slide: vendor, format, size, pyramid, µm/px and where it came from, objective power,
associated images, file size and md5. The µm/px is the one number everything physical
(tile size, tissue area, lesion size) depends on, so it is resolved in a fixed order
(sheet `mpp`, slide metadata, TIFF resolution tags, config `default_mpp`) and checked for
plausibility: generic TIFFs often carry a 72 dpi placeholder (352.8 µm/px) that must not be
mistaken for a real resolution.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import HistoflowError, SlideError
from .io import file_md5, read_json, write_json
from .wsi.levels import TIFF_UNIT_UM, mpp_from_properties  # noqa: F401 - the readers' µm/px, QC's first source

log = logging.getLogger("histoflow.slide_qc")

MPP_MIN, MPP_MAX = 0.05, 20.0          # µm/px a slide can plausibly have at level 0

SLIDE_FIELDS = ("slide_id", "status", "reason", "path", "vendor", "format", "width", "height", "level_count",
                "level_dimensions", "level_downsamples", "mpp_x", "mpp_y", "mpp_source", "mpp_warning", "objective_power",
                "associated_images", "file_size_bytes", "md5")


def _number(value: Any) -> float | None:
    """A float from a sheet/config/property value; None for empty, NaN or non-numbers."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or number <= 0 else number


def plausible_mpp(mpp: float | None) -> bool:
    return mpp is not None and MPP_MIN <= mpp <= MPP_MAX


MPP_DISAGREEMENT = 0.10   # sheet vs file µm/px: a larger relative difference is warned about


def resolve_mpp(slide_id: str, props: Mapping[str, str], sheet_mpp: Any = None,
                default_mpp: Any = None) -> tuple[float, float, str, dict[str, Any]]:
    """µm/px at level 0 and its source: the sheet's `mpp` when given (the user knows the scanner:
    it corrects a wrong value in the file), else the slide's own (if plausible), else config
    `default_mpp`. Raises a one-line SlideError naming the slide and both options.

    Notes returned beside it: ``mpp_file`` / ``mpp_file_source`` (what the file says, whenever it
    says something), ``mpp_warning`` (sheet and file differ by more than 10 %), and
    ``slide_mpp_rejected`` (an implausible file value, outside 0.05-20 µm/px, treated as missing).
    An implausible sheet or config value is an error (it is a typo to fix)."""
    notes: dict[str, Any] = {}
    mx, my, source = mpp_from_properties(props)
    sheet, default = _number(sheet_mpp), _number(default_mpp)
    if sheet_mpp not in (None, "") and sheet is None and not (isinstance(sheet_mpp, float) and math.isnan(sheet_mpp)):
        raise SlideError(slide_id, f"sheet mpp {sheet_mpp!r} is not a positive number; fix the `mpp` column")
    file_ok = bool(source) and plausible_mpp(mx) and plausible_mpp(my)
    if source:
        notes["mpp_file"] = [mx, my]
        notes["mpp_file_source"] = source
    if source and not file_ok:
        notes["slide_mpp_rejected"] = [mx, my]
        log.warning("slide %s: %s gives implausible %.4g x %.4g µm/px (outside %g-%g, e.g. a 72 dpi placeholder); ignoring it",
                    slide_id, source, mx, my, MPP_MIN, MPP_MAX)
    if sheet is not None:
        if not plausible_mpp(sheet):
            raise SlideError(slide_id, f"the samples sheet's `mpp` column gives {sheet:g} µm/px, outside the plausible "
                                       f"{MPP_MIN}-{MPP_MAX} µm/px (0.25 is 40x, 0.5 is 20x); correct it")
        if file_ok and max(abs(sheet - mx) / mx, abs(sheet - my) / my) > MPP_DISAGREEMENT:
            notes["mpp_warning"] = (f"sheet mpp {sheet:.4g} differs from the file's {mx:.4g} x {my:.4g} µm/px ({source}) "
                                    f"by more than {MPP_DISAGREEMENT:.0%}; the sheet's value is used")
            log.warning("slide %s: %s", slide_id, notes["mpp_warning"])
        return sheet, sheet, "sheet", notes
    if file_ok:
        return mx, my, source, notes
    if default is not None:
        if not plausible_mpp(default):
            raise SlideError(slide_id, f"config `default_mpp` gives {default:g} µm/px, outside the plausible "
                                       f"{MPP_MIN}-{MPP_MAX} µm/px (0.25 is 40x, 0.5 is 20x); correct it")
        return default, default, "default_mpp", notes
    found = f"the slide's own {mx:.4g} µm/px is implausible" if source else "the slide carries no µm/px"
    raise SlideError(slide_id, f"{found}; give it in the samples sheet's `mpp` column or set config "
                               "`default_mpp` (µm/px at level 0, e.g. 0.25 for 40x, 0.5 for 20x)")


def _objective_power(props: Mapping[str, str]) -> float | None:
    value = _number(props.get("openslide.objective-power"))
    if value is None:
        value = _number(props.get("aperio.AppMag"))
    return value


def _check_readable(slide, slide_id: str, name: str) -> None:
    """Decode a patch of the coarsest level: a slide whose header opens but whose tiles are
    corrupt fails here, not hours later in tiling."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    pw, ph = min(w, 512), min(h, 512)
    x, y = (w - pw) // 2, (h - ph) // 2
    try:
        slide.read_rgba(int(x * ds), int(y * ds), level, pw, ph)
    except Exception as err:  # openslide.OpenSlideError and decoder errors
        raise SlideError(slide_id, f"{name!r} opens but its image data cannot be decoded ({err}); the file is corrupt: "
                                   "re-download it or set on_error: skip") from None


# The colour-space check (YCbCr frames in an RGB container) lives with the readers
from .wsi.colour import check_colour_space, jpeg_colour_space  # noqa: E402,F401 - slide QC's step


# ------------------------------------------------------------------------------ tile decoding

QC_TILE_GRID = 8              # 8 x 8 = 64 tiles sampled across the tiling level
QC_TILE_P = 1e-3              # a slide fails when this many failures are that unlikely at the limit


def _grid(size: int, read: int, stored: float | None) -> list[int]:
    """QC_TILE_GRID read positions spread across ``size`` px. Moved to the start of the stored
    tile they fall in (``stored``: the level's tile size) when the read fits in one and the
    positions stay as many: one tile decoded per read instead of up to four."""
    spread = sorted({int((size - read) * (i + 0.5) / QC_TILE_GRID) for i in range(QC_TILE_GRID)})
    if stored and read <= stored:
        tile = int(stored)
        aligned = sorted({v // tile * tile for v in spread})
        if len(aligned) == len(spread) and all(v + read <= size for v in aligned):
            return aligned
    return spread


def check_tiles(path: Path, slide_id: str, level_downsamples, level_dimensions, mpp0: float,
                tile_check: Mapping[str, Any], colour_fix: str | None = None, reader=None) -> dict[str, Any]:
    """Decode tiles on a grid across the whole tiling level (QC runs before the tissue mask, and
    a corrupt file is corrupt under glass too): a file whose header and coarsest level are fine
    but whose level-0 tiles are damaged fails here, before any features are computed.

    The slide fails when the failures are too many to come from a slide within
    ``max_failed_tile_fraction`` (one-sided binomial test at p < 0.001: a slide just under the
    limit is not failed by the luck of the sample). Returns the counts for slides/{id}.json.
    ``reader``: QC's open OpenSlideReader of ``path`` (its handle is reused, and reopened after
    a decode error); None opens one here."""
    from .wsi import OpenSlideReader, best_level_for_mpp

    mpp = float(tile_check.get("mpp") or mpp0)
    tile_px = int(tile_check["tile_px"])   # config tiling.tile_px, validated (the schema holds the default)
    limit = float(tile_check["max_failed_tile_fraction"])
    choice = best_level_for_mpp(level_downsamples, mpp0, mpp)
    read_px = max(1, int(round(tile_px * mpp / choice.mpp)))
    w, h = level_dimensions[choice.level]
    pw, ph = min(w, read_px), min(h, read_px)
    failed, first_error = 0, None
    slide = reader if reader is not None else OpenSlideReader(path, slide_id, colour_fix)
    props = slide.properties
    xs = _grid(w, pw, _number(props.get(f"openslide.level[{choice.level}].tile-width")))
    ys = _grid(h, ph, _number(props.get(f"openslide.level[{choice.level}].tile-height")))
    try:
        for y in ys:
            for x in xs:
                try:
                    slide.read_rgba(int(x * choice.downsample), int(y * choice.downsample), choice.level, pw, ph)
                except Exception as err:  # noqa: BLE001 - a decode error; OpenSlide's handle is then unusable
                    failed += 1
                    # the decoder's words, not the file's name or folder (reasons leave the site)
                    first_error = first_error or (str(err).splitlines() or [type(err).__name__])[0][:200] \
                        .replace(str(path), "<slide>").replace(path.name, "<slide>")
                    slide.reset()          # reopened on the next read
    finally:
        if reader is None:
            slide.close()
    n = len(xs) * len(ys)
    result = {"qc_tiles_sampled": n, "qc_tiles_failed": failed, "qc_tile_level": int(choice.level)}
    if failed:
        # only a slide with a failed tile needs the test: scipy.stats takes ~1 s to import (the
        # docstrings of every distribution are parsed), 30x the rest of the step
        from scipy.stats import binom
    if failed and binom.sf(failed - 1, n, limit) < QC_TILE_P:
        raise SlideError(slide_id, f"{failed} of {n} tiles sampled across level {choice.level} fail to decode "
                                   f"({first_error}), more than features.max_failed_tile_fraction {limit:g} allows; "
                                   "the file is corrupt: re-download it or set on_error: skip")
    if failed:
        log.warning("slide %s: %d of %d sampled tiles fail to decode (%s); features will count and drop them",
                    slide_id, failed, n, first_error)
    return result


def slide_metadata(slide_id: str, path: str | os.PathLike, sheet_mpp: Any = None, default_mpp: Any = None,
                   md5: str | None = None, tile_check: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The slides/{id}.json record of a readable slide (raises SlideError otherwise)."""
    from .wsi import OpenSlideReader

    path = Path(path)
    slide = OpenSlideReader(path, slide_id)       # QC reads what OpenSlide reads, unconverted
    try:
        _check_readable(slide, slide_id, path.name)
        props = dict(slide.properties)
        mpp_x, mpp_y, mpp_source, notes = resolve_mpp(slide_id, props, sheet_mpp, default_mpp)
        colour = check_colour_space(slide, slide_id)
        notes.update(colour)
        if tile_check is not None:
            notes.update(check_tiles(path, slide_id, slide.level_downsamples, slide.level_dimensions, mpp_x,
                                     tile_check, colour["colour_fix"], reader=slide))
        if abs(mpp_x - mpp_y) / mpp_x > 0.05:
            log.warning("slide %s: anisotropic pixels (%.4g x %.4g µm/px)", slide_id, mpp_x, mpp_y)
        record: dict[str, Any] = {
            "slide_id": slide_id, "status": "ok", "reason": "", "path": str(path.resolve()),
            "vendor": slide.vendor,
            "format": path.suffix.lower().lstrip("."),
            "width": int(slide.dimensions[0]), "height": int(slide.dimensions[1]),
            "level_count": int(slide.level_count),
            "level_dimensions": [[int(w), int(h)] for w, h in slide.level_dimensions],
            "level_downsamples": [float(d) for d in slide.level_downsamples],
            "mpp_x": mpp_x, "mpp_y": mpp_y, "mpp_source": mpp_source, "mpp_warning": None,
            "objective_power": _objective_power(props),
            "associated_images": sorted(slide.associated_image_names),
            "file_size_bytes": path.stat().st_size,
            "md5": md5 or file_md5(path),
            "quickhash": props.get("openslide.quickhash-1"),
            **notes,
        }
    finally:
        slide.close()
    return record


def skipped_record(slide_id: str, reason: str, path: str | None = None) -> dict[str, Any]:
    """A slides/{id}.json for a slide the cohort goes on without (on_error: skip)."""
    record: dict[str, Any] = {key: None for key in SLIDE_FIELDS}
    record.update({"slide_id": slide_id, "status": "skipped", "reason": reason, "path": path,
                   "level_count": 0, "level_dimensions": [], "level_downsamples": [], "associated_images": []})
    return record


def write_slide_metadata(slide_id: str, manifest_path, out_path, sheet_mpp=None, default_mpp=None,
                         on_error: str = "fail", tile_check: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rule `slide_qc`: read the download manifest, open the slide, write slides/{id}.json.
    ``tile_check`` (``mpp``, ``tile_px``, ``max_failed_tile_fraction``): sample tiles of the
    tiling level (:func:`check_tiles`); None checks the coarsest level only.

    A failed download, an unopenable/corrupt slide or an unresolvable µm/px raises a one-line
    SlideError, or with ``on_error: skip`` writes a record with status "skipped" and the reason."""
    manifest = read_json(manifest_path)
    path = manifest.get("path")
    try:
        if manifest.get("status", "ok") != "ok":
            raise SlideError(slide_id, f"download failed ({manifest.get('reason') or 'no reason given'}); fix the "
                                       "`source` in the samples sheet, or set on_error: skip to go on without it")
        if not path:
            raise SlideError(slide_id, f"download manifest {str(manifest_path)!r} names no file to open; re-run the download")
        record = slide_metadata(slide_id, path, sheet_mpp, default_mpp, md5=manifest.get("md5"), tile_check=tile_check)
    except HistoflowError as err:
        if on_error != "skip":
            raise
        log.error("%s; skipped (on_error: skip)", err)
        record = skipped_record(slide_id, str(err), path)
    write_json(out_path, record)
    if record["status"] == "ok":
        log.info("slide %s: %s %dx%d, %d levels, %.4g µm/px (%s), %s", slide_id, record["vendor"], record["width"],
                 record["height"], record["level_count"], record["mpp_x"], record["mpp_source"],
                 f"{record['objective_power']:g}x" if record["objective_power"] else "objective unknown")
    return record


QC_COLUMNS = ["slide_id", "status", "reason", "vendor", "format", "width", "height", "level_count", "mpp_x", "mpp_y",
              "mpp_source", "mpp_warning", "objective_power", "file_size_bytes", "md5", "tissue_method", "tissue_area_mm2",
              "pen_fraction", "colour_fix", "qc_tiles_sampled", "qc_tiles_failed"]


def _tile_counts(path) -> dict[str, int]:
    from .tiles_table import read_tile_columns

    try:
        table = read_tile_columns(path, ["target_mpp"])
        table.column("target_mpp")
    except Exception:  # missing file, empty table without the column: no tiles
        return {}
    counts: dict[str, int] = {}
    for mpp in table.column("target_mpp").to_pylist():
        key = f"n_tiles_{mpp:g}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_qc_table(slide_jsons, tissue_jsons, tile_tables, out_path, privacy: str = "full") -> "Any":
    """Rule `qc_table`: one row per slide (status, reason, metadata, tissue area, tiles per µm/px)
    to qc/slides.tsv. Inputs are matched by slide_id, so order does not matter; missing tissue or
    tile outputs give empty cells / zero counts. With ``privacy="deidentified"`` (config
    privacy.export; the table is in the report) reasons lose paths, URLs and file names (the
    full reason stays in slides/{id}.json and the logs)."""
    import pandas as pd

    from .privacy import scrub_text

    from .io import write_tsv

    tissue = {}
    for p in tissue_jsons:
        record = read_json(p)
        tissue[record.get("slide_id") or Path(p).name.split(".")[0]] = record
    tiles = {Path(p).name[: -len(".parquet")]: _tile_counts(p) for p in tile_tables}
    rows = []
    for p in slide_jsons:
        s = read_json(p)
        sid = s["slide_id"]
        t = tissue.get(sid, {})
        reason = s.get("reason") or (t.get("reason") if t.get("status") == "skipped" else "") or ""
        row = {
            "slide_id": sid,
            "status": "skipped" if s.get("status") != "ok" or t.get("status") == "skipped" else "ok",
            "reason": (scrub_text(reason) if privacy == "deidentified" else reason).replace("\t", " ").replace("\n", " "),
            **{k: s.get(k) for k in ("vendor", "format", "width", "height", "level_count", "mpp_x", "mpp_y",
                                     "mpp_source", "mpp_warning", "objective_power", "file_size_bytes", "md5")},
            "tissue_method": t.get("method"),
            "tissue_area_mm2": t.get("tissue_area_mm2"),
            "pen_fraction": t.get("pen_fraction"),
            "colour_fix": s.get("colour_fix") or "",
            "qc_tiles_sampled": s.get("qc_tiles_sampled"),
            "qc_tiles_failed": s.get("qc_tiles_failed"),
        }
        row.update(tiles.get(sid, {}))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=QC_COLUMNS) if not rows else pd.DataFrame(rows)
    tile_cols = sorted((c for c in frame.columns if c.startswith("n_tiles_")), key=lambda c: float(c[8:]))
    for c in tile_cols:
        frame[c] = frame[c].fillna(0).astype("int64")
    if len(frame):
        frame = frame.sort_values("slide_id", kind="stable")
    write_tsv(out_path, frame)
    n_skip = int((frame["status"] != "ok").sum()) if len(frame) else 0
    log.info("qc table: %d slide(s), %d skipped", len(frame), n_skip)
    return frame
