"""Feature extraction side by side: histoflow vs LazySlide 0.13.0 vs slide2vec 7.1.4 (issue 22).

    .venv/bin/python benchmarks/peers.py [--size 40000x30000] [--rounds 3] [--tools histoflow,lazyslide,slide2vec]

* Slide: a tissue-like JPEG pyramidal TIFF at 0.25 µm/px (benchmarks/ingest.py's generator at
  ``--size``), made once in the bench cache (``.cache/bench``, $HISTOFLOW_BENCH_CACHE); with
  ``--shared`` the real slides under ../shared/data/slides are run too (one round each).
* Model: ``resnet50-trunc`` (ResNet-50 to layer3 + average pooling, 1024-d) with ONE random
  state dict (seeded) saved to a file that every tool loads; float32; ImageNet normalisation;
  224-px tiles at 0.5 µm/px from each tool's own tissue detection and grid; batch ``--batch``,
  ``--threads`` torch threads, ``--workers`` reader workers (histoflow: its job gets
  ``--threads`` cores and splits them itself, histoflow.features.plan_threads).
* Tools (each a fresh process; order interleaved A B C A B C ...):
  histoflow = ``snakemake features`` (slide QC, tissue, tiles, features; whole DAG) in this
  venv; LazySlide and slide2vec in ``{cache}/.venv-peers`` (installed with pip if missing,
  torch==2.14.1 torchvision==0.29.1 pinned: the main venv's torch is shared through a .pth).
* Measured per run: tiles, the feature phase (first batch in the model -> last features out;
  histoflow: its log line, peers: a timing wrapper around the same module), whole wall of
  the process (start-up included) and the peak RSS of its process tree (sampled every 0.1 s).
* Bare: the same module, batch and threads on random tensors in this process, repeated until
  three passes agree within 3 %.

Writes ``benchmarks/results/peers.json`` (per tool medians, min/max, ratios
``feature_ratio_vs_best_peer`` and ``feature_ratio_vs_bare``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
RESULTS = HERE / "results" / "peers.json"
SHARED = REPO.parent / "shared" / "data" / "slides"
LAZYSLIDE, SLIDE2VEC = "0.13.0", "7.1.4"
PINS = ["torch==2.14.1", "torchvision==0.29.1"]
MPP0, MPP, TILE = 0.25, 0.5, 224
BIN = Path(sys.executable).parent


def cache_dir() -> Path:
    return Path(os.environ.get("HISTOFLOW_BENCH_CACHE", REPO / ".cache" / "bench"))


# ------------------------------------------------------------------------------------ set-up

def make_slide(width: int, height: int) -> Path:
    import importlib.util

    path = cache_dir() / f"peers_{width}x{height}_v1.tiff"
    if path.is_file():
        return path
    spec = importlib.util.spec_from_file_location("bench_ingest", HERE / "ingest.py")
    ingest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest)
    ingest.WIDTH, ingest.HEIGHT, ingest.MPP = width, height, MPP0   # its generator reads these
    ingest.make_slide(path)
    return path


def make_weights() -> Path:
    """One random full ResNet-50 state dict (seeded), named as resnet50-trunc looks for it."""
    path = cache_dir() / "weights" / "resnet50-bench0000.pth"
    if path.is_file():
        return path
    import torch
    from torchvision.models import resnet50

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tmp = path.with_suffix(".part")
    torch.save(resnet50(weights=None).state_dict(), tmp)
    os.replace(tmp, path)
    return path


def peers_python() -> Path:
    """The bench venv with LazySlide and slide2vec (made and filled with pip if missing)."""
    venv = cache_dir() / ".venv-peers"
    python = venv / "bin" / "python"
    probe = "import lazyslide, slide2vec; assert lazyslide.__version__ == %r" % LAZYSLIDE
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"installing LazySlide {LAZYSLIDE} and slide2vec {SLIDE2VEC} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    import site

    # share this venv's torch (same build) instead of downloading another 2.5 GB
    site_dir = next(Path(venv, "lib").glob("python*/site-packages"))
    (site_dir / "histoflow-main.pth").write_text(site.getsitepackages()[0] + "\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    # slide2vec's hs2p extras (sam2, cucim, asap) conflict with the torch pins: its deps by hand
    subprocess.run(pip + [f"lazyslide=={LAZYSLIDE}", *PINS, "hs2p[openslide,tifffile]==6.1.0", "omegaconf",
                          "transformers>=4.47,<5", "einops", "einops-exts", "wandb"], check=True)
    subprocess.run(pip + ["--no-deps", f"slide2vec=={SLIDE2VEC}"], check=True)
    return python


# ------------------------------------------------------------------------------------ measuring

def run_measured(cmd: list[str], env: dict, cwd: Path | None = None) -> dict:
    """Run ``cmd``; wall time and the peak RSS of its whole process tree (sampled)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak[0] = max(peak[0], total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join(1)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} ... failed ({proc.returncode}):\n{(out + err)[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "stdout": out, "stderr": err}


FEATURE_LINE = re.compile(r"feature phase (\d+) tiles in ([\d.]+) s")


def run_histoflow(slide: Path, weights: Path, work: Path, args) -> dict:
    import yaml

    root = Path(tempfile.mkdtemp(prefix="histoflow-", dir=work))
    (root / "samples.tsv").write_text(f"slide_id\tpatient_id\tlabel\tsource\nbench\tP1\tnormal\t{slide}\n")
    cfg = {"samples": str(root / "samples.tsv"), "outdir": str(root / "results"),
           "tiling": {"mpp": [MPP], "tile_px": TILE},
           "features": {"encoders": ["resnet50-trunc"], "mpp": MPP, "batch_size": args.batch,
                        "num_workers": args.workers, "dtype": "float32", "weights_dir": str(weights.parent)}}
    (root / "bench.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HISTOFLOW_CACHE_DIR": str(work / "cache")}
    cmd = [str(BIN / "snakemake"), "features", "--cores", str(args.threads), "--quiet", "rules",
           "--configfile", str(REPO / "config.yaml"), str(root / "bench.yaml")]
    res = run_measured(cmd, env, cwd=REPO)
    logs = list((root / "results").rglob("logs/extract_features*/**/*.log")) + \
        list((root / "results").rglob("extract_features*/*.log"))
    text = "".join(p.read_text() for p in logs)
    match = FEATURE_LINE.search(text)
    if not match:
        raise RuntimeError(f"histoflow: no feature phase line in {logs}:\n{text[-2000:]}")
    tiles, seconds = int(match.group(1)), float(match.group(2))
    return {"tiles": tiles, "feature_s": seconds, "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"]}


