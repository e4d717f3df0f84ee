"""Stain normalisation (Macenko, Reinhard, Vahadane) and stain augmentation (HED jitter).

A normaliser is fitted once per cohort on one reference tile (given, or chosen automatically
as the most typical tissue tile of a seeded sample) and stored in ``{outdir}/stain/stain.json``;
it is then applied tile by tile while features are extracted. Everything here is a pure
function on uint8 RGB arrays (H x W x 3); file I/O sits in ``fit_stain_for_cohort``.

Conventions: optical density OD = -ln((I + 1) / 256) per channel (Beer-Lambert); a pixel is
tissue when its largest OD exceeds ``beta`` (0.15 ~ RGB 220), so near-white background is never
altered by any method.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import defaults_from_schema
from .errors import InputError

log = logging.getLogger("histoflow.stain")

METHODS = ("none", "macenko", "reinhard", "vahadane")
# Stain vectors in OD space (Ruifrok & Johnston 2001), used when a tile has too little tissue
# to estimate its own.
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)


@dataclass(frozen=True)
@defaults_from_schema("stain")
class StainSettings:
    """Config section ``stain``."""

    method: str
    reference: str  # tile image path, or "auto"
    max_tiles: int  # tiles sampled across the cohort when reference is auto
    min_tissue_fraction: float  # a reference candidate must be at least this much tissue
    beta: float  # OD threshold separating tissue from background
    alpha: float  # Macenko angle percentile (robust extremes)
    hed_jitter: float = 0.05         # sigma of HED jitter of SSL training views (ssl.hed_sigma: null)
    fit_on: str  # all | train_only: which slides the auto reference is drawn from

    @classmethod
    def from_config(cls, section: dict | None) -> "StainSettings":
        section = dict(section or {})
        augment = section.pop("augment", {}) or {}
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in section.items() if k in known}
        if "hed_jitter" in augment:
            kwargs["hed_jitter"] = float(augment["hed_jitter"])
        settings = cls(**kwargs)
        if settings.method not in METHODS:
            raise InputError(f"config key 'stain.method': {settings.method!r} is not one of {', '.join(METHODS)}")
        if settings.fit_on not in ("all", "train_only"):
            raise InputError(f"config key 'stain.fit_on': {settings.fit_on!r} is not one of all, train_only")
        return settings


# --------------------------------------------------------------------------- basics


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> optical density (..., 3) float32, >= 0."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density (..., 3) -> uint8 RGB (inverse of ``rgb_to_od``)."""
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def tissue_pixels(rgb: np.ndarray, beta: float = 0.15) -> np.ndarray:
    """Boolean mask (H x W): pixels with some stain (max OD > beta)."""
    return rgb_to_od(rgb).max(axis=-1) > beta


