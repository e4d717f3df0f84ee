"""Rendering of the demo cohort's synthetic H&E slides (histoflow.demo plans the cohort and
writes the sheet, annotations and truth; this module draws one slide from its plan).

Tissue is Beer-Lambert mixing of haematoxylin and eosin optical densities; lesions differ from
stroma by texture (crowded, large, pleomorphic nuclei), not only by colour. Low-resolution field
maps (tissue, lesion, pen, blur; one px per MASK_DS level-0 px) are drawn with numpy and the
level-0 image is synthesised in horizontal strips streamed to a raw file, which libvips turns
into the pyramid, so memory stays bounded whatever the slide size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from .io import atomic_path, safe_remove

if TYPE_CHECKING:   # the plan is made in histoflow.demo, which imports this module
    from .demo import SlidePlan

MPP = 0.5                       # µm/px at level 0 (a 20x scan)
MASK_DS = 16                    # field maps and truth masks: one px per 16 level-0 px
DEFAULT_SIZE = (8000, 6000)     # 4 x 3 mm: the whole demo DAG runs in minutes on a CPU
STRIP_ROWS = 256                # level-0 rows synthesised at once (~100 MB of temporaries at 8000 px)
JPEG_Q = 85
LYMPHOID = "lymphoid"           # multi-class demo: the third tissue pattern

# Stain optical-density vectors (RGB), the usual reference H&E vectors of Macenko et al. (2009).
OD_H = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
OD_E = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
OD_BACKGROUND = float(-np.log(240.0 / 255.0))   # glass + mounting medium: grey ~240
# Marker inks as RGB optical densities: green absorbs red+blue, blue absorbs red+green, ...
INK_OD = {
    "green": np.array([1.35, 0.45, 1.00], dtype=np.float32),
    "blue": np.array([1.55, 1.10, 0.40], dtype=np.float32),
    "red": np.array([0.30, 1.50, 1.30], dtype=np.float32),
}


# --------------------------------------------------------------------------------------------
# Low-resolution field maps (one px = MASK_DS level-0 px)
# --------------------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def tissue_field(rng: np.random.Generator, shape: tuple[int, int], almost_empty: bool) -> tuple[np.ndarray, list]:
    """Binary tissue mask (low-res): 1-3 irregular pieces, each a noisy ellipse in its own
    column of the slide so that pieces stay apart and inside the glass."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros(shape, bool)
    pieces = []
    if almost_empty:
        # one fragment of ~0.1 mm²: enough for a tile or two, nothing more
        radius = 350.0 / 2 / (MPP * MASK_DS)
        cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
        r = np.hypot((yy - cy) / radius, (xx - cx) / (radius * 1.2))
        mask = (1 - r + 0.15 * smooth_noise(rng, shape, 2.0)) > 0
        pieces.append({"center_px": [cx * MASK_DS, cy * MASK_DS], "fragment": True})
    else:
        k = int(rng.integers(1, 4))
        cell_w = w / k
        # pieces keep off the slide border (a soft ~10 % band): nothing is cut by the edge
        margin = 0.10 * min(h, w)
        to_edge = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
        border = np.clip((margin - to_edge) / margin, 0, 1) ** 2 * 3.0
        for i in range(k):
            a = cell_w * rng.uniform(0.28, 0.37)
            b = h * rng.uniform(0.28, 0.37)
            cx = cell_w * (i + 0.5) + rng.uniform(-0.05, 0.05) * cell_w
            cy = h * 0.5 + rng.uniform(-0.06, 0.06) * h
            theta = rng.uniform(-0.35, 0.35)
            dx, dy = xx - cx, yy - cy
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
            val = 1 - np.hypot(u, v) + 0.22 * smooth_noise(rng, shape, max(2.0, min(h, w) / 25)) \
                + 0.05 * smooth_noise(rng, shape, 1.5)
            mask |= (val - border) > 0
            pieces.append({"center_px": [cx * MASK_DS, cy * MASK_DS]})
    # Clean as a pathologist would see it: no specks, no pin holes (the truth must be unambiguous).
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= max(40, 0.02 * sizes.max())
        mask = keep[lab]
    mask = ndi.binary_fill_holes(mask)
    mask[[0, -1], :] = False
    mask[:, [0, -1]] = False
    return mask, pieces


