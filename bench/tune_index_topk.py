"""Sweep the launch settings and knobs of ``select_blocks`` (``kernels/index_topk.py``) on a GPU.

Run from the repository root on the GPU machine: ``python3 bench/tune_index_topk.py [--json out.json]``.
Inputs as in ``bench/msa_attention.py`` (random index projections plus a sink direction in block 0),
B = 1, Di = 128, block 128, k = 16, bf16. Per (N, Hkv): the exact kernel with the insertion gate from
its default block, from block 0, from block 1000 and off; num_stages 3; query tiles of 256 rows
(``block_t * Hkv``, half the key-tile reads) with 64-key chunks; and fp8 operands with per-block and
per-token key scales (share of the exact selection's blocks kept). Times: ``measure`` of
``bench/msa_attention.py``; the fp8 rows include the torch quantiser, as ``select_blocks(fp8=True)`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import run_meta  # noqa: E402
from bench.msa_attention import index_inputs, measure  # noqa: E402
from kernels.index_topk import select_blocks_fwd  # noqa: E402

DI, BK, TOPK = 128, 128, 16
OFF = 2**31 - 1


def kept(exact, other):
    a, b = exact[..., 1:].long(), other[..., 1:].long()
    return (((a[..., :, None] == b[..., None, :]).any(-1) & (a >= 0)).sum() / (a >= 0).sum()).item()


VARIANTS = {  # name: select_blocks_fwd keyword arguments
    "exact, gate default": {},
    "exact, gate from 0": {"gate_from": 0},
    "exact, gate from 1000": {"gate_from": 1000},
    "exact, gate off": {"gate_from": OFF},
    "exact, 3 stages": {"num_stages": 3},
    "exact, 256-row tiles, 64-key chunks": {"block_t": 0, "block_n": 64},
    "fp8 block scales": {"fp8": True, "fp8_key_scale": "block"},
    "fp8 token scales": {"fp8": True, "fp8_key_scale": "token"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--hkv", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    meta = run_meta()
    print(json.dumps(meta), flush=True)
    rows = []
    for N in args.sizes:
        for Hkv in args.hkv:
            torch.manual_seed(0)
            q_idx, k_idx = index_inputs(N, Hkv)
            exact = select_blocks_fwd(q_idx, k_idx, BK, TOPK)
            flops = Hkv * DI * N * (N + 1)
            for name, kw in VARIANTS.items():
                if "block_t" in kw:
                    kw = dict(kw, block_t=256 // triton.next_power_of_2(Hkv))
                fn = lambda kw=kw, q=q_idx, k=k_idx: select_blocks_fwd(q, k, BK, TOPK, **kw)  # noqa: E731
                ms, how = measure(fn, True)
                row = {"N": N, "Hkv": Hkv, "variant": name, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9),
                       "timing": how, "kept_of_exact": round(kept(exact, fn()), 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
