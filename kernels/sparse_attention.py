"""MSA main branch: exact softmax attention of each query over the blocks its GQA group selected.

Same signature and semantics as ``msa.reference.sparse_attention``: ``q [B, N, H, D]``,
``k, v [B, N, Hkv, D]``, ``block_idx`` int32 ``[B, Hkv, N, topk]`` (block ids relative to the query's
document under ``cu_seqlens``, ``-1`` for unused slots, no duplicates) -> ``o [B, N, H, D]`` and
``lse [B, H, N]`` float32 without gradient; an empty support gives ``o = 0``, ``lse = -inf``.

Supports G = H/Hkv of any size, head dim 16/32/64/128, block sizes that are powers of two >= 16
(KV-outer: <= 128), bf16/fp16/fp32 inputs with fp32 accumulation, int64 offsets (``N*H*D`` beyond
2^31). Two forward paths:

- ``query``: one program per (query, group) runs an online softmax of its G heads over its blocks.
- ``kv``: the reverse (block -> queries) CSR (``_sparse_csr``) lets one program hold a K/V block and
  multiply it against tiles of gathered (query, head) rows (64 rows: 4 queries x 16 heads; whole
  queries only, so 63 rows at G = 3); each (query, slot) gets a partial output and LSE, merged by a
  combine kernel (no atomics); hot blocks are cut into several work items. Queries are processed in
  chunks that bound the partial buffer.

Backward, after ``delta = rowsum(dO * O)``: dK/dV KV-outer over the CSR (each work item writes its own
partial, a reduce kernel sums them per block in a fixed order). dQ (``CONFIG["DQ_PATH"]``, environment
``MSA_KV_DQ_PATH``; ``auto``, the default, takes ``dkdv`` for G >= 16 and ``kv`` otherwise):
- ``kv``: KV-outer too, over the forward's CSR and query chunks: a program holds a whole K/V block,
  recomputes P and dS for its tiles of gathered rows and writes one dQ partial per (query, slot, head);
  a reduce kernel sums a query's valid slots in slot order.
- ``dkdv``: the dK/dV kernel itself writes ``dS K`` over its key tile as dQ partials (one per key tile),
  summed by the same reduce, so nothing re-gathers q and dO.
- ``query``: the query-outer kernel (one program per (query, group) over its blocks; it also writes delta).
No atomics anywhere, so the backward is deterministic.
Measured on an H200 (torch 2.11, Triton 3.6) at 128K tokens, 32 heads, D=128, Bk=128, k=16: forward
27 ms, forward+backward 91 ms (Hkv=2) and 109 ms (Hkv=4), against 907 ms for dense SDPA's
forward+backward; numbers and method in docs/kernels.md, section sparse_attention.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._sparse_csr import build_csr, build_layout, check_block_idx

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV: tl.constexpr, D: tl.constexpr):
    """The K and V rows ``o_k`` (``m_k``: inside the sequence) of batch ``i_b``, KV head ``i_r``."""
    p_kv = ((i_b.to(tl.int64) * N + o_k) * HKV + i_r)[:, None] * D + tl.arange(0, D)[None, :]
    return tl.load(k + p_kv, mask=m_k[:, None], other=0.0), tl.load(v + p_kv, mask=m_k[:, None], other=0.0)


@triton.jit
def _fwd_query_step(k, v, b_q, b_m, b_l, b_acc, o_k, m_k, i_b, i_r, N, scale2,
                    HKV: tl.constexpr, D: tl.constexpr):
    """One key tile of the query-outer online softmax: ``o_k`` keys (``m_k`` visible)."""
    b_k, b_v = _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV, D)
    # [BLOCK_G, BLOCK_N]
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
    b_s = tl.where(m_k[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_p = tl.exp2(b_s - b_ms[:, None])
    b_alpha = tl.exp2(b_m - b_ms)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_mn, b_l, b_acc


@triton.jit
def _query_group(N, NQ, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """Program ``(query, batch * Hkv + group)`` of a query-outer kernel: its ids, its key position
    ``i_n``, the group's head rows (``m_g``: real heads) and their offsets into ``[B, Nq, H, D]``."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_r = i_bh % HKV
    o_g = tl.arange(0, BLOCK_G)
    row = i_b.to(tl.int64) * NQ + i_q
    p_q = (row * H + i_r * G + o_g[:, None]) * D + tl.arange(0, D)[None, :]
    return i_q, i_bh, i_b, i_r, N - NQ + i_q, o_g, o_g < G, p_q


