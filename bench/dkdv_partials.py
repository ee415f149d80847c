"""How much memory the sparse attention backward's fp32 dK/dV partials take for a model at a row length,
counted on the CPU: all query chunks' partials at once, as the backward held them before ``dkdv_groups``,
and a group of chunks at a time, as it holds them now.

The backward holds one ``[block_size, head_dim]`` fp32 tile of dK and one of dV per work item of the
reverse CSR. A work item is up to ``chunk`` entries (query, slot) of one key block within one query chunk
(``kernels.sparse_attention.csr_sizes`` sets ``chunk`` and the chunk's queries), so a chunk has at least one
work item per key block its queries selected, and the count grows with chunks x key blocks. This script
counts them for a synthetic selection like the training step's at initialisation, where the blocks a query
picks are close to uniform over what it sees: each query's own block, block 0, and ``topk - 2`` blocks drawn
uniformly from its visible ones (with replacement: a query may repeat a block, which a real top-k never
does; at 1M tokens that is rare). It runs the real ``csr_sizes`` and ``dkdv_groups``; only the counting per bucket
(``kernels.common.build_csr`` on the GPU) is numpy here. One-document rows, batch 1.

    python -m bench.dkdv_partials --model 1b --seq-len 1048576
    python -m bench.dkdv_partials --model base --seq-len 1048576 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

GIB = 2**30


def synthetic_block_idx(N: int, Hkv: int, topk: int, block_size: int, seed: int = 0) -> np.ndarray:
    """``[Hkv, N, topk]`` key blocks of a one-document row: each query's own block, block 0, and ``topk - 2``
    blocks drawn uniformly from those it sees (with replacement)."""
    rng = np.random.default_rng(seed)
    own = np.arange(N) // block_size
    out = np.empty((Hkv, N, topk), dtype=np.int64)
    for r in range(Hkv):
        picks = [own, np.zeros_like(own)]
        picks += [(rng.random(N) * (own + 1)).astype(np.int64) for _ in range(max(topk - 2, 0))]
        out[r] = np.stack(picks[:topk], -1)
    return out


def chunk_work(block_idx: np.ndarray, block_size: int, chunk: int, q_chunk: int) -> list[int]:
    """``build_csr``'s ``chunk_work`` of a one-document row's ``block_idx [Hkv, N, topk]`` (no empty slots):
    per query chunk, each (group, key block) bucket's entries in work items of up to ``chunk``."""
    Hkv, N, _ = block_idx.shape
    nb = math.ceil(N / block_size)
    items = []
    for a in range(0, N, q_chunk):
        keys = (np.arange(Hkv)[:, None, None] * nb + block_idx[:, a:a + q_chunk]).ravel()
        counts = np.bincount(keys, minlength=Hkv * nb)
        items.append(int(np.sum(-(-counts[counts > 0] // chunk))))
    return [0, *np.cumsum(items).tolist()]


def count(model: str, N: int, overrides: list[str] | None = None) -> dict:
    from bench.meta import compose
    from kernels.sparse_attention import LAUNCH, csr_sizes, resolve_dq_path
    from kernels.sparse_attention_bwd import dkdv_groups
    from kernels.sparse_tiles import dkdv_items

    cfg = compose([f"model={model}", *(overrides or [])])
    H, Hkv, D = cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim
    topk, bs = cfg.attention.topk, cfg.attention.block_size
    dq_path = resolve_dq_path("auto", H // Hkv)
    nb = math.ceil(N / bs)
    chunk, q_chunk = csr_sizes(1, N, H, Hkv, D, topk, bs, nb, torch.bfloat16, dq_path, LAUNCH)
    cw = chunk_work(synthetic_block_idx(N, Hkv, topk, bs), bs, chunk, q_chunk)
    tile = bs * D * 4  # one fp32 [block_size, D] partial
    groups = dkdv_groups(cw, dkdv_items(LAUNCH, bs, D))
    largest = max(cw[c1] - cw[c0] for c0, c1 in groups)
    sums = 2 * N * Hkv * D * 4 if len(groups) > 1 else 0  # fp32 dK, dV sums across groups
    return {"model": model, "seq_len": N, "heads": H, "kv_heads": Hkv, "head_dim": D, "topk": topk,
            "block_size": bs, "dq_path": dq_path, "chunk": chunk, "q_chunk": q_chunk, "query_chunks": len(cw) - 1,
            "work_items": cw[-1], "all_chunks_gib": round(2 * cw[-1] * tile / GIB, 2), "groups": len(groups),
            "largest_group_items": largest, "grouped_gib": round((2 * largest * tile + sums) / GIB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["1b"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[1048576])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [count(m, n) for m in args.model for n in args.seq_len]
    print("| model | tokens | dQ path | query chunks | entries per item | work items | partials, all chunks at once "
          "(GiB) | groups | partials, a group at a time, with the fp32 sums (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['seq_len']:,} | {r['dq_path']} | {r['query_chunks']} | {r['chunk']} | "
              f"{r['work_items']:,} | {r['all_chunks_gib']} | {r['groups']} | {r['grouped_gib']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
