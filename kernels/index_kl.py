"""MSA index distillation loss: ``KL(teacher || student)`` over the attention support, fused, KV-outer.

The support of query ``i`` in group ``r`` is the visible tokens of the blocks in ``block_idx[r, i]``
(sparse phase) or every visible token (``block_idx=None``, dense warm-up). The teacher is the mean
over the group's ``G`` heads of ``softmax(q . k / sqrt(D))`` on the support, recomputed tile by tile
from ``q``, ``k`` and its log-normaliser ``lse [B, H, Nq]``: the main forward's, or one computed here
over the same support when ``lse`` is None. The student is ``softmax(q_idx . k_idx / sqrt(Di))`` on
the same support. Per row, with ``P`` summing to one on the support and ``log Q = S - lse_S``::

    KL = sum_j P_j log P_j - sum_j P_j log Q_j,     dKL/dS_j = Q_j - P_j

Work is KV-outer: each (query, slot) entry names one key block; the entries are sorted by key block
(a CSR built on the device by ``torch.sort``), padded per block to ``BLOCK_M``-entry chunks, and one
program owns one key block and up to ``CHUNKS`` consecutive chunks of it, i.e. one contiguous run of
CSR positions (hot blocks such as the sinks are split across programs). Two kernels walk that run:

- ``index_kl_teacher_kernel`` loads the block's ``k`` tile once and multiplies it against tiles of
  (entry x head) rows: ``TEACHER_ROWS // G_PAD`` entries x ``G_PAD`` heads (``G`` rounded up to a
  power of two, the extra rows masked), so an entry's ``G`` query heads are one contiguous
  ``G * D``-element load. It writes either per-(entry, head) partial teacher log-normalisers (when
  ``lse`` is None, a first pass) or the teacher distribution ``P = mean_h exp(q_h . k * scale - lse_h)``
  summed over each entry's head rows, stored per CSR position to a ``[positions, BK]`` buffer (fp32
  for fp32 inputs, else bf16 by default), plus a per-program ``sum P log P`` computed in fp32. With
  ``STUDENT_LSE`` it also writes the per-entry partial student log-normalisers (a separate loop over
  ``STUDENT_ROWS``-entry tiles against the block's ``k_idx``).
- ``index_kl_student_kernel`` loads the block's ``k_idx`` once and, per ``STUDENT_ROWS``-entry tile
  held transposed (keys x entries: the accumulators have ``BK`` or ``Di`` rows, not ``STUDENT_ROWS``),
  scores ``S``, reads ``P`` from the buffer, and writes the per-program ``-sum P log Q``, per-entry
  ``dq_idx`` partials (summed over slots afterwards, no atomics) and ``dk_idx`` with one fp32 atomic
  add per program, so ``dk_idx`` is reproducible only up to fp32 summation order.

The student log-normaliser needs every slot of a row before ``dS = Q - P`` can be formed, so it is
merged (``logsumexp`` over per-entry partials) before the student kernel; with ``lse`` given and one
slot chunk it comes out of the teacher kernel's launch, otherwise out of an earlier teacher-kernel
pass. The gradients are computed in the forward (the loss is a scalar) and scaled by the incoming
gradient in the backward; ``q`` and ``k`` get none. Nothing ``N x N`` is stored: the dense warm-up
walks its blocks in slot chunks sized so the ``P`` buffer and ``dq_idx`` partials fit ``BUDGET``.
Launch settings live in ``CONFIG`` (``index_kl_fwd(..., config=...)`` overrides them per call).
Speed on the GPU is a prediction until measured (``docs/kernels.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.index_topk import _check_block_size, check_cu_seqlens

__all__ = ["index_kl_loss", "CONFIG"]

# Launch settings, swept on the GPU; ``index_kl_fwd(..., config={...})`` overrides them for one call.
CONFIG = dict(
    BLOCK_M=128,         # CSR chunk (>= 16): a key block's entries are padded to a multiple of this
    CHUNKS=4,            # chunks per program at most, so a hot block spreads over several programs
    TEACHER_ROWS=128,    # (entry x head) rows per teacher tile: TEACHER_ROWS // G_PAD entries
    TEACHER_WARPS=8,
    TEACHER_STAGES=2,
    STUDENT_ROWS=64,     # entries per student tile (and per tile of the teacher kernel's student lse loop)
    STUDENT_WARPS=8,
    STUDENT_STAGES=2,
    HEAD_SUM="reshape",  # sum an entry's head rows by tl.reshape + tl.sum, or "dot" (a 0/1 selection matmul)
    P_DTYPE=None,        # teacher buffer: None = float32 for float32 inputs, else bfloat16
    BUDGET=4 << 30,      # bytes per slot chunk for the P buffer, the dq_idx partials and the lse partials
)


@triton.jit
def _entries(ent_ptr, pos, N, Nq, S, key0):
    """CSR positions -> entries (flat indices into ``[B, Hkv, Nq, S]``, 0 for padding), validity, query,
    and the query's last visible key counted from the block's first key ``key0`` (int32, -1 for padding:
    ``arange(BK) <= lim`` is the support mask, computed in int32 so no int64 ``[rows, BK]`` tile lives)."""
    e = tl.load(ent_ptr + pos)
    m_e = e >= 0
    e = tl.where(m_e, e, 0)
    i = (e // S) % Nq
    return e, m_e, i, tl.where(m_e, (N - Nq + i - key0).to(tl.int32), -1)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_lse(b_s):
    """Row log-sum-exp of a tile; ``-inf`` for a row with no finite entry (never NaN)."""
    mx = tl.max(b_s, 1)
    mx_safe = tl.where(mx > float("-inf"), mx, 0.0)
    return mx_safe + tl.log(tl.sum(tl.exp(b_s - mx_safe[:, None]), 1))


@triton.jit
def index_kl_teacher_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, ent_ptr, pkey_ptr, pc0_ptr, pnc_ptr, lse_t_ptr, lse_s_ptr, out_ptr, loss_ptr,
    N, Nq, S, D, Di, scale_t, scale_s,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, MODE: tl.constexpr, STUDENT_LSE: tl.constexpr,
    HEAD_SUM_DOT: tl.constexpr, BLOCK_M: tl.constexpr, ES: tl.constexpr, EP: tl.constexpr, SM: tl.constexpr,
    BK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: one key block, CSR positions ``[c0, c0 + nc) * BLOCK_M``. ``MODE`` 0: nothing from
    the teacher; 1: per-(entry, head) partial teacher log-normalisers to ``out [.., S, G]``; 2: the
    teacher distribution per position to ``out [positions, BK]`` and the program's ``sum P log P`` to
    ``loss``. ``STUDENT_LSE``: per-entry partial student log-normalisers to ``lse_s``."""
    i_p = tl.program_id(0)
    key = tl.load(pkey_ptr + i_p).to(tl.int64)
    if key < 0:
        return
    bat_r = key // N
    bat = bat_r // HKV
    r = bat_r % HKV
    key0 = key % N
    o_k = tl.arange(0, BK)
    o_j = key0 + o_k
    m_j = o_j < N
    c0 = tl.load(pc0_ptr + i_p)
    nc = tl.load(pnc_ptr + i_p)
    if STUDENT_LSE:
        o_di = tl.arange(0, BLOCK_DI)
        m_di = o_di < Di
        b_ki = tl.load(ki_ptr + (bat * N + o_j)[:, None] * Di + o_di[None, :],
                       mask=m_j[:, None] & m_di[None, :], other=0.0)
        for t in range(c0 * (BLOCK_M // SM), (c0 + nc) * (BLOCK_M // SM)):
            e, m_e, i, lim = _entries(ent_ptr, t * SM + tl.arange(0, SM), N, Nq, S, key0)
            b_qi = tl.load(qi_ptr + ((bat * Nq + i) * HKV + r)[:, None] * Di + o_di[None, :],
                           mask=m_e[:, None] & m_di[None, :], other=0.0)
            b_s = tl.where(o_k[None, :] <= lim[:, None], _dot(b_qi, tl.trans(b_ki), IEEE) * scale_s, float("-inf"))
            tl.store(lse_s_ptr + e, _row_lse(b_s), mask=m_e)
    if MODE > 0:
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        # [BK, BLOCK_D]: loaded once, used by every tile of this program
        b_k = tl.load(k_ptr + ((bat * N + o_j) * HKV + r)[:, None] * D + o_d[None, :],
                      mask=m_j[:, None] & m_d[None, :], other=0.0)
        o_r = tl.arange(0, ES * G_PAD)  # tile row = entry * G_PAD + head; rows of heads >= G are masked
        g = o_r % G_PAD
        o_e = tl.arange(0, EP)
        b_ent = tl.zeros((BK,), tl.float32)
        for t in range(c0 * (BLOCK_M // ES), (c0 + nc) * (BLOCK_M // ES)):
            e, m_e, i, lim = _entries(ent_ptr, t * ES + o_r // G_PAD, N, Nq, S, key0)
            m_r = m_e & (g < G)
            lim = tl.where(g < G, lim, -1)
            # row of q viewed as [B * Nq * H, D], also the index into lse_t [B, Nq, H]: an entry's G
            # heads are consecutive rows, one contiguous G * D run
            row = (bat * Nq + i) * (HKV * G) + r * G + g
            b_q = tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
            m_s = o_k[None, :] <= lim[:, None]
            b_s = _dot(b_q, tl.trans(b_k), IEEE) * scale_t  # [ES * G_PAD, BK]
            if MODE == 1:
                tl.store(out_ptr + e * G + g, _row_lse(tl.where(m_s, b_s, float("-inf"))), mask=m_r)
            else:
                b_lt = tl.load(lse_t_ptr + row, mask=m_r, other=float("inf"))
                # an empty teacher row (lse = -inf) contributes nothing
                b_lt = tl.where(b_lt > float("-inf"), b_lt, float("inf"))
                b_x = tl.where(m_s, tl.exp(b_s - b_lt[:, None]), 0.0)
                if HEAD_SUM_DOT:
                    # [EP, ES * G_PAD] 0/1: row e picks its entry's head rows (EP >= 16 rows for tl.dot)
                    b_sel = ((o_r // G_PAD)[None, :] == o_e[:, None]).to(b_q.dtype)
                    b_p = _dot(b_sel, b_x.to(b_q.dtype), IEEE) / G
                else:
                    b_p = tl.sum(tl.reshape(b_x, (ES, G_PAD, BK)), 1) / G
                b_ent += tl.sum(tl.where(b_p > 0, b_p * tl.log(tl.where(b_p > 0, b_p, 1.0)), 0.0), 0)
                pos = (t * ES + o_e).to(tl.int64)
                tl.store(out_ptr + pos[:, None] * BK + o_k[None, :], b_p.to(out_ptr.dtype.element_ty),
                         mask=(o_e < ES)[:, None] & (o_k < BK)[None, :])
        if MODE == 2:
            tl.store(loss_ptr + i_p, tl.sum(b_ent, 0))


@triton.jit
def index_kl_student_kernel(
    qi_ptr, ki_ptr, ent_ptr, pkey_ptr, pc0_ptr, pnc_ptr, lse_s_ptr, p_ptr, loss_ptr, dq_ptr, dk_ptr,
    N, Nq, S, Di, scale_s,
    HKV: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr, SM: tl.constexpr, BK: tl.constexpr,
    BLOCK_DI: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: one key block, the same CSR positions as the teacher kernel's program. Writes the
    program's ``-sum P log Q`` to ``loss`` and, with ``GRAD``, per-entry ``dq_idx`` partials and one
    atomic add of the block's ``dk_idx``."""
    i_p = tl.program_id(0)
    key = tl.load(pkey_ptr + i_p).to(tl.int64)
    if key < 0:
        return
    bat_r = key // N
    bat = bat_r // HKV
    r = bat_r % HKV
    key0 = key % N
    o_k = tl.arange(0, BK)
    o_j = key0 + o_k
    m_j = o_j < N
    o_di = tl.arange(0, BLOCK_DI)
    m_di = o_di < Di
    b_ki = tl.load(ki_ptr + (bat * N + o_j)[:, None] * Di + o_di[None, :],
                   mask=m_j[:, None] & m_di[None, :], other=0.0)
    b_dk = tl.zeros((BK, BLOCK_DI), tl.float32)
    b_loss = tl.zeros((SM,), tl.float32)
    c0 = tl.load(pc0_ptr + i_p)
    nc = tl.load(pnc_ptr + i_p)
    # transposed tiles, keys x entries: every accumulator has BK or BLOCK_DI rows (one warpgroup per 64
    # rows, no duplicated 64-row tiles), and dS^T is the register operand of the dk_idx matmul as it stands;
    # untransposed, the tile loop spilled (docs/kernels.md)
    for t in range(c0 * (BLOCK_M // SM), (c0 + nc) * (BLOCK_M // SM)):
        pos = t * SM + tl.arange(0, SM)
        e, m_e, i, lim = _entries(ent_ptr, pos, N, Nq, S, key0)
        b_qi = tl.load(qi_ptr + ((bat * Nq + i) * HKV + r)[:, None] * Di + o_di[None, :],
                       mask=m_e[:, None] & m_di[None, :], other=0.0)
        m_s = o_k[:, None] <= lim[None, :]
        b_s = _dot(b_ki, tl.trans(b_qi), IEEE) * scale_s  # [BK, SM]
        # unmasked: the teacher kernel wrote every position of this program (zeros off the support)
        b_p = tl.load(p_ptr + pos.to(tl.int64)[None, :] * BK + o_k[:, None]).to(tl.float32)
        # the merged student log-normaliser of the entry's row; finite wherever m_s holds
        b_ls = tl.load(lse_s_ptr + e // S, mask=m_e, other=0.0)
        b_loss += tl.sum(tl.where(m_s, b_p * (b_ls[None, :] - b_s), 0.0), 0)
        if GRAD:
            b_ds = (tl.where(m_s, tl.exp(b_s - b_ls[None, :]) - b_p, 0.0) * scale_s).to(b_qi.dtype)
            b_dk += _dot(b_ds, b_qi, IEEE)
            # [BLOCK_DI, SM]: each entry's share of dq_idx (transposed), summed over slots on the host
            b_dq = _dot(tl.trans(b_ki), b_ds, IEEE)
            tl.store(dq_ptr + e[None, :] * Di + o_di[:, None], b_dq, mask=m_e[None, :] & m_di[:, None])
    tl.store(loss_ptr + i_p, tl.sum(b_loss, 0))
    if GRAD:
        tl.atomic_add(dk_ptr + (bat * N + o_j)[:, None] * Di + o_di[None, :], b_dk,
                      mask=m_j[:, None] & m_di[None, :])


def _doc_start(N, cu_seqlens, device):
    """``[N]`` int64: the first token of each token's document."""
    if cu_seqlens is None:
        return torch.zeros(N, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu, torch.arange(N, device=device), right=True) - 1
    return cu[doc]


def _build_csr(blocks, N, doc_start, n_docs, block_size, block_m, chunks):
    """Entries of ``blocks [B, Hkv, Nq, S]`` grouped by key block, padded to ``block_m`` rows per chunk.

    Returns ``ent`` (flat entry ids, -1 padding) and the program table ``(key, first chunk, n chunks)``
    with ``key = (bat * Hkv + r) * N + first key token`` (-1: an idle program). Sizes are upper bounds
    known on the host, so nothing waits for the device."""
    B, Hkv, Nq, S = blocks.shape
    dev = blocks.device
    flat = blocks.reshape(-1).long()
    E = flat.numel()
    e = torch.arange(E, device=dev)
    n_keys = B * Hkv * N
    first = doc_start[N - Nq + (e // S) % Nq] + flat * block_size
    key = torch.where(flat >= 0, (e // (S * Nq)) * N + first, n_keys)
    key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=n_keys + 1)[:n_keys]
    n_chunk = (counts + block_m - 1) // block_m
    chunk_start = n_chunk.cumsum(0) - n_chunk
    seg_start = counts.cumsum(0) - counts
    n_seg_max = B * Hkv * (triton.cdiv(N, block_size) + n_docs)
    c_max = E // block_m + n_seg_max
    k_ = key.clamp(max=n_keys - 1)
    pos = torch.where(key < n_keys, chunk_start[k_] * block_m + e - seg_start[k_], c_max * block_m)
    ent = torch.full((c_max * block_m + 1,), -1, dtype=torch.long, device=dev).scatter_(0, pos, order)
    n_piece = (n_chunk + chunks - 1) // chunks
    piece_cum = n_piece.cumsum(0)
    p = torch.arange(c_max // chunks + n_seg_max + 1, device=dev)
    k = torch.searchsorted(piece_cum, p, right=True)
    ok = k < n_keys
    k = k.clamp(max=n_keys - 1)
    local = p - (piece_cum[k] - n_piece[k])
    c0 = chunk_start[k] + local * chunks
    nc = torch.clamp(n_chunk[k] - local * chunks, max=chunks)
    return ent[:-1], torch.where(ok, k, -1), c0.to(torch.int32), torch.where(ok, nc, 0).to(torch.int32)


def _slot_chunks(block_idx, B, Hkv, Nq, block_size, doc_start, entry_bytes, budget):
    """Yield ``[B, Hkv, Nq, S]`` block lists of at most ``budget`` bytes at ``entry_bytes`` per entry
    (P buffer, ``dq_idx`` partials, lse partials): slices of ``block_idx``, or for the dense warm-up
    (``block_idx=None``) every visible block."""
    S = max(1, budget // (B * Hkv * Nq * entry_bytes))
    if block_idx is not None:
        yield from torch.split(block_idx, S, dim=-1)
        return
    N = doc_start.numel()
    own = (torch.arange(N - Nq, N, device=doc_start.device) - doc_start[N - Nq:]) // block_size  # [Nq]
    n_blocks = int(own.max()) + 1 if Nq else 0
    for b0 in range(0, n_blocks, S):
        b = torch.arange(b0, min(b0 + S, n_blocks), device=doc_start.device, dtype=torch.int32)
        blocks = torch.where(b[None, :] <= own[:, None], b[None, :], -1)  # [Nq, S]
        yield blocks.expand(B, Hkv, Nq, b.numel())


def index_kl_fwd(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad, config=None):
    """Loss (float32 scalar) and, with ``grad``, float32 ``dq_idx [B, Nq, Hkv, Di]``, ``dk_idx [B, N, Di]``.
    ``config``: overrides of ``CONFIG`` for this call."""
    cfg = CONFIG if config is None else {**CONFIG, **config}
    B, Nq, H, D = q.shape
    N, Hkv, Di = k.shape[1], k.shape[2], q_idx.shape[-1]
    G = H // Hkv
    G_PAD = triton.next_power_of_2(G)
    dev = q.device
    ieee = q.dtype == torch.float32 and q_idx.dtype == torch.float32
    p_dtype = cfg["P_DTYPE"] or (torch.float32 if ieee else torch.bfloat16)
    bm = cfg["BLOCK_M"]
    tm = min(max(cfg["TEACHER_ROWS"], G_PAD, 16), bm * G_PAD)  # >= 16 rows for tl.dot, <= BLOCK_M entries
    dot_sum = cfg["HEAD_SUM"] == "dot"
    meta = dict(HKV=Hkv, BLOCK_M=bm, BK=block_size, BLOCK_DI=max(16, triton.next_power_of_2(Di)), IEEE=ieee,
                SM=min(max(cfg["STUDENT_ROWS"], 16), bm))
    t_meta = dict(meta, G=G, G_PAD=G_PAD, ES=tm // G_PAD, EP=max(16, tm // G_PAD) if dot_sum else tm // G_PAD,
                  HEAD_SUM_DOT=dot_sum, BLOCK_D=max(16, triton.next_power_of_2(D)),
                  num_warps=cfg["TEACHER_WARPS"], num_stages=cfg["TEACHER_STAGES"])
    s_meta = dict(meta, GRAD=grad, num_warps=cfg["STUDENT_WARPS"], num_stages=cfg["STUDENT_STAGES"])
    doc_start = _doc_start(N, cu_seqlens, dev)
    n_docs = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    p_bytes = p_dtype.itemsize * block_size
    entry_bytes = p_bytes + 4 + (4 * Di if grad else 0) + (4 * G if lse is None else 0)
    pad_bytes = B * Hkv * (triton.cdiv(N, block_size) + n_docs) * bm * p_bytes  # chunk padding of the P buffer
    chunk_list = list(_slot_chunks(block_idx, B, Hkv, Nq, block_size, doc_start, entry_bytes,
                                   cfg["BUDGET"] - pad_bytes))
    csrs = [_build_csr(c, N, doc_start, n_docs, block_size, bm, cfg["CHUNKS"]) for c in chunk_list]
    args = (N, Nq)
    scales = (D ** -0.5, Di ** -0.5)

    # pass 1: log-normalisers over the support, merged across slots and slot chunks; skipped when the
    # teacher's is given and one slot chunk holds every slot (the P pass then computes the student's)
    fuse = lse is not None and len(chunk_list) == 1
    lse_s = torch.full((B, Hkv, Nq), float("-inf"), device=dev)
    lse_t_acc = torch.full((B, Hkv, Nq, G), float("-inf"), device=dev) if lse is None else None
    for blocks, (ent, pkey, pc0, pnc) in [] if fuse else zip(chunk_list, csrs):
        S = blocks.shape[-1]
        part_s = torch.full((B, Hkv, Nq, S), float("-inf"), device=dev)
        part_t = torch.full((B, Hkv, Nq, S, G), float("-inf"), device=dev) if lse is None else part_s
        index_kl_teacher_kernel[(pkey.numel(),)](
            q, k, q_idx, k_idx, ent, pkey, pc0, pnc, part_s, part_s, part_t, part_s, *args, S, D, Di, *scales,
            MODE=1 if lse is None else 0, STUDENT_LSE=True, **t_meta)
        lse_s = torch.logaddexp(lse_s, part_s.logsumexp(-1))
        if lse is None:
            lse_t_acc = torch.logaddexp(lse_t_acc, part_t.logsumexp(-2))
    # [B, Nq, H]: an entry's G normalisers side by side, like its G query heads
    lse_t = (lse.float().transpose(1, 2) if lse is not None
             else lse_t_acc.permute(0, 2, 1, 3).reshape(B, Nq, H)).contiguous()

    # pass 2, per slot chunk: teacher distribution into the P buffer, then the student's loss and gradients
    loss = torch.zeros((), device=dev)
    dq = torch.zeros(B, Hkv, Nq, Di, device=dev) if grad else None
    dk = torch.zeros(B, N, Di, device=dev) if grad else None
    for blocks, (ent, pkey, pc0, pnc) in zip(chunk_list, csrs):
        S = blocks.shape[-1]
        p_buf = torch.empty(ent.numel(), block_size, dtype=p_dtype, device=dev)
        loss_t = torch.zeros(pkey.numel(), device=dev)
        loss_s = torch.zeros(pkey.numel(), device=dev)
        part_s = torch.full((B, Hkv, Nq, S), float("-inf"), device=dev) if fuse else loss_s
        index_kl_teacher_kernel[(pkey.numel(),)](
            q, k, q_idx, k_idx, ent, pkey, pc0, pnc, lse_t, part_s, p_buf, loss_t, *args, S, D, Di, *scales,
            MODE=2, STUDENT_LSE=fuse, **t_meta)
        if fuse:
            lse_s = part_s.logsumexp(-1)
        dq_part = torch.zeros(B, Hkv, Nq, S, Di, device=dev) if grad else loss_s
        index_kl_student_kernel[(pkey.numel(),)](
            q_idx, k_idx, ent, pkey, pc0, pnc, lse_s, p_buf, loss_s, dq_part, dk if grad else loss_s,
            *args, S, Di, scales[1], **s_meta)
        loss = loss + loss_t.sum() + loss_s.sum()
        if grad:
            dq += dq_part.sum(3)
    norm = 1.0 / (B * Nq * Hkv)
    if not grad:
        return loss * norm, None, None
    return loss * norm, dq.permute(0, 2, 1, 3).mul_(norm).contiguous(), dk.mul_(norm)


class IndexKLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse):
        grad = q_idx.requires_grad or k_idx.requires_grad
        loss, dq, dk = index_kl_fwd(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad)
        ctx.save_for_backward(dq, dk)
        ctx.dtypes = (q_idx.dtype, k_idx.dtype)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        dq, dk = ctx.saved_tensors
        return (None, None, (dq * d_loss).to(ctx.dtypes[0]), (dk * d_loss).to(ctx.dtypes[1]),
                None, None, None, None)


def index_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                  block_idx: torch.Tensor | None, block_size: int,
                  cu_seqlens: torch.Tensor | None = None, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Index distillation loss ``1/(B*Nq*Hkv) * sum_{b,i,r} KL(P[r,i,:] || Q[r,i,:])``, float32 scalar.

    ``q [B, Nq, H, D]``, ``k [B, N, Hkv, D]`` (teacher, no gradient), ``q_idx [B, Nq, Hkv, Di]``,
    ``k_idx [B, N, Di]`` (student, gradients); the queries are the last ``Nq <= N`` positions (``Nq = N``
    but for context parallelism). ``block_idx`` int32 ``[B, Hkv, Nq, topk]`` or None for the dense
    warm-up support. ``lse [B, H, Nq]``: the teacher's log-normaliser on that same support (what
    ``sparse_attention`` returns for this ``block_idx``); None computes it here. ``cu_seqlens`` is over
    the keys (``B == 1``).
    """
    B, Nq, H, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[1] < Nq or k.shape[-1] != D or H % k.shape[2]:
        raise ValueError(f"k must be [B, N >= Nq, Hkv, D] with Hkv dividing H, q is {tuple(q.shape)}, "
                         f"k is {tuple(k.shape)}")
    N, Hkv = k.shape[1], k.shape[2]
    if q_idx.ndim != 4 or q_idx.shape[:3] != (B, Nq, Hkv) or k_idx.shape != (B, N, q_idx.shape[-1]):
        raise ValueError(f"q_idx must be [B, Nq, Hkv, Di] and k_idx [B, N, Di], got {tuple(q_idx.shape)} "
                         f"and {tuple(k_idx.shape)}")
    if block_idx is not None and (block_idx.shape[:3] != (B, Hkv, Nq) or block_idx.dtype != torch.int32):
        raise ValueError(f"block_idx must be int32 [B, Hkv, Nq, topk] = [{B}, {Hkv}, {Nq}, k], got "
                         f"{block_idx.dtype} {tuple(block_idx.shape)}")
    if lse is not None and lse.shape != (B, H, Nq):
        raise ValueError(f"lse must be [B, H, Nq] = {(B, H, Nq)}, got {tuple(lse.shape)}")
    if max(D, q_idx.shape[-1]) > 256:
        raise ValueError(f"head dims above 256 (D={D}, Di={q_idx.shape[-1]}) are not supported by the "
                         f"Triton index KL; lower model.head_dim or attention.index_dim")
    _check_block_size(block_size)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, N)
    q, k = q.detach().contiguous(), k.detach().contiguous()
    return IndexKLLoss.apply(q, k, q_idx.contiguous(), k_idx.to(q_idx.dtype).contiguous(),
                             None if block_idx is None else block_idx.contiguous(), block_size,
                             cu_seqlens, None if lse is None else lse.detach())