WORKER = r'''
import json, sys, time
t_start = time.perf_counter()
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from histoflow.encoders import truncated_resnet50, IMAGENET_MEAN, IMAGENET_STD
model, full = truncated_resnet50()
full.load_state_dict(torch.load(spec["weights"], map_location="cpu", weights_only=True))
model.eval()

class Timed(torch.nn.Module):
    """The same module; records the feature phase (first batch in -> last features out)."""
    def __init__(self, net):
        super().__init__()
        self.net, self.first, self.last, self.n = net, None, None, 0
    def forward(self, x):
        if self.first is None:
            self.first = time.perf_counter()
        y = self.net(x)
        self.n += int(x.shape[0])
        self.last = time.perf_counter()
        return y

timed = Timed(model).eval()
tool = spec["tool"]
if tool == "lazyslide":
    import lazyslide as zs
    from torchvision.transforms import v2
    from wsidata import open_wsi
    wsi = open_wsi(spec["slide"], store=spec["store"])
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, spec["tile"], mpp=spec["mpp"])
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    feats = zs.tl.feature_extraction(wsi, timed, transform=transform, batch_size=spec["batch"],
                                     num_workers=spec["workers"], device="cpu", amp=False, pbar=False,
                                     return_features=True, model_name="bench")
    n = len(feats)
elif tool == "slide2vec":
    from hs2p import TilingConfig
    from slide2vec import Model
    from slide2vec.api import ExecutionOptions, PreprocessingConfig
    from slide2vec.encoders.base import TorchTileEncoder
    from slide2vec.encoders.registry import register_encoder

    @register_encoder("histoflow-bench", encode_dim=1024, input_size=spec["tile"], supports_variable_input_size=False,
                      supported_spacing_um=spec["mpp"], precision="fp32", source="local")
    class Bench(TorchTileEncoder):
        def __init__(self, *, output_variant=None):
            super().__init__(timed, encode_dim=1024, input_size=spec["tile"], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             output_variant=output_variant)

    m = Model.from_preset("histoflow-bench", device="cpu")
    pre = PreprocessingConfig(tiling=TilingConfig(requested_spacing_um=spec["mpp"], requested_tile_size_px=spec["tile"],
                                                  tolerance=0.05, overlap=0.0))
    exe = ExecutionOptions(output_dir=spec["store"], batch_size=spec["batch"], num_workers_per_gpu=spec["workers"],
                           num_preprocessing_workers=spec["workers"], precision="fp32")
    out = m.embed_slide(spec["slide"], preprocessing=pre, execution=exe, spacing_at_level_0=spec["mpp0"])
    n = int(out.tile_embeddings.shape[0])
print(json.dumps({"tiles": n, "forwarded": timed.n, "feature_s": (timed.last or 0) - (timed.first or 0),
                  "worker_s": time.perf_counter() - t_start}))
'''


