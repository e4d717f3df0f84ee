"""Patient-level, label-stratified cross-validation splits.

Slides of one patient (and, with ``preserve_site``, of one acquisition site) always land on
the same side of every split: slide-level leakage inflates AUCs in pathology far more than any
model choice. The split table is long format, one row per (slide, fold), so every downstream
stage reads "which role does this slide play in fold k" with a filter, not a join.

Labels are per slide: one patient may have a tumour and a normal slide (TCGA -01 / -11). The
split is still made over patients, and stratified by each patient's *positive-if-any* label (a
patient counts as positive when any of its slides carries ``positive_label``). Why not the
majority: the typical mixed patient has one tumour and one normal slide, a tie that majority
would have to break arbitrarily; positive-if-any spreads the patients who bring positive slides
(the class a fold's test set must not lack) evenly over the folds. Metrics use slide labels.

Folds are numbered from 0. Strategies:

* ``kfold``: fold k tests on group k of a stratified K-way partition of the patients; a
  stratified ``val_fraction`` share of the remaining patients is the validation set (early
  stopping), the rest trains.
* ``holdout``: one fixed, stratified ``test_fraction`` of the patients is the test set of every
  fold; the rest is split into K inner train/val folds (val = inner group k).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from .config import defaults_from_schema
from .errors import InputError

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
STRATEGIES = ("kfold", "holdout", "sheet")
SPLIT_COLUMNS = ("slide_id", "patient_id", "label", "y", "site", "fold", "role")


@dataclass(frozen=True)
@defaults_from_schema("split")
class SplitSettings:
    strategy: str  # kfold | holdout | sheet
    k: int
    val_fraction: float
    test_fraction: float  # holdout only
    preserve_site: bool

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "SplitSettings":
        section = dict(section or {})
        known = {f for f in cls.__dataclass_fields__}
        settings = cls(**{k: v for k, v in section.items() if k in known})
        settings.check()
        return settings

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"config key 'split.strategy': {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.strategy == "kfold" and self.k < 2:
            raise InputError("config key 'split.k': kfold needs k >= 2 (use strategy: holdout for a single split)")
        if self.k < 1:
            raise InputError("config key 'split.k': must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise InputError("config key 'split.val_fraction': must be in [0, 1)")
        if self.strategy == "holdout" and not 0 < self.test_fraction < 1:
            raise InputError("config key 'split.test_fraction': must be in (0, 1) for strategy holdout")


# ---------------------------------------------------------------------------------------------
# Grouping units: patients, or connected patient/site components when sites must not be split.

def _split_units(patients: pd.DataFrame, preserve_site: bool) -> np.ndarray:
    """Map each patient (row of ``patients``) to the index of its indivisible unit.

    With ``preserve_site`` a unit is a connected component of the patient-site graph, so a
    patient with slides from two sites pulls both sites to the same side.
    """
    n = len(patients)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if preserve_site:
        first_of_site: dict[str, int] = {}
        for i, sites in enumerate(patients["sites"]):
            for site in sites:
                j = first_of_site.setdefault(site, i)
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    _, unit = np.unique(roots, return_inverse=True)
    return unit


def _unit_counts(unit: np.ndarray, y: np.ndarray, n_strata: int = 2) -> np.ndarray:
    """[n_units, n_strata] patient counts per class (stratum)."""
    counts = np.zeros((unit.max() + 1 if len(unit) else 0, n_strata), dtype=np.int64)
    np.add.at(counts, (unit, y), 1)
    return counts


def _visit_order(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Big units first (they are the hard ones to balance), random order among equals."""
    shuffled = rng.permutation(len(counts))
    sizes = counts.sum(1)[shuffled]
    return shuffled[np.argsort(-sizes, kind="stable")]


