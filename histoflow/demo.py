"""The embedded demo cohort: synthetic H&E whole-slide images with known ground truth.

Every slide is a pyramidal, tiled, JPEG-compressed TIFF at 0.5 µm/px that OpenSlide opens like
a scanner file. Tissue is rendered with Beer-Lambert mixing of haematoxylin and eosin optical
densities; lesions ("tumor" slides) differ from normal stroma by texture (crowded, large,
pleomorphic nuclei and little stroma), not only by colour, so that a CNN on 224-256 px tiles at
0.5-1.0 µm/px can learn them. Pen marks, blurred patches, air bubbles and an almost empty slide
are the nuisances real cohorts have.

Memory stays bounded whatever the slide size: low-resolution "field maps" (tissue, lesion, pen,
blur; one pixel per 16 level-0 px) are drawn with numpy, and the level-0 image is synthesised in
horizontal strips that are streamed to a raw file, which libvips then turns into the pyramid.
Everything is drawn from ``numpy.random.default_rng([seed, slide_index])``, so the decoded
pixels are identical from run to run.

Layout of ``out_dir`` (see docs/demo.md)::

    samples.tsv              slide_id patient_id label source md5 [annotations]
    config.yaml              demo overrides: snakemake --configfile config.yaml out_dir/config.yaml
    slides/demo_000.tiff     pyramidal JPEG TIFF, mpp 0.5
    annotations/demo_000.geojson / .xml   lesion polygons (QuPath GeoJSON, ASAP XML), level-0 px
    truth/demo_000.tissue.png             binary tissue mask at downsample 16
    truth/demo_000.json                   label, lesions (area_um2, ...), nuisances

Tasks (``--task``; histoflow.targets): ``binary`` (the default above: tumour vs normal);
``multiclass``: three tissue patterns, ``normal`` (no lesion), ``tumor`` (lesions of large
pleomorphic nuclei) and ``lymphoid`` (lesions of densely packed small dark nuclei, a third
texture); ``survival``: every patient gets a lesion burden (none to large), and its event time is
drawn from an exponential hazard exp(5 x standardised burden) with uniform censoring;
``regression``: the label is the lesion burden (% of the tissue area covered by lesion).
Non-binary cohorts carry no annotations (their targets are slide-level); the ground truth of
each slide (burden, time, event) is in truth/ and in truth/targets.tsv beside the sheet.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

# the slides themselves (field maps, textures, one slide's rendering) are in demo_slides
from .demo_slides import DEFAULT_SIZE, INK_OD, LYMPHOID, MASK_DS, MPP, render_slide  # noqa: F401 (MASK_DS: API)
from .errors import InputError
from .io import atomic_path, file_md5, safe_remove, write_json, write_text, write_tsv

log = logging.getLogger("histoflow.demo")

SMALL_SIZE = (3000, 2400)       # 1.5 x 1.2 mm, for CI tests
MAX_LESION_FRACTION = 0.5       # --lesion-fraction HIGH: lesions must leave normal tissue around them
SMALL_LESION_MAX_FOCI = 4
MPP_40X = 0.25                  # --mixed-mpp: level-0 µm/px of the 40x slides
TUMOR, NORMAL = "tumor", "normal"
TASKS = ("binary", "multiclass", "survival", "regression")
# survival/regression: lesion-size factors dealt over patients (0 = no lesion)
BURDEN_LEVELS = (0.0, 0.45, 0.7, 1.0, 1.35, 1.7)
POSITIVE_CLASS = "Tumor"
TUMOR_COLOR = (200, 0, 0)


# --------------------------------------------------------------------------------------------
# Cohort plan: who is which patient, which label, which nuisances
# --------------------------------------------------------------------------------------------

@dataclass
class SlidePlan:
    index: int
    slide_id: str
    patient_id: str
    label: str
    pen: str | None = None          # ink colour
    blur: bool = False
    bubble: bool = False
    almost_empty: bool = False
    burden: float | None = None     # survival/regression: lesion size factor (0 = no lesion)
    nuisances: list = field(default_factory=list)
    lesion: bool | None = None      # draw lesions; None = on tumor-labelled slides only
    lesion_scale: float = 1.0       # lesion diameters times this
    max_lesions: int = 3            # with lesion_fraction: the most foci
    lesion_fraction: tuple[float, float] | None = None   # small-lesion cohorts: (low, high) of the tissue
    mpp: float = MPP                # level-0 µm/px: 0.25 = a 40x scan (mixed-magnification cohorts)

    @property
    def has_lesion(self) -> bool:
        return self.label in (TUMOR, LYMPHOID) if self.lesion is None else self.lesion


def parse_lesion_fraction(text: str) -> tuple[float, float]:
    """``LOW-HIGH`` (fractions of the tissue area, e.g. ``0.005-0.03``) -> (low, high)."""
    parts = str(text).split("-")
    try:
        low, high = (float(parts[0]), float(parts[1])) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not (0 < low <= high <= MAX_LESION_FRACTION):
        raise InputError(f"demo cohort: --lesion-fraction {text!r} must be LOW-HIGH with "
                         f"0 < LOW <= HIGH <= {MAX_LESION_FRACTION} (fractions of the tissue), e.g. 0.005-0.03")
    return low, high


def small_lesion_plan(plans: list[SlidePlan], seed: int, lesion_fraction: tuple[float, float] | None,
                      mixed_mpp: bool) -> list[SlidePlan]:
    """Small-lesion and mixed-magnification variants of a binary plan (in place): every tumor
    slide's lesion covers a fraction of its tissue drawn in ``lesion_fraction`` as 1-4 foci
    (:func:`histoflow.demo_slides.lesion_field_fraction`); with ``mixed_mpp``, half the slides of
    each label (a seeded choice, its own stream) are 40x scans at 0.25 µm/px."""
    if lesion_fraction is not None:
        for p in plans:
            p.lesion_fraction, p.max_lesions = tuple(lesion_fraction), SMALL_LESION_MAX_FOCI
    if mixed_mpp:
        rng = np.random.default_rng([seed, 30_000])
        for label in (TUMOR, NORMAL):
            group = [p for p in plans if p.label == label]
            for k in rng.permutation(len(group))[: len(group) // 2]:
                group[k].mpp = MPP_40X
    return plans


def plan_cohort(n_slides: int, seed: int, null_labels: bool = False, task: str = "binary") -> list[SlidePlan]:
    """Patients (about a third of them with two slides, same label), balanced labels, and the
    nuisances, spread so that even a 4-slide cohort has pen, blur, bubble and an empty slide.

    ``null_labels``: the null cohort (see :func:`null_plan`): lesions on every slide, labels
    drawn by a seeded permutation of the patients, no almost empty slide. ``task``: binary |
    multiclass | survival | regression (:func:`_plan_task`)."""
    if task not in TASKS:
        raise InputError(f"demo cohort: --task {task!r} is not one of {', '.join(TASKS)}")
    if task != "binary":
        if null_labels:
            raise InputError("demo cohort: --null-labels is a binary cohort; leave --task at binary")
        return _plan_task(n_slides, seed, task)
    if n_slides < 1:
        raise InputError(f"demo cohort: --slides must be >= 1 (got {n_slides})")
    if null_labels:
        return null_plan(plan_cohort(n_slides, seed), seed)
    rng = np.random.default_rng([seed, 10_000])
    n_pairs = n_slides // 3 if n_slides >= 3 else (1 if n_slides == 2 else 0)
    n_single = n_slides - 2 * n_pairs
    groups = [2] * n_pairs + [1] * n_single
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    # Alternate labels over patients sorted by size so slide counts stay balanced.
    by_size = sorted(range(len(groups)), key=lambda g: (-groups[g], g))
    labels = {}
    counts = {TUMOR: 0, NORMAL: 0}
    for g in by_size:
        lab = TUMOR if counts[TUMOR] <= counts[NORMAL] else NORMAL
        if n_slides >= 2 and g == by_size[-1] and counts[NORMAL] == 0:
            lab = NORMAL
        labels[g] = lab
        counts[lab] += groups[g]
    plans: list[SlidePlan] = []
    for g, size in enumerate(groups):
        for _ in range(size):
            i = len(plans)
            plans.append(SlidePlan(index=i, slide_id=f"demo_{i:03d}", patient_id=f"P{g + 1:03d}",
                                   label=labels[g]))
    # The almost empty slide: the last normal slide (a negative, so no lesion has to fit).
    normals = [p for p in plans if p.label == NORMAL]
    if n_slides >= 2 and normals:
        normals[-1].almost_empty = True
    # Nuisances on the other slides, spread so that even 4 slides have pen, blur and a bubble.
    inks = list(INK_OD)
    others = [p for p in plans if not p.almost_empty]
    for j, p in enumerate(others):
        if j % 3 == 1:
            p.pen = inks[(j // 3) % len(inks)]
        p.blur = j % 3 == 2
        p.bubble = j % 4 == 2
    return plans


def null_plan(plans: list[SlidePlan], seed: int) -> list[SlidePlan]:
    """The null cohort: every slide carries one lesion (half the usual diameters, ~3-12 % of the
    tissue on full-size slides), so the pixels say nothing about the label.

    Labels go to patients in the order of a seeded permutation (its own stream, independent of
    every slide's pixel stream), tumor while that keeps the tumor slides at most half of the
    cohort, so about half the slides are tumor. No nuisances and no almost empty slide (whose
    fragment could not hold a lesion, which would give its label away): they only add variance
    unrelated to the question.

    With annotations, only tumor-labelled slides get polygons, as annotators do in CAMELYON16-
    style sheets. Any annotation-dependent tile selection then enriches exactly the positive
    bags in tumour (the lesion is small, so an honest sample holds little of it), and any model
    fed by it scores above chance: this cohort is the permutation guard's
    (tests/test_permutation_guard.py). Honest code stays at chance.
    """
    rng = np.random.default_rng([seed, 20_000])
    patients = list(dict.fromkeys(p.patient_id for p in plans))
    size = {pid: sum(p.patient_id == pid for p in plans) for pid in patients}
    label, n_tumor = {}, 0
    for k in rng.permutation(len(patients)):
        pid = patients[k]
        label[pid] = TUMOR if 2 * (n_tumor + size[pid]) <= len(plans) else NORMAL
        n_tumor += size[pid] if label[pid] == TUMOR else 0
    for p in plans:
        p.label, p.lesion, p.lesion_scale, p.max_lesions = label[p.patient_id], True, 0.5, 1
        p.almost_empty, p.pen, p.blur, p.bubble = False, None, False, False
    return plans


def _plan_task(n_slides: int, seed: int, task: str) -> list[SlidePlan]:
    """Multi-class: the three patterns dealt over patients (balanced in slides); survival and
    regression: the burden levels dealt over patients. Same patient grouping and nuisances as
    the binary plan (drawn from the same seed)."""
    plans = plan_cohort(n_slides, seed)   # the binary plan: patients, nuisances
    rng = np.random.default_rng([seed, 10_001])
    patients = sorted({p.patient_id for p in plans})
    order = [patients[i] for i in rng.permutation(len(patients))]
    size = {pid: sum(p.patient_id == pid for p in plans) for pid in patients}
    if task == "multiclass":
        counts = {NORMAL: 0, TUMOR: 0, LYMPHOID: 0}
        label = {}
        for pid in sorted(order, key=lambda q: -size[q]):   # big patients first, keep classes even
            lab = min(counts, key=lambda c: (counts[c], list(counts).index(c)))
            label[pid] = lab
            counts[lab] += size[pid]
        for p in plans:
            p.label = label[p.patient_id]
            p.almost_empty = False
    else:
        level = {pid: BURDEN_LEVELS[i % len(BURDEN_LEVELS)] for i, pid in enumerate(order)}
        for p in plans:
            p.burden = level[p.patient_id]
            p.label = TUMOR if p.burden > 0 else NORMAL
            p.almost_empty = False
    return plans


# --------------------------------------------------------------------------------------------
# Annotations, truth, sheet
# --------------------------------------------------------------------------------------------

def lesion_geojson(slide_id: str, polygons: list, seed: int, mpp: float = MPP) -> dict:
    """QuPath GeoJSON (File > Import objects): one 'Tumor' annotation per lesion, level-0 px."""
    feats = []
    for i, p in enumerate(polygons):
        ring = [[round(x, 1), round(y, 1)] for x, y in p.exterior.coords]
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"histoflow-demo/{seed}/{slide_id}/{i}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation",
                "name": f"lesion {i + 1}",
                "classification": {"name": POSITIVE_CLASS, "color": list(TUMOR_COLOR)},
                "isLocked": False,
                "measurements": {"Area µm^2": round(p.area * mpp * mpp, 1)},
            },
        })
    return {"type": "FeatureCollection", "features": feats}


def lesion_asap_xml(polygons: list) -> str:
    """ASAP XML as in CAMELYON16: lesions in group '_0'."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, p in enumerate(polygons):
        a = ET.SubElement(anns, "Annotation", Name=f"_{i}", Type="Polygon", PartOfGroup="_0", Color="#F4FA58")
        coords = ET.SubElement(a, "Coordinates")
        for k, (x, y) in enumerate(list(p.exterior.coords)[:-1]):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=f"{x:.1f}", Y=f"{y:.1f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    g = ET.SubElement(groups, "Group", Name="_0", PartOfGroup="None", Color="#FF0000")
    ET.SubElement(g, "Attributes")
    ET.indent(root)
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


DEMO_MIL_MODELS = ("abmil", "mean", "max", "clam_sb", "dsmil", "transmil")


# Small-lesion cohorts (--lesion-fraction; `make demo-hard`): the SSL encoder trains on crops at
# the tiles' own 1 µm/px (nuclei 7-17 px across) instead of 224 px tiles shrunk to 64 px
# (3.5 µm/px: a nucleus is 2-5 px), and sees the whole 224 px tile at feature time; measured in
# docs/mil.md "Small lesions".
SMALL_LESION_SSL = {"image_px": 224, "crop_px": 96}
# A focus is smaller than a 224 µm tile: at the default positive_overlap 0.5 the 24-slide cohort
# had 4 positive tiles in all (run of 2026-12-03) and the patch classifier of an inner fold had
# none and stopped the DAG; tiles >= 10 % lesion are positive instead (not yet re-run).
SMALL_LESION_PATCH_LABELS = {"positive_overlap": 0.1}


def demo_config(samples_path: Path, task: str = "binary", small_lesions: bool = False) -> dict:
    """Snakemake overrides for the demo (layered on config.yaml with a second --configfile).

    Tiles of 224 px at 1.0 µm/px keep CPU feature extraction to minutes. The encoder is
    ``ssl:resnet-tiny``, trained by ``ssl_pretrain`` on the cohort's own tiles: the demo needs no
    pretrained weights and no network, and its features carry the lesions' texture (random
    ImageNet-shaped weights would not). Six MIL aggregators are compared over 4 patient folds.
    Snakemake merges nested dicts key by key, so each section here only lists what changes.
    ``small_lesions`` (cohorts written with --lesion-fraction): :data:`SMALL_LESION_SSL` too.
    ``mil.bag_center`` stays at its default (off): it was explored on this very cohort's test
    folds (docs/mil.md), so switching it on here would report a choice made on test slides.
    """
    from .config import load_schema

    tiling_schema = load_schema("config")["properties"]["tiling"]["properties"]
    tiling = {k: v["default"] for k, v in tiling_schema.items() if "default" in v}
    tiling.update({"mpp": [1.0], "tile_px": 224, "min_tissue_fraction": 0.5})
    config = {"samples": str(samples_path), "tiling": tiling,
              "features": {"mpp": 1.0, "encoders": ["ssl:resnet-tiny"]},
              "ssl": {"arch": "resnet-tiny", **(SMALL_LESION_SSL if small_lesions else {})},
              "split": {"k": 4},
              "mil": {"models": list(DEMO_MIL_MODELS)}}
    if small_lesions:
        config["patch_labels"] = dict(SMALL_LESION_PATCH_LABELS)
    if task == "binary":
        return config
    from .targets import UNSUPPORTED_MIL

    kind = {"multiclass": "classification"}.get(task, task)
    config["target"] = {"type": kind, **({"classes": "sheet"} if task == "multiclass" else {})}
    config["mil"] = {"models": [m for m in DEMO_MIL_MODELS if (kind, m) not in UNSUPPORTED_MIL]}
    return config


def make_demo_cohort(out_dir: str | os.PathLike, n_slides: int = 16, seed: int = 7,
                     width: int | None = None, height: int | None = None,
                     annotations: bool = True, small: bool = False,
                     progress: bool = True, null_labels: bool = False, task: str = "binary",
                     lesion_fraction: tuple[float, float] | str | None = None, mixed_mpp: bool = False) -> Path:
    """Write the demo cohort to ``out_dir`` and return the samples sheet path.

    ``small`` gives ~3000 x 2400 px slides (CI), otherwise ~8000 x 6000 px; ``width``/``height``
    override either. Same ``seed`` => identical decoded pixels, polygons and sheet.
    ``null_labels``: the null cohort (:func:`null_plan`): lesions on every slide, labels by a
    seeded permutation of the patients, annotations on tumor-labelled slides only.
    ``task``: binary | multiclass | survival | regression (module docstring); non-binary
    cohorts have no annotations. ``lesion_fraction`` (``(low, high)`` or ``"LOW-HIGH"``): each
    tumor slide's lesion covers a fraction of its tissue drawn log-uniform in the range, as 1-4
    small foci (:func:`small_lesion_plan`); ``mixed_mpp``: half the slides at 0.25 µm/px (40x).
    """
    from tqdm import tqdm

    if isinstance(lesion_fraction, str):
        lesion_fraction = parse_lesion_fraction(lesion_fraction)
    elif lesion_fraction is not None:
        lesion_fraction = parse_lesion_fraction(f"{lesion_fraction[0]}-{lesion_fraction[1]}")
    if (lesion_fraction is not None or mixed_mpp) and (task != "binary" or null_labels):
        raise InputError("demo cohort: --lesion-fraction and --mixed-mpp make a binary cohort; "
                         "leave --task at binary and drop --null-labels")

    dw, dh = SMALL_SIZE if small else DEFAULT_SIZE
    width, height = int(width or dw), int(height or dh)
    if width < 512 or height < 512:
        raise InputError(f"demo cohort: slides must be at least 512 x 512 px (got {width} x {height})")
    annotations = annotations and task == "binary"
    out = Path(out_dir).resolve()
    for sub in ("slides", "truth", ".tmp") + (("annotations",) if annotations else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(n_slides, seed, null_labels=null_labels, task=task)
    if lesion_fraction is not None or mixed_mpp:
        plans = small_lesion_plan(plans, seed, lesion_fraction, mixed_mpp)
    rows, truths = [], []
    t0 = time.perf_counter()
    for plan in tqdm(plans, desc="demo slides", unit="slide", disable=not progress):
        tiff = out / "slides" / f"{plan.slide_id}.tiff"
        result = render_slide(plan, width, height, seed, tiff, out / ".tmp")
        _write_mask_png(out / "truth" / f"{plan.slide_id}.tissue.png", result.tissue)
        truths.append(result.truth)
        row = {"slide_id": plan.slide_id, "patient_id": plan.patient_id, "label": plan.label,
               "source": f"slides/{plan.slide_id}.tiff", "md5": file_md5(tiff)}
        # the null cohort's negatives carry lesions nobody outlined (as CAMELYON16's sheets do)
        if annotations and not (null_labels and plan.label != TUMOR):
            write_json(out / "annotations" / f"{plan.slide_id}.geojson",
                       lesion_geojson(plan.slide_id, result.lesion_polygons, seed, plan.mpp))
            write_text(out / "annotations" / f"{plan.slide_id}.xml", lesion_asap_xml(result.lesion_polygons))
            row["annotations"] = f"annotations/{plan.slide_id}.geojson"
        elif annotations:
            row["annotations"] = ""
        rows.append(row)
    safe_remove(out / ".tmp", out)
    if task != "binary":
        _task_targets(rows, truths, plans, seed, task)
        write_tsv(out / "truth" / "targets.tsv", pd.DataFrame(
            [{"slide_id": t["slide_id"], "patient_id": t["patient_id"], "label": r["label"],
              "lesion_burden": t["lesion_area_fraction_of_tissue"], **{k: t[k] for k in ("time", "event") if k in t}}
             for t, r in zip(truths, rows)]))
    for truth in truths:
        write_json(out / "truth" / f"{truth['slide_id']}.json", truth)
    sheet = out / "samples.tsv"
    write_tsv(sheet, pd.DataFrame(rows))
    write_text(out / "config.yaml",
               "# histoflow demo overrides: snakemake --configfile config.yaml "
               f"{out / 'config.yaml'}\n" + yaml.safe_dump(demo_config(sheet, task, lesion_fraction is not None),
                                                        sort_keys=False))
    log.info("demo cohort: %d slides (%d x %d px) in %s in %.1f s", n_slides, width, height, out,
             time.perf_counter() - t0)
    return sheet


def _task_targets(rows: list[dict], truths: list[dict], plans: list[SlidePlan], seed: int, task: str) -> None:
    """The sheet's target of a non-binary demo, from the rendered morphology (in place).

    regression: label = lesion burden in % of the tissue area. survival: per patient (its slides'
    mean burden b), hazard 0.1 exp(5 z) with z the standardised burden, time ~ Exponential(hazard)
    (4 significant digits), censored at Uniform(100, 300) (about a fifth censored); sheet columns
    time, event. The steep hazard makes the burden's ranking carry the times: on the CI cohort
    (18 slides, seed 7) the true patient burden as risk reaches c = 0.89 (the slides' own
    burdens 0.84; their spread within a patient caps that at 0.88), where exp(2 z) with
    Uniform(5, 30) censoring gave 0.79 (0.78)."""
    burden = np.array([t["lesion_area_fraction_of_tissue"] for t in truths])
    task_truth: list[dict] = [{} for _ in truths]
    if task == "regression":
        for row, value in zip(rows, burden):
            row["label"] = f"{100 * value:.3f}"
    elif task == "survival":
        rng = np.random.default_rng([seed, 20_000])
        patients = sorted({p.patient_id for p in plans})
        per_patient = {pid: float(np.mean(burden[[i for i, p in enumerate(plans) if p.patient_id == pid]])) for pid in patients}
        values = np.array([per_patient[p] for p in patients])
        z = (values - values.mean()) / (values.std() or 1.0)
        hazard = 0.1 * np.exp(5.0 * z)
        event_time = rng.exponential(1.0 / hazard)
        censor = rng.uniform(100, 300, len(patients))
        # 4 significant digits: the steep hazard puts early events far below 1e-4
        outcome = {pid: (float(f"{min(t, c):.4g}"), int(t <= c)) for pid, t, c in zip(patients, event_time, censor)}
        for row, truth in zip(rows, truths):
            time_, event = outcome[row["patient_id"]]
            row["time"], row["event"] = time_, event
            truth["time"], truth["event"] = time_, event
            truth["hazard_model"] = "0.1 * exp(5 * standardised patient lesion burden), censoring Uniform(100, 300)"
    for truth, extra in zip(truths, task_truth):
        truth.update(extra)
        truth["task"] = task


def _write_mask_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
