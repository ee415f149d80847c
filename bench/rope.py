"""The fused rotary kernel (``kernels/rope.py``) against the PyTorch path, side by side in one process.

For one layer of a model at one row length it rotates what an MSA layer rotates (``q``, ``k``, ``q_idx``,
``k_idx``; ``--dense``: ``q``, ``k`` only), forward and backward, and records per path:
- ``device_ms``: GPU time of the forward+backward of the four (``triton.testing.do_bench``, median);
- ``host_us``: host time to launch them (wall clock of many calls without a sync, per call), what bounds a
  step when the GPU waits for the host (``docs/scaling.md``: the MSA step below 32K);
- ``kernels``: CUDA kernels launched per forward+backward (``torch.profiler``).
Run on the GPU machine from the repository root, results as JSON to ``--json``:

    python3 -m bench.rope --model small --seq-len 16384 --json runs/rope_small_16k.json

``--device cpu`` (with ``TRITON_INTERPRET=1``, short rows) checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.meta import run_meta
from bench.profile_buckets import profile_step
from bench.timing import measure, sync

SHAPES = {  # heads, KV heads, head dim, rotated dims, index dim (the conf/model presets, conf/attention/msa)
    "small": (8, 2, 128, 64, 64),
    "base": (16, 4, 128, 64, 64),
}


def tensors(model: str, n: int, dense: bool, device: str = "cuda", dtype=torch.bfloat16):
    H, Hkv, D, R, Di = SHAPES[model]
    out = [(torch.randn(1, n, H, D, device=device, dtype=dtype), R),
           (torch.randn(1, n, Hkv, D, device=device, dtype=dtype), R)]
    if not dense:
        out += [(torch.randn(1, n, Hkv, Di, device=device, dtype=dtype), min(R, Di)),
                (torch.randn(1, n, 1, Di, device=device, dtype=dtype), min(R, Di))]
    return [(x.requires_grad_(True), r) for x, r in out]


def step_fn(impl: str, n: int, xs):
    from msa.rope import Rotary

    pos = torch.arange(n, device=xs[0][0].device)[None]
    rot = Rotary(pos, 1e6, None, impl).build(*{r for _, r in xs})
    grads = [torch.randn_like(x) for x, _ in xs]

    def step():
        ys = [rot.apply(x, r) for x, r in xs]
        torch.autograd.backward(ys, grads)
    return step


def kernels_per_step(step, device: str) -> int | None:
    """CUDA kernels (and copies, memsets) launched by one call of ``step`` (None off CUDA)."""
    return profile_step(step, device)["n_kernels"] if device == "cuda" else None


def host_us(step, device: str, calls: int = 50) -> float:
    """Microseconds of host time per call of ``step``, ``calls`` calls without a sync between them."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    t = time.perf_counter() - t0
    sync(device)
    return t / calls * 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384])
    ap.add_argument("--dense", action="store_true", help="rotate q and k only (a dense layer)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calls", type=int, default=50, help="calls per host-time measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    # bf16 on the GPU (what training runs); the interpreter on CPU is exact only in fp32
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    points = []
    for n in args.seq_len:
        xs = tensors(args.model, n, args.dense, args.device, dtype)
        row = {"seq_len": n, "tensors": len(xs)}
        for impl in ("torch", "triton"):
            step = step_fn(impl, n, xs)
            ms, how = measure(step, device=args.device)  # its warm-up call compiles the kernel
            row[impl] = {"device_ms": ms, "how": how, "host_us": host_us(step, args.device, args.calls),
                         "kernels": kernels_per_step(step, args.device)}
        row["device_speedup"] = row["torch"]["device_ms"] / row["triton"]["device_ms"]
        row["host_speedup"] = row["torch"]["host_us"] / row["triton"]["host_us"]
        print(json.dumps(row), flush=True)
        points.append(row)
    out = {"meta": {**run_meta(), "model": args.model, "dense": args.dense, "device": args.device,
                    "dtype": str(dtype)}, "points": points}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
