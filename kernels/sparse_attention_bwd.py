"""The backward of ``kernels.sparse_attention`` (its module docstring has the design): ``delta``, the
dK/dV kernel over the reverse CSR (with ``dq_path="dkdv"`` also writing dQ partials; with the index
KL in backward also its terms, ``kernels.index_kl.kl_tile``), the KV-outer dQ kernel, and the reduces
that sum the partials in a fixed order.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kernels.common import entry_query_slot
from kernels.index_kl import backward_kl_args, kl_tile
from kernels.sparse_tile import sparse_attention_tile_dq, tile_queries, tile_union
from kernels.sparse_tiles import (
    DATA_DEPENDENT,
    LAUNCH,
    LOG2E,
    _dkdv_tiles,
    _group,
    _query_slots,
    _rows,
    _warps,
    _work_item,
    dkdv_items,
)


@triton.jit
def sparse_attention_bwd_delta_kernel(o, do, delta, NQ, H: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``delta = rowsum(dO * O)`` (fp32, ``[B, H, Nq]``) of ``BLOCK_Q`` queries of one (batch, head)."""
    i_bh = tl.program_id(1)
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < NQ
    o_d = tl.arange(0, D)
    o_qd = (((i_bh // H).to(tl.int64) * NQ + o_q) * H + i_bh % H)[:, None] * D + o_d[None, :]
    b_o = tl.load(o + o_qd, mask=m_q[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + o_qd, mask=m_q[:, None], other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * NQ + o_q, tl.sum(b_o * b_do, 1), mask=m_q)


@triton.jit
def _bwd_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1, i_b, i_r, scale2, N, NQ,
              H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """The KV-outer backward's tile: rows ``(entry e + m // G, head m % G)`` of a work item ending at
    ``e1`` against the keys ``o_k`` (``m_k`` in the block): gathered q and dO, ``P`` and
    ``dS = P * (dP - delta)`` ``[BLOCK_M, keys]``, each row's slot and query, and the row mask."""
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    o_mq = o_m // G
    o_h = i_r * G + o_m % G
    # rows past the last whole entry (G not dividing BLOCK_M) belong to the next tile
    m_row = (e + o_mq < e1) & (o_m < (BLOCK_M // G) * G)
    o_q, o_slot = entry_query_slot(entries, e + o_mq, m_row, i_b * HKV + i_r, NQ, TOPK)
    o_qd = ((i_b.to(tl.int64) * NQ + o_q) * H + o_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + o_qd, mask=m_row[:, None], other=0.0)
    b_do = tl.load(do + o_qd, mask=m_row[:, None], other=0.0)
    o_row = (i_b.to(tl.int64) * H + o_h) * NQ + o_q
    b_lse = tl.load(lse + o_row, mask=m_row, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + o_row, mask=m_row, other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
    m_s = m_row[:, None] & m_k[None, :] & (o_k[None, :] <= (N - NQ + o_q)[:, None])
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_q, b_do, b_p, b_ds, o_slot, o_q, m_row


@triton.jit
def _store_dq_part(part_dq, b_ds, b_k, bh, o_slot, o_q, m_row, i_t, NC, q0,
                   G: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   NSUB: tl.constexpr):
    """``dS K`` (without the softmax scale) of each (entry, head) row of the tile (batch and group ``bh``) over the
    keys of ``b_k`` (key tile ``i_t`` of ``NSUB`` in the block), to the chunk's
    ``part_dq [B*Hkv*NC*topk*NSUB*G, D]`` (laid out like the forward's ``part_o``, key tiles inside a slot)."""
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k)
    o_part = (((bh * NC + o_q - q0) * TOPK + o_slot) * NSUB + i_t).to(tl.int64) * G + o_m % G
    tl.store(part_dq + o_part[:, None] * D + o_d[None, :], b_dq.to(part_dq.dtype.element_ty), mask=m_row[:, None])


@triton.jit(do_not_specialize=DATA_DEPENDENT)
def sparse_attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, entries, work_bucket, work_start, work_end, vb_start, vb_end, part_dq,
    scale2, N, NQ, NV, NC, q0, w0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """KV-outer dQ (``dq_path="kv"``), work item ``w0 + program_id`` of the query chunk ``q0 .. q0+NC``:
    one K/V block against its entries (P, dP, dS recomputed), one dQ partial per (entry, head)."""
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                      vb_end, w0 + tl.program_id(0), 0, N, NV, HKV, D, BK)
    for e in range(e0, e1, BLOCK_M // G):
        _, _, _, b_ds, o_slot, o_q, m_row = _bwd_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1, i_b,
                                                      i_r, scale2, N, NQ, H, HKV, G, TOPK, D, BLOCK_M)
        _store_dq_part(part_dq, b_ds, b_k, i_b * HKV + i_r, o_slot, o_q, m_row, 0, NC, q0, G, TOPK, D, BLOCK_M, 1)


@triton.jit
def sparse_attention_bwd_dq_reduce_kernel(
    part_dq, block_idx, tok_start, dq, scale, N, NQ, NC, q0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, NSUB: tl.constexpr,
):
    """dQ of a query's G heads: the sum of its valid slots' partials (``NSUB`` key tiles each) in slot
    order (0 if none)."""
    i_bh, i_b, i_r, i_q, o_g, m_g, o_d, pos, e0 = _query_slots(tok_start, N, NQ, NC, q0, HKV, G, TOPK, D, BLOCK_G)
    b_dq = tl.zeros([BLOCK_G, D], tl.float32)
    for i_s in range(TOPK):
        blk = tl.load(block_idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK + i_s)
        # the CSR's validity test: exactly the slots the dQ kernel wrote
        if (blk >= 0) & (blk * BK <= pos):
            for i_t in tl.static_range(NSUB):
                o_e = ((e0 + i_s) * NSUB + i_t) * G + o_g
                b_dq += tl.load(part_dq + o_e[:, None] * D + o_d[None, :], mask=m_g[:, None],
                                other=0.0).to(tl.float32)
    i_row = i_b.to(tl.int64) * NQ + i_q
    tl.store(dq + (i_row * H + i_r * G + o_g[:, None]) * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_g[:, None])


@triton.jit(do_not_specialize=[*DATA_DEPENDENT, "p0"])  # p0: a group's first work item, as data-dependent as w0
def sparse_attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, entries, work_bucket, work_start, work_end, vb_start, vb_end,
    part_dk, part_dv, part_dq, scale2, scale, N, NQ, NV, NC, q0, w0, p0,
    q_idx, k_idx, lse_s, kl_part, dq_idx, dk_idx, scale_i, DI,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_DQ: tl.constexpr,
    KL: tl.constexpr = False, BLOCK_DI: tl.constexpr = 16, IEEE: tl.constexpr = False,
):
    """dK/dV partials of work item ``w0 + program_id(0)`` (at row ``w - p0`` of the partials: they hold one group
    of query chunks, ``dkdv_groups``), key tile ``program_id(1)``; with ``WRITE_DQ``
    (``dq_path="dkdv"``) also each tile's ``dS K`` over this key tile to the dQ partials of the query
    chunk ``q0 .. q0+NC``; with ``KL`` the index KL on the same tiles (``kl_tile``): the program's loss
    partial to ``kl_part`` and its ``dk_idx`` by one fp32 atomic add. (Adding ``dk_idx`` per query tile
    instead, with no accumulator held across the loop, spilled less and ran slower on the H200:
    docs/kernels.md.)"""
    i_w = w0 + tl.program_id(0)
    i_t = tl.program_id(1)
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                      vb_end, i_w, i_t * BLOCK_N, N, NV, HKV, D, BLOCK_N)
    o_d = tl.arange(0, D)
    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    if KL:
        o_di = tl.arange(0, BLOCK_DI)
        o_ki = (i_b.to(tl.int64) * N + o_k)[:, None] * DI + o_di[None, :]
        m_ki = m_k[:, None] & (o_di < DI)[None, :]
        b_ki = tl.load(k_idx + o_ki, mask=m_ki, other=0.0)
        b_dki = tl.zeros([BLOCK_N, BLOCK_DI], tl.float32)
        b_kl = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    for e in range(e0, e1, BLOCK_M // G):
        b_q, b_do, b_p, b_ds, o_slot, o_q, m_row = _bwd_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1,
                                                             i_b, i_r, scale2, N, NQ, H, HKV, G, TOPK, D, BLOCK_M)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
        if WRITE_DQ:
            _store_dq_part(part_dq, b_ds, b_k, i_b * HKV + i_r, o_slot, o_q, m_row, i_t, NC, q0, G, TOPK, D,
                           BLOCK_M, BK // BLOCK_N)
        if KL:
            t_kl, t_dki = kl_tile(q_idx, b_ki, lse_s, dq_idx, b_p, o_q, m_row, o_k, m_k, i_b, i_r, scale_i, N,
                                   NQ, DI, HKV, G, BLOCK_M, BLOCK_N, BLOCK_DI, IEEE)
            b_kl += t_kl
            b_dki += t_dki
    o_part = ((i_w - p0).to(tl.int64) * BK + i_t * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * D + o_d[None, :]
    tl.store(part_dk + o_part, b_dk * scale)
    tl.store(part_dv + o_part, b_dv)
    if KL:
        tl.store(kl_part + i_w * tl.num_programs(1) + i_t, b_kl)
        tl.atomic_add(dk_idx + o_ki, b_dki, mask=m_ki, sem="relaxed")


@triton.jit(do_not_specialize=["c0", "c1", "p0"])  # a group's chunks and first work item: one variant for all
def sparse_attention_bwd_dkdv_reduce_kernel(
    part_dk, part_dv, bucket_work, vb_start, vb_end, dk, dv, N, NV, NB, c0, c1, p0,
    HKV: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, ACCUM: tl.constexpr = False,
):
    """dK/dV of one key tile: the sum, in a fixed order, of its work items' partials in query chunks
    ``c0 .. c1`` (held from work item ``p0`` on); with ``ACCUM`` added to what ``dk, dv`` hold (fp32 sums over
    groups of chunks)."""
    i_u = tl.program_id(0)
    i_t = tl.program_id(1)
    i_br = i_u // NV
    i_b = i_br // HKV
    i_r = i_br % HKV
    k0 = tl.load(vb_start + i_u % NV) + i_t * BLOCK_N
    k1 = tl.load(vb_end + i_u % NV)
    o_d = tl.arange(0, D)
    o_t = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = k0 + tl.arange(0, BLOCK_N)
    m_k = o_k < k1
    o_kv = ((i_b.to(tl.int64) * N + o_k) * HKV + i_r)[:, None] * D + o_d[None, :]
    if ACCUM:
        b_dk = tl.load(dk + o_kv, mask=m_k[:, None], other=0.0)
        b_dv = tl.load(dv + o_kv, mask=m_k[:, None], other=0.0)
    else:
        b_dk = tl.zeros([BLOCK_N, D], tl.float32)
        b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    for c in range(c0, c1):
        w0 = tl.load(bucket_work + c * NB + i_u)
        w1 = tl.load(bucket_work + c * NB + i_u + 1)
        o_w = ((w0 - p0).to(tl.int64) * BK + o_t)[:, None] * D + o_d[None, :]
        for _ in range(w0, w1):
            b_dk += tl.load(part_dk + o_w)
            b_dv += tl.load(part_dv + o_w)
            o_w += BK * D
    tl.store(dk + o_kv, b_dk.to(dk.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv + o_kv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])


def sparse_attention_bwd(q, k, v, o, lse, do, block_idx, block_size, layout, scale, csr, dq_path,
                         launch=LAUNCH, index=None):
    """``(dq, dk, dv)``; with ``index = (q_idx, k_idx, lse_s)`` (the student's log-normaliser over the
    support, ``student_lse``) also the index KL of the support, the dK/dV kernel computing it
    on its tiles: ``(dq, dk, dv, (loss, dq_idx, dk_idx))``, the loss and its float32 gradients as
    ``index_kl_loss`` defines them (``1 / (B * Nq * Hkv)`` included)."""
    B, NQ, H, D = q.shape
    N, Hkv, topk = k.shape[1], k.shape[2], block_idx.shape[-1]
    G = H // Hkv
    NV = layout.vb_start.numel()
    consts = dict(H=H, HKV=Hkv, G=G, TOPK=topk, BK=block_size, D=D)
    delta = torch.empty_like(lse)  # [B, H, Nq]: rowsum(dO * O)
    # dQ's output is needed by the dK/dV loop only on the dkdv path; the others allocate it after the loop, when
    # the dK/dV partials are freed: the two never coexist (at 1M tokens and 32 heads, an 8 GiB dQ beside 4 GiB of
    # partials and 2 GiB of fp32 sums)
    dq = torch.empty_like(q) if dq_path == "dkdv" else None
    BLOCK_Q = launch.delta.block_m
    sparse_attention_bwd_delta_kernel[(triton.cdiv(NQ, BLOCK_Q), B * H)](
        o, do, delta, NQ, H=H, D=D, BLOCK_Q=BLOCK_Q, **_warps(launch.delta))
    W = csr.chunk_work[-1]
    dkdv = _dkdv_tiles(launch, dq_path, G, block_size)
    n_sub = block_size // dkdv["BLOCK_N"]
    # fp32 dK/dV partials, a [block_size, D] tile per work item, for one group of query chunks at a time. All
    # chunks at once grow with the square of the row (each chunk has a work item per key block it sees): `1b`
    # at 1M has 0.5M of them, 2 x 30.7 GiB, which ran an H100 out of memory. A group keeps both buffers within
    # dkdv_bytes together (one query chunk over it is a group of its own).
    groups = dkdv_groups(csr.chunk_work, dkdv_items(launch, block_size, D))
    items = max(max(csr.chunk_work[c1] - csr.chunk_work[c0] for c0, c1 in groups), 1)
    part_dk = torch.empty(items * block_size, D, dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    # one group: its reduce writes dK/dV; several: each group's reduce adds to fp32 sums (the first one writes
    # them), cast to dK/dV once the partials are freed
    sum_dtype = k.dtype if len(groups) == 1 else torch.float32
    dk_sum, dv_sum = torch.empty_like(k, dtype=sum_dtype), torch.empty_like(v, dtype=sum_dtype)
    kv_args = (csr.entries, csr.work_bucket, csr.work_start, csr.work_end, layout.vb_start, layout.vb_end)
    dq_reduce = _group(launch.dq_reduce, G)
    kl = backward_kl_args(q, k, index, max(W, 1) * n_sub)
    dq_chunks = _dq_chunks(q, csr, topk, n_sub)
    # the reduce's key tile is its own (the partials are laid out per key, not per dK/dV tile)
    red_n = min(launch.dkdv_reduce.block_n, block_size)
    for g, (c0, c1) in enumerate(groups):
        p0 = csr.chunk_work[c0]
        if dq_path == "dkdv":
            # dK/dV and dQ from one kernel, chunk by chunk: dQ partials per (query, slot, key tile, head)
            for c, q0, nc, part_dq in itertools.islice(dq_chunks, c1 - c0):
                w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
                if w1 > w0:
                    sparse_attention_bwd_dkdv_kernel[(w1 - w0, n_sub)](
                        q, k, v, do, lse, delta, *kv_args, part_dk, part_dv, part_dq, scale * LOG2E, scale, N, NQ,
                        NV, nc, q0, w0, p0, *kl.args, WRITE_DQ=True, **kl.meta, **dkdv, **consts)
                sparse_attention_bwd_dq_reduce_kernel[(nc, B * Hkv)](
                    part_dq, block_idx, layout.tok_start, dq, scale, N, NQ, nc, q0, NSUB=n_sub, **dq_reduce,
                    **consts)
                del part_dq  # one chunk's partials at a time
        elif csr.chunk_work[c1] > p0:
            sparse_attention_bwd_dkdv_kernel[(csr.chunk_work[c1] - p0, n_sub)](
                q, k, v, do, lse, delta, *kv_args, part_dk, part_dv, part_dk, scale * LOG2E, scale, N, NQ, NV,
                1, 0, p0, p0, *kl.args, WRITE_DQ=False, **kl.meta, **dkdv, **consts)
        sparse_attention_bwd_dkdv_reduce_kernel[(B * Hkv * NV, block_size // red_n)](
            part_dk, part_dv, csr.bucket_work, layout.vb_start, layout.vb_end, dk_sum, dv_sum, N, NV, B * Hkv * NV,
            c0, c1, p0, HKV=Hkv, BK=block_size, D=D, BLOCK_N=red_n, ACCUM=g > 0, **_warps(launch.dkdv_reduce))
    del part_dk, part_dv  # freed before dQ and the kv path's dQ partials are allocated
    dk, dv = dk_sum.to(k.dtype), dv_sum.to(v.dtype)
    del dk_sum, dv_sum
    if dq is None:
        dq = torch.empty_like(q)
    if dq_path == "tile":  # each tile of queries over the union of its blocks (kernels/sparse_tile.py); the union
        # is built again here (two sorts of the selection): the forward's is not kept
        T = tile_queries(launch.tile_fwd, G)
        union = tile_union(block_idx, layout.tok_start, N, block_size, T)
        sparse_attention_tile_dq(q, k, v, do, lse, delta, block_size, scale, union, launch.tile_fwd, dq)
    if dq_path == "kv":
        # KV-outer dQ chunk by chunk, as the forward
        for c, q0, nc, part_dq in _dq_chunks(q, csr, topk, 1):
            w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
            if w1 > w0:
                sparse_attention_bwd_dq_kernel[(w1 - w0,)](
                    q, k, v, do, lse, delta, *kv_args, part_dq, scale * LOG2E, N, NQ, NV, nc, q0, w0,
                    **_rows(launch.dq, G), **consts)
            sparse_attention_bwd_dq_reduce_kernel[(nc, B * Hkv)](
                part_dq, block_idx, layout.tok_start, dq, scale, N, NQ, nc, q0, NSUB=1, **dq_reduce, **consts)
            del part_dq  # one chunk's partials at a time
    if index is None:
        return dq, dk, dv
    return dq, dk, dv, kl.result(B * NQ * Hkv)


def dkdv_groups(chunk_work: list[int], max_items: int) -> list[tuple[int, int]]:
    """Consecutive query chunks ``[c0, c1)`` whose dK/dV work items (``chunk_work``: chunk ``c`` has items
    ``chunk_work[c] .. chunk_work[c+1]``) number at most ``max_items`` together; a chunk with more is a group
    of its own. Every chunk is in exactly one group, in order."""
    groups, c0 = [], 0
    n = len(chunk_work) - 1
    for c in range(1, n + 1):
        if chunk_work[c] - chunk_work[c0] > max_items and c - 1 > c0:
            groups.append((c0, c - 1))
            c0 = c - 1
    groups.append((c0, max(n, c0 + 1)))
    return groups


def _dq_chunks(q, csr, topk, n_sub):
    """The query chunks of the CSR, each with a fresh dQ partial buffer ``[B*H*nc*topk*n_sub, D]``
    in the input's precision (fp32 for fp32 inputs): ``(chunk, q0, nc, part_dq)``."""
    B, NQ, H, D = q.shape
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    for c, q0 in enumerate(range(0, NQ, csr.q_chunk)):
        nc = min(csr.q_chunk, NQ - q0)
        yield c, q0, nc, torch.empty(B * H * nc * topk * n_sub, D, dtype=part_dtype, device=q.device)
