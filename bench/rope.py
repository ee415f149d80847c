"""The fused rotary kernel (``kernels/rope.py``) against the PyTorch path, side by side in one process.

For one layer of a model at one row length it rotates what an MSA layer rotates (``q``, ``k``, ``q_idx``,
``k_idx``; ``--dense``: ``q``, ``k`` only), forward and backward, and records per path:
- ``device_ms``: GPU time of the forward+backward of the four (``triton.testing.do_bench``, median);
- ``host_us``: host time to launch them (wall clock of many calls without a sync, per call), what bounds a
  step when the GPU waits for the host (``docs/scaling.md``: the MSA step below 32K);
- ``kernels``: CUDA kernels launched per forward+backward (``torch.profiler``).
Run on the GPU machine from the repository root, results as JSON to ``--json``:

    python3 -m bench.rope --model small --seq-len 16384 --json runs/rope_small_16k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.meta import run_meta

SHAPES = {  # heads, KV heads, head dim, rotated dims, index dim (the conf/model presets, conf/attention/msa)
    "small": (8, 2, 128, 64, 64),
    "base": (16, 4, 128, 64, 64),
}


def tensors(model: str, n: int, dense: bool, dtype=torch.bfloat16):
    H, Hkv, D, R, Di = SHAPES[model]
    out = [(torch.randn(1, n, H, D, device="cuda", dtype=dtype), R),
           (torch.randn(1, n, Hkv, D, device="cuda", dtype=dtype), R)]
    if not dense:
        out += [(torch.randn(1, n, Hkv, Di, device="cuda", dtype=dtype), min(R, Di)),
                (torch.randn(1, n, 1, Di, device="cuda", dtype=dtype), min(R, Di))]
    return [(x.requires_grad_(True), r) for x, r in out]


def step_fn(impl: str, n: int, xs):
    from msa.rope import Rotary

    pos = torch.arange(n, device="cuda")[None]
    rot = Rotary(pos, 1e6, None, impl).build(*{r for _, r in xs})
    grads = [torch.randn_like(x) for x, _ in xs]

    def step():
        ys = [rot.apply(x, r) for x, r in xs]
        torch.autograd.backward(ys, grads)
    return step


def kernels_per_step(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_us(step, calls: int = 50) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / calls * 1e6


def main(argv=None) -> dict:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384])
    ap.add_argument("--dense", action="store_true", help="rotate q and k only (a dense layer)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    points = []
    for n in args.seq_len:
        xs = tensors(args.model, n, args.dense)
        row = {"seq_len": n, "tensors": len(xs)}
        for impl in ("torch", "triton"):
            step = step_fn(impl, n, xs)
            step()  # compile
            row[impl] = {"device_ms": do_bench(step, warmup=10, rep=50), "host_us": host_us(step),
                         "kernels": kernels_per_step(step)}
        row["device_speedup"] = row["torch"]["device_ms"] / row["triton"]["device_ms"]
        row["host_speedup"] = row["torch"]["host_us"] / row["triton"]["host_us"]
        print(json.dumps(row), flush=True)
        points.append(row)
    out = {"meta": {**run_meta(), "model": args.model, "dense": args.dense}, "points": points}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
