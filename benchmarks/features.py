"""Feature-extraction benchmark: does tile reading hide behind compute?

    .venv/bin/python benchmarks/features.py [--quick]

(a) tiles/s of the full path (DataLoader workers read + resize + normalise, batched inference)
    vs the same model's bare forward on tensors already in memory; same batch size; target >= 0.9.
(b) tile reads/s of histoflow's reader (DataLoader, 1 and 2 workers) vs a plain OpenSlide
    read_region loop (1 and 2 processes) on the same 256-px tiles at 0.5 µm/px, read from a
    0.25 µm/px JPEG pyramid (20k x 20k px, built once with pyvips, cached in benchmarks/.cache).
Prints a table and writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from histoflow import features as F  # noqa: E402
from histoflow.stain import od_to_rgb  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "features.json"
MPP0, MPP, TILE = 0.25, 0.5, 256


def make_pyramid(size: int = 20480, seed: int = 0) -> Path:
    """A 0.25 µm/px JPEG (Q 90, 256-px tiles) pyramid of stained texture, cached by size."""
    import pyvips

    path = CACHE / f"pyramid_{size}.tiff"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = 2048
    # texture at several scales so JPEG has realistic work (flat areas would decode too fast)
    conc = sum(np.kron(rng.gamma(2.0, 0.2, (block // s, block // s, 2)), np.ones((s, s, 1))) for s in (2, 8, 32))
    rgb = od_to_rgb(conc @ np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]))
    tile = pyvips.Image.new_from_memory(np.ascontiguousarray(rgb).tobytes(), block, block, 3, "uchar")
    img = tile.replicate(size // block, size // block)
    tmp = path.with_suffix(".part.tiff")
    img.tiffsave(str(tmp), tile=True, pyramid=True, compression="jpeg", Q=90, tile_width=256, tile_height=256,
                 xres=1000 / MPP0, yres=1000 / MPP0, resunit="cm")
    os.replace(tmp, path)
    return path


def tile_grid(size: int, n: int, seed: int = 0) -> pd.DataFrame:
    """n tiles of 256 px at 0.5 µm/px (level 1), a seeded sample of the grid, sorted by position."""
    size0 = TILE * 2
    side = size // size0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(side * side, min(n, side * side), replace=False))
    rows, cols = idx // side, idx % side
    return pd.DataFrame({"slide_id": "bench", "x": cols * size0, "y": rows * size0, "read_level": 1,
                         "read_w": TILE, "read_h": TILE, "target_mpp": MPP, "tile_px": TILE,
                         "size0": size0, "col": cols, "row": rows})


def _plain_loop(args) -> int:
    import openslide

    path, coords = args
    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        np.asarray(slide.read_region((int(x), int(y)), 1, (TILE, TILE)).convert("RGB"))
    slide.close()
    return len(coords)


def plain_reads_per_s(path: Path, tiles: pd.DataFrame, processes: int) -> float:
    coords = tiles[["x", "y"]].to_numpy()
    chunks = [(path, c) for c in np.array_split(coords, processes)]
    t0 = time.perf_counter()
    if processes == 1:
        n = _plain_loop(chunks[0])
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            n = sum(pool.map(_plain_loop, chunks))
    return n / (time.perf_counter() - t0)


def reader_reads_per_s(path: Path, tiles: pd.DataFrame, workers: int, batch: int = 64) -> float:
    import torch

    torch.set_num_threads(1)
    dataset = F.TileDataset(str(path), "bench", tiles, TILE)
    loader = F.make_loader(dataset, batch, workers)
    t0 = time.perf_counter()
    n = 0
    for images, _, ok in loader:
        n += int(ok.sum())
    return n / (time.perf_counter() - t0)


def full_vs_bare(path: Path, tiles: pd.DataFrame, batch: int, workers: int, threads: int) -> dict:
    import torch

    from histoflow.encoders import load_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = load_encoder("resnet50-trunc", allow_random_weights=True, device="cpu")
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    dataset = F.TileDataset(str(path), "bench", tiles, enc.input_size, None, enc.interpolation, enc.crop_pct)
    # the bare baseline gets its inputs for free: every batch prepared and normalised in memory
    inputs = [((torch.stack([dataset[i][0] for i in range(s, min(s + batch, len(dataset)))]).float() / 255) - mean) / std
              for s in range(0, len(dataset), batch)]
    with torch.inference_mode():
        enc.model(inputs[0][:4])  # warm-up (allocator, oneDNN kernels) for both
        t0 = time.perf_counter()
        for x in inputs:
            enc.model(x)
        bare = len(dataset) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    feats, ok = F.extract_features(dataset, enc, batch, workers, "cpu", progress=False)
    full = len(dataset) / (time.perf_counter() - t0)
    assert ok.all() and np.isfinite(feats).all()
    return {"model": enc.name, "input_size": enc.input_size, "tiles": len(dataset), "batch_size": batch,
            "workers": workers, "torch_threads": threads, "bare_tiles_per_s": bare, "full_tiles_per_s": full,
            "ratio": full / bare}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pyramid and fewer tiles (smoke run)")
    ap.add_argument("--size", type=int, default=20480)
    ap.add_argument("--read-tiles", type=int, default=1500)
    ap.add_argument("--model-tiles", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.read_tiles, args.model_tiles = 8192, 400, 64
    t0 = time.perf_counter()
    path = make_pyramid(args.size)
    build_s = time.perf_counter() - t0
    tiles = tile_grid(args.size, args.read_tiles)
    _plain_loop((path, tiles[["x", "y"]].to_numpy()[:50]))  # warm the page cache for everyone
    reads = {
        "plain_1proc": plain_reads_per_s(path, tiles, 1),
        "plain_2proc": plain_reads_per_s(path, tiles, 2),
        "histoflow_1worker": reader_reads_per_s(path, tiles, 1),
        "histoflow_2workers": reader_reads_per_s(path, tiles, 2),
    }
    cores = os.cpu_count() or 1
    model = full_vs_bare(path, tile_grid(args.size, args.model_tiles, seed=1), args.batch_size, 1, cores)
    result = {
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
        "pyramid": {"path": str(path), "size": args.size, "mpp0": MPP0, "jpeg_q": 90, "build_s": build_s},
        "reads_per_s": reads,
        "reader_vs_plain_1": reads["histoflow_1worker"] / reads["plain_1proc"],
        "reader_scaling_2_vs_1": reads["histoflow_2workers"] / reads["histoflow_1worker"],
        "full_vs_bare": model,
        "targets": {"full_vs_bare_ratio": 0.9, "reader_vs_plain_per_worker": 1.0},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"{'tile reads (256 px @ 0.5 µm/px, level 1 of a 0.25 µm/px JPEG pyramid)':<72}{'tiles/s':>10}")
    for k, v in reads.items():
        print(f"  {k:<70}{v:>10.0f}")
    print(f"  {'histoflow 1 worker / plain 1 process':<70}{result['reader_vs_plain_1']:>10.2f}")
    print(f"  {'histoflow 2 workers / 1 worker':<70}{result['reader_scaling_2_vs_1']:>10.2f}")
    print(f"{'full path vs bare forward (' + model['model'] + ', random weights, CPU)':<72}{'tiles/s':>10}")
    print(f"  {'bare forward (tensors in memory, batch ' + str(model['batch_size']) + ')':<70}{model['bare_tiles_per_s']:>10.1f}")
    print(f"  {'full path (read + resize + normalise + forward, 1 worker)':<70}{model['full_tiles_per_s']:>10.1f}")
    print(f"  {'ratio (target >= 0.9)':<70}{model['ratio']:>10.2f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
