"""Sequence (Ulysses) and context parallelism for the attention cores, applied from outside.

The attention modules (``msa/layer.py``) do token-local work and hand the sequence-wide math to a
parameter-free ``core``: ``DenseCore(q, k, v, cu_seqlens) -> o`` or
``MSACore(q, k, v, q_idx, k_idx, cu_seqlens) -> (o, kl)``. The wrappers here take the same
arguments on a rank's token shard and return that shard's output:

- ``UlyssesCore`` (``parallel.sp_size``): DeepSpeed's all-to-all (``deepspeed.sequence``) turns
  sequence shards into head shards, so the inner core sees every token of ``Hkv/sp`` GQA groups;
  ``q_idx`` travels with its group, the shared ``k_idx`` is all-gathered.
- ``ContextParallelCore`` (``parallel.cp_size``): queries stay sharded in load-balanced zig-zag
  chunks (rank ``c`` holds chunks ``c`` and ``2*cp-1-c`` of ``2*cp``); K, V and ``k_idx`` are
  all-gathered along the sequence (gradients reduce-scattered) and the inner core runs once per
  chunk with the keys up to that chunk's end, the global ``cu_seqlens`` cut there.

Both compose (Ulysses outside, context parallel inside). ``cu_seqlens`` always describes the whole
sequence. ``kl`` comes back as this rank's share: summed over the sequence/context ranks it is the
layer's KL averaged over every query and group, as the single-process core returns it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.sequence.layer import _SeqAllToAll

from msa import reference


def zigzag_ranges(n_tokens: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """The two ``[start, end)`` token ranges context rank ``cp_rank`` holds: chunks ``cp_rank`` and
    ``2*cp_size-1-cp_rank`` of ``2*cp_size`` equal chunks (early chunks are cheap, late ones dear)."""
    if n_tokens % (2 * cp_size):
        raise ValueError(f"{n_tokens} tokens do not split into 2*parallel.cp_size={2 * cp_size} chunks")
    L = n_tokens // (2 * cp_size)
    return [(cp_rank * L, (cp_rank + 1) * L), ((2 * cp_size - 1 - cp_rank) * L, (2 * cp_size - cp_rank) * L)]


def local_token_index(n_tokens: int, sp_size: int, cp_size: int, sp_rank: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64) of the tokens a rank holds: its context rank's zig-zag chunks,
    concatenated, then split contiguously over the sequence-parallel ranks."""
    chunks = [torch.arange(s, e) for s, e in zigzag_ranges(n_tokens, cp_size, cp_rank)]
    mine = torch.cat(chunks)
    if len(mine) % sp_size:
        raise ValueError(f"{len(mine)} tokens per context rank do not split over parallel.sp_size={sp_size}")
    step = len(mine) // sp_size
    return mine[sp_rank * step:(sp_rank + 1) * step]