def _order_he(vectors: np.ndarray) -> np.ndarray:
    """Unit rows, positive, haematoxylin first (H absorbs more red than eosin does)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    vectors = np.where(vectors.sum(axis=1, keepdims=True) < 0, -vectors, vectors)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if vectors[0, 0] < vectors[1, 0]:
        vectors = vectors[::-1]
    return np.ascontiguousarray(vectors)


def macenko_stain_matrix(rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> np.ndarray | None:
    """H and E OD unit vectors (2 x 3) by Macenko et al. 2009; None when too little tissue.

    OD of stained pixels is projected on the plane of its two main eigenvectors; the robust
    extreme angles (percentiles alpha, 100 - alpha) are the two stains.
    """
    od = rgb_to_od(rgb).reshape(-1, 3)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 100:
        return None
    _, eigvecs = np.linalg.eigh(np.cov(od.T.astype(np.float64)))
    plane = eigvecs[:, 1:3]                       # two largest eigenvalues
    plane = np.where(plane.sum(axis=0, keepdims=True) < 0, -plane, plane)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    return _order_he(np.stack([v1, v2]))


def sparse_nmf(od: np.ndarray, init: np.ndarray, sparsity: float = 0.1, n_iter: int = 300) -> np.ndarray:
    """Stains S (k x 3, unit rows) minimising ||OD - C S||^2 / 2 + sparsity * |C|_1 with C, S >= 0.

    Multiplicative updates (Lee & Seung, with the L1 term in the C update); S rows are renormalised
    every step so that the L1 penalty cannot be dodged by scaling S up and C down.
    """
    stains = np.asarray(init, np.float64).copy()
    conc = np.clip(od @ np.linalg.pinv(stains), 1e-3, None)
    for _ in range(n_iter):
        conc *= (od @ stains.T) / (conc @ (stains @ stains.T) + sparsity + 1e-9)
        stains *= (conc.T @ od) / ((conc.T @ conc) @ stains + 1e-9)
        norms = np.maximum(np.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
        stains /= norms
        conc *= norms.T
    return stains


def vahadane_stain_matrix(rgb: np.ndarray, beta: float = 0.15, sparsity: float = 0.1,
                          max_pixels: int = 4096, seed: int = 0) -> np.ndarray | None:
    """H and E OD unit vectors (2 x 3) by sparse non-negative factorisation (Vahadane et al.
    2016): OD ~ C @ S with C >= 0 sparse (L1, lambda = 0.1) and S >= 0, started from the
    Ruifrok-Johnston vectors; None when too little tissue.

    Sparsity is what makes the answer the pure stains: a plain NMF is satisfied by any cone
    that contains the data, a sparse one prefers the stains that explain pixels alone."""
    od = rgb_to_od(rgb).reshape(-1, 3)
    od = od[od.max(axis=1) > beta].astype(np.float64)
    if len(od) < 100:
        return None
    if len(od) > max_pixels:  # a seeded subsample keeps it fast and deterministic
        od = od[np.sort(np.random.default_rng(seed).choice(len(od), max_pixels, replace=False))]
    stains = sparse_nmf(od, RUIFROK_HE, sparsity)
    if not np.all(np.isfinite(stains)):
        return None
    return _order_he(stains)


def concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (N x 2) of OD rows (N x 3), clipped at 0."""
    return np.clip(od @ np.linalg.pinv(stain_matrix).astype(np.float32), 0, None)


def lab_stats(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb[mask][None])[0]
    return lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)


# --------------------------------------------------------------------------- normaliser


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted normaliser; ``apply`` maps a tile to the reference's stain appearance.

    Tiles with fewer than ``min_tissue_pixels`` stained pixels are returned unchanged (their
    stain vectors cannot be estimated; they are mostly background anyway).
    """

    method: str
    stain_matrix: tuple[tuple[float, ...], ...] | None = None   # H, E OD unit vectors (macenko/vahadane)
    max_concentrations: tuple[float, ...] | None = None         # 99th percentile of H, E
    lab_mean: tuple[float, ...] | None = None                   # reinhard
    lab_std: tuple[float, ...] | None = None
    beta: float = 0.15
    alpha: float = 1.0
    min_tissue_pixels: int = 200
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "stain_matrix" and v is not None else
                    (list(v) if isinstance(v, tuple) else v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StainNormalizer":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in data.items() if k in known}
        if kw.get("stain_matrix") is not None:
            kw["stain_matrix"] = tuple(tuple(float(x) for x in row) for row in kw["stain_matrix"])
        for key in ("max_concentrations", "lab_mean", "lab_std"):
            if kw.get(key) is not None:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)

    def _source_matrix(self, rgb: np.ndarray) -> np.ndarray | None:
        if self.method == "macenko":
            return macenko_stain_matrix(rgb, self.beta, self.alpha)
        return vahadane_stain_matrix(rgb, self.beta, seed=self.seed)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise one uint8 RGB tile (H x W x 3) -> uint8 RGB of the same shape."""
        if self.method == "none":
            return rgb
        if self.method == "reinhard":
            return self._apply_reinhard(rgb)
        mask = tissue_pixels(rgb, self.beta)
        if mask.sum() < self.min_tissue_pixels:
            return rgb
        source = self._source_matrix(rgb)
        if source is None:
            return rgb
        od = rgb_to_od(rgb).reshape(-1, 3)
        conc = concentrations(od, source)
        src_max = np.percentile(conc[mask.reshape(-1)], 99, axis=0)
        scale = np.asarray(self.max_concentrations, np.float32) / np.maximum(src_max, 1e-6).astype(np.float32)
        out = od_to_rgb((conc * scale) @ np.asarray(self.stain_matrix, np.float32)).reshape(rgb.shape)
        # background (unstained) pixels keep their exact value: white stays white
        return np.where(mask[..., None], out, rgb)

    def _apply_reinhard(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.color import lab2rgb, rgb2lab

        mask = tissue_pixels(rgb, self.beta)
        if mask.sum() < self.min_tissue_pixels:
            return rgb
        lab = rgb2lab(rgb[mask][None])[0]
        mean, std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)
        lab = (lab - mean) / std * np.asarray(self.lab_std) + np.asarray(self.lab_mean)
        lab[:, 0] = np.clip(lab[:, 0], 0, 100)
        new = np.clip(np.rint(lab2rgb(lab[None])[0] * 255), 0, 255).astype(np.uint8)
        out = rgb.copy()
        out[mask] = new
        return out


