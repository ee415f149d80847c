"""MSA index distillation loss: ``KL(teacher || student)`` over the attention support, fused, KV-outer.

The support of query ``i`` in group ``r`` is the visible tokens of the blocks in ``block_idx[r, i]``
(sparse phase) or every visible token (``block_idx=None``, dense warm-up). The teacher is the mean
over the group's ``G`` heads of ``softmax(q . k / sqrt(D))`` on the support, recomputed tile by tile
from ``q``, ``k`` and its log-normaliser ``lse [B, H, N]``: the main forward's, or one computed here
over the same support when ``lse`` is None. The student is ``softmax(q_idx . k_idx / sqrt(Di))`` on
the same support. Per row, with ``P`` summing to one on the support::

    KL = sum_j P_j log P_j - sum_j P_j S_j + lse_S,     dKL/dS_j = Q_j - P_j

Work is KV-outer: each (query, slot) entry names one key block; the entries are sorted by key block
(a CSR built on the device by ``torch.sort``), padded per block to ``BLOCK_M``-row chunks, and one
program loads a block's ``k_idx`` and ``k`` tiles once and runs over up to ``chunks`` chunks of gathered
queries (hot blocks such as the sinks are split across programs). Pass 1 writes per-entry partial
log-normalisers; pass 2 writes per-chunk loss partials, per-entry ``dq_idx`` partials (summed over
slots afterwards, no atomics) and ``dk_idx`` per program with one fp32 atomic add per program, so
``dk_idx`` is reproducible only up to fp32 summation order. The gradients are computed in the forward
(the loss is a scalar) and scaled by the incoming gradient in the backward; ``q`` and ``k`` get none.
Nothing ``N x N`` is stored: the dense warm-up walks its blocks in slot chunks of the same kernels.

The same module holds the KL's other form, computed in the sparse attention's backward
(``kernels.sparse_attention.sparse_attention_kl``): ``kl_tile`` runs on the dK/dV kernel's tiles, after the
student's log-normaliser from ``student_lse`` (a pre-pass over the attention's reverse index).

Supports any G and Hkv, the head dims, index dims and block sizes of ``kernels.common.LIMITS``,
bf16/fp16/fp32 inputs with fp32 accumulation, packed documents (``cu_seqlens``) and queries that are
the last ``Nq`` of ``N`` keys. Launch settings are arguments of ``index_kl_fwd``. Measured on H200:
28.8 ms forward+backward at N = 128K, Hkv = 2, G = 16 (``docs/kernels.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.common import (
    build_kl_csr,
    build_layout,
    check_cu_seqlens,
    check_limits,
    dot_ieee,
    entry_query_slot,
    plogp,
    work_keys,
)
from kernels.index_kl_tile import index_kl_tile_fwd
from kernels.ops import index_kl_fwd_op
from msa.keep import kept
from msa.reference import kl_rows

__all__ = ["index_kl_loss", "KL_PATHS"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
KL_PATHS = ("kv", "tile")  # attention.kl_path: the KV-outer form here, or kernels/index_kl_tile.py


def check_kl_path(path: str) -> None:
    if path not in KL_PATHS:
        raise ValueError(f"kl_path must be one of {KL_PATHS}, got {path!r} (attention.kl_path)")


@triton.jit
def _entry_rows(entries, c, br, NQ, S, BLOCK_M: tl.constexpr):
    """Decode chunk ``c``'s entries (flat indices into ``[B, Hkv, NQ, S]``, all of batch and group ``br``; -1
    padding, ``m_e`` false) into their offsets ``o_e``, rows ``br * NQ + i`` and queries ``i``. The entry less
    ``br * NQ * S`` fits 32 bits (``NQ * S < 2^31``, checked by ``index_kl_fwd``), so the division by the runtime
    ``S`` is a 32-bit one: a 64-bit division is a subroutine call per row on the GPU (docs/kernels.md)."""
    o_e = tl.load(entries + c * BLOCK_M + tl.arange(0, BLOCK_M))
    m_e = o_e >= 0
    o_e = tl.where(m_e, o_e, br * NQ * S)
    o_q = (o_e - br * NQ * S).to(tl.int32) // S
    return o_e, m_e, br * NQ + o_q, o_q


@triton.jit
def _key_block(key, k_idx, N, DI, HKV: tl.constexpr, BK: tl.constexpr, BLOCK_DI: tl.constexpr):
    """A program's key block from its table entry ``key = (b * Hkv + r) * N + first key``: batch,
    group, key positions and mask, and the ``[BK, BLOCK_DI]`` ``k_idx`` tile every chunk of it uses."""
    i_b = key // N // HKV
    i_r = key // N % HKV
    o_j = key % N + tl.arange(0, BK)
    m_j = o_j < N
    o_di = tl.arange(0, BLOCK_DI)
    b_ki = tl.load(k_idx + (i_b * N + o_j)[:, None] * DI + o_di[None, :],
                   mask=m_j[:, None] & (o_di < DI)[None, :], other=0.0)
    return i_b, i_r, o_j, m_j, b_ki


@triton.jit
def index_kl_fwd_lse_kernel(
    q, k, q_idx, k_idx, entries, prog_key, prog_c0, prog_nc, lse_s, lse_t,
    N, NQ, S, D, DI, scale_t, scale_s,
    HKV: tl.constexpr, G: tl.constexpr, TEACHER: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IEEE: tl.constexpr,
):
    """Pass 1: per-entry partial log-normalisers of the student (and of the teacher's G heads with
    ``TEACHER``) over one key block."""
    i_p = tl.program_id(0)
    key = tl.load(prog_key + i_p).to(tl.int64)
    if key < 0:
        return
    i_b, i_r, o_j, m_j, b_ki = _key_block(key, k_idx, N, DI, HKV, BK, BLOCK_DI)
    o_di = tl.arange(0, BLOCK_DI)
    o_d = tl.arange(0, BLOCK_D)
    if TEACHER:
        b_k = tl.load(k + ((i_b * N + o_j) * HKV + i_r)[:, None] * D + o_d[None, :],
                      mask=m_j[:, None] & (o_d < D)[None, :], other=0.0)
    c0 = tl.load(prog_c0 + i_p)
    nc = tl.load(prog_nc + i_p)
    for c in range(c0, c0 + nc):
        o_e, m_e, o_row, o_q = _entry_rows(entries, c, i_b * HKV + i_r, NQ, S, BLOCK_M)
        b_qi = tl.load(q_idx + ((i_b * NQ + o_q) * HKV + i_r)[:, None] * DI + o_di[None, :],
                       mask=m_e[:, None] & (o_di < DI)[None, :], other=0.0)
        # [BLOCK_M, BK]
        m_s = m_e[:, None] & (o_j[None, :] <= (N - NQ + o_q)[:, None])
        b_s = tl.where(m_s, dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_s, float("-inf"))
        tl.store(lse_s + o_e, _row_lse(b_s), mask=m_e)
        if TEACHER:
            for g in range(G):
                i_h = i_r * G + g
                b_q = tl.load(q + ((i_b * NQ + o_q) * (HKV * G) + i_h)[:, None] * D + o_d[None, :],
                              mask=m_e[:, None] & (o_d < D)[None, :], other=0.0)
                b_st = tl.where(m_s, dot_ieee(b_q, tl.trans(b_k), IEEE) * scale_t, float("-inf"))
                tl.store(lse_t + o_e * G + g, _row_lse(b_st), mask=m_e)


@triton.jit
def _row_lse(b_s):
    """Row log-sum-exp of a tile; ``-inf`` for a row with no finite entry (never NaN)."""
    b_mx = tl.max(b_s, 1)
    b_mx_safe = tl.where(b_mx > float("-inf"), b_mx, 0.0)
    return b_mx_safe + tl.log(tl.sum(tl.exp2(b_s * LOG2E - (b_mx_safe * LOG2E)[:, None]), 1))


@triton.jit
def index_kl_fwd_kernel(
    q, k, q_idx, k_idx, entries, prog_key, prog_c0, prog_nc, lse_s, lse_t,
    loss, dq_idx, dk_idx,
    N, NQ, S, D, DI, scale_t, scale_s,
    HKV: tl.constexpr, G: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IEEE: tl.constexpr,
):
    """Pass 2 over one key block: per-chunk loss partials; with ``GRAD`` per-entry ``dq_idx`` partials
    and one atomic add of the block's ``dk_idx``."""
    i_p = tl.program_id(0)
    key = tl.load(prog_key + i_p).to(tl.int64)
    if key < 0:
        return
    i_b, i_r, o_j, m_j, b_ki = _key_block(key, k_idx, N, DI, HKV, BK, BLOCK_DI)
    o_di = tl.arange(0, BLOCK_DI)
    o_d = tl.arange(0, BLOCK_D)
    m_di = o_di < DI
    b_k = tl.load(k + ((i_b * N + o_j) * HKV + i_r)[:, None] * D + o_d[None, :],
                  mask=m_j[:, None] & (o_d < D)[None, :], other=0.0)
    b_dk = tl.zeros((BK, BLOCK_DI), tl.float32)
    # exponentials as exp2 with log2(e) folded into the scales: tl.exp adds a multiply and a subnormal fix-up
    # per element (8 instructions), and pass 2 takes G + 1 of them per (entry, key)
    scale_t2 = scale_t * LOG2E
    c0 = tl.load(prog_c0 + i_p)
    nc = tl.load(prog_nc + i_p)
    for c in range(c0, c0 + nc):
        o_e, m_e, o_row, o_q = _entry_rows(entries, c, i_b * HKV + i_r, NQ, S, BLOCK_M)
        b_qi = tl.load(q_idx + ((i_b * NQ + o_q) * HKV + i_r)[:, None] * DI + o_di[None, :],
                       mask=m_e[:, None] & m_di[None, :], other=0.0)
        # [BLOCK_M, BK]
        m_s = m_e[:, None] & (o_j[None, :] <= (N - NQ + o_q)[:, None])
        b_s = dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_s
        b_p = tl.zeros((BLOCK_M, BK), tl.float32)
        for g in range(G):
            i_h = i_r * G + g
            b_q = tl.load(q + ((i_b * NQ + o_q) * (HKV * G) + i_h)[:, None] * D + o_d[None, :],
                          mask=m_e[:, None] & (o_d < D)[None, :], other=0.0)
            b_lt = tl.load(lse_t + (i_b * HKV * G + i_h) * NQ + o_q, mask=m_e, other=float("inf"))
            # an empty teacher row (lse = -inf) contributes nothing
            b_lt = tl.where(b_lt > float("-inf"), b_lt, float("inf")) * LOG2E
            b_p += tl.exp2(dot_ieee(b_q, tl.trans(b_k), IEEE) * scale_t2 - b_lt[:, None])
        b_p = tl.where(m_s, b_p / G, 0.0)
        b_plogp = plogp(b_p)
        tl.store(loss + c, tl.sum(tl.sum(b_plogp - b_p * tl.where(m_s, b_s, 0.0), 1), 0))
        if GRAD:
            b_ls = tl.load(lse_s + o_row, mask=m_e, other=float("inf"))
            b_ls = tl.where(b_ls > float("-inf"), b_ls, float("inf")) * LOG2E
            b_ds = tl.where(m_s, tl.exp2(b_s * LOG2E - b_ls[:, None]) - b_p, 0.0) * scale_s
            # [BLOCK_M, BLOCK_DI]: this entry's share of dq_idx, summed over slots on the host
            b_dq = dot_ieee(b_ds.to(b_ki.dtype), b_ki, IEEE)
            tl.store(dq_idx + o_e[:, None] * DI + o_di[None, :], b_dq, mask=m_e[:, None] & m_di[None, :])
            b_dk += dot_ieee(tl.trans(b_ds.to(b_qi.dtype)), b_qi, IEEE)
    if GRAD:
        tl.atomic_add(dk_idx + (i_b * N + o_j)[:, None] * DI + o_di[None, :], b_dk,
                      mask=m_j[:, None] & m_di[None, :], sem="relaxed")


