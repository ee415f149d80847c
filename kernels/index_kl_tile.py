"""MSA index distillation loss, query-tile-outer: each program holds a tile of consecutive queries of one KV group
and walks the union of the key blocks those queries selected (``kernels.sparse_tile.tile_union``).

Same loss and gradients as ``kernels.index_kl.index_kl_fwd`` (the KV-outer form; its docstring has the math)
on the sparse phase's support, with the teacher's log-normaliser given (the main forward's ``lse``). What the
KV-outer form spends beyond the products themselves, this one does not: no reverse index of its own, no gathered
query rows, and no per-(query, slot) ``dq_idx`` partials (``B * Hkv * Nq * topk * Di`` fp32, 1 GiB for `small` at
128K) summed afterwards: a tile owns its queries, so ``dq_idx`` is accumulated in registers and written once. The
cost is the union's extra (query, block) pairs, masked out per query (a membership test against its ``topk``
blocks), and ``dk_idx``, which is per key: one fp32 atomic add of a ``[block, Di]`` tile per (tile, union block).

Two kernels: the student's log-normaliser per (query, group) over its support, then the loss partials (one per
program), ``dq_idx`` and ``dk_idx``. The teacher's ``P`` is the mean over the group's ``G`` heads of
``exp(q . k / sqrt(D) - lse)``, one ``[T, block]`` product per head, so every product has the tile's ``T`` queries
as rows (``T >= 16``, a power of two) whatever G is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import dot_ieee, plogp
from kernels.sparse_tile import tile_selection, tile_support, tile_union
from kernels.sparse_tiles import LOG2E, Tiles

__all__ = ["KL_TILE", "index_kl_tile_fwd"]

# queries per tile, warps, stages: the best of bench/tile_fwd.py's KL sweep on an H100 at 043ed09 (32K, 8/2 heads,
# a trained-like selection: 3.13 ms, against 4.10 at 32 queries, 7.2-7.9 at 64 and 10.5-55.1 at 128), and faster
# than 32 queries at every shape of that run (docs/kernels.md)
KL_TILE = Tiles(block_m=16, num_warps=4, num_stages=1)


@triton.jit
def _kl_rows(q_idx, starts, union, count, N, NQ, NT, DI, HKV: tl.constexpr, TOPK: tl.constexpr,
             TOPK_P: tl.constexpr, T: tl.constexpr, BLOCK_DI: tl.constexpr):
    """Program ``(tile, batch * Hkv + group)``'s queries: ``i_b, i_r, i_q, m_q``, their index queries ``[T, Di]``,
    their selected blocks' starts (``-1`` past the end), their key positions, the union's length and start."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_r = i_bh % HKV
    i_q = i_t * T + tl.arange(0, T)
    m_q = i_q < NQ
    i_q = tl.where(m_q, i_q, 0)
    o_di = tl.arange(0, BLOCK_DI)
    b_qi = tl.load(q_idx + ((i_b.to(tl.int64) * NQ + i_q) * HKV + i_r)[:, None] * DI + o_di[None, :],
                   mask=m_q[:, None] & (o_di < DI)[None, :], other=0.0)
    b_sel, n_u, p_u = tile_selection(starts, union, count, i_t, i_bh, i_q, m_q, NQ, NT, TOPK, TOPK_P, T)
    return i_b, i_r, i_q, m_q, b_qi, b_sel, N - NQ + i_q, n_u, p_u


@triton.jit
def _kl_block(k_idx, u, b_sel, at, i_b, N, DI, BK: tl.constexpr, BLOCK_DI: tl.constexpr):
    """The union block starting at key ``u``: its key positions and mask, its ``k_idx`` tile and which (query,
    key) pairs are in the support (the query selected the block and may see the key)."""
    kpos = u + tl.arange(0, BK)
    m_k = kpos < N
    o_di = tl.arange(0, BLOCK_DI)
    b_ki = tl.load(k_idx + (i_b.to(tl.int64) * N + kpos)[:, None] * DI + o_di[None, :],
                   mask=m_k[:, None] & (o_di < DI)[None, :], other=0.0)
    return kpos, m_k, b_ki, tile_support(b_sel, u, kpos, at)