@triton.jit
def _slot_tile(p_idx, it, start, i_n, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile ``it`` of the flat (slot, key tile) loop: positions and visibility (invalid slots
    masked, not branched, so the loads pipeline across slots)."""
    c = tl.load(p_idx + it // (BS // BLOCK_N))
    o_k = start + c * BS + (it % (BS // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the slot's validity broadcast to the tile: Triton 3.9's interpreter rejects tile & scalar masks
    return o_k, (o_k <= i_n) & (tl.zeros_like(o_k) + c >= 0)


@triton.jit
def sparse_attention_fwd_query_kernel(
    q, k, v, idx, tok_start, o, lse, scale2, N, NQ,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_q, i_bh, i_b, i_r, i_n, o_g, m_g, p_q = _query_group(N, NQ, H, HKV, G, D, BLOCK_G)
    b_q = tl.load(q + p_q, mask=m_g[:, None], other=0.0)
    start = tl.load(tok_start + i_n)
    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, D], tl.float32)
    p_idx = idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK
    for it in range(TOPK * (BS // BLOCK_N)):
        o_k, m_k = _slot_tile(p_idx, it, start, i_n, BS, BLOCK_N)
        b_m, b_l, b_acc = _fwd_query_step(k, v, b_q, b_m, b_l, b_acc, o_k, m_k, i_b, i_r, N, scale2, HKV, D)
    nonempty = b_l > 0
    b_acc = b_acc / tl.where(nonempty, b_l, 1.0)[:, None]
    b_lse = tl.where(nonempty, (b_m + tl.log2(tl.where(nonempty, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))
    tl.store(o + p_q, b_acc.to(o.dtype.element_ty), mask=m_g[:, None])
    tl.store(lse + (i_b.to(tl.int64) * H + i_r * G + o_g) * NQ + i_q, b_lse, mask=m_g)


@triton.jit
def _kv_work_item(k, v, work_bucket, work_start, work_end, vb_start, vb_end, i_w, t0, N, NV,
                  HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Work item ``i_w`` of the reverse CSR: its entries ``[e0, e1)``, batch, group, and the K/V tile of
    ``BLOCK_N`` keys from key ``t0`` of its block (``o_k`` positions, ``m_k`` inside the block)."""
    u = tl.load(work_bucket + i_w)
    e0 = tl.load(work_start + i_w)
    e1 = tl.load(work_end + i_w)
    i_br = u // NV
    i_b = i_br // HKV
    i_r = i_br % HKV
    o_k = tl.load(vb_start + u % NV) + t0 + tl.arange(0, BLOCK_N)
    m_k = o_k < tl.load(vb_end + u % NV)
    b_k, b_v = _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV, D)
    return e0, e1, i_b, i_r, o_k, m_k, b_k, b_v