def truncate_cu_seqlens(cu_seqlens: torch.Tensor, end: int) -> torch.Tensor:
    """Document boundaries of the first ``end`` tokens of the sequence ``cu_seqlens`` describes."""
    inside = cu_seqlens[cu_seqlens < end]
    return torch.cat([inside, inside.new_full((1,), end)])


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1 (rank order) in forward; reduce-scatter (sum) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [p.contiguous() for p in grad.chunk(world, dim=1)]
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty_like(parts[rank])
            dist.reduce_scatter(out, parts, group=group)
            return out, None
        # gloo has no reduce-scatter: all-reduce and keep this rank's slice (CPU tests only)
        full = grad.contiguous()
        dist.all_reduce(full, group=group)
        return full.chunk(world, dim=1)[rank].contiguous(), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``x [B, n, ...]`` on each rank of ``group`` -> ``[B, world*n, ...]``, differentiable."""
    return _GatherSeq.apply(x, group)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, n, heads, d]`` sequence shard -> ``[B, world*n, heads/world, d]`` head shard."""
    return _SeqAllToAll.apply(group, x, 2, 1, 0)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, world*n, heads/world, d]`` head shard -> ``[B, n, heads, d]`` sequence shard."""
    return _SeqAllToAll.apply(group, x, 1, 2, 0)


class UlyssesCore(nn.Module):
    """Ulysses sequence parallelism around an attention core: each rank computes whole-sequence
    attention for ``1/sp`` of the GQA groups (its query heads, their K/V heads and index queries)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.world = dist.get_world_size(group)

    @property
    def stats(self) -> dict[str, float]:
        """The wrapped MSA core's selection stats (index recall, sparsity) for this rank's share."""
        return getattr(self.inner, "stats", {})

    def forward(self, q, k, v, *rest):
        *index, cu_seqlens = rest
        if k.shape[2] % self.world:
            raise ValueError(f"{k.shape[2]} KV heads do not split over parallel.sp_size={self.world}: "
                             "change parallel.sp_size (it must divide model.n_kv_heads)")
        q, k, v, *q_idx = self._exchange([q, k, v, *index[:1]])
        if not index:
            return heads_to_seq(self.inner(q, k, v, cu_seqlens), self.group)
        k_idx = gather_seq(index[1], self.group)
        o, kl = self.inner(q, k, v, q_idx[0], k_idx, cu_seqlens)
        return heads_to_seq(o, self.group), kl / self.world  # this rank holds 1/sp of the groups

    def _exchange(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sequence shard -> head shard for ``q [B, n, H, D]`` and the per-group tensors (``k``, ``v``,
        ``q_idx``: ``[B, n, Hkv, d]``) in one all-to-all: each group's slices side by side in the last
        dim, so splitting the group dim hands every rank whole groups."""
        q = tensors[0]
        B, n, H, D = q.shape
        Hkv = tensors[1].shape[2]
        if len({t.dtype for t in tensors}) > 1:
            return [seq_to_heads(t, self.group) for t in tensors]
        parts = [q.reshape(B, n, Hkv, H // Hkv * D), *tensors[1:]]
        widths = [t.shape[-1] for t in parts]
        packed = seq_to_heads(torch.cat(parts, dim=-1), self.group)  # [B, n*sp, Hkv/sp, sum(widths)]
        out = [t.contiguous() for t in packed.split(widths, dim=-1)]
        out[0] = out[0].view(B, n * self.world, H // self.world, D)
        return out


class ContextParallelCore(nn.Module):
    """Context parallelism around an attention core: the rank's two zig-zag query chunks attend to
    the all-gathered keys before them (the inner core takes queries that are the last ``Nq`` keys)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    @property
    def stats(self) -> dict[str, float]:
        """The wrapped MSA core's selection stats (index recall, sparsity) for this rank's share."""
        return getattr(self.inner, "stats", {})

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``[B, 2L, ...]`` (two zig-zag chunks) -> the whole ``[B, 2*cp*L, ...]`` in order."""
        g = gather_seq(x, self.group)
        B, L = x.shape[0], x.shape[1] // 2
        g = g.view(B, self.world, 2, L, *x.shape[2:])
        # rank r holds chunks r and 2*cp-1-r: first halves in rank order, second halves reversed
        return torch.cat([g[:, :, 0], g[:, :, 1].flip(1)], dim=1).reshape(B, 2 * self.world * L, *x.shape[2:])

    def forward(self, q, k, v, *rest):
        *index, cu_seqlens = rest
        n_local = q.shape[1]
        n_total = n_local * self.world
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, n_total], dtype=torch.int32, device=q.device)
        k, v = self._gather(k), self._gather(v)
        k_idx = self._gather(index[1]) if index else None
        outs, kls, stats = [], [], []
        for half, (start, end) in enumerate(zigzag_ranges(n_total, self.world, self.rank)):
            rows = slice(half * (n_local // 2), (half + 1) * (n_local // 2))
            cu = truncate_cu_seqlens(cu_seqlens, end)
            if not index:
                outs.append(self.inner(q[:, rows], k[:, :end], v[:, :end], cu))
                continue
            o, kl = self.inner(q[:, rows], k[:, :end], v[:, :end], index[0][:, rows], k_idx[:, :end], cu)
            outs.append(o)
            kls.append(kl)
            if getattr(self.inner, "track_stats", False):
                stats.append((self.inner.stats, _visible_pairs(cu, end, end - start)))
        o = torch.cat(outs, dim=1)
        if not index:
            return o
        if stats:
            self.inner.stats = _combine_stats(stats)
        # each chunk's kl is a mean over its n_local/2 queries; the whole sequence has n_total
        return o, sum(kls) * (n_local // 2) / n_total


def _visible_pairs(cu_seqlens: torch.Tensor, n_keys: int, n_queries: int) -> int:
    """Causal same-document (query, key) pairs of the last ``n_queries`` of ``n_keys`` positions."""
    _, pos = reference.doc_layout(1, n_keys, cu_seqlens, cu_seqlens.device)
    return int((pos[0, -n_queries:] + 1).sum())


def _combine_stats(parts: list[tuple[dict, int]]) -> dict[str, float]:
    """Index recall: mean over the chunks' equally many sampled queries; sparsity: skipped share of
    all visible pairs, each chunk weighted by its visible pairs."""
    visible = sum(n for _, n in parts)
    kept = sum((1.0 - s["sparsity"]) * n for s, n in parts)
    recall = sum(s["index_recall"] for s, _ in parts) / len(parts)
    return {"index_recall": recall, "sparsity": 1.0 - kept / visible}


__all__ = [
    "UlyssesCore", "ContextParallelCore", "zigzag_ranges", "local_token_index", "truncate_cu_seqlens",
    "gather_seq", "seq_to_heads", "heads_to_seq",
]