@triton.jit
def index_kl_tile_lse_kernel(
    q_idx, k_idx, starts, union, count, lse_s, scale_s2, N, NQ, NT, DI,
    HKV: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr, BK: tl.constexpr, T: tl.constexpr,
    BLOCK_DI: tl.constexpr, IEEE: tl.constexpr,
):
    """The student's log-normaliser ``lse_s [B, Hkv, Nq]`` of the tile's queries over their support (``-inf``
    where it is empty)."""
    i_b, i_r, i_q, m_q, b_qi, b_sel, at, n_u, p_u = _kl_rows(
        q_idx, starts, union, count, N, NQ, NT, DI, HKV, TOPK, TOPK_P, T, BLOCK_DI)
    b_m = tl.full([T], float("-inf"), tl.float32)
    b_l = tl.zeros([T], tl.float32)
    for i_u in range(n_u):
        kpos, m_k, b_ki, m_s = _kl_block(k_idx, tl.load(p_u + i_u), b_sel, at, i_b, N, DI, BK, BLOCK_DI)
        b_s = tl.where(m_s, dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_s2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp2(b_m - b_ms) + tl.sum(tl.exp2(b_s - b_ms[:, None]), 1)
        b_m = b_mn
    b_lse = tl.where(b_l > 0, (b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_s + (i_b.to(tl.int64) * HKV + i_r) * NQ + i_q, b_lse, mask=m_q)


@triton.jit
def index_kl_tile_kernel(
    q, k, q_idx, k_idx, starts, union, count, lse_t, lse_s, loss, dq_idx, dk_idx, scale_t2, scale_s,
    N, NQ, NT, DI,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
    TOPK_P: tl.constexpr, BK: tl.constexpr, T: tl.constexpr, BLOCK_DI: tl.constexpr, GRAD: tl.constexpr,
    IEEE: tl.constexpr,
):
    """The tile's loss (one partial per program: ``sum P log P - P S`` over the support plus each finite
    ``lse_s``); with ``GRAD`` its ``dq_idx`` rows, written once, and each union block's ``dk_idx``, added
    atomically. Both gradients unnormalised, as the KV-outer kernel's."""
    i_b, i_r, i_q, m_q, b_qi, b_sel, at, n_u, p_u = _kl_rows(
        q_idx, starts, union, count, N, NQ, NT, DI, HKV, TOPK, TOPK_P, T, BLOCK_DI)
    o_d = tl.arange(0, D)
    o_di = tl.arange(0, BLOCK_DI)
    m_di = o_di < DI
    b_ls = tl.load(lse_s + (i_b.to(tl.int64) * HKV + i_r) * NQ + i_q, mask=m_q, other=float("-inf"))
    finite = m_q & (b_ls > float("-inf"))
    b_ls = tl.where(finite, b_ls, float("inf"))  # no support: Q = 0 everywhere, as P
    b_loss = tl.where(finite, b_ls, 0.0)
    b_dq = tl.zeros([T, BLOCK_DI], tl.float32)
    for i_u in range(n_u):
        kpos, m_k, b_ki, m_s = _kl_block(k_idx, tl.load(p_u + i_u), b_sel, at, i_b, N, DI, BK, BLOCK_DI)
        b_k = tl.load(k + ((i_b.to(tl.int64) * N + kpos) * HKV + i_r)[:, None] * D + o_d[None, :],
                      mask=m_k[:, None], other=0.0)
        b_s = dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_s
        b_p = tl.zeros([T, BK], tl.float32)
        for g in range(G):
            i_h = i_r * G + g
            b_q = tl.load(q + ((i_b.to(tl.int64) * NQ + i_q) * H + i_h)[:, None] * D + o_d[None, :],
                          mask=m_q[:, None], other=0.0)
            b_lt = tl.load(lse_t + (i_b.to(tl.int64) * H + i_h) * NQ + i_q, mask=m_q, other=float("inf"))
            # an empty teacher row (lse = -inf) contributes nothing
            b_lt = tl.where(b_lt > float("-inf"), b_lt * 1.4426950408889634, float("inf"))
            b_p += tl.exp2(dot_ieee(b_q, tl.trans(b_k), IEEE) * scale_t2 - b_lt[:, None])
        b_p = tl.where(m_s, b_p / G, 0.0)
        b_plogp = plogp(b_p)
        b_loss += tl.sum(b_plogp - b_p * tl.where(m_s, b_s, 0.0), 1)
        if GRAD:
            b_ds = tl.where(m_s, tl.exp(b_s - b_ls[:, None]) - b_p, 0.0) * scale_s
            b_dq += dot_ieee(b_ds.to(b_ki.dtype), b_ki, IEEE)
            b_dk = dot_ieee(tl.trans(b_ds.to(b_qi.dtype)), b_qi, IEEE)
            tl.atomic_add(dk_idx + (i_b.to(tl.int64) * N + kpos)[:, None] * DI + o_di[None, :], b_dk,
                          mask=m_k[:, None] & m_di[None, :], sem="relaxed")
    tl.store(loss + tl.program_id(1) * NT + tl.program_id(0), tl.sum(tl.where(m_q, b_loss, 0.0), 0))
    if GRAD:
        tl.store(dq_idx + ((i_b.to(tl.int64) * NQ + i_q) * HKV + i_r)[:, None] * DI + o_di[None, :], b_dq,
                 mask=m_q[:, None] & m_di[None, :])


def index_kl_tile_fwd(q, k, q_idx, k_idx, block_idx, block_size, tok_start, lse, grad, tiles: Tiles = KL_TILE):
    """``index_kl_fwd``'s results for the sparse phase, query-tile-outer: the loss (float32 scalar) and, with
    ``grad``, float32 ``dq_idx [B, Nq, Hkv, Di]``, ``dk_idx [B, N, Di]``, normalised by ``B * Nq * Hkv``.
    ``lse [B, H, Nq]`` is the teacher's log-normaliser on the support (the main forward's), ``tok_start`` each
    key's document start (``kernels.common.build_layout``); ``tiles.block_m`` queries per tile (a power of two,
    at least 16)."""
    B, NQ, H, D = q.shape
    N, Hkv, DI = k.shape[1], k.shape[2], q_idx.shape[-1]
    T = tiles.block_m
    if T < 16 or T & (T - 1):
        raise ValueError(f"the tile KL's queries per tile must be a power of two >= 16, got {T}")
    dev = q.device
    starts, un, count = tile_union(block_idx, tok_start, N, block_size, T)
    NT, topk = un.shape[2], starts.shape[-1]
    meta = dict(HKV=Hkv, TOPK=topk, TOPK_P=triton.next_power_of_2(topk), BK=block_size, T=T,
                BLOCK_DI=max(16, triton.next_power_of_2(DI)),
                IEEE=q.dtype == torch.float32 and q_idx.dtype == torch.float32,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    grid = (NT, B * Hkv)
    lse_s = torch.empty(B, Hkv, NQ, device=dev)
    index_kl_tile_lse_kernel[grid](q_idx, k_idx, starts, un, count, lse_s, DI ** -0.5 * LOG2E, N, NQ, NT, DI,
                                   **meta)
    loss = torch.empty(B * Hkv * NT, device=dev)
    dq = torch.empty(B, NQ, Hkv, DI, device=dev) if grad else loss
    dk = torch.zeros(B, N, DI, device=dev) if grad else loss
    index_kl_tile_kernel[grid](q, k, q_idx, k_idx, starts, un, count, lse.float().contiguous(), lse_s, loss, dq, dk,
                               D ** -0.5 * LOG2E, DI ** -0.5, N, NQ, NT, DI, H=H, G=H // Hkv, D=D, GRAD=grad, **meta)
    norm = 1.0 / (B * NQ * Hkv)
    if not grad:
        return loss.sum() * norm, None, None
    return loss.sum() * norm, dq.mul_(norm), dk.mul_(norm)