def assign_partitions(counts: np.ndarray, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Deal units with per-class counts ``counts`` [n, C] into ``n_parts`` stratified parts.

    Greedy: each unit goes to the part whose class proportions it unbalances least
    (for single-patient units this is a shuffled round-robin within each class).
    """
    totals = np.maximum(counts.sum(0), 1).astype(float)
    load = np.zeros((n_parts, counts.shape[1]))
    part = np.zeros(len(counts), dtype=np.int64)
    for u in _visit_order(counts, rng):
        after = load + counts[u]
        # share of the unit's own classes after adding (weighted by its composition), then overall
        # size: keeps every stratum and the part sizes even
        cost = np.round((after / totals) @ counts[u], 9) * 1e6 + after.sum(1)
        best = int(np.flatnonzero(cost == cost.min())[0])
        part[u] = best
        load[best] += counts[u]
    return part


def select_share(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick units holding about ``fraction`` of the patients of every class (boolean mask).

    Each class keeps at least one patient on both sides when it has 3+ units, so a small
    validation/test set is never single-class just by rounding.
    """
    chosen = np.zeros(len(counts), dtype=bool)
    if fraction <= 0 or len(counts) == 0:
        return chosen
    target = fraction * counts.sum(0)
    totals = np.maximum(counts.sum(0), 1)
    picked = np.zeros(counts.shape[1])
    order = _visit_order(counts, rng)[::-1]  # small units first: finer control of the share
    for u in order:
        before = np.abs(picked - target) / totals
        after = np.abs(picked + counts[u] - target) / totals
        if after.sum() < before.sum() - 1e-12:
            chosen[u] = True
            picked += counts[u]
    for c in range(counts.shape[1]):
        has_c = np.flatnonzero(counts[:, c] > 0)
        if len(has_c) >= 3 and not chosen[has_c].any():
            smallest = has_c[np.argmin(counts[has_c].sum(1))]
            chosen[smallest] = True
    return chosen


# ---------------------------------------------------------------------------------------------

def _patient_table(samples: pd.DataFrame, positive_label: str, preserve_site: bool, target=None) -> pd.DataFrame:
    frame = samples.reset_index(drop=True).copy()
    if "site" not in frame.columns:
        frame["site"] = None
    if preserve_site:
        missing = frame.loc[frame["site"].isna() | (frame["site"].astype(str).str.strip() == ""), "slide_id"]
        if len(missing):
            raise InputError(f"split.preserve_site is true but slide {missing.iloc[0]!r} has no `site` in the samples "
                             "sheet; fill the site column for every slide or set split.preserve_site: false")
    if target is None or target.binary:
        frame["y"] = (frame["label"].astype(str) == str(positive_label)).astype(int)
        # stratum of a patient: positive if any of its slides is (see the module docstring)
        agg = "max"
    else:
        # other targets: the slide's stratum (class; event; value tertile), the patient's is
        # event-if-any (survival) or its slides' most frequent stratum
        frame["y"] = target.strata(target.encode(frame)["y"].to_numpy())[0]
        agg = target.stratum_of_patient
    patients = (frame.groupby("patient_id", sort=True)
                .agg(y=("y", agg), sites=("site", lambda s: sorted({str(v) for v in s if v is not None})))
                .reset_index())
    return patients


def _check_two_classes(samples: pd.DataFrame, positive_label: str) -> None:
    y = (samples["label"].astype(str) == str(positive_label))
    if y.all() or not y.any():
        seen = sorted(samples["label"].astype(str).unique())
        raise InputError(f"positive_label {positive_label!r} leaves one class only (labels in the sheet: {seen}); "
                         "set positive_label to one of them and make sure both classes are present")


def make_splits(samples: pd.DataFrame, settings: SplitSettings, positive_label: str, seed: int,
                target=None) -> pd.DataFrame:
    """The long split table: one row per (slide, fold) with role train/val/test.

    ``samples`` needs slide_id, patient_id, label (site optional; survival: the time and event
    columns). Deterministic for a seed. ``target`` (histoflow.targets.Target; None = binary):
    ``y`` is its encoding (binary 0/1, class index, value, event) and the split is stratified by
    its strata. Raises InputError when a fold's train or test set would hold one class only.
    """
    settings.check()
    if target is not None and target.binary:
        positive_label, target = target.positive_label, None
    if target is None:
        _check_two_classes(samples, positive_label)
    patients = _patient_table(samples, positive_label, settings.preserve_site, target)
    unit = _split_units(patients, settings.preserve_site)
    y = patients["y"].to_numpy()
    counts = _unit_counts(unit, y, 2 if target is None else max(target.strata(np.zeros(3))[1], int(y.max()) + 1))
    n_units = len(counts)
    rng = np.random.default_rng(seed)

    roles_per_fold: list[np.ndarray] = []  # per fold: role of every unit
    if settings.strategy == "sheet":
        roles_per_fold = _sheet_roles(samples, patients, unit, counts, settings, rng)
    elif settings.strategy == "kfold":
        if settings.k > n_units:
            raise InputError(f"split.k={settings.k} folds but only {n_units} patient groups; "
                             f"set split.k <= {n_units} or add patients")
        part = assign_partitions(counts, settings.k, rng)
        for fold in range(settings.k):
            role = np.full(n_units, "train", dtype=object)
            role[part == fold] = "test"
            rest = np.flatnonzero(part != fold)
            val = select_share(counts[rest], settings.val_fraction, rng)
            role[rest[val]] = "val"
            roles_per_fold.append(role)
    else:
        test = select_share(counts, settings.test_fraction, rng)
        rest = np.flatnonzero(~test)
        if settings.k == 1:
            inner = [select_share(counts[rest], settings.val_fraction, rng)]
        else:
            if settings.k > len(rest):
                raise InputError(f"split.k={settings.k} inner folds but only {len(rest)} patient groups outside the "
                                 f"test set; set split.k <= {len(rest)} or add patients")
            inner_part = assign_partitions(counts[rest], settings.k, rng)
            inner = [inner_part == f for f in range(settings.k)]
        for val in inner:
            role = np.full(n_units, "train", dtype=object)
            role[test] = "test"
            role[rest[val]] = "val"
            roles_per_fold.append(role)

    slides = samples.reset_index(drop=True)
    slide_unit = slides["patient_id"].map(dict(zip(patients["patient_id"], unit))).to_numpy()
    site = slides["site"] if "site" in slides.columns else pd.Series([None] * len(slides))
    base = pd.DataFrame({
        "slide_id": slides["slide_id"].astype(str).to_numpy(),
        "patient_id": slides["patient_id"].astype(str).to_numpy(),
        "label": slides["label"].astype(str).to_numpy(),
        "y": (slides["label"].astype(str) == str(positive_label)).astype(np.int64).to_numpy(),
        "site": site.where(site.notna(), "").astype(str).to_numpy(),
    })
    columns = list(SPLIT_COLUMNS)
    if target is not None:
        encoded = target.encode(slides)
        base["y"] = encoded["y"].to_numpy()
        if target.type == "survival":  # time and event travel with the split table to every job
            base["time"], base["event"] = encoded["time"].to_numpy(), encoded["event"].to_numpy()
            columns = columns[:4] + ["time", "event"] + columns[4:]
    frames = []
    for fold, role in enumerate(roles_per_fold):
        part = base.copy()
        part["fold"] = np.int64(fold)
        part["role"] = role[slide_unit].astype(str)
        frames.append(part)
    table = pd.concat(frames, ignore_index=True)[[c for c in columns if c in base.columns or c in ("fold", "role")]]
    check_splits(table, preserve_site=settings.preserve_site, target=target)
    return table


def check_sheet_split(samples: pd.DataFrame, sheet: str = "samples sheet") -> dict[str, str]:
    """{patient: train|val|test} from the sheet's ``split`` column (split.strategy: sheet).

    One line naming the slide or patient and the fix: a missing/unknown cell, or a patient whose
    slides sit on different sides (patient leakage across the official split)."""
    if "split" not in samples.columns:
        raise InputError(f"split.strategy is sheet but {sheet} has no `split` column; add one (train / val / test "
                         "per slide) or use split.strategy: kfold or holdout")
    side: dict[str, str] = {}
    first_slide: dict[str, str] = {}
    for slide, patient, cell in zip(samples["slide_id"], samples["patient_id"], samples["split"]):
        value = None if cell is None or (isinstance(cell, float) and np.isnan(cell)) else str(cell).strip()
        if value not in ROLES:
            raise InputError(f"{sheet}: slide {str(slide)!r} has split {cell!r}; with split.strategy: sheet every slide "
                             "needs train, val or test in the `split` column")
        patient = str(patient)
        if patient in side and side[patient] != value:
            raise InputError(f"{sheet}: patient {patient!r} has slides on both sides of the sheet's split "
                             f"({first_slide[patient]!r} is {side[patient]}, {str(slide)!r} is {value}); "
                             "put all of a patient's slides in one of train / val / test")
        side.setdefault(patient, value)
        first_slide.setdefault(patient, str(slide))
    return side


def _sheet_roles(samples: pd.DataFrame, patients: pd.DataFrame, unit: np.ndarray, counts: np.ndarray,
                 settings: SplitSettings, rng: np.random.Generator) -> list[np.ndarray]:
    """Per fold, the role of every unit under split.strategy: sheet (see the module docstring)."""
    side = check_sheet_split(samples)
    unit_side = np.full(len(counts), "", dtype=object)
    for patient, u in zip(patients["patient_id"], unit):
        s = side[str(patient)]
        if unit_side[u] and unit_side[u] != s:   # preserve_site joined patients of two sides
            raise InputError(f"split.preserve_site joins patient {str(patient)!r} ({s}) with patients on the "
                             f"{unit_side[u]} side of the sheet's split through a shared site; fix the split "
                             "column or set split.preserve_site: false")
        unit_side[u] = s
    test = unit_side == "test"
    if not test.any():
        raise InputError("split.strategy is sheet but no slide has split test; mark the test slides in the `split` column")
    fixed_val = unit_side == "val"
    train = np.flatnonzero(unit_side == "train")
    if fixed_val.any() and settings.k > 1:
        raise InputError(f"split.strategy is sheet with split.k={settings.k}, but the sheet fixes val slides too; "
                         "use split.k: 1 (the sheet's val set as given) or leave the val cells of the sheet as train")
    if settings.k == 1:
        inner = [fixed_val[train]] if fixed_val.any() else [select_share(counts[train], settings.val_fraction, rng)]
    else:
        if settings.k > len(train):
            raise InputError(f"split.k={settings.k} inner folds but only {len(train)} train patient groups in the "
                             f"sheet; set split.k <= {len(train)}")
        inner_part = assign_partitions(counts[train], settings.k, rng)
        inner = [inner_part == f for f in range(settings.k)]
    roles = []
    for val in inner:
        role = np.full(len(counts), "train", dtype=object)
        role[test] = "test"
        role[fixed_val] = "val"
        role[train[val]] = "val"
        roles.append(role)
    return roles


def check_splits(table: pd.DataFrame, preserve_site: bool = False, target=None) -> None:
    """Raise InputError unless every fold is leak-free and trainable.

    * each slide appears exactly once per fold;
    * no patient (and, with ``preserve_site``, no site) sits in two roles of one fold;
    * train and test of every fold hold both classes.
    """
    for fold, part in table.groupby("fold", sort=True):
        dup = part["slide_id"][part["slide_id"].duplicated()]
        if len(dup):
            raise InputError(f"split fold {fold}: slide {dup.iloc[0]!r} appears twice; regenerate splits.tsv")
        keys = ["patient_id"] + (["site"] if preserve_site else [])
        for key in keys:
            roles = part.groupby(key)["role"].nunique()
            leaked = roles[roles > 1]
            if len(leaked):
                raise InputError(f"split fold {fold}: {key} {leaked.index[0]!r} is in several roles "
                                 f"({sorted(part.loc[part[key] == leaked.index[0], 'role'].unique())}); "
                                 "regenerate splits.tsv with `snakemake split`")
        if target is not None and target.type != "classification":
            for role in ("train", "test"):
                rows = part[part["role"] == role]
                n_ok = int(rows["event"].sum()) if target.type == "survival" else int(rows["y"].nunique())
                if n_ok < (1 if target.type == "survival" else 2):
                    what = "no event" if target.type == "survival" else "fewer than two distinct values"
                    raise InputError(f"split fold {fold}: role '{role}' has {what} ({rows['patient_id'].nunique()} patients); "
                                     "use fewer folds (split.k) or add patients")
            continue
        for role in ("train", "test"):
            ys = part.loc[part["role"] == role, "y"]
            if ys.nunique() < 2:
                have = "no slides" if ys.empty else f"only {'positive' if ys.iloc[0] else 'negative'} slides"
                npat = part.loc[part["role"] == role, "patient_id"].nunique()
                raise InputError(f"split fold {fold}: role '{role}' has {have} ({npat} patients); use fewer folds "
                                 "(split.k) or a larger split.test_fraction, or add patients of the missing class")
        if (part["role"] == "val").any() and part.loc[part["role"] == "val", "y"].nunique() < 2:
            log.warning("split fold %s: validation set is single-class; early stopping will use the validation loss", fold)


def split_summary(table: pd.DataFrame, settings: SplitSettings, seed: int, positive_label: str, target=None) -> dict:
    """What split.json records: how the split was made and per-fold counts."""
    folds: dict[str, dict] = {}
    for fold, part in table.groupby("fold", sort=True):
        folds[str(fold)] = {
            role: {
                "slides": int((part["role"] == role).sum()),
                "patients": int(part.loc[part["role"] == role, "patient_id"].nunique()),
                "positive_slides": int(part.loc[part["role"] == role, "y"].sum()),
                "negative_slides": int((part.loc[part["role"] == role, "y"] == 0).sum()),
            }
            for role in ROLES
        }
    return {
        **asdict(settings),
        "seed": int(seed),
        "positive_label": positive_label,
        **({"target": target.describe()} if target is not None and not target.binary else {}),
        "n_folds": int(table["fold"].nunique()),
        "n_slides": int(table["slide_id"].nunique()),
        "n_patients": int(table["patient_id"].nunique()),
        "folds": folds,
    }


def n_folds(settings: SplitSettings) -> int:
    """How many folds a split config yields (known before any split is made: the DAG needs it)."""
    return settings.k


def read_splits(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "label": str, "site": str},
                       keep_default_na=False)