def lesion_field(rng: np.random.Generator, tissue: np.ndarray, scale: float, max_lesions: int = 3) -> np.ndarray:
    """Binary lesion mask (low-res): 1-3 (at most ``max_lesions``) irregular blobs from ~0.3 to
    ~1.5 mm (times ``scale`` for small slides), always inside the tissue with a margin."""
    h, w = tissue.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inner = ndi.binary_erosion(tissue, iterations=3)
    dist = ndi.distance_transform_edt(inner)
    free = dist.copy()
    out = np.zeros(tissue.shape, bool)
    n = int(rng.integers(1, 4))
    # a mix of sizes: the first lesion large, the others smaller
    diameters_um = np.sort(np.exp(rng.uniform(np.log(300), np.log(1500), n)))[::-1]
    diameters_um[0] = max(diameters_um[0], 900.0)
    diameters_um = diameters_um[:max_lesions]
    for d_um in diameters_um * scale:
        r = d_um / 2 / (MPP * MASK_DS)
        if free.max() < 3:
            break
        r = min(r, free.max() / 1.3)
        cand = np.argwhere(free >= r * 1.3 - 1e-3)   # tolerance: r may equal max/1.3
        cy, cx = cand[rng.integers(len(cand))]
        a, b = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.1)
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        blob = (1 - np.hypot(u, v) + 0.25 * smooth_noise(rng, tissue.shape, max(1.5, r / 3))) > 0
        blob &= inner
        lab, k = ndi.label(blob)
        if k == 0:
            continue
        sizes = ndi.sum(blob, lab, index=np.arange(1, k + 1))
        blob = lab == (1 + int(np.argmax(sizes)))
        blob = ndi.binary_fill_holes(blob)
        out |= blob
        # keep later lesions apart from this one
        free[ndi.binary_dilation(blob, iterations=int(r) + 4)] = 0
    return out