def fit_normalizer(method: str, reference: np.ndarray, beta: float = 0.15, alpha: float = 1.0,
                   seed: int = 0) -> StainNormalizer:
    """Fit a normaliser of ``method`` to a uint8 RGB reference tile."""
    if method not in METHODS:
        raise InputError(f"config key 'stain.method': {method!r} is not one of {', '.join(METHODS)}")
    if method == "none":
        return StainNormalizer("none", beta=beta, alpha=alpha, seed=seed)
    mask = tissue_pixels(reference, beta)
    if mask.sum() < 200:
        raise InputError("stain reference tile has almost no tissue (fewer than 200 stained pixels); "
                         "give another tile in config 'stain.reference' or use 'auto'")
    if method == "reinhard":
        mean, std = lab_stats(reference, mask)
        return StainNormalizer("reinhard", lab_mean=tuple(map(float, mean)), lab_std=tuple(map(float, std)),
                               beta=beta, alpha=alpha, seed=seed)
    matrix = (macenko_stain_matrix(reference, beta, alpha) if method == "macenko"
              else vahadane_stain_matrix(reference, beta, seed=seed))
    if matrix is None:
        raise InputError(f"stain reference tile: {method} could not estimate H and E vectors; "
                         "choose a tile with more tissue in config 'stain.reference' or use 'auto'")
    conc = concentrations(rgb_to_od(reference).reshape(-1, 3), matrix)[mask.reshape(-1)]
    max_c = np.percentile(conc, 99, axis=0)
    return StainNormalizer(method, stain_matrix=tuple(tuple(map(float, r)) for r in matrix),
                           max_concentrations=tuple(map(float, max_c)), beta=beta, alpha=alpha, seed=seed)


# --------------------------------------------------------------------------- augmentation