def write_splits(samples: pd.DataFrame | list[dict[str, Any]], settings: dict[str, Any] | SplitSettings, positive_label: str, seed: int,
                 out_tsv: str | os.PathLike, out_json: str | os.PathLike, target: dict[str, Any] | None = None) -> pd.DataFrame:
    """Make the splits of a samples table and write splits.tsv + split.json atomically.
    ``target``: the config's ``target`` section (None: binary, positive_label)."""
    from .io import write_json, write_tsv

    if not isinstance(settings, SplitSettings):
        settings = SplitSettings.from_config(settings)
    if not isinstance(samples, pd.DataFrame):
        samples = pd.DataFrame(list(samples))
    task = None
    if target:
        from .targets import Target
        task = Target.from_config({"target": target, "positive_label": positive_label}, labels=samples["label"])
        task = None if task.binary and task.positive_label == positive_label else task
    table = make_splits(samples, settings, positive_label, seed, target=task)
    summary = split_summary(table, settings, seed, positive_label, target=task)
    write_tsv(out_tsv, table)
    write_json(out_json, summary)
    for fold, counts in summary["folds"].items():
        log.info("fold %s: %s", fold, ", ".join(f"{r} {c['slides']} slides/{c['patients']} patients "
                                                 f"({c['positive_slides']} pos)" for r, c in counts.items()))
    return table