@triton.jit
def sparse_attention_fwd_kv_kernel(
    q, k, v, entries, work_bucket, work_start, work_end, vb_start, vb_end, o_part, lse_part,
    scale2, N, NQ, NV, NC, q0, w0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Work item ``w0 + program_id`` of the query chunk ``q0 .. q0+NC``: one K/V block against its
    entries; partials go to the chunk's ``o_part [B*Hkv*NC*topk*G, D]``."""
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _kv_work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                        vb_end, w0 + tl.program_id(0), 0, N, NV, HKV, D, BS)
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    o_mq = o_m // G
    h = i_r * G + o_m % G
    for e in range(e0, e1, BLOCK_M // G):
        # rows past the last whole entry (G not dividing BLOCK_M) belong to the next tile
        m_row = (e + o_mq < e1) & (o_m < (BLOCK_M // G) * G)
        ent = tl.load(entries + e + o_mq, mask=m_row, other=0).to(tl.int64)
        i_q = (ent // TOPK) % NQ
        p_q = ((i_b.to(tl.int64) * NQ + i_q) * H + h)[:, None] * D + o_d[None, :]
        b_q = tl.load(q + p_q, mask=m_row[:, None], other=0.0)
        # [BLOCK_M, BS]
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
        m_s = m_k[None, :] & (o_k[None, :] <= (N - NQ + i_q)[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mx = tl.max(b_s, 1)
        b_mx = tl.where(b_mx == float("-inf"), 0.0, b_mx)
        b_p = tl.exp2(b_s - b_mx[:, None])
        b_l = tl.sum(b_p, 1)
        b_o = tl.dot(b_p.to(b_v.dtype), b_v) / tl.where(b_l > 0, b_l, 1.0)[:, None]
        p_out = (((ent // (NQ * TOPK)) * NC + i_q - q0) * TOPK + ent % TOPK) * G + o_m % G
        tl.store(o_part + p_out[:, None] * D + o_d[None, :], b_o.to(o_part.dtype.element_ty),
                 mask=m_row[:, None])
        tl.store(lse_part + p_out, b_mx + tl.log2(tl.where(b_l > 0, b_l, 1.0)), mask=m_row)


@triton.jit
def _query_slots(tok_start, N, NQ, NC, q0, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr,
                 D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Where the merge of one (query, group)'s slot partials starts (combine, dQ reduce): program
    ``(query - q0, batch * Hkv + group)``, the query's position in its document and its first partial."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_q = q0 + i_c
    i_n = N - NQ + i_q
    o_g = tl.arange(0, BLOCK_G)
    pos = i_n - tl.load(tok_start + i_n)
    e0 = (i_bh.to(tl.int64) * NC + i_c) * TOPK
    return i_bh, i_bh // HKV, i_bh % HKV, i_q, o_g, o_g < G, tl.arange(0, D), pos, e0


@triton.jit
def sparse_attention_combine_kernel(
    o_part, lse_part, idx, tok_start, o, lse, N, NQ, NC, q0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    i_bh, i_b, i_r, i_q, o_g, m_g, o_d, pos, e0 = _query_slots(tok_start, N, NQ, NC, q0, HKV, G, TOPK, D, BLOCK_G)
    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i_s in range(TOPK):
        c = tl.load(idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK + i_s)
        if (c >= 0) & (c * BS <= pos):
            p_e = (e0 + i_s) * G + o_g
            b_ls = tl.load(lse_part + p_e, mask=m_g, other=0.0)
            b_os = tl.load(o_part + p_e[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.0)
            b_mn = tl.maximum(b_m, b_ls)
            b_alpha = tl.exp2(b_m - b_mn)
            b_w = tl.exp2(b_ls - b_mn)
            b_l = b_l * b_alpha + b_w
            b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_os.to(tl.float32)
            b_m = b_mn
    nonempty = b_l > 0
    b_acc = b_acc / tl.where(nonempty, b_l, 1.0)[:, None]
    b_lse = tl.where(nonempty, (b_m + tl.log2(tl.where(nonempty, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))
    row = i_b.to(tl.int64) * NQ + i_q
    tl.store(o + (row * H + i_r * G + o_g[:, None]) * D + o_d[None, :], b_acc.to(o.dtype.element_ty),
             mask=m_g[:, None])
    tl.store(lse + (i_b.to(tl.int64) * H + i_r * G + o_g) * NQ + i_q, b_lse, mask=m_g)


@triton.jit
def _bwd_dq_step(k, v, b_q, b_do, b_lse, b_delta, b_dq, o_k, m_k, i_b, i_r, N, scale2,
                 HKV: tl.constexpr, D: tl.constexpr):
    b_k, b_v = _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV, D)
    # [BLOCK_G, BLOCK_N]
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
    b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k)


@triton.jit
def sparse_attention_bwd_dq_kernel(
    q, k, v, o, do, lse, delta, idx, tok_start, dq, scale2, scale, N, NQ,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of a query's G heads over its blocks; also writes ``delta = rowsum(dO * O)`` for dK/dV."""
    i_q, i_bh, i_b, i_r, i_n, o_g, m_g, p_q = _query_group(N, NQ, H, HKV, G, D, BLOCK_G)
    b_q = tl.load(q + p_q, mask=m_g[:, None], other=0.0)
    b_do = tl.load(do + p_q, mask=m_g[:, None], other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * tl.load(o + p_q, mask=m_g[:, None], other=0.0).to(tl.float32), 1)
    p_row = (i_b.to(tl.int64) * H + i_r * G + o_g) * NQ + i_q
    tl.store(delta + p_row, b_delta, mask=m_g)
    b_lse = tl.load(lse + p_row, mask=m_g, other=0.0) * 1.4426950408889634
    start = tl.load(tok_start + i_n)
    b_dq = tl.zeros([BLOCK_G, D], tl.float32)
    p_idx = idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK
    for it in range(TOPK * (BS // BLOCK_N)):
        o_k, m_k = _slot_tile(p_idx, it, start, i_n, BS, BLOCK_N)
        b_dq = _bwd_dq_step(k, v, b_q, b_do, b_lse, b_delta, b_dq, o_k, m_k, i_b, i_r, N, scale2, HKV, D)
    tl.store(dq + p_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def sparse_attention_bwd_delta_kernel(o, do, delta, NQ, H: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``delta = rowsum(dO * O)`` (fp32, ``[B, H, Nq]``) of ``BLOCK_Q`` queries of one (batch, head)."""
    i_bh = tl.program_id(1)
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < NQ
    o_d = tl.arange(0, D)
    p = (((i_bh // H).to(tl.int64) * NQ + o_q) * H + i_bh % H)[:, None] * D + o_d[None, :]
    b_o = tl.load(o + p, mask=m_q[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + p, mask=m_q[:, None], other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * NQ + o_q, tl.sum(b_o * b_do, 1), mask=m_q)


@triton.jit
def _bwd_kv_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1, i_b, i_r, scale2, N, NQ,
                 H: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The KV-outer backward's tile: rows ``(entry e + m // G, head m % G)`` of a work item ending at
    ``e1`` against the keys ``o_k`` (``m_k`` in the block): gathered q and dO, ``P`` and
    ``dS = P * (dP - delta)`` ``[BLOCK_M, keys]``, each row's entry and query, and the row mask."""
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    o_mq = o_m // G
    h = i_r * G + o_m % G
    # rows past the last whole entry (G not dividing BLOCK_M) belong to the next tile
    m_row = (e + o_mq < e1) & (o_m < (BLOCK_M // G) * G)
    ent = tl.load(entries + e + o_mq, mask=m_row, other=0).to(tl.int64)
    i_q = (ent // TOPK) % NQ
    p_q = ((i_b.to(tl.int64) * NQ + i_q) * H + h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_row[:, None], other=0.0)
    b_do = tl.load(do + p_q, mask=m_row[:, None], other=0.0)
    p_row = (i_b.to(tl.int64) * H + h) * NQ + i_q
    b_lse = tl.load(lse + p_row, mask=m_row, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + p_row, mask=m_row, other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
    m_s = m_row[:, None] & m_k[None, :] & (o_k[None, :] <= (N - NQ + i_q)[:, None])
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_q, b_do, b_p, b_ds, ent, i_q, m_row


@triton.jit
def _store_dq_part(dq_part, b_ds, b_k, ent, i_q, m_row, i_t, NQ, NC, q0,
                   G: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   NSUB: tl.constexpr):
    """``dS K`` (without the softmax scale) of each (entry, head) row of the tile over the keys of
    ``b_k`` (key tile ``i_t`` of ``NSUB`` in the block), to the chunk's
    ``dq_part [B*Hkv*NC*topk*NSUB*G, D]`` (laid out like the forward's ``o_part``, key tiles inside a slot)."""
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k)
    p_out = ((((ent // (NQ * TOPK)) * NC + i_q - q0) * TOPK + ent % TOPK) * NSUB + i_t) * G + o_m % G
    tl.store(dq_part + p_out[:, None] * D + o_d[None, :], b_dq.to(dq_part.dtype.element_ty), mask=m_row[:, None])


@triton.jit
def sparse_attention_bwd_dq_kv_kernel(
    q, k, v, do, lse, delta, entries, work_bucket, work_start, work_end, vb_start, vb_end, dq_part,
    scale2, N, NQ, NV, NC, q0, w0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """KV-outer dQ, work item ``w0 + program_id`` of the query chunk ``q0 .. q0+NC``: one K/V block
    against its entries (P, dP, dS recomputed), one dQ partial per (entry, head)."""
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _kv_work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                        vb_end, w0 + tl.program_id(0), 0, N, NV, HKV, D, BS)
    for e in range(e0, e1, BLOCK_M // G):
        _, _, _, b_ds, ent, i_q, m_row = _bwd_kv_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1, i_b,
                                                      i_r, scale2, N, NQ, H, G, TOPK, D, BLOCK_M)
        _store_dq_part(dq_part, b_ds, b_k, ent, i_q, m_row, 0, NQ, NC, q0, G, TOPK, D, BLOCK_M, 1)


@triton.jit
def sparse_attention_bwd_dq_reduce_kernel(
    dq_part, idx, tok_start, dq, scale, N, NQ, NC, q0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, NSUB: tl.constexpr,
):
    """dQ of a query's G heads: the sum of its valid slots' partials (``NSUB`` key tiles each) in slot
    order (0 if none)."""
    i_bh, i_b, i_r, i_q, o_g, m_g, o_d, pos, e0 = _query_slots(tok_start, N, NQ, NC, q0, HKV, G, TOPK, D, BLOCK_G)
    b_dq = tl.zeros([BLOCK_G, D], tl.float32)
    for i_s in range(TOPK):
        c = tl.load(idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK + i_s)
        # the CSR's validity test: exactly the slots the dQ kernel wrote
        if (c >= 0) & (c * BS <= pos):
            for i_t in tl.static_range(NSUB):
                p_e = ((e0 + i_s) * NSUB + i_t) * G + o_g
                b_dq += tl.load(dq_part + p_e[:, None] * D + o_d[None, :], mask=m_g[:, None],
                                other=0.0).to(tl.float32)
    row = i_b.to(tl.int64) * NQ + i_q
    tl.store(dq + (row * H + i_r * G + o_g[:, None]) * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_g[:, None])


@triton.jit
def sparse_attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, entries, work_bucket, work_start, work_end, vb_start, vb_end,
    dk_part, dv_part, dq_part, scale2, scale, N, NQ, NV, NC, q0, w0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_DQ: tl.constexpr,
):
    """dK/dV partials of work item ``w0 + program_id(0)``, key tile ``program_id(1)``; with ``WRITE_DQ``
    also each tile's ``dS K`` over this key tile to the dQ partials of the query chunk ``q0 .. q0+NC``."""
    i_w = w0 + tl.program_id(0)
    i_t = tl.program_id(1)
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _kv_work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                        vb_end, i_w, i_t * BLOCK_N, N, NV, HKV, D, BLOCK_N)
    o_d = tl.arange(0, D)
    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    for e in range(e0, e1, BLOCK_M // G):
        b_q, b_do, b_p, b_ds, ent, i_q, m_row = _bwd_kv_tile(q, do, lse, delta, entries, b_k, b_v, o_k, m_k, e, e1,
                                                             i_b, i_r, scale2, N, NQ, H, G, TOPK, D, BLOCK_M)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
        if WRITE_DQ:
            _store_dq_part(dq_part, b_ds, b_k, ent, i_q, m_row, i_t, NQ, NC, q0, G, TOPK, D, BLOCK_M,
                           BS // BLOCK_N)
    p_out = (i_w.to(tl.int64) * BS + i_t * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * D + o_d[None, :]
    tl.store(dk_part + p_out, b_dk * scale)
    tl.store(dv_part + p_out, b_dv)


@triton.jit
def sparse_attention_bwd_reduce_kernel(
    dk_part, dv_part, bucket_work, vb_start, vb_end, dk, dv, N, NV, NB, n_chunks,
    HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of one key tile: the sum, in a fixed order, of its work items' partials."""
    u = tl.program_id(0)
    i_t = tl.program_id(1)
    i_br = u // NV
    i_b = i_br // HKV
    i_r = i_br % HKV
    k0 = tl.load(vb_start + u % NV) + i_t * BLOCK_N
    k1 = tl.load(vb_end + u % NV)
    o_d = tl.arange(0, D)
    o_t = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = k0 + tl.arange(0, BLOCK_N)
    m_k = o_k < k1
    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    for c in range(n_chunks):
        w0 = tl.load(bucket_work + c * NB + u)
        w1 = tl.load(bucket_work + c * NB + u + 1)
        p_w = (w0.to(tl.int64) * BS + o_t)[:, None] * D + o_d[None, :]
        for _ in range(w0, w1):
            b_dk += tl.load(dk_part + p_w)
            b_dv += tl.load(dv_part + p_w)
            p_w += BS * D
    p_kv = ((i_b.to(tl.int64) * N + o_k) * HKV + i_r)[:, None] * D + o_d[None, :]
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])


# Launch settings, per kernel; bench/tune_sparse_attention.py sweeps them (docs/kernels.md has the
# numbers behind the defaults). CHUNK: entries per KV-outer work item (hot blocks get several);
# PART_BYTES: memory for the KV-outer forward's partial outputs and the KV-outer dQ's (queries go in
# chunks that fit). DQ_PATH: the backward's dQ, "kv" (KV-outer kernel + reduce), "dkdv" (the dK/dV kernel
# writes dQ partials per key tile, then a reduce), "query" (query-outer kernel) or "auto": "dkdv" for
# G >= 16, where it was faster (32K and 128K on the H200), else "kv" (faster at G = 8; docs/kernels.md);
# block sizes above 128 take "query".
CONFIG = {
    "fwd_query": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd_kv": dict(BLOCK_M=64, num_warps=4, num_stages=1),
    "combine": dict(num_warps=4, num_stages=1),
    "bwd_dq": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "bwd_delta": dict(BLOCK_Q=64, num_warps=4, num_stages=1),
    "bwd_dq_kv": dict(BLOCK_M=64, num_warps=4, num_stages=1),
    "bwd_dq_reduce": dict(num_warps=4, num_stages=1),
    "bwd_dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "bwd_dkdv_dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
    "reduce": dict(num_warps=4, num_stages=1),
    "CHUNK": 256,
    "PART_BYTES": 2**32,
    "DKDV_BYTES": 2**32,
    "DQ_PATH": "auto",
}


def _setting(name: str):
    """CHUNK, PART_BYTES, DKDV_BYTES or DQ_PATH; the environment (MSA_KV_<name>) overrides CONFIG."""
    return type(CONFIG[name])(os.environ.get(f"MSA_KV_{name}", CONFIG[name]))


def _launch(name: str, G: int, block_size: int) -> dict:
    """Launch settings of kernel ``name``: tiles clipped to the block, rows padded to 16 (tensor cores)."""
    cfg = dict(CONFIG[name])
    if "BLOCK_N" in cfg:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
    if "BLOCK_M" in cfg:
        cfg["BLOCK_M"] = max(cfg["BLOCK_M"], 16, triton.next_power_of_2(G))
    if name in ("fwd_query", "combine", "bwd_dq", "bwd_dq_reduce"):
        cfg["BLOCK_G"] = max(16, triton.next_power_of_2(G))
    return cfg


def _check_inputs(q, k, v, block_idx, block_size):
    if q.ndim != 4 or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[1] < q.shape[1] \
            or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be [B, Nq, H, D] and k [B, N >= Nq, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must match k {tuple(k.shape)}, got {tuple(v.shape)}")
    B, NQ, H, D = q.shape
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"sparse_attention kernels support head dim 16, 32, 64 or 128, got D={D}: "
                         "change the model's head_dim or use attention.backend=reference")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the kernels, got {block_size} "
                         "(attention.block_size)")
    if block_idx.ndim != 4 or block_idx.shape[:3] != (B, Hkv, NQ):
        raise ValueError(f"block_idx must be [B, Hkv, Nq, topk] = [{B}, {Hkv}, {NQ}, topk], "
                         f"got {tuple(block_idx.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, H, Hkv, D


def _pick_path(path: str, G: int, block_size: int) -> str:
    """``auto``: KV-outer for G a power of two and ``block_size <= 128``. On the H200 (docs/kernels.md)
    it won forward+backward at every measured shape (8K-128K, G = 8 and 16); query-outer won only the
    8K forward alone at G = 16. Other G (tiles of ``BLOCK_M // G`` whole queries) are unmeasured."""
    if path == "auto":
        return "kv" if G & (G - 1) == 0 and block_size <= 128 else "query"
    if path == "kv" and block_size > 128:
        raise ValueError(f"path='kv' needs block_size <= 128, got {block_size}")
    if path not in ("query", "kv"):
        raise ValueError(f"path must be 'auto', 'query' or 'kv', got {path!r}")
    return path


def _dq_path(G: int, block_size: int) -> str:
    path = _setting("DQ_PATH")
    if path not in ("auto", "kv", "dkdv", "query"):
        raise ValueError(f"MSA_KV_DQ_PATH / CONFIG['DQ_PATH'] must be 'auto', 'kv', 'dkdv' or 'query', got {path!r}")
    if block_size > 128:
        return "query"  # the KV-outer dQ paths hold a whole block per program
    if path == "auto":
        return "dkdv" if G >= 16 else "kv"
    return path


def _reverse_index(q, block_idx, block_size, layout, q_chunk=None):
    """The reverse CSR; query chunks sized so the KV-outer partials (forward, dQ) fit PART_BYTES, work items
    of CHUNK entries, or more where the backward's fp32 dK/dV partials (one per work item, at most
    ``entries/chunk + buckets`` of them) would pass DKDV_BYTES (at 1M tokens, not at 128K)."""
    B, NQ, H, D = q.shape
    if q_chunk is None:
        part = torch.float32 if q.dtype == torch.float32 else q.dtype
        # the forward's o/lse partials, or the dkdv dQ path's partials (one per key tile of a block)
        G = H // block_idx.shape[1]
        n_sub = 1
        if _dq_path(G, block_size) == "dkdv":
            n_sub = block_size // _launch("bwd_dkdv_dq", G, block_size)["BLOCK_N"]
        per_query = B * H * block_idx.shape[-1] * max(D * part.itemsize + 4, n_sub * D * part.itemsize)
        q_chunk = max(1, min(NQ, _setting("PART_BYTES") // per_query))
    NB = B * block_idx.shape[1] * layout.vb_start.numel()
    max_work = max(2 * NB, _setting("DKDV_BYTES") // (block_size * D * 8))
    chunk = max(_setting("CHUNK"), -(-block_idx.numel() // (max_work - NB)))
    return build_csr(block_idx, layout, block_size, layout.tok_start.numel() - NQ, chunk, q_chunk)


def sparse_attention_fwd(q, k, v, block_idx, block_size, layout, scale, path, csr=None):
    B, NQ, H, D = q.shape
    N, Hkv, topk = k.shape[1], k.shape[2], block_idx.shape[-1]
    G = H // Hkv
    o = torch.empty_like(q)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    consts = dict(H=H, HKV=Hkv, G=G, TOPK=topk, BS=block_size, D=D)
    if path == "query":
        sparse_attention_fwd_query_kernel[(NQ, B * Hkv)](
            q, k, v, block_idx, layout.tok_start, o, lse, scale * LOG2E, N, NQ,
            **_launch("fwd_query", G, block_size), **consts)
        return o, lse
    csr = _reverse_index(q, block_idx, block_size, layout) if csr is None else csr
    # partial outputs in the input's precision (bf16/fp16 halve the bytes the combine moves)
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    NC = csr.q_chunk
    for c, q0 in enumerate(range(0, NQ, NC)):
        nc = min(NC, NQ - q0)
        o_part = torch.empty(B * Hkv * nc * topk * G, D, dtype=part_dtype, device=q.device)
        lse_part = torch.empty(B * Hkv * nc * topk * G, dtype=torch.float32, device=q.device)
        w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
        if w1 > w0:
            sparse_attention_fwd_kv_kernel[(w1 - w0,)](
                q, k, v, csr.entries, csr.work_bucket, csr.work_start, csr.work_end, layout.vb_start,
                layout.vb_end, o_part, lse_part, scale * LOG2E, N, NQ, layout.vb_start.numel(), nc, q0, w0,
                **_launch("fwd_kv", G, block_size), **consts)
        sparse_attention_combine_kernel[(nc, B * Hkv)](
            o_part, lse_part, block_idx, layout.tok_start, o, lse, N, NQ, nc, q0,
            **_launch("combine", G, block_size), **consts)
        del o_part, lse_part  # free before the next chunk's allocation: one chunk's partials at a time
    return o, lse


def sparse_attention_bwd(q, k, v, o, lse, do, block_idx, block_size, layout, scale, csr=None):
    B, NQ, H, D = q.shape
    N, Hkv, topk = k.shape[1], k.shape[2], block_idx.shape[-1]
    G = H // Hkv
    NV = layout.vb_start.numel()
    consts = dict(H=H, HKV=Hkv, G=G, TOPK=topk, BS=block_size, D=D)
    dq_path = _dq_path(G, block_size)
    delta = torch.empty_like(lse)  # [B, H, Nq]: rowsum(dO * O)
    dq = torch.empty_like(q)
    if dq_path == "query":  # the query-outer dQ kernel also writes delta
        sparse_attention_bwd_dq_kernel[(NQ, B * Hkv)](
            q, k, v, o, do, lse, delta, block_idx, layout.tok_start, dq, scale * LOG2E, scale, N, NQ,
            **_launch("bwd_dq", G, block_size), **consts)
        # dK/dV alone needs no query chunks
        csr = _reverse_index(q, block_idx, block_size, layout, NQ) if csr is None else csr
    else:
        cfg = _launch("bwd_delta", G, block_size)
        sparse_attention_bwd_delta_kernel[(triton.cdiv(NQ, cfg["BLOCK_Q"]), B * H)](o, do, delta, NQ, H=H, D=D, **cfg)
        csr = _reverse_index(q, block_idx, block_size, layout) if csr is None else csr
    W = csr.chunk_work[-1]
    dkdv = _launch("bwd_dkdv_dq" if dq_path == "dkdv" else "bwd_dkdv", G, block_size)
    n_sub = block_size // dkdv["BLOCK_N"]
    dk_part = torch.empty(max(W, 1) * block_size, D, dtype=torch.float32, device=q.device)
    dv_part = torch.empty_like(dk_part)
    kv_args = (csr.entries, csr.work_bucket, csr.work_start, csr.work_end, layout.vb_start, layout.vb_end)
    if dq_path == "dkdv":
        # dK/dV and dQ from one kernel, chunk by chunk: dQ partials per (query, slot, key tile, head)
        for c, q0, nc, dq_part in _dq_chunks(q, csr, topk, n_sub):
            w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
            if w1 > w0:
                sparse_attention_bwd_dkdv_kernel[(w1 - w0, n_sub)](
                    q, k, v, do, lse, delta, *kv_args, dk_part, dv_part, dq_part, scale * LOG2E, scale, N, NQ, NV,
                    nc, q0, w0, WRITE_DQ=True, **dkdv, **consts)
            sparse_attention_bwd_dq_reduce_kernel[(nc, B * Hkv)](
                dq_part, block_idx, layout.tok_start, dq, scale, N, NQ, nc, q0, NSUB=n_sub,
                **_launch("bwd_dq_reduce", G, block_size), **consts)
            del dq_part  # one chunk's partials at a time
    elif W:
        sparse_attention_bwd_dkdv_kernel[(W, n_sub)](
            q, k, v, do, lse, delta, *kv_args, dk_part, dv_part, dk_part, scale * LOG2E, scale, N, NQ, NV,
            1, 0, 0, WRITE_DQ=False, **dkdv, **consts)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    sparse_attention_bwd_reduce_kernel[(B * Hkv * NV, n_sub)](
        dk_part, dv_part, csr.bucket_work, layout.vb_start, layout.vb_end, dk, dv, N, NV, B * Hkv * NV,
        len(csr.chunk_work) - 1, HKV=Hkv, BS=block_size, D=D, BLOCK_N=dkdv["BLOCK_N"],
        **_launch("reduce", G, block_size))
    del dk_part, dv_part  # up to 2 x DKDV_BYTES, freed before the kv path allocates its dQ partials
    if dq_path == "kv":
        # KV-outer dQ chunk by chunk, as the KV-outer forward
        for c, q0, nc, dq_part in _dq_chunks(q, csr, topk, 1):
            w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
            if w1 > w0:
                sparse_attention_bwd_dq_kv_kernel[(w1 - w0,)](
                    q, k, v, do, lse, delta, *kv_args, dq_part, scale * LOG2E, N, NQ, NV, nc, q0, w0,
                    **_launch("bwd_dq_kv", G, block_size), **consts)
            sparse_attention_bwd_dq_reduce_kernel[(nc, B * Hkv)](
                dq_part, block_idx, layout.tok_start, dq, scale, N, NQ, nc, q0, NSUB=1,
                **_launch("bwd_dq_reduce", G, block_size), **consts)
            del dq_part  # one chunk's partials at a time
    return dq, dk, dv


def _dq_chunks(q, csr, topk, n_sub):
    """The query chunks of the CSR, each with a fresh dQ partial buffer ``[B*H*nc*topk*n_sub, D]``
    in the input's precision (fp32 for fp32 inputs): ``(chunk, q0, nc, dq_part)``."""
    B, NQ, H, D = q.shape
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    for c, q0 in enumerate(range(0, NQ, csr.q_chunk)):
        nc = min(csr.q_chunk, NQ - q0)
        yield c, q0, nc, torch.empty(B * H * nc * topk * n_sub, D, dtype=part_dtype, device=q.device)


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, cu_seqlens, scale, path):
        q, k, v, block_idx = (x.contiguous() for x in (q, k, v, block_idx))
        layout = build_layout(k.shape[1], block_size, cu_seqlens, q.device)
        csr = _reverse_index(q, block_idx, block_size, layout) if path == "kv" else None
        o, lse = sparse_attention_fwd(q, k, v, block_idx, block_size, layout, scale, path, csr)
        ctx.save_for_backward(q, k, v, o, lse, block_idx)
        ctx.layout, ctx.csr, ctx.block_size, ctx.scale = layout, csr, block_size, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, block_idx = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, o, lse, do.contiguous(), block_idx, ctx.block_size,
                                          ctx.layout, ctx.scale, ctx.csr)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                     block_size: int, cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                     path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of each query over the visible tokens of its group's selected blocks.

    ``q [B, Nq, H, D]``, ``k, v [B, N, Hkv, D]`` (``Nq <= N``: the queries are the last ``Nq``
    positions), ``block_idx`` int32 ``[B, Hkv, Nq, topk]``, ``cu_seqlens`` int32 ``[n_docs + 1]`` over
    the keys (``B == 1``) -> ``o [B, Nq, H, D]`` (dtype of ``q``) and ``lse [B, H, Nq]`` float32
    (natural log, no gradient). ``scale`` defaults to ``1/sqrt(D)``; ``path`` is ``"auto"``,
    ``"query"`` (query-outer forward) or ``"kv"`` (KV-outer forward). The backward's dQ path is a module
    setting (``CONFIG["DQ_PATH"]``, environment ``MSA_KV_DQ_PATH``), read when the backward runs.
    """
    B, H, Hkv, D = _check_inputs(q, k, v, block_idx, block_size)
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    path = _pick_path(path, H // Hkv, block_size)
    scale = D ** -0.5 if scale is None else float(scale)
    check_block_idx(block_idx, -(-k.shape[1] // block_size))  # before the int32 cast can wrap
    return SparseAttentionFunction.apply(q, k, v, block_idx.to(torch.int32), block_size, cu_seqlens,
                                         scale, path)
