"""A sliding-window layer's attention, forward + backward, the two ways ``msa.dense.dense_attention`` runs it:
``chunks`` = query chunks of masked SDPA (``varlen=False``; the only way before FlashAttention's own window
was used), ``flash`` = FlashAttention with its window (``varlen=True``, where ``FLASH_WINDOW``): one call, or
for a row whose fp32 dq accumulator would pass ``FLASH_WINDOW_ACCUM_BYTES``, query chunks of such calls.
Baselines in the same process: ``causal`` = dense causal SDPA over the whole row (what the layer costs
without a window), and ``flex`` = FlexAttention with a sliding-window block mask (up to ``--flex-max-n``).

Per length: milliseconds (``bench.timing.measure``), the peak memory a call adds above its inputs, and the
rel RMS of ``flash``'s and ``flex``'s outputs and ``dq`` against ``chunks``. Useful FLOPs of a window: ``4 D``
per (query, head, visible key) forward, 2.5x that backward.

    python -m bench.window --lengths 32768 131072 1048576 --heads 8 2 --window 4096 --json /tmp/window.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_kernels import rel_rms  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from bench.timing import measure  # noqa: E402
from msa.dense import FLASH_WINDOW, can_run_varlen, dense_attention  # noqa: E402
from train.metrics import attended_pairs  # noqa: E402


def _flex_window(q, k, v, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask(b, h, i, j):
        return (j <= i) & (i - j < window)

    N = q.shape[1]
    block_mask = create_block_mask(mask, None, None, N, N, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                        enable_gqa=True).transpose(1, 2)


def bench_length(N: int, H: int, Hkv: int, D: int, window: int, device, dtype, flex_max_n: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, N, h, D, generator=g).to(device, dtype).requires_grad_() for h in (H, Hkv, Hkv))
    do = torch.randn(1, N, H, D, generator=g).to(device, dtype)
    keys = int(attended_pairs(np.array([N]), window=window))  # (query, key) pairs a head attends
    row = {"N": N, "H": H, "Hkv": Hkv, "D": D, "window": window, "visible_keys_per_head": keys,
           "fwd_bwd_tflop": 3.5 * 4 * D * H * keys / 1e12}
    ways = {"chunks": lambda: dense_attention(q, k, v, window=window),
            "flash": lambda: dense_attention(q, k, v, window=window, varlen=True),
            "causal": lambda: dense_attention(q, k, v, varlen=True)}
    if N <= flex_max_n:
        try:
            ways["flex"] = _flex_window(q, k, v, window)
        except Exception as ex:  # noqa: BLE001 - an unsupported build is a result, recorded
            row["flex_status"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
    else:
        row["flex_status"] = f"skipped (N > --flex-max-n={flex_max_n})"
    outs = {}
    for name, fwd in ways.items():
        def step(fwd=fwd):  # forward + backward: the output and dq
            o = fwd()
            return o, torch.autograd.grad(o, (q, k, v), do)[0]

        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            o, dq = step()
            if device == "cuda":
                torch.cuda.synchronize()
                row[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            outs[name] = (o.detach(), dq)
            del o, dq
            row[f"{name}_ms"], row[f"{name}_timing"] = measure(step, device=device)
            if name != "causal":
                row[f"{name}_tflops"] = row["fwd_bwd_tflop"] / row[f"{name}_ms"] * 1e3
        except Exception as ex:  # noqa: BLE001 - an out-of-memory or unsupported way is a result, recorded
            row[f"{name}_status"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
    for name in ("flash", "flex"):
        if name in outs and "chunks" in outs:
            row[f"{name}_rel_rms_o_vs_chunks"] = rel_rms(outs["chunks"][0], outs[name][0])
            row[f"{name}_rel_rms_dq_vs_chunks"] = rel_rms(outs["chunks"][1], outs[name][1])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("H", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=4096)
    # create_block_mask built a dense N x N mask first: 128 GiB asked at 128K on an H100 (f6510d5)
    ap.add_argument("--flex-max-n", type=int, default=32768)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    probe = torch.empty(1, 1, 1, a.head_dim, device=device, dtype=dtype)
    res = {"meta": {**run_meta(), "flash_window": FLASH_WINDOW, "flash_runs": FLASH_WINDOW and can_run_varlen(probe)},
           "rows": []}
    if not res["meta"]["flash_runs"]:
        print("note: FlashAttention's window does not run here, so `flash` is the chunked path again")
    for N in a.lengths:
        row = bench_length(N, *a.heads, a.head_dim, a.window, device, dtype, a.flex_max_n)
        res["rows"].append(row)
        print(json.dumps(row))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