_SKIMAGE_OD_SCALE = float(-np.log(1e-6))


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Stain augmentation (Tellez et al. 2018): in HED space each channel c becomes
    c * a + b with a ~ U(1 - sigma, 1 + sigma), b ~ U(-sigma, sigma); uint8 RGB in and out.
    ``sigma = 0`` returns the image unchanged."""
    from skimage.color import hed2rgb, rgb2hed

    if sigma <= 0:
        return rgb
    a = rng.uniform(1 - sigma, 1 + sigma, size=3)
    # skimage's HED is OD / ln(1e6); the shift is drawn in OD units (as in Tellez et al.), else
    # sigma 0.05 would add 0.7 OD and turn the glass pink
    b = rng.uniform(-sigma, sigma, size=3) / _SKIMAGE_OD_SCALE
    hed = rgb2hed(rgb)
    out = hed2rgb(hed * a + b)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- reference choice


def tile_od_signature(rgb: np.ndarray, beta: float = 0.15) -> tuple[float, np.ndarray]:
    """(tissue fraction, mean OD per channel over tissue pixels) of one tile."""
    od = rgb_to_od(rgb).reshape(-1, 3)
    mask = od.max(axis=1) > beta
    frac = float(mask.mean())
    mean = od[mask].mean(axis=0) if mask.any() else np.zeros(3, np.float32)
    return frac, mean


def choose_reference(tiles: Sequence[np.ndarray], beta: float = 0.15, min_tissue_fraction: float = 0.5) -> int:
    """Index of the most typical tissue tile: among tiles with enough tissue, the one whose
    mean OD (per channel, plus tissue fraction) is nearest the cohort median."""
    sigs = [tile_od_signature(t, beta) for t in tiles]
    fracs = np.array([s[0] for s in sigs])
    ok = np.nonzero(fracs >= min_tissue_fraction)[0]
    if len(ok) == 0:  # relax rather than fail: the most tissue-rich tiles still carry stain
        ok = np.argsort(-fracs)[: max(1, len(fracs) // 4)]
    feats = np.array([np.append(sigs[i][1], sigs[i][0]) for i in ok])
    median = np.median(feats, axis=0)
    return int(ok[np.argmin(np.linalg.norm(feats - median, axis=1))])


# --------------------------------------------------------------------------- I/O edge


def _read_image(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise InputError(f"config key 'stain.reference': file {str(path)!r} does not exist; "
                         "give a tile image (PNG/JPEG/TIFF) or 'auto'")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_normalizer(stain_json: str | os.PathLike | None) -> StainNormalizer:
    """The normaliser stored by ``fit_stain_for_cohort`` (method none when no file is given)."""
    from .io import read_json

    if not stain_json:
        return StainNormalizer("none")
    return StainNormalizer.from_dict(read_json(stain_json)["normalizer"])


def fit_stain_for_cohort(slide_jsons: Sequence[str], tile_tables: Sequence[str], out_json: str,
                         out_png: str, settings: dict, seed: int, mpp: float,
                         splits_tsv: str | None = None) -> dict:
    """Rule ``fit_stain``: fit the cohort's normaliser and write stain.json + reference.png.

    With ``reference: auto``, up to ``max_tiles`` tiles at ``mpp`` are sampled across
    the cohort's non-skipped slides (seeded), and the most typical tissue tile is the reference.
    ``stain.fit_on: all`` samples every slide, test slides included (no label is read:
    transductive, stated in the checklist); ``train_only`` only the slides that are train-role in
    every fold of ``splits_tsv``. stain.json records ``fit_on`` and ``n_fit_slides``.
    """
    from PIL import Image

    from .tiles_table import load_tiles
    from .wsi import SlideReader, open_slide
    from .io import atomic_path, read_json, write_json
    from .split import slides_to_fit

    cfg = StainSettings.from_config(settings)
    info: dict[str, Any] = {"method": cfg.method, "reference": cfg.reference, "seed": seed, "fit_on": cfg.fit_on}
    if cfg.reference != "auto":
        ref = _read_image(cfg.reference)
        info["reference_source"] = str(Path(cfg.reference).resolve())
        info["n_fit_slides"] = 0   # a given tile: no cohort slide chose it
    else:
        allowed = slides_to_fit(cfg.fit_on, splits_tsv, "stain.fit_on")
        rng = np.random.default_rng(seed)
        candidates: list[tuple[str, dict]] = []
        fit_slides = set()
        for sj, tp in zip(slide_jsons, tile_tables):
            meta = read_json(sj)
            if meta.get("status") != "ok":
                continue
            if allowed is not None and meta["slide_id"] not in allowed:
                continue   # stain.fit_on: train_only: a validation/test slide is never sampled
            tiles = load_tiles(tp, mpp)
            candidates += [((meta["path"], meta.get("colour_fix")), row) for row in tiles.to_dict("records")]
            if len(tiles):
                fit_slides.add(meta["slide_id"])
        if not candidates:
            raise InputError(f"stain.reference is 'auto' but no slide has tiles at {mpp} µm/px; "
                             "give a reference tile image in config 'stain.reference' or set stain.method: none")
        pick = sorted(rng.choice(len(candidates), min(cfg.max_tiles, len(candidates)), replace=False))
        images, where = [], []
        readers: dict[tuple, SlideReader] = {}
        for i in pick:
            path, row = candidates[i]
            if path not in readers:
                readers[path] = open_slide(path[0], row["slide_id"], path[1])
            images.append(readers[path].read_tile(row))
            where.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
        for r in readers.values():
            r.close()
        best = choose_reference(images, cfg.beta, cfg.min_tissue_fraction)
        ref = images[best]
        info["reference_source"] = "auto"
        info["reference_tile"] = where[best]
        info["n_candidates"] = len(images)
        info["n_fit_slides"] = len(fit_slides)
        log.info("stain reference: tile %s of %d sampled", where[best], len(images))
    normalizer = fit_normalizer(cfg.method, ref, cfg.beta, cfg.alpha, seed)
    info["normalizer"] = normalizer.to_dict()
    info["tissue_fraction"] = tile_od_signature(ref, cfg.beta)[0]
    with atomic_path(out_png) as tmp:
        Image.fromarray(ref).save(tmp, format="PNG")
    write_json(out_json, info)
    return info