def run_peer(tool: str, python: Path, slide: Path, weights: Path, work: Path, args) -> dict:
    store = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    # slide2vec 7.1.4 with DataLoader workers hung here (its _preload waiting on the worker queue,
    # > 500 s for a 50-tile slide): it reads in the main process (workers 0)
    workers = 0 if tool == "slide2vec" else args.workers
    spec = {"tool": tool, "slide": str(slide), "weights": str(weights), "store": str(store / "out"),
            "tile": TILE, "mpp": MPP, "mpp0": MPP0, "batch": args.batch, "workers": workers,
            "threads": args.threads}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    res = run_measured([str(python), "-c", WORKER, json.dumps(spec)], env)
    line = json.loads(res["stdout"].strip().splitlines()[-1])
    return {"tiles": line["tiles"], "feature_s": line["feature_s"], "wall_s": res["wall_s"],
            "peak_rss_mb": res["peak_rss_mb"]}


def bare_tiles_per_s(weights: Path, batch: int, threads: int, max_passes: int = 12,
                     channels_last: bool = False) -> dict:
    """The same module, batch and threads on random tensors: passes until 3 agree within 3 %.
    ``channels_last``: in the memory layout histoflow runs on CPU (features.cpu_channels_last)."""
    import torch

    from histoflow.encoders import truncated_resnet50

    torch.set_num_threads(threads)
    model, full = truncated_resnet50()
    full.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    x = torch.rand(batch, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    rates: list[float] = []
    with torch.inference_mode():
        model(x)
        for _ in range(max_passes):
            t0 = time.perf_counter()
            for _ in range(2):
                model(x)
            rates.append(2 * batch / (time.perf_counter() - t0))
            last = rates[-3:]
            if len(last) == 3 and (max(last) - min(last)) / max(last) < 0.03:
                break
    return {"tiles_per_s": statistics.median(rates[-3:]), "passes": len(rates), "all": [round(r, 2) for r in rates]}


# ------------------------------------------------------------------------------------ main

def summarise(runs: list[dict]) -> dict:
    tps = [r["tiles"] / r["feature_s"] for r in runs if r["feature_s"] > 0]
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    return {"tiles": runs[-1]["tiles"], "rounds": len(runs),
            "feature_tiles_per_s": {"median": round(statistics.median(tps), 2), "min": round(min(tps), 2),
                                    "max": round(max(tps), 2)},
            "wall_s": {"median": round(statistics.median(walls), 1), "min": round(min(walls), 1),
                       "max": round(max(walls), 1)},
            "peak_rss_mb": {"median": round(statistics.median(rss)), "max": round(max(rss))},
            "runs": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="40000x30000", help="synthetic slide WIDTHxHEIGHT (level-0 px, 0.25 µm/px)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tools", default="histoflow,lazyslide,slide2vec")
    ap.add_argument("--shared", action="store_true", help="also run the real slides in ../shared/data/slides "
                    "(.svs/.tif/.tiff; one round each)")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    slide, weights = make_slide(width, height), make_weights()
    python = peers_python() if set(tools) - {"histoflow"} else None
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for tool in tools:                    # interleaved: A B C A B C ...
                if tool in errors:
                    continue
                try:
                    res = (run_histoflow(slide, weights, work, args) if tool == "histoflow"
                           else run_peer(tool, python, slide, weights, work, args))
                except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    errors[tool] = str(err)[-1500:]
                    print(f"round {rnd + 1}: {tool} FAILED: {str(err)[-300:]}", flush=True)
                    continue
                runs[tool].append(res)
                print(f"round {rnd + 1}: {tool:<10} {res['tiles']:>6} tiles  feature {res['tiles'] / max(res['feature_s'], 1e-9):6.2f} "
                      f"tiles/s  wall {res['wall_s']:7.1f} s  peak RSS {res['peak_rss_mb']:7.0f} MB", flush=True)
        shared: dict[str, dict] = {}
        real = sorted(p for p in SHARED.glob("*") if p.suffix.lower() in (".svs", ".tif", ".tiff")) \
            if args.shared and SHARED.is_dir() else []
        for path in real:                         # one interleaved round per real slide
            for tool in tools:
                try:
                    res = (run_histoflow(path, weights, work, args) if tool == "histoflow"
                           else run_peer(tool, python, path, weights, work, args))
                    res["feature_tiles_per_s"] = round(res["tiles"] / max(res["feature_s"], 1e-9), 2)
                except Exception as err:  # noqa: BLE001
                    res = {"error": str(err)[-500:]}
                shared.setdefault(path.name, {})[tool] = res
                print(f"{path.name}: {tool}: {res}", flush=True)
        bare = bare_tiles_per_s(weights, args.batch, args.threads, channels_last=True)
        bare["layout"] = "channels_last (as histoflow runs it)"
        bare_plain = bare_tiles_per_s(weights, args.batch, args.threads)
    summary = {t: summarise(r) for t, r in runs.items() if r}
    peers = [t for t in summary if t != "histoflow"]
    result = {"slide": f"synthetic {width}x{height} px at {MPP0} µm/px (JPEG pyramid)", "model": "resnet50-trunc (one random state dict)",
              "tile_px": TILE, "mpp": MPP, "batch": args.batch, "threads": args.threads, "workers": args.workers,
              "dtype": "float32", "rounds": args.rounds, "order": "interleaved " + " ".join(tools),
              "versions": {"lazyslide": LAZYSLIDE, "slide2vec": SLIDE2VEC}, "bare": bare,
              "bare_contiguous": bare_plain, "tools": summary, "shared_slides": shared,
              "errors": errors}
    if "histoflow" in summary:
        ours = summary["histoflow"]["feature_tiles_per_s"]["median"]
        result["feature_ratio_vs_bare"] = round(ours / bare["tiles_per_s"], 3)
        if peers:
            best = max(peers, key=lambda t: summary[t]["feature_tiles_per_s"]["median"])
            result["best_peer"] = best
            result["feature_ratio_vs_best_peer"] = round(ours / summary[best]["feature_tiles_per_s"]["median"], 3)
            result["peak_rss_vs_best_peer"] = round(summary["histoflow"]["peak_rss_mb"]["median"]
                                                    / summary[best]["peak_rss_mb"]["median"], 3)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbare forward: {bare['tiles_per_s']:.2f} tiles/s channels_last ({bare['passes']} passes), "
          f"{bare_plain['tiles_per_s']:.2f} contiguous ({bare_plain['passes']} passes)")
    for t, s in summary.items():
        f = s["feature_tiles_per_s"]
        print(f"{t:<10} tiles {s['tiles']:>6}  feature tiles/s {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f})  "
              f"wall {s['wall_s']['median']:.1f} s  peak RSS {s['peak_rss_mb']['median']} MB")
    for key in ("feature_ratio_vs_best_peer", "feature_ratio_vs_bare", "peak_rss_vs_best_peer"):
        if key in result:
            print(f"{key}: {result[key]}")
    for t, e in errors.items():
        print(f"{t}: could not run: {e.splitlines()[-1] if e else '?'}")
    return 0 if "histoflow" in summary else 1


if __name__ == "__main__":
    sys.exit(main())
