"""The MSA kernels of one attention step at a model's shapes, once each inside a CUDA profiler range, for
Nsight Compute (``ncu --profile-from-start off``): block selection, the sparse attention's forward and
backward, and the index KL (forward with its gradients) with ``attention.kl_query_stride`` 1 and, with
``--strides``, others. A warm-up call of each runs first, outside the range, so the range holds no
compilation and no autotuning. What ncu reads per kernel (speed of light, pipes, stalls, occupancy) says
what bounds it; docs/kernels.md has the readings.

Run from the repository root on the GPU machine (``bench/train_step_gpu.sh`` stage ``ncu`` does it):
``ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/ncu_msa.py``.
Without ncu it runs as a plain script and prints each call's time (one call: not a benchmark). ``--device cpu``
under ``TRITON_INTERPRET=1`` rehearses it at a small ``--seq-len`` (no profiler range, no times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import run_meta  # noqa: E402
from bench.msa_attention import make_inputs  # noqa: E402
from kernels import select_blocks, sparse_attention  # noqa: E402
from kernels.index_kl import index_kl_fwd  # noqa: E402

MODELS = {"small": dict(heads=8, hkv=2, index_dim=64), "base": dict(heads=16, hkv=4, index_dim=64)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 4], help="index KL query strides to run")
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal under TRITON_INTERPRET=1")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/ncu_msa.py: no CUDA GPU here; --device cpu with TRITON_INTERPRET=1 rehearses it")
    m = MODELS[args.model]
    print(json.dumps({**run_meta(), "args": vars(args)}), flush=True)
    torch.manual_seed(0)
    q, k, v, q_idx, k_idx, do = make_inputs(args.seq_len, m["hkv"], True, m["heads"], args.device, 128,
                                            m["index_dim"], args.block, torch.bfloat16 if cuda else torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    BK = args.block

    def select():
        return select_blocks(q_idx, k_idx, BK, args.topk)

    block_idx = select()

    def attention():
        o, lse = sparse_attention(q, k, v, block_idx, BK)
        o.backward(do)
        return lse

    lse = attention().detach()
    calls = [("select_blocks", select), ("sparse_attention_fwd_bwd", attention)]
    for s in args.strides:
        calls.append((f"index_kl_stride{s}", lambda s=s: index_kl_fwd(
            q.detach(), k.detach(), q_idx, k_idx, block_idx, BK, None, lse, True, query_stride=s)))
    for _, f in calls:  # warm-up: compile every kernel outside the profiled range
        f()
    if not cuda:
        print(json.dumps({"rehearsal": [name for name, _ in calls]}), flush=True)
        return
    torch.cuda.synchronize()
    times = {}
    torch.cuda.cudart().cudaProfilerStart()
    for name, f in calls:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.nvtx.range_push(name)
        a.record()
        f()
        b.record()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        times[name] = round(a.elapsed_time(b), 3)
    torch.cuda.cudart().cudaProfilerStop()
    print(json.dumps({"ms_one_call": times, "note": "under ncu these include its replays; without it, one call"}),
          flush=True)


if __name__ == "__main__":
    main()
