"""CPU inference modes side by side (issue 22): what the model itself gives on CPU.

    .venv/bin/python benchmarks/cpu_modes.py [--model resnet50-trunc] [--batch 32] [--rounds 3]

The same random-weight encoder (seeded), batch and threads; tensors already in memory (the
bare forward the features loop runs). Modes, interleaved round by round:

* ``no_grad``: ``torch.no_grad`` (the reference output)
* ``inference_mode``: ``torch.inference_mode`` (what histoflow runs)
* ``channels_last``: + model and input in channels_last memory format
* ``no_mkldnn``: oneDNN off (``torch.backends.mkldnn.flags(enabled=False)``), to see what it gives
* ``frozen``: ``torch.jit.trace`` + ``torch.jit.freeze`` (conv+BN folded, oneDNN weight layouts)
* ``bf16``: ``torch.autocast('cpu', torch.bfloat16)`` (numerics change; opt-in only)

Each mode reports tiles/s (median and spread of ``--rounds`` timed passes of ``--iters``
batches) and the largest absolute difference of its features from the reference.
Writes ``benchmarks/results/cpu_modes.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "cpu_modes.json"


def build(name: str):
    import torch

    from histoflow.encoders import load_encoder

    torch.manual_seed(0)
    return load_encoder(name, allow_random_weights=True, device="cpu")


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50-trunc")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    enc = build(args.model)
    model = enc.model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, enc.input_size, enc.input_size, generator=g)
    x = (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)

    import copy

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), x[:2]))

    def run(fn, ctx):
        with ctx():
            return fn()

    modes = {
        "no_grad": (lambda: model(x), torch.no_grad),
        "inference_mode": (lambda: model(x), torch.inference_mode),
        "channels_last": (lambda: cl_model(x_cl), torch.inference_mode),
        "no_mkldnn": (lambda: model(x), lambda: _stack(torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False))),
        "frozen": (lambda: frozen(x), torch.inference_mode),
        "bf16": (lambda: model(x).float(), lambda: _stack(torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16))),
    }
    ref = run(*modes["no_grad"]).float()
    diffs, times = {}, {m: [] for m in modes}
    for name, (fn, ctx) in modes.items():
        out = run(fn, ctx).float()                     # warm-up (oneDNN primitives, freeze)
        diffs[name] = float((out - ref).abs().max())
    for _ in range(args.rounds):
        for name, (fn, ctx) in modes.items():       # interleaved: A B C ... A B C
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run(fn, ctx)
            times[name].append(args.batch * args.iters / (time.perf_counter() - t0))
    base = statistics.median(times["inference_mode"])
    rows = {name: {"tiles_per_s_median": round(statistics.median(t), 2), "tiles_per_s_min": round(min(t), 2),
                   "tiles_per_s_max": round(max(t), 2), "vs_inference_mode": round(statistics.median(t) / base, 3),
                   "max_abs_diff_vs_no_grad": diffs[name], "identical": diffs[name] == 0.0}
            for name, t in times.items()}
    result = {"model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
              "iters": args.iters, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "mkldnn": torch.backends.mkldnn.is_available(), "modes": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.iters} batches")
    print(f"{'mode':<16}{'tiles/s (med)':>14}{'min-max':>16}{'vs infer':>10}{'max |diff|':>12}")
    for name, r in rows.items():
        print(f"{name:<16}{r['tiles_per_s_median']:>14.2f}{r['tiles_per_s_min']:>8.2f}-{r['tiles_per_s_max']:<7.2f}"
              f"{r['vs_inference_mode']:>10.3f}{r['max_abs_diff_vs_no_grad']:>12.3g}")
    return 0


@contextlib.contextmanager
def _stack(*ctxs):
    with contextlib.ExitStack() as stack:
        for c in ctxs:
            stack.enter_context(c)
        yield


if __name__ == "__main__":
    sys.exit(main())
