"""Sweep the launch settings of the index KL loss (``kernels/index_kl.py`` ``index_kl_fwd``) on a GPU.

Run from the repository root on the GPU machine: ``python3 bench/tune_index_kl.py [--json out.json]``.
Inputs as in ``bench/msa_attention.py`` (random q, k; index projections with a sink direction in block 0;
selection by ``select_blocks``; the main forward's ``lse``), B = 1, by default H = 32, D = Di = 128,
block 128, k = 16, bf16 (``small``: ``--heads 8 --hkv 2 --index-dim 64``). Each variant is
``index_kl_fwd`` with the gradient (the whole forward+backward: the backward only scales the gradients
it returns), timed by ``measure`` of ``bench/msa_attention.py``; the loss and gradients of each variant
are compared with the default's. The default's CUDA kernel
breakdown is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare_kernels import breakdown, rel_rms  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from bench.msa_attention import make_inputs, measure  # noqa: E402
from kernels import select_blocks, sparse_attention  # noqa: E402
from kernels.index_kl import index_kl_fwd  # noqa: E402

VARIANTS = [  # keyword arguments of index_kl_fwd; {} is its default (128-row chunks, 8 a program, 8 warps, 2 stages)
    {},
    {"num_stages": 3},
    {"num_stages": 1},
    {"chunks": 2},
    {"chunks": 8},
    {"chunks": 1},
    {"block_m": 64},
    {"block_m": 64, "num_stages": 1},
    {"block_m": 64, "chunks": 8},
    {"block_m": 64, "num_warps": 4},
    {"block_m": 32, "num_warps": 4},
]


def sweep_shape(N, Hkv, rows, args):
    torch.manual_seed(0)
    BK = args.block
    q, k, v, q_idx, k_idx, _ = make_inputs(N, Hkv, backward=False, n_heads=args.heads, head_dim=args.head_dim,
                                           index_dim=args.index_dim, block_size=BK)
    block_idx = select_blocks(q_idx, k_idx, BK, args.topk)
    lse = sparse_attention(q, k, v, block_idx, BK)[1]

    def run(cfg):
        return index_kl_fwd(q, k, q_idx, k_idx, block_idx, BK, None, lse, True, **cfg)

    ref = run({})
    for cfg in VARIANTS if args.only is None else [VARIANTS[i] for i in args.only]:
        try:
            ms, how = measure(lambda cfg=cfg: run(cfg), True)
            err = {n: rel_rms(a, b) for n, a, b in zip(("loss", "dq_idx", "dk_idx"), ref, run(cfg))}
        except Exception as e:  # a setting that does not launch (shared memory) is reported, not fatal
            ms, how, err = float("nan"), f"{type(e).__name__}: {str(e)[:100]}", {}
        row = {"N": N, "Hkv": Hkv, "H": args.heads, "D": args.head_dim, "Di": args.index_dim, "block": BK,
               "topk": args.topk, "config": cfg, "ms": round(ms, 3), "timing": how, "rel_vs_default": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    row = {"N": N, "Hkv": Hkv, "breakdown_default": breakdown(lambda: run({}))}
    rows.append(row)
    print(json.dumps(row, indent=1), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072])
    ap.add_argument("--hkv", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=32, help="query heads (small: 8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--index-dim", type=int, default=128, help="the index branch's dimension (small: 64)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--only", type=int, nargs="*", default=None, help="indices into VARIANTS (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    meta = run_meta()
    print(json.dumps(meta), flush=True)
    rows = []
    for N in args.sizes:
        for Hkv in args.hkv:
            sweep_shape(N, Hkv, rows, args)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
