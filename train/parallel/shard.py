"""Which tokens a rank holds, and sums over the ranks that share one sequence.

Under ``sp x cp`` sharding a packed ``[B, N]`` batch becomes one ``[1, B*N/(sp*cp)]`` shard per rank:
the sequence is cut into ``2*cp`` equal chunks, context rank ``c`` holds chunks ``c`` and ``2*cp-1-c``
(zig-zag: early chunks are cheap under causal attention, late ones dear, so the work balances), and
those are split contiguously over the ``sp`` ranks. ``cu_seqlens`` stays global: the attention cores
need the whole sequence's document boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from msa.host import remember_bounds, to_device_async
from train.parallel.mesh import Mesh


def zigzag_ranges(n_tokens: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """The two ``[start, end)`` token ranges context rank ``cp_rank`` holds: chunks ``cp_rank`` and
    ``2*cp_size-1-cp_rank`` of ``2*cp_size`` equal chunks."""
    if n_tokens % (2 * cp_size):
        raise ValueError(f"{n_tokens} tokens do not split into 2*parallel.cp_size={2 * cp_size} chunks")
    L = n_tokens // (2 * cp_size)
    return [(cp_rank * L, (cp_rank + 1) * L), ((2 * cp_size - 1 - cp_rank) * L, (2 * cp_size - cp_rank) * L)]


def local_token_index(n_tokens: int, sp_size: int, cp_size: int, sp_rank: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64) of the tokens a rank holds: its context rank's zig-zag chunks,
    concatenated, then split contiguously over the sequence-parallel ranks."""
    mine = torch.cat([torch.arange(s, e) for s, e in zigzag_ranges(n_tokens, cp_size, cp_rank)])
    if len(mine) % sp_size:
        raise ValueError(f"{len(mine)} tokens per context rank do not split over parallel.sp_size={sp_size}")
    step = len(mine) // sp_size
    return mine[sp_rank * step:(sp_rank + 1) * step]


def truncate_cu_seqlens(cu_seqlens: torch.Tensor, end: int) -> torch.Tensor:
    """Document boundaries of the first ``end`` tokens of the sequence ``cu_seqlens`` describes."""
    inside = cu_seqlens[cu_seqlens < end]
    return torch.cat([inside, inside.new_full((1,), end)])


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This rank's tokens of a packed batch (``input_ids``, ``labels``, ``position_ids`` and, with several
    data sources, ``loss_groups``); ``cu_seqlens`` stays global (rows without it become one document each);
    image patches stay whole (an image may straddle shards): ``image_keep`` picks the embeddings of this
    shard's patch slots and ``image_slots`` is re-indexed to the shard."""
    if mesh.shards == 1:
        return batch
    B, N = batch["input_ids"].shape
    device = batch["input_ids"].device
    idx = local_token_index(B * N, mesh.sp_size, mesh.cp_size, mesh.sp_rank, mesh.cp_rank).to(device)
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids", "loss_groups"):
        if key in batch:  # loss_groups: only with several data.sources
            out[key] = batch[key].reshape(-1)[idx][None]
    if batch.get("cu_seqlens") is None:  # values known here: the layers need not read them back (msa.host)
        bounds = list(range(0, B * N + 1, N))
        out["cu_seqlens"] = remember_bounds(to_device_async(bounds, device), bounds)
    slots = batch.get("image_slots")
    if slots is not None:
        local = torch.full((B * N,), -1, dtype=torch.long, device=device)
        local[idx] = torch.arange(len(idx), device=device)
        keep = (local[slots] >= 0).nonzero().squeeze(1)
        out["image_keep"], out["image_slots"] = keep, local[slots[keep]]
    return out


def shard_sum(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Sum of ``x`` over the ranks sharing one sequence (no gradient); ``x`` itself when unsharded.
    A collective: every rank of the shard group calls it alike."""
    if mesh.shards == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=mesh.shard_group)
    return total


__all__ = ["zigzag_ranges", "local_token_index", "truncate_cu_seqlens", "shard_batch", "shard_sum"]
