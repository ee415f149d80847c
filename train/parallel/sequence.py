"""Sequence (Ulysses) and context parallelism for the attention cores, applied from outside.

An attention core (``msa/layer.py``) is called as ``core(q, k, v, cu_seqlens, index, phase,
stats_queries)`` with ``index = (q_idx, k_idx)`` for MSA (None for dense attention) and returns a
``CoreOut(o, kl, stats)``. The wrappers here take the same arguments on a rank's token shard and return
that shard's ``CoreOut``:

- ``UlyssesCore`` (``parallel.sp_size``): DeepSpeed's all-to-all (``deepspeed.sequence``) turns
  sequence shards into head shards, so the inner core sees every token of ``Hkv/sp`` GQA groups;
  ``q_idx`` travels with its group, the shared ``k_idx`` is all-gathered.
- ``ContextParallelCore`` (``parallel.cp_size``): queries stay sharded in zig-zag chunks
  (``train/parallel/shard.py``); K, V and ``k_idx`` are all-gathered along the sequence (gradients
  reduce-scattered) and the inner core runs once per chunk with the keys up to that chunk's end,
  the global ``cu_seqlens`` cut there.

Both compose (Ulysses outside, context parallel inside). ``cu_seqlens`` always describes the whole
sequence. ``kl`` comes back as this rank's share: summed over the sequence/context ranks it is the
layer's KL averaged over every query and group, as the single-process core returns it. ``stats`` are
sums (``msa/stats.py``): the shards' add up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from msa.layer import CoreOut, kl_scaled
from train.parallel.shard import truncate_cu_seqlens, zigzag_ranges


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1 (rank order) in forward; reduce-scatter (sum) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
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
    from deepspeed.sequence.layer import _SeqAllToAll  # on use: importing deepspeed prints to stdout

    return _SeqAllToAll.apply(group, x, 2, 1, 0)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, world*n, heads/world, d]`` head shard -> ``[B, n, heads, d]`` sequence shard."""
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x, 1, 2, 0)


class UlyssesCore(nn.Module):
    """Ulysses sequence parallelism around an attention core: each rank computes whole-sequence
    attention for ``1/sp`` of the query heads.

    With ``sp <= Hkv`` a rank holds whole GQA groups (their query heads, K/V heads and index queries).
    Beyond that (``replicas = sp / Hkv > 1``, as DeepSpeed's ALST Ulysses does for dense attention) the
    K/V heads and index queries are replicated over the ``replicas`` consecutive ranks that split a
    group's query heads; the replicas' gradients are summed back (``repeat_interleave``'s backward).
    The selection is the same on those ranks (same index inputs); the KL teacher and the recall need all
    of the group's heads, so the inner core gathers them over ``replica_group`` (queries, detached, and
    the attention's lse), and each replica's KL and stats count ``1/replicas``."""

    def __init__(self, inner: nn.Module, group, replicas: int = 1, replica_group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.world = dist.get_world_size(group)
        self.replicas, self.replica_group = replicas, replica_group

    def forward(self, q, k, v, cu_seqlens=None, index=None, phase="sparse", stats_queries=0, teacher=None):
        per_group = [k, v, *index[:1]] if index else [k, v]
        if self.replicas > 1:
            per_group = [t.repeat_interleave(self.replicas, dim=2) for t in per_group]
        q, k, v, *q_idx = self._exchange([q, *per_group])
        if index:
            index = (q_idx[0], gather_seq(index[1], self.group))
        teacher = self._group_heads if self.replicas > 1 else None
        with kl_scaled(1 / self.world):  # the share below, for a KL its core reports from the backward
            out = self.inner(q, k, v, cu_seqlens, index, phase, stats_queries, teacher)
        # a rank's KL is the mean over its groups: Hkv/sp of them, or (replicated) one group of Hkv that
        # `replicas` ranks each compute; either way 1/sp of the sum over ranks
        kl = None if out.kl is None else out.kl / self.world
        stats = out.stats
        if stats is not None and self.replicas > 1:
            stats = type(stats)(stats.sums / self.replicas)
        return CoreOut(heads_to_seq(out.o, self.group), kl, stats)

    def _group_heads(self, q: torch.Tensor, lse: torch.Tensor | None):
        """All of the group's query heads (``q [B, N, H/sp, D]`` -> ``[B, N, G, D]``) and their lse
        (``[B, H/sp, N]`` -> ``[B, G, N]``), gathered over the ranks that split the group."""
        q = torch.cat(_all_gather(q.contiguous(), self.replica_group), dim=2)
        if lse is not None:
            lse = torch.cat(_all_gather(lse.contiguous(), self.replica_group), dim=1)
        return q, lse

    def _exchange(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sequence shard -> head shard for ``q [B, n, H, D]`` and the per-group tensors (``k``, ``v``,
        ``q_idx``: ``[B, n, Hkv, d]``, replicated where ``replicas > 1``) in one all-to-all: each group's
        slices side by side in the last dim, so splitting the group dim hands every rank whole groups (or
        one group's replica with its share of the query heads)."""
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


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


class ContextParallelCore(nn.Module):
    """Context parallelism around an attention core: the rank's two zig-zag query chunks attend to
    the all-gathered keys before them (the inner core takes queries that are the last ``Nq`` keys)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``[B, 2L, ...]`` (two zig-zag chunks) -> the whole ``[B, 2*cp*L, ...]`` in order."""
        g = gather_seq(x, self.group)
        B, L = x.shape[0], x.shape[1] // 2
        g = g.view(B, self.world, 2, L, *x.shape[2:])
        # rank r holds chunks r and 2*cp-1-r: first halves in rank order, second halves reversed
        return torch.cat([g[:, :, 0], g[:, :, 1].flip(1)], dim=1).reshape(B, 2 * self.world * L, *x.shape[2:])

    def forward(self, q, k, v, cu_seqlens=None, index=None, phase="sparse", stats_queries=0, teacher=None):
        n_local = q.shape[1]
        n_total = n_local * self.world
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, n_total], dtype=torch.int32, device=q.device)
        k, v = self._gather(k), self._gather(v)
        k_idx = self._gather(index[1]) if index else None
        outs = []
        for half, (_, end) in enumerate(zigzag_ranges(n_total, self.world, self.rank)):
            rows = slice(half * (n_local // 2), (half + 1) * (n_local // 2))
            chunk_index = (index[0][:, rows], k_idx[:, :end]) if index else None
            with kl_scaled((n_local // 2) / n_total):  # as the kl below, for one its core reports in backward
                outs.append(self.inner(q[:, rows], k[:, :end], v[:, :end], truncate_cu_seqlens(cu_seqlens, end),
                                       chunk_index, phase, stats_queries, teacher))
        o = torch.cat([out.o for out in outs], dim=1)
        kl = None
        if index:
            # each chunk's kl is a mean over its n_local/2 queries; the whole sequence has n_total
            kl = sum(out.kl for out in outs) * (n_local // 2) / n_total
        stats = None if outs[0].stats is None else outs[0].stats + outs[1].stats
        return CoreOut(o, kl, stats)


__all__ = ["UlyssesCore", "ContextParallelCore", "gather_seq", "seq_to_heads", "heads_to_seq"]
