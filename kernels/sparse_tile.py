"""MSA main-branch forward and dQ, query-tile-outer: each program holds a tile of consecutive queries of one KV
group and runs a flash-attention loop over the union of the key blocks those queries selected.

The KV-outer forward (``kernels/sparse_attention.py``) computes exactly the selected (query, block) pairs,
but it gathers query rows per entry, writes a partial output per (query, slot) and merges them in a combine
kernel. With a trained indexer neighbouring queries select mostly the same blocks (``msa/tile_union``,
``docs/run_management.md``: 1.2-1.9 after training, against up to the tile's query count for unrelated
selections). Then a tile can load its query rows once, stream the union's K/V blocks through an online
softmax and write ``o`` and ``lse`` directly: no reverse index, no partials, no combine. Each row keeps
only its own blocks (a membership test of the block against the row's ``topk`` selected blocks) and the
keys it may see (causal, its document). The cost is the extra pairs: ``tile_union`` times the selected ones.
The dQ kernel walks the same unions with ``P`` from the final lse (``dq_path="tile"``); dK/dV stay KV-outer.

Same contract as ``kernels.sparse_attention.sparse_attention_fwd``: ``q [B, Nq, H, D]``, ``k, v [B, N, Hkv,
D]`` (the queries are the last ``Nq`` of the ``N`` keys), ``block_idx [B, Hkv, Nq, topk]`` int32 with block
ids relative to the query's document (``layout.tok_start``), ``-1`` for unused slots, no duplicates ->
``o [B, Nq, H, D]`` and ``lse [B, H, Nq]`` float32 (natural log; an empty support gives ``o = 0``,
``lse = -inf``). Blocks are named here by their first key's absolute position, so the queries of a tile
that spans two packed documents share one union without mixing the documents' blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.sparse_tiles import LAUNCH, LOG2E, Tiles

__all__ = ["TILE_FWD", "TILE_PAYS_BELOW", "tile_queries", "tile_union", "tile_pays", "sparse_attention_tile_fwd",
           "sparse_attention_tile_dq"]

TILE_FWD = LAUNCH.tile_fwd  # rows (query, head) per tile, warps, stages: bench/tile_fwd.py --sweep tries others
_NONE = 2**31 - 1  # sorts after every key position


def tile_queries(tiles: Tiles, G: int) -> int:
    """Queries per tile: ``block_m // G`` (whole queries, at least one)."""
    return max(1, tiles.block_m // G)


# The tile union below which the tile forward beats the KV-outer one, by G: the break-even points of
# bench/tile_fwd.py on an H100 (docs/kernels.md), the lower of 32K's and 128K's (2.8 and 2.3 at G = 4, 2.0 and
# 1.7 at G = 16), a little under them; between, linear in log2 G, and the end values below G = 4 and above 16
# (not measured there)
TILE_PAYS_BELOW = {4: 2.2, 16: 1.65}


def tile_pays(G: int, starts: torch.Tensor, count: torch.Tensor, T: int) -> bool:
    """Whether ``fwd_path="auto"`` takes the tile forward: the selection's tile union (queries x union blocks per
    visible pair selected; the last tile counted whole) under ``TILE_PAYS_BELOW`` at this G. One device->host
    read."""
    work, selected = torch.stack([count.sum(dtype=torch.int64) * T, (starts != _NONE).sum()]).tolist()
    lo, hi = TILE_PAYS_BELOW[4], TILE_PAYS_BELOW[16]
    below = lo + (hi - lo) * min(max((math.log2(G) - 2) / 2, 0.0), 1.0)
    return selected > 0 and work < below * selected


def tile_union(block_idx: torch.Tensor, tok_start: torch.Tensor, N: int, block_size: int, T: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(starts, union, count)`` for tiles of ``T`` queries: ``starts [B, Hkv, Nq, topk]`` int32, the first
    key of each selected block that the query can see (``_NONE`` elsewhere); ``union [B, Hkv, n_tiles,
    T * topk]`` int32, per tile the distinct starts in ascending order, padded with ``_NONE``; ``count [B,
    Hkv, n_tiles]`` int32, how many there are."""
    B, Hkv, NQ, topk = block_idx.shape
    dev = block_idx.device
    doc0 = tok_start[N - NQ:].to(torch.int64)  # the queries' documents' first keys
    pos = torch.arange(N - NQ, N, device=dev) - doc0  # the queries' positions in their documents
    blk = block_idx.to(torch.int64)
    seen = (blk >= 0) & (blk * block_size <= pos[:, None])
    starts = torch.where(seen, doc0[:, None] + blk * block_size, _NONE).to(torch.int32)
    n_tiles = -(-NQ // T)
    pad = starts.new_full((B, Hkv, n_tiles * T - NQ, topk), _NONE)
    u = torch.cat([starts, pad], 2).view(B, Hkv, n_tiles, T * topk).sort(-1).values
    repeat = torch.zeros_like(u, dtype=torch.bool)
    repeat[..., 1:] = u[..., 1:] == u[..., :-1]
    u = torch.where(repeat, _NONE, u).sort(-1).values
    count = (u != _NONE).sum(-1, dtype=torch.int32)
    return starts, u, count


@triton.jit
def tile_selection(starts, union, count, i_t, i_bh, i_q, m, NQ, NT, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                   T: tl.constexpr):
    """Tile ``i_t`` of group ``i_bh``: the selected blocks' starts of its rows (query ``i_q`` each, ``m`` the rows
    that exist; ``-1`` elsewhere), the length of its union and where the union starts (``tile_union``'s layout)."""
    o_s = tl.arange(0, TOPK_P)
    b_sel = tl.load(starts + ((i_bh.to(tl.int64) * NQ + i_q) * TOPK)[:, None] + o_s[None, :],
                    mask=m[:, None] & (o_s < TOPK)[None, :], other=-1)
    n_u = tl.load(count + i_bh * NT + i_t)
    return b_sel, n_u, union + (i_bh.to(tl.int64) * NT + i_t) * (T * TOPK)


@triton.jit
def tile_support(b_sel, u, kpos, at):
    """Which (row, key) pairs of the union block starting at key ``u`` (keys ``kpos``) are in a row's support: the
    row selected the block (a membership test against its starts ``b_sel``) and may see the key (``at``: the
    row's own position)."""
    member = tl.max((b_sel == u).to(tl.int32), 1) > 0
    return member[:, None] & (kpos[None, :] <= at[:, None])


@triton.jit
def _tile_rows(q, starts, union, count, N, NQ, NT, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
               TOPK: tl.constexpr, TOPK_P: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program ``(tile, batch * Hkv + group)``'s rows (query ``m // G`` of the tile, head ``m % G``): ``i_b, i_r,
    i_q, i_h, m_row``, each row's offset into ``[B, Nq, H]``, its q, its selected blocks' starts (the membership
    test of a union block), its key position, and the tile's union: its length and where it starts."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    i_q = i_t * T + o_m // G
    m_row = (o_m < T * G) & (i_q < NQ)
    i_q = tl.where(m_row, i_q, 0)
    i_b = i_bh // HKV
    i_r = i_bh % HKV
    i_h = i_r * G + o_m % G
    row = (i_b.to(tl.int64) * NQ + i_q) * H + i_h
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.0)
    b_sel, n_u, p_u = tile_selection(starts, union, count, i_t, i_bh, i_q, m_row, NQ, NT, TOPK, TOPK_P, T)
    return i_b, i_r, i_q, i_h, m_row, row, b_q, b_sel, N - NQ + i_q, n_u, p_u


@triton.jit
def _tile_block(k, v, u, b_sel, at, i_b, i_r, N, HKV: tl.constexpr, BK: tl.constexpr, D: tl.constexpr):
    """The union block starting at key ``u``: its K and V tiles and which (row, key) pairs count (the row
    selected the block and may see the key)."""
    o_d = tl.arange(0, D)
    kpos = u + tl.arange(0, BK)
    m_k = kpos < N
    p_kv = ((i_b.to(tl.int64) * N + kpos) * HKV + i_r) * D
    b_k = tl.load(k + p_kv[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
    b_v = tl.load(v + p_kv[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
    return b_k, b_v, tile_support(b_sel, u, kpos, at)


@triton.jit
def sparse_attention_tile_fwd_kernel(
    q, k, v, starts, union, count, o, lse, scale2, N, NQ, NT,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
    BK: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Program ``(tile, batch * Hkv + group)``: the tile's ``T`` queries x ``G`` heads over its union."""
    i_b, i_r, i_q, i_h, m_row, row, b_q, b_sel, at, n_u, p_u = _tile_rows(
        q, starts, union, count, N, NQ, NT, H, HKV, G, TOPK, TOPK_P, D, T, BLOCK_M)
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i_u in range(n_u):
        b_k, b_v, m_s = _tile_block(k, v, tl.load(p_u + i_u), b_sel, at, i_b, i_r, N, HKV, BK, D)
        b_s = tl.where(m_s, tl.dot(b_q, tl.trans(b_k)) * scale2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn
    nonempty = b_l > 0
    b_acc = b_acc / tl.where(nonempty, b_l, 1.0)[:, None]
    b_lse = tl.where(nonempty, (b_m + tl.log2(tl.where(nonempty, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))
    o_d = tl.arange(0, D)
    tl.store(o + row[:, None] * D + o_d[None, :], b_acc.to(o.dtype.element_ty), mask=m_row[:, None])
    tl.store(lse + (i_b.to(tl.int64) * H + i_h) * NQ + i_q, b_lse, mask=m_row)


@triton.jit
def sparse_attention_tile_dq_kernel(
    q, k, v, do, lse, delta, starts, union, count, dq, scale2, scale, N, NQ, NT,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
    BK: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ of the tile ``(program 0, batch * Hkv + group)`` over its union, as the forward walks it: ``P`` from the
    final lse, ``dS = P (dO V^T - delta)``, ``dQ = scale * dS K`` summed in the union's order; no partials."""
    i_b, i_r, i_q, i_h, m_row, row, b_q, b_sel, at, n_u, p_u = _tile_rows(
        q, starts, union, count, N, NQ, NT, H, HKV, G, TOPK, TOPK_P, D, T, BLOCK_M)
    o_d = tl.arange(0, D)
    b_do = tl.load(do + row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.0)
    o_row = (i_b.to(tl.int64) * H + i_h) * NQ + i_q
    # an empty row's lse is -inf; it has no member block, so its P is 0 everywhere
    b_lse = tl.load(lse + o_row, mask=m_row, other=0.0) * 1.4426950408889634
    b_lse = tl.where(b_lse == float("-inf"), 0.0, b_lse)
    b_delta = tl.load(delta + o_row, mask=m_row, other=0.0)
    b_dq = tl.zeros([BLOCK_M, D], tl.float32)
    for i_u in range(n_u):
        b_k, b_v, m_s = _tile_block(k, v, tl.load(p_u + i_u), b_sel, at, i_b, i_r, N, HKV, BK, D)
        b_p = tl.where(m_s, tl.exp2(tl.dot(b_q, tl.trans(b_k)) * scale2 - b_lse[:, None]), 0.0)
        b_ds = b_p * (tl.dot(b_do, tl.trans(b_v)) - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(dq + row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_row[:, None])


def sparse_attention_tile_dq(q, k, v, do, lse, delta, block_size, scale, union, tiles: Tiles = TILE_FWD, dq=None):
    """dQ over the tiles' ``union`` (``tile_union`` for ``tile_queries(tiles, G)``), ``delta = rowsum(dO O)``
    ``[B, H, Nq]`` fp32 as the KV-outer backward computes it; written to ``dq`` where given (the backward's own
    buffer), else to a new tensor."""
    B, NQ, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    T = tile_queries(tiles, G)
    starts, un, count = union
    topk = starts.shape[-1]
    dq = torch.empty_like(q) if dq is None else dq
    sparse_attention_tile_dq_kernel[(un.shape[2], B * Hkv)](
        q, k, v, do, lse, delta, starts, un, count, dq, scale * LOG2E, scale, N, NQ, un.shape[2],
        H=H, HKV=Hkv, G=G, TOPK=topk, TOPK_P=triton.next_power_of_2(topk), BK=block_size, D=D, T=T,
        BLOCK_M=max(16, triton.next_power_of_2(T * G)), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return dq


def sparse_attention_tile_fwd(q, k, v, block_idx, block_size, tok_start, scale, tiles: Tiles = TILE_FWD,
                              union=None):
    """``(o, lse)`` of the tile-outer forward; ``scale`` is the softmax scale, ``union`` what ``tile_union`` gives
    for these tiles. Where it is None it is built here from ``block_idx`` and the layout's ``tok_start``
    (``kernels.common.build_layout``), which are read for nothing else (the custom op and the benchmark's
    kernel-alone timing pass the union instead). The inputs are checked by the caller, as
    ``sparse_attention_fwd``'s are."""
    B, NQ, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    T = tile_queries(tiles, G)
    if union is None:
        union = tile_union(block_idx, tok_start, N, block_size, T)
    starts, union, count = union
    topk = starts.shape[-1]
    NT = union.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    sparse_attention_tile_fwd_kernel[(NT, B * Hkv)](
        q, k, v, starts, union, count, o, lse, scale * LOG2E, N, NQ, NT,
        H=H, HKV=Hkv, G=G, TOPK=topk, TOPK_P=triton.next_power_of_2(topk), BK=block_size, D=D, T=T,
        BLOCK_M=max(16, triton.next_power_of_2(T * G)), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return o, lse