def lesion_field_fraction(rng: np.random.Generator, tissue: np.ndarray, low: float, high: float,
                          max_foci: int = 4) -> tuple[np.ndarray, float]:
    """Binary lesion mask (low-res) covering a given fraction of the tissue, as small foci
    (micro-metastasis-like): the fraction is drawn log-uniform in [low, high] (small burdens as
    likely per decade as large ones), split over 1-``max_foci`` foci by a Dirichlet(2) draw, each
    focus an irregular blob grown to its exact pixel count inside the tissue (with a margin) and
    apart from the others. Returns the mask and the target fraction; the realised fraction is
    within one low-res px per focus of it and inside [low, high] (whole px are rounded inward)."""
    h, w = tissue.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inner = ndi.binary_erosion(tissue, iterations=3)
    n_tissue = int(tissue.sum())
    target = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    # whole low-res px, kept inside [low, high] of the tissue
    total = int(np.clip(round(target * n_tissue), np.ceil(low * n_tissue), np.floor(high * n_tissue)))
    n = int(rng.integers(1, max_foci + 1))
    n = max(1, min(n, total // 12))            # a focus is at least ~12 px (~100 µm across)
    shares = rng.dirichlet(np.full(n, 2.0))
    sizes = np.floor(shares * total).astype(int)
    sizes[np.argsort(-(shares * total - sizes))[: total - sizes.sum()]] += 1   # largest remainders
    free = ndi.distance_transform_edt(inner)
    out = np.zeros(tissue.shape, bool)
    for size in sorted(sizes, reverse=True):
        r = float(np.sqrt(size / np.pi))
        if free.max() < 2:
            break
        cand = np.argwhere(free >= min(r * 1.3, free.max()) - 1e-3)
        cy, cx = cand[rng.integers(len(cand))]
        a, b = rng.uniform(0.8, 1.25), rng.uniform(0.7, 1.1)
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        val = -np.hypot(u, v) / max(r, 1.0) + 0.25 * smooth_noise(rng, tissue.shape, max(1.5, r / 3))
        allowed = inner & (free > 0)
        val[~allowed] = -np.inf
        order = np.argsort(-val, axis=None, kind="stable")
        want = size
        blob = np.zeros_like(out)
        for _ in range(12):   # grow (or trim) until the one connected, hole-free focus has `size` px
            blob = np.zeros_like(out)
            blob.flat[order[:want]] = True
            blob &= allowed
            lab, k = ndi.label(blob)
            if k == 0:
                break
            keep = ndi.sum(blob, lab, index=np.arange(1, k + 1))
            blob = ndi.binary_fill_holes(lab == (1 + int(np.argmax(keep)))) & allowed
            got = int(blob.sum())
            if got == size:
                break
            want = max(1, want + size - got)
        out |= blob
        free[ndi.binary_dilation(blob, iterations=int(r) + 4)] = 0
    return out, target


def stroke_field(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    """Soft low-res mask of a polyline stroke of the given width (low-res px)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.full(shape, np.inf, np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / max(vx * vx + vy * vy, 1e-6), 0, 1)
        d = np.minimum(d, np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy)))
    return np.clip((width / 2 - d) / 1.5 + 0.5, 0, 1).astype(np.float32)


def pen_field(rng: np.random.Generator, tissue: np.ndarray) -> tuple[np.ndarray, list[list[float]]]:
    """A marker stroke circling one tissue piece (as pathologists mark an area on the glass),
    drawn over the background only: of the ring around the piece, the longest run of points
    that stays on glass and inside the slide is kept."""
    h, w = tissue.shape
    lab, n = ndi.label(tissue)
    piece = lab == int(rng.integers(1, n + 1))
    ys, xs = np.nonzero(piece)
    cy, cx = ys.mean(), xs.mean()
    width = rng.uniform(5, 9) * min(1.0, min(h, w) / 375)
    ry = (ys.max() - ys.min()) / 2 + width + rng.uniform(3, 8)
    rx = (xs.max() - xs.min()) / 2 + width + rng.uniform(3, 8)
    t = np.linspace(0, 2 * np.pi, 73)[:-1] + rng.uniform(0, 2 * np.pi)
    wobble = 1 + 0.05 * np.sin(3 * t + rng.uniform(0, 6))
    pts = np.stack([cx + rx * wobble * np.cos(t), cy + ry * wobble * np.sin(t)], 1)
    clear = ~ndi.binary_dilation(tissue, iterations=int(width / 2) + 2)
    xi, yi = pts[:, 0].round().astype(int), pts[:, 1].round().astype(int)
    inside = (xi >= 2) & (xi < w - 2) & (yi >= 2) & (yi < h - 2)
    ok = inside & clear[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
    # longest circular run of usable points
    best, cur, best_end = 0, 0, -1
    for k in range(2 * len(ok)):
        cur = cur + 1 if ok[k % len(ok)] else 0
        if cur > best:
            best, best_end = min(cur, len(ok)), k
    if best < 4:   # nowhere to draw around it: a short tick in the emptiest corner instead
        cy, cx = (h * 0.1, w * 0.1) if not tissue[: h // 5, : w // 5].any() else (h * 0.9, w * 0.9)
        pts = np.array([[cx - 10, cy - 4], [cx, cy + 4], [cx + 14, cy - 8]], dtype=float)
    else:
        take = [(best_end - best + 1 + j) % len(ok) for j in range(min(best, 36))]
        pts = pts[take]
    ink = stroke_field(tissue.shape, pts, width)
    # ink is uneven: streaks where the felt tip dried
    ink *= np.clip(0.8 + 0.25 * smooth_noise(rng, tissue.shape, 2.0), 0.4, 1.1)
    return ink, (pts * MASK_DS).round(1).tolist()


def disc_field(shape: tuple[int, int], cx: float, cy: float, r: float, soft: float = 1.5) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.clip((r - np.hypot(xx - cx, yy - cy)) / soft + 0.5, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Level-0 textures: fibres and nuclei
# --------------------------------------------------------------------------------------------

def fibre_texture(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    """Periodic (size x size) collagen-fibre texture in [0, 1]: noise filtered in the Fourier
    domain to be long along ``angle`` and thin across it; periodic so it tiles seamlessly."""
    f = np.fft.fftfreq(size).astype(np.float32)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    filt = np.exp(-(along / 0.012) ** 2 - ((np.abs(across) - 0.045) / 0.035) ** 2)
    spec = np.fft.fft2(rng.standard_normal((size, size)))
    tex = np.real(np.fft.ifft2(spec * filt)).astype(np.float32)
    tex /= tex.std() + 1e-6
    return 0.5 + 0.5 * np.tanh(1.1 * tex)


def _blob(rng: np.random.Generator, size: int, rx: float, ry: float, theta: float, irregular: float) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged irregular ellipse (coverage in [0,1]) and its normalised radius."""
    c = (size - 1) / 2 + rng.uniform(-0.5, 0.5, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - c[1], yy - c[0]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    phi = np.arctan2(v, u)
    wobble = 1 + sum(irregular * rng.uniform(0.3, 1) * np.cos(k * phi + rng.uniform(0, 6)) for k in (2, 3, 5))
    r = np.hypot(u / rx, v / ry) / wobble
    cover = np.clip((1 - r) * min(rx, ry) + 0.5, 0, 1)   # ~1 px anti-aliased edge
    return cover, r


def nucleus_sprites(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """A bank of ``n`` haematoxylin-density sprites (n, S, S).

    normal: small, dark, uniform nuclei: spindle fibroblasts and round lymphocytes (~7 µm).
    tumor: large (10-18 µm), pleomorphic, irregular outline, vesicular chromatin (dark rim,
    coarse granules) with nucleoli, variable staining: the texture a lesion tile shows.
    """
    size = 28 if kind == "normal" else 44
    bank = np.zeros((n, size, size), np.float32)
    for i in range(n):
        if kind == "normal":
            if rng.random() < 0.6:   # spindle
                rx, ry, irr = rng.uniform(8, 12), rng.uniform(2.2, 3.3), 0.04
            else:                    # lymphocyte
                rx = rng.uniform(5.5, 7.0)
                ry, irr = rx * rng.uniform(0.85, 1.0), 0.03
            cover, r = _blob(rng, size, rx, ry, rng.uniform(0, np.pi), irr)
            grain = 1 + 0.15 * rng.standard_normal((size, size))
            dens = rng.uniform(1.3, 1.8) * cover * grain
        else:
            rx = rng.uniform(9, 17)
            ry = rx * rng.uniform(0.6, 0.95)
            cover, r = _blob(rng, size, rx, ry, rng.uniform(0, np.pi), rng.uniform(0.05, 0.12))
            rim = np.exp(-((r - 0.9) / 0.12) ** 2)
            grain = ndi.gaussian_filter(rng.standard_normal((size, size)), 1.0) * 2.2
            dens = (0.45 + 0.55 * rim + 0.25 * grain) * cover
            for _ in range(int(rng.integers(0, 3))):    # nucleoli
                cy, cx = (size - 1) / 2 + rng.uniform(-0.4, 0.4, 2) * ry
                yy, xx = np.mgrid[0:size, 0:size]
                dens += 0.8 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.3 ** 2)) * cover
            dens *= rng.uniform(0.75, 1.45)            # hyper/hypochromasia
        bank[i] = np.clip(dens, 0, None)
    return bank


def scatter_points(rng: np.random.Generator, intensity: np.ndarray, per_px: float) -> np.ndarray:
    """Poisson points (level-0 x, y) with density ``per_px * intensity`` (intensity: low-res map
    in [0, 1]), by thinning a homogeneous process."""
    h, w = intensity.shape
    n = rng.poisson(per_px * h * w * MASK_DS * MASK_DS)
    xy = rng.uniform(0, 1, (n, 2)) * np.array([w * MASK_DS, h * MASK_DS])
    lx = np.minimum((xy[:, 0] / MASK_DS).astype(int), w - 1)
    ly = np.minimum((xy[:, 1] / MASK_DS).astype(int), h - 1)
    keep = rng.uniform(0, 1, n) < intensity[ly, lx]
    pts = xy[keep]
    return pts[np.argsort(pts[:, 1], kind="stable")]   # sorted by y: each strip is a slice


def stamp(out: np.ndarray, y0: int, pts: np.ndarray, sprite_idx: np.ndarray, bank: np.ndarray) -> None:
    """Add sprites centred on ``pts`` (level-0 x, y) into the strip ``out`` starting at row y0."""
    sh, w = out.shape
    size = bank.shape[1]
    half = size // 2
    lo = np.searchsorted(pts[:, 1], y0 - half - 1)
    hi = np.searchsorted(pts[:, 1], y0 + sh + half + 1)
    if hi <= lo:
        return
    p = pts[lo:hi]
    tlx = np.floor(p[:, 0]).astype(np.int64) - half
    tly = np.floor(p[:, 1]).astype(np.int64) - half - y0
    oy, ox = np.mgrid[0:size, 0:size]
    for start in range(0, len(p), 512):      # bounded temporaries for crowded strips
        sl = slice(start, start + 512)
        xs = tlx[sl, None] + ox.ravel()[None, :]
        ys = tly[sl, None] + oy.ravel()[None, :]
        wts = bank[sprite_idx[lo:hi][sl]].reshape(len(xs), -1)
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < sh) & (wts > 0.01)
        flat = ys[ok] * w + xs[ok]
        out += np.bincount(flat, weights=wts[ok], minlength=sh * w).reshape(sh, w).astype(np.float32)


class Upsampler:
    """Bilinear upsampling of low-res maps to level-0 rows, one strip at a time (pixel centres
    aligned, so ``map > 0.5`` at level 0 matches the low-res mask)."""

    def __init__(self, width: int, lr_shape: tuple[int, int]):
        self.lr_h, self.lr_w = lr_shape
        self.xi0, self.xi1, self.xw = self._axis(width, self.lr_w)

    @staticmethod
    def _axis(n: int, n_lr: int):
        c = (np.arange(n, dtype=np.float32) + 0.5) / MASK_DS - 0.5
        c = np.clip(c, 0, n_lr - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_lr - 1)
        return i0, i1, (c - i0).astype(np.float32)

    def strip(self, field_lr: np.ndarray, y0: int, y1: int) -> np.ndarray | None:
        """The map at level-0 rows [y0, y1), or None where it is zero throughout."""
        yi0, yi1, yw = self._axis(y1, self.lr_h)
        yi0, yi1, yw = yi0[y0:], yi1[y0:], yw[y0:]
        rows = field_lr[yi0.min(): yi1.max() + 1]
        if not rows.any():
            return None
        base = yi0.min()
        cols = rows[:, self.xi0] * (1 - self.xw) + rows[:, self.xi1] * self.xw
        a, b = cols[yi0 - base], cols[yi1 - base]
        return a + (b - a) * yw[:, None]


# --------------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------------

@dataclass
class SlideTruth:
    tissue: np.ndarray              # low-res binary tissue mask (MASK_DS)
    lesion_polygons: list           # shapely Polygons, level-0 px
    truth: dict                     # JSON-able ground truth


def render_slide(plan: SlidePlan, width: int, height: int, seed: int, tiff_path: Path,
                 tmp_dir: Path) -> SlideTruth:
    """Synthesise one slide and write it as a pyramidal JPEG TIFF at ``tiff_path``."""
    import pyvips

    rng = np.random.default_rng([seed, plan.index])
    # floor, as libvips sizes pyramid levels: the truth mask has the shape of the 16x level
    lr_shape = (height // MASK_DS, width // MASK_DS)
    scale = min(width, height) / min(DEFAULT_SIZE)
    tissue, pieces = tissue_field(rng, lr_shape, plan.almost_empty)
    fraction_target = None
    if plan.burden is not None:  # survival/regression: the lesion size factor sets the burden
        lesion = lesion_field(rng, tissue, min(1.0, scale) * plan.burden) if plan.burden > 0 else np.zeros(lr_shape, bool)
    elif plan.lesion_fraction is not None:   # small-lesion cohorts: foci covering a drawn fraction
        lesion = np.zeros(lr_shape, bool)
        if plan.has_lesion:
            lesion, fraction_target = lesion_field_fraction(rng, tissue, *plan.lesion_fraction, plan.max_lesions)
    else:
        lesion = lesion_field(rng, tissue, min(1.0, scale) * plan.lesion_scale, plan.max_lesions) if plan.has_lesion else np.zeros(lr_shape, bool)

    alpha = ndi.gaussian_filter(tissue.astype(np.float32), 0.8)
    alpha[~ndi.binary_dilation(tissue, iterations=3)] = 0
    les = ndi.gaussian_filter(lesion.astype(np.float32), 1.0) * tissue
    # regional staining variation (section thickness, fixation): +-15 % eosin, +-30 % cellularity
    emod = np.clip(1 + 0.12 * smooth_noise(rng, lr_shape, 6), 0.75, 1.25)
    cell = alpha * np.clip(0.7 + 0.3 * smooth_noise(rng, lr_shape, 5), 0.3, 1.0) * (1 - 0.9 * les)
    fib_w = np.clip(0.5 + 0.5 * smooth_noise(rng, lr_shape, 8), 0, 1).astype(np.float32)

    nuisances: list[dict] = []
    ink = None
    if plan.pen:
        ink, pts = pen_field(rng, tissue)
        nuisances.append({"type": "pen", "color": plan.pen, "polyline_px": pts})
    blur_lr = None
    if plan.blur:
        ys, xs = np.nonzero(tissue)
        k = rng.integers(len(ys))
        r = rng.uniform(250, 450) * min(1.0, scale * 1.5) / (MPP * MASK_DS)
        blur_lr = disc_field(lr_shape, xs[k], ys[k], r, soft=3.0)
        nuisances.append({"type": "blur", "center_px": [float(xs[k] * MASK_DS), float(ys[k] * MASK_DS)],
                          "radius_px": float(r * MASK_DS), "sigma_px": 3.5})
    bubble = None
    if plan.bubble:
        ys, xs = np.nonzero(tissue)
        k = rng.integers(len(ys))
        r0 = rng.uniform(200, 400) * min(1.0, scale * 1.5) / MPP
        bubble = (float(xs[k] * MASK_DS + MASK_DS / 2), float(ys[k] * MASK_DS + MASK_DS / 2), float(r0))
        nuisances.append({"type": "air_bubble", "center_px": list(bubble[:2]), "radius_px": r0})
    if plan.almost_empty:
        nuisances.append({"type": "almost_empty"})

    # Nuclei: sparse small dark ones in stroma, crowded large pleomorphic ones in lesions.
    normal_bank = nucleus_sprites(rng, "normal", 48)
    tumor_bank = nucleus_sprites(rng, "tumor", 64)
    pts_n = scatter_points(rng, cell, 1 / 1400)
    if plan.label == LYMPHOID:
        # the third pattern: lesions packed with small dark (lymphocyte-like) nuclei
        tumor_bank = normal_bank
        pts_t = scatter_points(rng, les, 1 / 260)
    else:
        pts_t = scatter_points(rng, les, 1 / 650)
    idx_n = rng.integers(0, len(normal_bank), len(pts_n))
    idx_t = rng.integers(0, len(tumor_bank), len(pts_t))
    banks = [(pts_n, idx_n, normal_bank), (pts_t, idx_t, tumor_bank)]
    if blur_lr is not None:
        # nuclei centred in the blurred patch are drawn from pre-blurred sprite banks
        def split(pts, idx, bank):
            lx = np.minimum((pts[:, 0] / MASK_DS).astype(int), lr_shape[1] - 1)
            ly = np.minimum((pts[:, 1] / MASK_DS).astype(int), lr_shape[0] - 1)
            inb = blur_lr[ly, lx] > 0.5
            blurred = np.stack([ndi.gaussian_filter(b, 3.5) for b in bank])
            return [(pts[~inb], idx[~inb], bank), (pts[inb], idx[inb], blurred)]
        banks = split(pts_n, idx_n, normal_bank) + split(pts_t, idx_t, tumor_bank)

    tex_a = fibre_texture(rng, 512, rng.uniform(0, np.pi))
    tex_b = fibre_texture(rng, 512, rng.uniform(0, np.pi))
    # the blurred patch shows the same fibres out of focus
    tex_blur = ndi.gaussian_filter(0.5 * (tex_a + tex_b), 3.5, mode="wrap") if blur_lr is not None else None
    noise_tile = (0.012 * rng.standard_normal((257, 263))).astype(np.float32)  # odd periods: no grid
    ink_od = INK_OD[plan.pen] * rng.uniform(0.7, 1.0) if plan.pen else None
    # Staining batches differ: per-slide H and E strength and a slight hue shift (what stain
    # normalisation is for; it also keeps mean colour from giving lesions away).
    od_h = _jitter_vector(OD_H, rng) * rng.uniform(0.75, 1.25)
    od_e = _jitter_vector(OD_E, rng) * rng.uniform(0.7, 1.3)

    up = Upsampler(width, lr_shape)
    raw = tmp_dir / f"{plan.slide_id}.rgb"
    with open(raw, "wb") as fh:
        for y0 in range(0, height, STRIP_ROWS):
            y1 = min(height, y0 + STRIP_ROWS)
            fh.write(_render_strip(y0, y1, width, up, alpha, emod, les, fib_w, tex_a, tex_b,
                                   tex_blur, blur_lr, banks, ink, ink_od, bubble, noise_tile, od_h, od_e).tobytes())
        fh.flush()
    img = pyvips.Image.rawload(str(raw), width, height, 3).copy(interpretation="srgb")
    # a 40x scan (plan.mpp 0.25): the 0.5 µm/px rendering upsampled 2x (a scanner's optics add
    # no detail either at this scale; what matters here is that the pipeline sees another mpp)
    zoom = MPP / plan.mpp
    if zoom != 1:
        img = img.resize(zoom, kernel="linear")
    px_per_mm = 1000.0 / plan.mpp
    with atomic_path(tiff_path) as tmp:
        # resunit cm: OpenSlide 4 reports openslide.mpp-x/y from TIFF resolution in cm/inch only
        img.tiffsave(str(tmp), tile=True, pyramid=True, compression="jpeg", Q=JPEG_Q,
                     tile_width=256, tile_height=256, xres=px_per_mm, yres=px_per_mm,
                     resunit="cm", strip=True)
    out_size = (int(img.width), int(img.height))
    del img
    safe_remove(raw, tmp_dir)

    polygons = lesion_polygons(lesion)
    truth = {
        "slide_id": plan.slide_id,
        "patient_id": plan.patient_id,
        "label": plan.label,
        "mpp": MPP,
        "width": width,
        "height": height,
        "tissue_mask_downsample": MASK_DS,
        "tissue_area_mm2": float(tissue.sum() * (MASK_DS * MPP / 1000) ** 2),
        "tissue_pieces": pieces,
        "lesions": [{"area_um2": float(p.area * MPP * MPP),
                     "centroid_px": [round(p.centroid.x, 1), round(p.centroid.y, 1)],
                     "bbox_px": [round(v, 1) for v in p.bounds]} for p in polygons],
        "lesion_area_fraction_of_tissue": float(lesion.sum() / max(tissue.sum(), 1)),
        "nuisances": nuisances,
        "seed": seed,
    }
    if plan.lesion_fraction is not None:
        truth["lesion_fraction_range"] = list(plan.lesion_fraction)
        truth["lesion_fraction_target"] = fraction_target
        truth["lesion_fraction_draw"] = "log-uniform in the range, 1-max_foci foci (Dirichlet(2) shares)"
    if zoom != 1:   # level-0 px of the upsampled slide
        truth = _scale_px(truth, zoom)
        truth.update(mpp=plan.mpp, width=out_size[0], height=out_size[1],
                     tissue_mask_downsample=int(MASK_DS * zoom))
        from shapely import affinity

        polygons = [affinity.scale(p, zoom, zoom, origin=(0, 0)) for p in polygons]
    return SlideTruth(tissue=tissue, lesion_polygons=polygons, truth=truth)


def _scale_px(obj, factor: float):
    """A truth dict with every ``*_px`` value (level-0 px coordinates, radii) times ``factor``."""
    def scale(v):
        if isinstance(v, (list, tuple)):
            return [scale(x) for x in v]
        return round(float(v) * factor, 1) if isinstance(v, (int, float)) else v
    if isinstance(obj, dict):
        return {k: (scale(v) if k.endswith("_px") else _scale_px(v, factor)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scale_px(v, factor) for v in obj]
    return obj


def _render_strip(y0, y1, width, up, alpha, emod, les, fib_w, tex_a, tex_b, tex_blur, blur_lr,
                  banks, ink, ink_od, bubble, noise_tile, od_h=OD_H, od_e=OD_E) -> np.ndarray:
    sh = y1 - y0
    a = up.strip(alpha, y0, y1)
    rows, cols = np.arange(y0, y1), np.arange(width)
    od = np.empty((sh, width, 3), np.float32)
    od[...] = (_wrap(noise_tile, rows, cols) + OD_BACKGROUND)[:, :, None]
    if a is not None:
        # the low-res alpha is blurry; a real section ends within a few µm
        a = np.clip((a - 0.5) * 3.0 + 0.5, 0, 1)
        ta, tb = _wrap(tex_a, rows, cols), _wrap(tex_b, rows, cols)
        w = up.strip(fib_w, y0, y1)
        tex = tb + (ta - tb) * w if w is not None else tb
        bl = up.strip(blur_lr, y0, y1) if blur_lr is not None else None
        if bl is not None:
            tex = tex + (_wrap(tex_blur, rows, cols) - tex) * bl
        e = up.strip(emod, y0, y1) * a
        l = up.strip(les, y0, y1)
        eos = e * (0.30 + 0.50 * tex)
        hem = np.zeros((sh, width), np.float32)
        for pts, idx, bank in banks:
            if len(pts):
                stamp(hem, y0, pts, idx, bank)
        hem = np.minimum(hem, 2.6)
        hem += 0.06 * a                               # faint nuclear-stain background
        if l is not None:
            # lesion: stroma replaced by tumour cells with pale eosinophilic cytoplasm
            eos = eos * (1 - 0.75 * l) + 0.12 * l * a
            hem += 0.05 * l
        od += hem[:, :, None] * od_h + eos[:, :, None] * od_e
    if ink is not None:
        p = up.strip(ink, y0, y1)
        if p is not None:
            od += p[:, :, None] * ink_od
    if bubble is not None:
        _air_bubble(od, y0, bubble)
    rgb = np.exp(-od)
    rgb *= 255.0
    np.clip(rgb, 0, 255, out=rgb)
    return (rgb + 0.5).astype(np.uint8)


def _wrap(tile: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A periodic texture tile read at (rows, cols), exactly the strip's size (no big np.tile)."""
    return tile[(rows % tile.shape[0])[:, None], (cols % tile.shape[1])[None, :]]


def _jitter_vector(v: np.ndarray, rng: np.random.Generator, amount: float = 0.06) -> np.ndarray:
    """A stain OD vector turned slightly (unit length kept): another batch of dye."""
    j = np.clip(v + rng.normal(0, amount, 3).astype(np.float32), 0.05, None)
    return (j / np.linalg.norm(j)).astype(np.float32)


def _air_bubble(od: np.ndarray, y0: int, bubble: tuple[float, float, float]) -> None:
    """Air trapped under the coverslip: a dark refractive rim and a slightly hazy interior."""
    cx, cy, r = bubble
    sh, w = od.shape[:2]
    r_out = r + 20
    ya, yb = max(0, int(cy - r_out) - y0), min(sh, int(cy + r_out) - y0 + 1)
    xa, xb = max(0, int(cx - r_out)), min(w, int(cx + r_out) + 1)
    if ya >= yb or xa >= xb:
        return
    yy, xx = np.mgrid[ya + y0:yb + y0, xa:xb].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy)
    rim = np.exp(-((d - r) / 5.0) ** 2) * 0.9 + np.exp(-((d - r + 12) / 4.0) ** 2) * 0.25
    inside = (d < r - 8).astype(np.float32)
    sub = od[ya:yb, xa:xb]
    sub *= (1 - 0.25 * inside)[:, :, None]     # contrast lost under the bubble
    sub += (rim + 0.05 * inside)[:, :, None]


def lesion_polygons(lesion: np.ndarray) -> list:
    """Outlines of the low-res lesion mask as level-0 polygons (pixel-centre aligned)."""
    from shapely.geometry import Polygon
    from skimage import measure

    polys = []
    padded = np.pad(lesion.astype(np.float32), 1)
    for c in measure.find_contours(padded, 0.5):
        if len(c) < 4:
            continue
        xy = (c[:, ::-1] - 1 + 0.5) * MASK_DS
        poly = Polygon(xy).buffer(0).simplify(MASK_DS / 4)
        if poly.geom_type == "MultiPolygon":
            poly = max(poly.geoms, key=lambda g: g.area)
        if poly.area > (2 * MASK_DS) ** 2:
            polys.append(poly)
    return sorted(polys, key=lambda p: (p.bounds[1], p.bounds[0]))