_MERGE_ROWS, _MERGE_SLOTS = 256, 16


@triton.jit
def index_kl_merge_lse_kernel(part, lse, loss_part, n_rows, S, FIRST: tl.constexpr, LAST: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """``lse[r] = logaddexp(lse[r], logsumexp(part[r, :S]))`` over ``BLOCK_R`` rows (``FIRST``: ``lse`` not yet
    written, taken as -inf); with ``LAST``, also this program's sum of the finite ``lse`` values into
    ``loss_part[program]``. All -inf stays -inf (a row without support)."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    if FIRST:
        b_m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        b_acc = tl.zeros((BLOCK_R,), tl.float32)
    else:
        b_m = tl.load(lse + o_r, mask=m_r, other=float("-inf"))
        b_acc = tl.where(b_m > float("-inf"), 1.0, 0.0)
    for s0 in range(0, S, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)
        b_x = tl.load(part + o_r.to(tl.int64)[:, None] * S + o_s[None, :], mask=m_r[:, None] & (o_s < S)[None, :],
                      other=float("-inf"))
        b_new = tl.maximum(b_m, tl.max(b_x, 1))
        b_safe = tl.where(b_new > float("-inf"), b_new, 0.0)
        b_acc = b_acc * tl.exp(b_m - b_safe) + tl.sum(tl.exp(b_x - b_safe[:, None]), 1)
        b_m = b_new
    b_lse = tl.where(b_acc > 0, b_m + tl.log(b_acc), float("-inf"))
    tl.store(lse + o_r, b_lse, mask=m_r)
    if LAST:
        finite = m_r & (b_lse > float("-inf")) & (b_lse < float("inf"))
        tl.store(loss_part + tl.program_id(0), tl.sum(tl.where(finite, b_lse, 0.0), 0))


def _slot_chunks(block_idx, B, Hkv, NQ, block_size, doc_start, DI, budget, rows=None):
    """Yield ``[B, Hkv, NQ, S]`` block lists whose per-entry ``dq_idx`` partials fit in ``budget`` bytes:
    slices of ``block_idx``, or for the dense warm-up (``block_idx=None``) every visible block of the queries in
    ``rows`` (``[NQ]`` bool, a strided loss's queries; None: every query)."""
    S = max(1, budget // (B * Hkv * NQ * DI * 4))
    if block_idx is not None:
        yield from torch.split(block_idx, S, dim=-1)
        return
    N = doc_start.numel()
    own = (torch.arange(N - NQ, N, device=doc_start.device) - doc_start[N - NQ:]) // block_size  # [NQ]
    if rows is not None:
        own = torch.where(rows, own, -1)
    n_blocks = int(own.max()) + 1 if NQ else 0
    for b0 in range(0, n_blocks, S):
        b = torch.arange(b0, min(b0 + S, n_blocks), device=doc_start.device, dtype=torch.int32)
        blocks = torch.where(b[None, :] <= own[:, None], b[None, :], -1)  # [NQ, S]
        yield blocks.expand(B, Hkv, NQ, b.numel())


def _launch_args(q, k, q_idx, block_m):
    D, DI = q.shape[-1], q_idx.shape[-1]
    return dict(HKV=k.shape[2], G=q.shape[2] // k.shape[2], BLOCK_M=block_m,
                BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DI=max(16, triton.next_power_of_2(DI)),
                IEEE=q.dtype == torch.float32 and q_idx.dtype == torch.float32)


def index_kl_fwd(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad,
                 block_m=128, chunks=8, budget=4 << 30, num_warps=8, num_stages=2, path="kv",
                 query_stride=1, query_offset=0):
    """Loss (float32 scalar) and, with ``grad``, float32 ``dq_idx [B, Nq, Hkv, Di]``, ``dk_idx [B, N, Di]``.
    Launch settings: ``block_m`` gathered queries per chunk, ``chunks`` chunks per program, ``budget``
    bytes of ``dq_idx`` partials per slot chunk, warps, stages (defaults: the H200 sweep). ``path="tile"``
    runs the query-tile-outer form (``kernels/index_kl_tile.py``) where it applies: the sparse phase with the
    teacher's ``lse`` given; elsewhere, and with ``"kv"``, this KV-outer one. ``query_stride > 1``: the
    strided loss of ``msa.reference.index_kl_loss``, the other queries' slots emptied before the reverse index
    is built, so both passes do ``query_stride`` times less work."""
    B, NQ, H, D = q.shape
    N, Hkv, DI = k.shape[1], k.shape[2], q_idx.shape[-1]
    G = H // Hkv
    dev = q.device
    check_kl_path(path)
    rows = None if query_stride == 1 else kl_rows(N, NQ, query_stride, query_offset, dev)
    if rows is not None and block_idx is not None:  # the other queries' slots empty: no entries, no work
        block_idx = block_idx.masked_fill(~rows[:, None], -1)
    layout = build_layout(N, block_size, cu_seqlens, dev)
    if path == "tile" and block_idx is not None and lse is not None:
        loss, dq, dk = index_kl_tile_fwd(q, k, q_idx, k_idx, block_idx, block_size, layout.tok_start, lse, grad)
        if query_stride == 1:
            return loss, dq, dk
        return loss * query_stride, *(t if t is None else t.mul_(query_stride) for t in (dq, dk))
    doc_start = layout.tok_start.long()  # [N]: each token's document start
    n_docs = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    args = (N, NQ)
    scales = (D ** -0.5, DI ** -0.5)
    meta = dict(_launch_args(q, k, q_idx, block_m), BK=block_size, num_warps=num_warps,
                num_stages=num_stages)
    chunk_list = list(_slot_chunks(block_idx, B, Hkv, NQ, block_size, doc_start, DI, budget, rows))
    if chunk_list and NQ * max(c.shape[-1] for c in chunk_list) >= 2**31:  # the kernels decode entries in 32 bits
        raise ValueError(f"index_kl_fwd: {NQ} queries x {max(c.shape[-1] for c in chunk_list)} slots a chunk reach "
                         f"2^31; pass a smaller budget ({budget} bytes) so the slot chunks shrink")
    csrs = [build_kl_csr(c, N, doc_start, n_docs, block_size, block_m, chunks) for c in chunk_list]

    # pass 1: log-normalisers over the support, merged across slots and slot chunks (with the main forward's
    # lse, the student's only: one small kernel per slot chunk merges its partials, and the last one also
    # writes each program's sum of the finite lse_S terms into ``loss_buf``)
    rows = B * Hkv * NQ
    n_merge = triton.cdiv(rows, _MERGE_ROWS)
    lse_s = torch.empty(B, Hkv, NQ, device=dev)
    lse_t = None if lse is None else lse.float().contiguous()
    lse_t_acc = torch.full((B, Hkv, NQ, G), float("-inf"), device=dev) if lse is None else None
    n_loss = [n_merge] + [csr[0].numel() // block_m for csr in csrs]
    loss_buf = torch.zeros(sum(n_loss), device=dev)
    for c, (blocks, (ent, pkey, pc0, pnc)) in enumerate(zip(chunk_list, csrs)):
        S = blocks.shape[-1]
        part_s = torch.full((B, Hkv, NQ, S), float("-inf"), device=dev)
        part_t = torch.full((B, Hkv, NQ, S, G), float("-inf"), device=dev) if lse is None else part_s
        index_kl_fwd_lse_kernel[(pkey.numel(),)](
            q, k, q_idx, k_idx, ent, pkey, pc0, pnc, part_s, part_t, *args, S, D, DI, *scales,
            TEACHER=lse is None, **meta)
        index_kl_merge_lse_kernel[(n_merge,)](part_s, lse_s, loss_buf, rows, S, FIRST=c == 0,
                                              LAST=c == len(csrs) - 1, BLOCK_R=_MERGE_ROWS, BLOCK_S=_MERGE_SLOTS)
        if lse is None:
            lse_t_acc = torch.logaddexp(lse_t_acc, part_t.logsumexp(-2))
    if lse is None:
        lse_t = lse_t_acc.permute(0, 1, 3, 2).reshape(B, H, NQ).contiguous()

    # pass 2: loss partials and gradients (the lse_S term of each row was added in pass 1, once)
    dq = None
    dk = torch.zeros(B, N, DI, device=dev) if grad else None
    for c, (blocks, (ent, pkey, pc0, pnc)) in enumerate(zip(chunk_list, csrs)):
        S = blocks.shape[-1]
        loss_part = loss_buf[sum(n_loss[:c + 1]):sum(n_loss[:c + 2])]
        dq_part = torch.zeros(B, Hkv, NQ, S, DI, device=dev) if grad else loss_part
        index_kl_fwd_kernel[(pkey.numel(),)](
            q, k, q_idx, k_idx, ent, pkey, pc0, pnc, lse_s, lse_t, loss_part, dq_part,
            dk if grad else loss_part, *args, S, D, DI, *scales, GRAD=grad, **meta)
        if grad:
            dq = dq_part.sum(3) if dq is None else dq.add_(dq_part.sum(3))
    norm = query_stride / (B * NQ * Hkv)
    loss = loss_buf.sum() * norm
    if not grad:
        return loss, None, None
    return loss, dq.permute(0, 2, 1, 3).mul_(norm).contiguous(), dk.mul_(norm)


# ---- the KL computed in the sparse attention's backward (kernels.sparse_attention.sparse_attention_kl): its
# dK/dV kernel calls kl_tile on its tiles, with the student's log-normaliser from student_lse


@triton.jit
def kl_tile(q_idx, b_ki, lse_s, dq_idx, b_p, o_q, m_row, o_k, m_k, i_b, i_r, scale_i, N, NQ, DI,
             HKV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_DI: tl.constexpr, IEEE: tl.constexpr):
    """The index KL on the backward tile (``KL``): the teacher of an entry is the mean of its G heads'
    rows of ``P`` (exact: the final lse), the student ``softmax(q_idx . k_idx / sqrt(Di))`` on the same
    support with the log-normaliser ``lse_s`` of the pre-pass. Per entry: ``sum_j P_j log P_j - P_j S_j``
    over this key tile (the tile's loss, returned) and ``dS = Q - P``; its ``dS k_idx`` goes to ``dq_idx``
    by fp32 atomic add, ``dS^T q_idx`` ``[BLOCK_N, BLOCK_DI]`` is returned for the program's ``dk_idx``.
    G is a power of two (the caller checks), so whole entries fill the tile. With 16 or more entries a
    tile the matmuls run on the entries; with fewer (G >= 8 at 64 rows: a matmul needs 16 rows) on the
    tile's rows, each entry's first row carrying it and the other G - 1 zero."""
    o_di = tl.arange(0, BLOCK_DI)
    m_di = o_di < DI
    b_pt = tl.sum(tl.reshape(b_p, (BLOCK_M // G, G, BLOCK_N)), 1) / G
    if BLOCK_M // G >= 16:
        o_q = tl.max(tl.reshape(o_q, (BLOCK_M // G, G)), 1)  # the G rows of an entry share its query
        first = tl.max(tl.reshape(m_row.to(tl.int32), (BLOCK_M // G, G)), 1) > 0
    else:
        b_pt = tl.reshape(tl.broadcast_to(tl.expand_dims(b_pt, 1), (BLOCK_M // G, G, BLOCK_N)), (BLOCK_M, BLOCK_N))
        first = m_row & (tl.arange(0, BLOCK_M) % G == 0)
    o_qi = ((i_b.to(tl.int64) * NQ + o_q) * HKV + i_r)[:, None] * DI + o_di[None, :]
    b_qi = tl.load(q_idx + o_qi, mask=first[:, None] & m_di[None, :], other=0.0)
    b_si = dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_i
    m_s = first[:, None] & m_k[None, :] & (o_k[None, :] <= (N - NQ + o_q)[:, None])
    b_pt = tl.where(m_s, b_pt, 0.0)
    b_plogp = plogp(b_pt)
    b_kl = tl.sum(tl.sum(b_plogp - b_pt * tl.where(m_s, b_si, 0.0), 1), 0)
    b_ls = tl.load(lse_s + (i_b.to(tl.int64) * HKV + i_r) * NQ + o_q, mask=first, other=float("inf"))
    b_ls = tl.where(b_ls > float("-inf"), b_ls, float("inf"))
    b_ds = tl.where(m_s, tl.exp(b_si - b_ls[:, None]) - b_pt, 0.0) * scale_i
    b_dq = dot_ieee(b_ds.to(b_ki.dtype), b_ki, IEEE)
    # relaxed: a sum nothing reads before the kernel ends (Triton's default, acq_rel, fences every add)
    tl.atomic_add(dq_idx + o_qi, b_dq, mask=first[:, None] & m_di[None, :], sem="relaxed")
    return b_kl, dot_ieee(tl.trans(b_ds.to(b_qi.dtype)), b_qi, IEEE)


@triton.jit
def index_kl_student_lse_kernel(
    q_idx, k_idx, entries, work_bucket, work_start, work_end, vb_start, vb_end, part_lse, scale_i, N, NQ, NV, DI,
    HKV: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DI: tl.constexpr,
    IEEE: tl.constexpr,
):
    """The student's log-normaliser of each entry of work item ``program_id(0)`` over its block's visible
    keys, to ``part_lse`` (indexed like ``block_idx``): the pre-pass of ``sparse_attention_kl``'s backward,
    on the attention's own reverse index."""
    e0, e1, i_b, i_r, o_k, m_k = work_keys(work_bucket, work_start, work_end, vb_start, vb_end, tl.program_id(0),
                                            0, NV, HKV, BK)
    o_di = tl.arange(0, BLOCK_DI)
    m_di = o_di < DI
    b_ki = tl.load(k_idx + (i_b.to(tl.int64) * N + o_k)[:, None] * DI + o_di[None, :],
                   mask=m_k[:, None] & m_di[None, :], other=0.0)
    for e in range(e0, e1, BLOCK_E):
        o_e = e + tl.arange(0, BLOCK_E)
        m_e = o_e < e1
        o_q, o_slot = entry_query_slot(entries, o_e, m_e, i_b * HKV + i_r, NQ, TOPK)
        b_qi = tl.load(q_idx + ((i_b.to(tl.int64) * NQ + o_q) * HKV + i_r)[:, None] * DI + o_di[None, :],
                       mask=m_e[:, None] & m_di[None, :], other=0.0)
        m_s = m_e[:, None] & m_k[None, :] & (o_k[None, :] <= (N - NQ + o_q)[:, None])
        b_s = tl.where(m_s, dot_ieee(b_qi, tl.trans(b_ki), IEEE) * scale_i, float("-inf"))
        b_mx = tl.max(b_s, 1)
        b_mx = tl.where(b_mx > float("-inf"), b_mx, 0.0)
        b_lse = b_mx + tl.log(tl.sum(tl.exp(b_s - b_mx[:, None]), 1))
        tl.store(part_lse + ((i_b * HKV + i_r) * NQ + o_q).to(tl.int64) * TOPK + o_slot, b_lse, mask=m_e)


def student_lse(q_idx, k_idx, block_idx, block_size, layout, csr, block_e=64, num_warps=4):
    """``lse_S [B, Hkv, Nq]`` float32: the student's log-normaliser over the support of ``block_idx``,
    from per-entry partials on the attention's reverse index (no sort of its own, no host sync)."""
    B, NQ, Hkv, DI = q_idx.shape
    part = torch.full(block_idx.shape, float("-inf"), dtype=torch.float32, device=q_idx.device)
    W = csr.chunk_work[-1]
    if W:
        index_kl_student_lse_kernel[(W,)](
            q_idx, k_idx, csr.entries, csr.work_bucket, csr.work_start, csr.work_end, layout.vb_start,
            layout.vb_end, part, DI ** -0.5, k_idx.shape[1], NQ, layout.vb_start.numel(), DI, HKV=Hkv,
            TOPK=block_idx.shape[-1], BK=block_size, BLOCK_E=block_e, BLOCK_DI=max(16, triton.next_power_of_2(DI)),
            IEEE=q_idx.dtype == torch.float32, num_warps=num_warps)
    return part.logsumexp(-1)


@dataclass
class BackwardKLArgs:
    """The dK/dV kernel's index-KL arguments (``args``: ``q_idx, k_idx, lse_s, kl_part, dq_idx, dk_idx,
    scale_i, DI``; ``meta``: its constexprs) and, after it ran, the loss and gradients (``result``);
    without an index, placeholders and ``KL=False``."""

    args: tuple
    meta: dict

    def result(self, rows: int):
        lse_s, kl_part, dq_idx, dk_idx = self.args[2:6]
        norm = 1.0 / rows
        loss = (torch.where(torch.isfinite(lse_s), lse_s, 0.0).sum() + kl_part.sum()) * norm
        return loss, dq_idx.mul_(norm), dk_idx.mul_(norm)


def backward_kl_args(q, k, index, n_programs) -> BackwardKLArgs:
    if index is None:
        return BackwardKLArgs((q, k, q, q, q, q, 1.0, 1), dict(KL=False))
    q_idx, k_idx, lse_s = index
    B, NQ, H, _ = q.shape
    N, Hkv, DI = k.shape[1], k.shape[2], q_idx.shape[-1]
    kl_part = torch.zeros(n_programs, dtype=torch.float32, device=q.device)
    dq_idx = torch.zeros(B, NQ, Hkv, DI, dtype=torch.float32, device=q.device)
    dk_idx = torch.zeros(B, N, DI, dtype=torch.float32, device=q.device)
    meta = dict(KL=True, BLOCK_DI=max(16, triton.next_power_of_2(DI)),
                IEEE=q.dtype == torch.float32 and q_idx.dtype == torch.float32)
    return BackwardKLArgs((q_idx, k_idx, lse_s, kl_part, dq_idx, dk_idx, DI ** -0.5, DI), meta)


class IndexKLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, path, query_stride, query_offset):
        grad = q_idx.requires_grad or k_idx.requires_grad
        # the gradients too, in one op (msa::index_kl_fwd) whose outputs selective checkpointing keeps (msa.keep)
        loss, dq, dk = kept("msa::index_kl_fwd", lambda: index_kl_fwd_op(
            q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad, path, query_stride, query_offset))
        ctx.save_for_backward(dq, dk)
        ctx.dtypes = (q_idx.dtype, k_idx.dtype)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        dq, dk = ctx.saved_tensors
        return (None, None, (dq * d_loss).to(ctx.dtypes[0]), (dk * d_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)


def index_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                  block_idx: torch.Tensor | None, block_size: int,
                  cu_seqlens: torch.Tensor | None = None, *, lse: torch.Tensor | None = None,
                  kl_path: str = "kv", query_stride: int = 1, query_offset: int = 0) -> torch.Tensor:
    """Index distillation loss ``1/(B*Nq*Hkv) * sum_{b,i,r} KL(P[r,i,:] || Q[r,i,:])``, float32 scalar.

    ``q [B, Nq, H, D]``, ``k [B, N, Hkv, D]`` (teacher, no gradient), ``q_idx [B, Nq, Hkv, Di]``,
    ``k_idx [B, N, Di]`` (student, gradients); the queries are the last ``Nq <= N`` positions (``Nq = N``
    but for context parallelism). ``block_idx`` int32 ``[B, Hkv, Nq, topk]`` or None for the dense
    warm-up support. ``lse [B, H, Nq]``: the teacher's log-normaliser on that same support (what
    ``sparse_attention`` returns for this ``block_idx``); None computes it here. ``cu_seqlens`` is over
    the keys (``B == 1``). ``kl_path``: ``"kv"`` (KV-outer, this module) or ``"tile"`` (each tile of queries
    over the union of its blocks, ``kernels/index_kl_tile.py``; the sparse phase with ``lse`` given, else
    ``"kv"``). ``query_stride``, ``query_offset``: the strided loss of ``msa.reference.index_kl_loss`` (the
    rows of one query in ``query_stride``, times ``query_stride``).
    """
    check_kl_path(kl_path)
    B, NQ, H, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[1] < NQ or k.shape[-1] != D or H % k.shape[2]:
        raise ValueError(f"k must be [B, N >= Nq, Hkv, D] with Hkv dividing H, q is {tuple(q.shape)}, "
                         f"k is {tuple(k.shape)}")
    N, Hkv = k.shape[1], k.shape[2]
    if q_idx.ndim != 4 or q_idx.shape[:3] != (B, NQ, Hkv) or k_idx.shape != (B, N, q_idx.shape[-1]):
        raise ValueError(f"q_idx must be [B, Nq, Hkv, Di] and k_idx [B, N, Di], got {tuple(q_idx.shape)} "
                         f"and {tuple(k_idx.shape)}")
    if block_idx is not None and (block_idx.shape[:3] != (B, Hkv, NQ) or block_idx.dtype != torch.int32):
        raise ValueError(f"block_idx must be int32 [B, Hkv, Nq, topk] = [{B}, {Hkv}, {NQ}, k], got "
                         f"{block_idx.dtype} {tuple(block_idx.shape)}")
    if lse is not None and lse.shape != (B, H, NQ):
        raise ValueError(f"lse must be [B, H, Nq] = {(B, H, NQ)}, got {tuple(lse.shape)}")
    check_limits(head_dim=D, block_size=block_size, index_dim=q_idx.shape[-1], dtype=q.dtype)
    check_limits(dtype=q_idx.dtype)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, N)
    q, k = q.detach().contiguous(), k.detach().contiguous()
    return IndexKLLoss.apply(q, k, q_idx.contiguous(), k_idx.to(q_idx.dtype).contiguous(),
                             None if block_idx is None else block_idx.contiguous(), block_size,
                             cu_seqlens, None if lse is None else lse.detach(), kl_path, int(query_stride),
                             int(query_offset))