FIT_ON = ("all", "train_only")


def train_in_every_fold(table: pd.DataFrame) -> list[str]:
    """Slides that are train-role in every fold (never validated, never tested), sorted."""
    roles = table.groupby("slide_id")["role"].agg(lambda r: set(r) == {"train"})
    return sorted(str(s) for s in roles[roles].index)


def slides_to_fit(fit_on: str, splits_tsv: str | os.PathLike | None, key: str) -> set[str] | None:
    """Which slides an unsupervised cohort-level fit (SSL encoder, stain reference) may see.

    ``all`` (None: every slide, test slides included; no label is read, so this is transductive,
    the usual protocol for self-supervised pretraining and a stain reference). ``train_only``:
    the slides that are train-role in every fold. With kfold every patient is tested once and
    with holdout k >= 2 every non-test patient validates once, so that set is empty; then this is
    a one-line error: fitting per fold instead would extract every slide's features once per
    fold (k x the most expensive stage, and a fold dimension in every table downstream).
    """
    if fit_on not in FIT_ON:
        raise InputError(f"config key '{key}': {fit_on!r} is not one of {', '.join(FIT_ON)}")
    if fit_on == "all":
        return None
    if not splits_tsv:
        raise InputError(f"config key '{key}' is train_only but no splits.tsv was given to the rule; "
                         "run it through the workflow (it reads {outdir}/splits/splits.tsv)")
    table = read_splits(splits_tsv)
    keep = train_in_every_fold(table)
    if not keep:
        tested_all = table.loc[table["role"] == "test", "slide_id"].nunique() == table["slide_id"].nunique()
        strategy = "kfold tests every patient once" if tested_all else "every non-test patient is validated in some fold"
        raise InputError(f"config key '{key}' is train_only, but no slide is train-role in every fold ({strategy}); "
                         "use split.strategy: holdout with split.k: 1 (one fixed test and validation set), "
                         f"or set {key}: all (fitted on every slide without labels; said in the checklist)")
    return set(keep)
