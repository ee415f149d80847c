"""MSA main branch: exact softmax attention of each query over the blocks its GQA group selected.

Same signature and semantics as ``msa.reference.sparse_attention``: ``q [B, Nq, H, D]``,
``k, v [B, N, Hkv, D]``, ``block_idx`` int32 ``[B, Hkv, Nq, topk]`` (block ids relative to the query's
document under ``cu_seqlens``, ``-1`` for unused slots, no duplicates) -> ``o [B, Nq, H, D]`` and
``lse [B, H, Nq]`` float32 without gradient; an empty support gives ``o = 0``, ``lse = -inf``.

Supports any G = H/Hkv, the head dims and block sizes of ``kernels.common.LIMITS`` (D 16/32/64/128,
block 16..128: a program holds a whole K/V block), bf16/fp16/fp32 inputs with fp32 accumulation,
int64 offsets (``N*H*D`` beyond 2^31), packed documents and queries that are the last ``Nq`` of ``N``
keys (context parallelism).

Forward, KV-outer: the reverse (block -> queries) CSR (``kernels.common.build_csr``) lets one program
hold a K/V block and multiply it against tiles of gathered (query, head) rows (64 rows: 4 queries x 16
heads; whole queries only, so 63 rows at G = 3); each (query, slot) gets a partial output and LSE,
merged by a combine kernel (no atomics); hot blocks are cut into several work items. Queries go in
chunks that bound the partial buffers.

Backward, after ``delta = rowsum(dO * O)``: dK/dV KV-outer over the same CSR (one partial per work
item, summed per block in a fixed order by a reduce kernel). dQ (``dq_path``): ``dkdv``, where the
dK/dV kernel also writes ``dS K`` over its key tile as dQ partials, or ``kv``, a second KV-outer kernel
that recomputes P and dS; a reduce sums a query's valid slots in slot order. ``auto`` takes ``dkdv``
for G >= 16 and ``kv`` below. No atomics anywhere, so the backward is deterministic. Launch settings
are the ``Launch`` argument (defaults: the H200 sweeps); nothing is read from the environment.

``sparse_attention_kl`` adds the index KL to the backward: the dK/dV kernel, which recomputes every
probability with the final lse, also forms the teacher (each entry's G rows averaged), the student and
the KL's gradients (``kernels.index_kl.kl_tile``); the student's log-normaliser comes from a pre-pass over
the same reverse index (``kernels.index_kl.student_lse``). Its ``q_idx``/``k_idx`` gradients use fp32
atomics.

The backward's kernels are in ``kernels/sparse_attention_bwd.py``; the launch settings (``Launch``,
``Tiles``) and the kernel code both directions share in ``kernels/sparse_tiles.py``.

Measured on an H200 (torch 2.11, Triton 3.6) at 128K tokens, 32 heads, D=128, Bk=128, k=16: forward
27 ms, forward+backward 91 ms (Hkv=2) and 109 ms (Hkv=4), against 907 ms for dense SDPA's
forward+backward; numbers, method and the variants that lost in docs/kernels.md (sparse_attention).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.common import (
    build_csr,
    build_layout,
    check_block_idx,
    check_cu_seqlens,
    check_limits,
    entry_query_slot,
)
from kernels.index_kl import student_lse
from kernels.ops import sparse_attention_fwd_args, sparse_attention_fwd_op, sparse_attention_tile_fwd_op
from kernels.sparse_attention_bwd import sparse_attention_bwd
from kernels.sparse_tile import tile_pays, tile_queries, tile_union
from kernels.sparse_tiles import (
    DATA_DEPENDENT,
    DQ_PATHS,
    LAUNCH,
    LOG2E,
    Launch,
    Tiles,
    _dkdv_tiles,
    _group,
    _query_slots,
    _rows,
    _work_item,
    check_fwd_path,
    dkdv_items,
    with_kl_tiles,
)
from msa.keep import kept

__all__ = ["sparse_attention", "sparse_attention_kl", "deferred_kl_fits", "Launch", "Tiles", "LAUNCH",
           "resolve_dq_path", "reverse_index", "sparse_attention_fwd", "sparse_attention_bwd"]


@triton.jit(do_not_specialize=DATA_DEPENDENT)
def sparse_attention_fwd_kernel(
    q, k, v, entries, work_bucket, work_start, work_end, vb_start, vb_end, part_o, part_lse,
    scale2, N, NQ, NV, NC, q0, w0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Work item ``w0 + program_id`` of the query chunk ``q0 .. q0+NC``: one K/V block against its
    entries; partials go to the chunk's ``part_o [B*Hkv*NC*topk*G, D]``."""
    e0, e1, i_b, i_r, o_k, m_k, b_k, b_v = _work_item(k, v, work_bucket, work_start, work_end, vb_start,
                                                      vb_end, w0 + tl.program_id(0), 0, N, NV, HKV, D, BK)
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    o_mq = o_m // G
    o_h = i_r * G + o_m % G
    for e in range(e0, e1, BLOCK_M // G):
        # rows past the last whole entry (G not dividing BLOCK_M) belong to the next tile
        m_row = (e + o_mq < e1) & (o_m < (BLOCK_M // G) * G)
        o_q, o_slot = entry_query_slot(entries, e + o_mq, m_row, i_b * HKV + i_r, NQ, TOPK)
        p_q = q + (((i_b.to(tl.int64) * NQ + o_q) * H + o_h)[:, None] * D + o_d[None, :])
        b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)
        # [BLOCK_M, BK]
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale2
        m_s = m_k[None, :] & (o_k[None, :] <= (N - NQ + o_q)[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mx = tl.max(b_s, 1)
        b_mx = tl.where(b_mx == float("-inf"), 0.0, b_mx)
        b_p = tl.exp2(b_s - b_mx[:, None])
        b_l = tl.sum(b_p, 1)
        b_o = tl.dot(b_p.to(b_v.dtype), b_v) / tl.where(b_l > 0, b_l, 1.0)[:, None]
        o_part = (((i_b * HKV + i_r) * NC + o_q - q0) * TOPK + o_slot).to(tl.int64) * G + o_m % G
        tl.store(part_o + o_part[:, None] * D + o_d[None, :], b_o.to(part_o.dtype.element_ty),
                 mask=m_row[:, None])
        tl.store(part_lse + o_part, b_mx + tl.log2(tl.where(b_l > 0, b_l, 1.0)), mask=m_row)


@triton.jit
def sparse_attention_fwd_combine_kernel(
    part_o, part_lse, block_idx, tok_start, o, lse, N, NQ, NC, q0,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """``o`` and ``lse`` of a query's G heads: its valid slots' partials merged in slot order."""
    i_bh, i_b, i_r, i_q, o_g, m_g, o_d, pos, e0 = _query_slots(tok_start, N, NQ, NC, q0, HKV, G, TOPK, D, BLOCK_G)
    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i_s in range(TOPK):
        blk = tl.load(block_idx + (i_bh.to(tl.int64) * NQ + i_q) * TOPK + i_s)
        if (blk >= 0) & (blk * BK <= pos):
            o_e = (e0 + i_s) * G + o_g
            b_ls = tl.load(part_lse + o_e, mask=m_g, other=0.0)
            b_os = tl.load(part_o + o_e[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.0)
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
    i_row = i_b.to(tl.int64) * NQ + i_q
    tl.store(o + (i_row * H + i_r * G + o_g[:, None]) * D + o_d[None, :], b_acc.to(o.dtype.element_ty),
             mask=m_g[:, None])
    tl.store(lse + (i_b.to(tl.int64) * H + i_r * G + o_g) * NQ + i_q, b_lse, mask=m_g)


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
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_limits(head_dim=D, block_size=block_size, dtype=q.dtype)
    if block_idx.ndim != 4 or block_idx.shape[:3] != (B, Hkv, NQ):
        raise ValueError(f"block_idx must be [B, Hkv, Nq, topk] = [{B}, {Hkv}, {NQ}, topk], "
                         f"got {tuple(block_idx.shape)}")
    return B, H, Hkv, D


def _with_fwd_path(launch: Launch, fwd_path: str | None) -> Launch:
    if fwd_path is not None:
        launch = dataclasses.replace(launch, fwd_path=fwd_path)
    check_fwd_path(launch.fwd_path)
    return launch


def resolve_dq_path(dq_path: str, G: int) -> str:
    """``auto``: ``dkdv`` for G >= 16, ``kv`` below, as measured on the H200 (docs/kernels.md: 128K
    forward+backward 90.8 vs 93.8 ms at G = 16, 127.8 vs 108.7 ms at G = 8). Where the forward then runs the
    tile kernel, ``sparse_attention``'s ``auto`` takes the tile dQ instead (``sparse_attention_kl`` resolves
    before its forward, so keeps this one)."""
    if dq_path == "auto":
        return "dkdv" if G >= 16 else "kv"
    if dq_path not in DQ_PATHS:
        raise ValueError(f"dq_path must be one of {DQ_PATHS}, got {dq_path!r} (attention.dq_path)")
    return dq_path


def reverse_index(q, block_idx, block_size, layout, dq_path, launch):
    """The reverse CSR of ``block_idx`` for ``q``'s queries, its work items and query chunks as
    ``csr_sizes`` sets them."""
    B, NQ, H, D = q.shape
    chunk, q_chunk = csr_sizes(B, NQ, H, block_idx.shape[1], D, block_idx.shape[-1], block_size,
                               layout.vb_start.numel(), q.dtype, dq_path, launch)
    return build_csr(block_idx, layout, block_size, layout.tok_start.numel() - NQ, chunk, q_chunk)


def csr_sizes(B, NQ, H, Hkv, D, topk, block_size, n_vblocks, dtype, dq_path, launch) -> tuple[int, int]:
    """``(chunk, q_chunk)`` of the reverse CSR: query chunks sized so the KV-outer partials (forward, dQ) fit
    ``part_bytes``; work items of ``chunk`` entries, or more where ``entries/chunk + buckets`` would pass the
    work items that ``dkdv_bytes`` holds (at 1M tokens, not at 128K). That does not bound the backward's fp32
    dK/dV partials, one per work item: each query chunk has up to ``buckets`` items of its own, so their
    number grows with chunks x buckets; the backward takes them a group of chunks at a time (``dkdv_groups``)."""
    part = torch.float32 if dtype == torch.float32 else dtype
    # the forward's o/lse partials, or the dkdv dQ path's partials (one per key tile of a block)
    G = H // Hkv
    n_sub = 1
    if dq_path == "dkdv":
        n_sub = block_size // _dkdv_tiles(launch, dq_path, G, block_size)["BLOCK_N"]
    per_query = B * H * topk * max(D * part.itemsize + 4, n_sub * D * part.itemsize)
    q_chunk = max(1, min(NQ, launch.part_bytes // per_query))
    NB = B * Hkv * n_vblocks
    max_work = max(2 * NB, dkdv_items(launch, block_size, D))
    chunk = max(launch.chunk, -(-(B * Hkv * NQ * topk) // (max_work - NB)))
    return chunk, q_chunk


def sparse_attention_fwd(q, k, v, block_idx, block_size, layout, scale, csr, launch=LAUNCH):
    B, NQ, H, D = q.shape
    N, Hkv, topk = k.shape[1], k.shape[2], block_idx.shape[-1]
    G = H // Hkv
    o = torch.empty_like(q)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    consts = dict(H=H, HKV=Hkv, G=G, TOPK=topk, BK=block_size, D=D)
    # partial outputs in the input's precision (bf16/fp16 halve the bytes the combine moves)
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    NC = csr.q_chunk
    for c, q0 in enumerate(range(0, NQ, NC)):
        nc = min(NC, NQ - q0)
        part_o = torch.empty(B * Hkv * nc * topk * G, D, dtype=part_dtype, device=q.device)
        part_lse = torch.empty(B * Hkv * nc * topk * G, dtype=torch.float32, device=q.device)
        w0, w1 = csr.chunk_work[c], csr.chunk_work[c + 1]
        if w1 > w0:
            sparse_attention_fwd_kernel[(w1 - w0,)](
                q, k, v, csr.entries, csr.work_bucket, csr.work_start, csr.work_end, layout.vb_start,
                layout.vb_end, part_o, part_lse, scale * LOG2E, N, NQ, layout.vb_start.numel(), nc, q0, w0,
                **_rows(launch.fwd, G), **consts)
        sparse_attention_fwd_combine_kernel[(nc, B * Hkv)](
            part_o, part_lse, block_idx, layout.tok_start, o, lse, N, NQ, nc, q0,
            **_group(launch.combine, G), **consts)
        del part_o, part_lse  # free before the next chunk's allocation: one chunk's partials at a time
    return o, lse


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, cu_seqlens, scale, dq_path, launch, q_idx=None, k_idx=None,
                sink=None, sink_scale=1.0):
        q, k, v, block_idx = (x.contiguous() for x in (q, k, v, block_idx))

        def run():
            layout = build_layout(k.shape[1], block_size, cu_seqlens, q.device)
            union, tile = None, launch.fwd_path == "tile"
            if launch.fwd_path != "kv":
                T = tile_queries(launch.tile_fwd, q.shape[2] // k.shape[2])
                union = tile_union(block_idx, layout.tok_start, k.shape[1], block_size, T)
                tile = tile or tile_pays(q.shape[2] // k.shape[2], union[0], union[2], T)
            # dq_path "auto" follows the forward to the tile dQ (docs/kernels.md: where the tile forward pays, the
            # tile dQ takes another 5-11% off the forward+backward), else picks by G
            bwd_dq = "tile" if tile and dq_path == "auto" else resolve_dq_path(dq_path, q.shape[2] // k.shape[2])
            csr = reverse_index(q, block_idx, block_size, layout, bwd_dq, launch)  # the backward's, either way
            if tile:
                o, lse = sparse_attention_tile_fwd_op(q, k, v, *union, list(dataclasses.astuple(launch.tile_fwd)),
                                                      block_size, scale)
            else:
                o, lse = sparse_attention_fwd_op(q, k, v, block_idx, *sparse_attention_fwd_args(layout, csr, launch),
                                                 block_size, scale)
            return layout, csr, o, lse, bwd_dq

        # selective checkpointing keeps the reverse index (a sort and a device->host read to build) and
        # (o, lse) for the block's recompute (msa.keep); the backward needs all four, and the dQ path chosen
        layout, csr, o, lse, bwd_dq = kept("msa::sparse_attention", run)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, q_idx, k_idx)
        ctx.layout, ctx.csr, ctx.block_size, ctx.scale = layout, csr, block_size, scale
        ctx.dq_path, ctx.launch, ctx.sink, ctx.sink_scale = bwd_dq, launch, sink, sink_scale
        ctx.mark_non_differentiable(lse)
        if q_idx is None:
            return o, lse
        # the index KL is computed in backward: its value goes to ``sink``, this output only carries the
        # gradient (the loss's weight on it) to the backward
        return o, lse, q_idx.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, do, dlse, dkl=None):
        q, k, v, o, lse, block_idx, q_idx, k_idx = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        index = None
        if q_idx is not None:
            index = (q_idx, k_idx, student_lse(q_idx, k_idx, block_idx, ctx.block_size, ctx.layout, ctx.csr))
        grads = sparse_attention_bwd(q, k, v, o, lse, do, block_idx, ctx.block_size, ctx.layout, ctx.scale,
                                     ctx.csr, ctx.dq_path, ctx.launch, index)
        dq, dk, dv = grads[:3]
        dq_idx = dk_idx = None
        if index is not None:
            loss, dq_idx, dk_idx = grads[3]
            ctx.sink.append(loss * ctx.sink_scale)
            # a non-finite KL (the caller skips that step) must not reach the index weights' gradients
            weight = torch.zeros((), device=q.device) if dkl is None else dkl.float()
            weight = torch.where(torch.isfinite(loss), weight, 0.0)
            dq_idx = torch.nan_to_num(dq_idx * weight, 0.0, 0.0, 0.0).to(q_idx.dtype)
            dk_idx = torch.nan_to_num(dk_idx * weight, 0.0, 0.0, 0.0).to(k_idx.dtype)
        return dq, dk, dv, None, None, None, None, None, None, dq_idx, dk_idx, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                     block_size: int, cu_seqlens: torch.Tensor | None = None, scale: float | None = None, *,
                     dq_path: str = "auto", fwd_path: str | None = None, launch: Launch = LAUNCH
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of each query over the visible tokens of its group's selected blocks.

    ``q [B, Nq, H, D]``, ``k, v [B, N, Hkv, D]`` (``Nq <= N``: the queries are the last ``Nq``
    positions), ``block_idx`` int32 ``[B, Hkv, Nq, topk]``, ``cu_seqlens`` int32 ``[n_docs + 1]`` over
    the keys (``B == 1``) -> ``o [B, Nq, H, D]`` (dtype of ``q``) and ``lse [B, H, Nq]`` float32
    (natural log, no gradient). ``scale`` defaults to ``1/sqrt(D)``. ``dq_path`` picks the backward's dQ
    kernels: ``"auto"`` (``"tile"`` where the tile forward ran, else ``"dkdv"`` for G >= 16 and ``"kv"`` below),
    ``"kv"``, ``"dkdv"`` or ``"tile"`` (``kernels/sparse_tile.py``: each tile of queries over the union of its
    blocks, no partials); ``fwd_path`` the
    forward's (``"kv"``: KV-outer; ``"tile"``: ``kernels/sparse_tile.py``; ``"auto"``: the tile forward where the
    selection's tile union is under ``kernels.sparse_tile.TILE_PAYS_BELOW``; None: ``launch.fwd_path``);
    ``launch`` holds the kernels' launch settings (``Launch``; the default is the measured one).
    """
    B, H, Hkv, D = _check_inputs(q, k, v, block_idx, block_size)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, k.shape[1])
    # a bad name fails here; "auto" is resolved in the forward, after the tile forward's choice
    resolve_dq_path(dq_path, H // Hkv)
    launch = _with_fwd_path(launch, fwd_path)
    scale = D ** -0.5 if scale is None else float(scale)
    check_block_idx(block_idx, -(-k.shape[1] // block_size))  # before the int32 cast can wrap
    return SparseAttentionFunction.apply(q, k, v, block_idx.to(torch.int32), block_size, cu_seqlens,
                                         scale, dq_path, launch)


def deferred_kl_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``sparse_attention_kl`` takes these heads: G = H / Hkv a power of two (its tile sums
    whole groups of G rows)."""
    G = q.shape[2] // k.shape[2]
    return G & (G - 1) == 0


def sparse_attention_kl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                        k_idx: torch.Tensor, block_idx: torch.Tensor, block_size: int,
                        cu_seqlens: torch.Tensor | None = None, *, sink: list, sink_scale: float = 1.0,
                        dq_path: str = "auto", fwd_path: str | None = None, launch: Launch = LAUNCH
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sparse_attention`` and the index KL of its support with the teacher computed where the backward
    already has the attention probabilities: no pass over ``q k^T`` of its own (``index_kl_loss`` makes
    two). Returns ``(o, lse, kl)``: ``kl`` is a zero float32 scalar that only carries the gradient;
    the backward appends the KL's value (``index_kl_loss(q, k, q_idx, k_idx, block_idx, ..., lse=lse)``,
    a detached float32 scalar, times ``sink_scale``) to ``sink`` and gives ``q_idx``, ``k_idx`` its gradient times the
    incoming one. So the value is known after backward only, and a forward without backward (eval)
    has none: use ``sparse_attention`` and ``index_kl_loss`` there. The default softmax scale; G a power
    of two (``deferred_kl_fits``); gradients of ``q_idx`` and ``k_idx`` accumulate in fp32 atomics
    (reproducible up to summation order, as ``index_kl_loss``'s ``dk_idx``). Its dK/dV kernel runs with
    ``launch.dkdv_kl`` (``with_kl_tiles``), not the plain kernel's tiles."""
    B, H, Hkv, D = _check_inputs(q, k, v, block_idx, block_size)
    if not deferred_kl_fits(q, k):
        raise ValueError(f"sparse_attention_kl needs H / Hkv a power of two, got {H} / {Hkv}")
    DI = q_idx.shape[-1]
    if q_idx.shape != (B, q.shape[1], Hkv, DI) or k_idx.shape != (B, k.shape[1], DI):
        raise ValueError(f"q_idx must be [B, Nq, Hkv, Di] and k_idx [B, N, Di], got {tuple(q_idx.shape)} "
                         f"and {tuple(k_idx.shape)}")
    check_limits(index_dim=DI, dtype=q_idx.dtype)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, k.shape[1])
    dq_path = resolve_dq_path(dq_path, H // Hkv)
    launch = _with_fwd_path(launch, fwd_path)
    check_block_idx(block_idx, -(-k.shape[1] // block_size))
    return SparseAttentionFunction.apply(q, k, v, block_idx.to(torch.int32), block_size, cu_seqlens, D ** -0.5,
                                         dq_path, with_kl_tiles(launch, dq_path), q_idx.contiguous(),
                                         k_idx.to(q_idx.dtype).contiguous(), sink, float(sink_scale))
