"""MSA index top-k: fused ``q_idx . k_idx``, causal block max-pool and a running top-k (exp-free).

One program owns ``BLOCK_T`` consecutive query tokens of one document and all ``Hkv`` index-query
heads of them (``BLOCK_T * Hkv`` rows, so each ``k_idx`` tile it loads serves every group). It walks
the key blocks that lie wholly before its own block, takes each block's row-wise maximum of the raw
scores in registers and keeps a running top-``(topk - 1)`` of ``(score, block id)`` per row with its
minimum; from key block ``gate_from`` on, a tile runs the insertion only when some row's block maximum
beats that minimum (one tile-wide reduction). The own block needs no score: it always takes slot 0.
Only ``block_idx`` is written; neither the ``N x N`` scores nor the ``N x N/Bk`` block scores ever
reach GPU memory.

Semantics are ``msa.reference.select_blocks``: ranking on raw scores (the ``1/sqrt(Di)`` scale is
positive and does not change the order), ties to the lower block id, ``-1`` in the slots left when
fewer than ``topk`` blocks are visible, block ids relative to the query's document under
``cu_seqlens``. Near-ties may order differently from the fp32 reference because the dot products are
summed in another order (tf32/bf16 tensor-core products on GPU).

Supports any ``Hkv``, the index dims and block sizes of ``kernels.common.LIMITS`` (``Di <= 256``,
padded to a power of two; block 16..128), bf16/fp16/fp32 inputs with fp32 accumulation (or e4m3
operands with ``fp8=True``, keys with one scale per key block by default), int64 offsets. Launch
settings and knobs are arguments of ``select_blocks_fwd`` with the measured defaults. Measured on an
H200: 7.0 ms at N = 128K, Hkv = 2, Di = 128 (626 TFLOP/s useful, 80% of its measured bf16 matmul rate),
5.2 ms with fp8 operands; 937 ms at 1M tokens, Hkv = 4 (``docs/kernels.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from kernels.common import build_layout, check_cu_seqlens, check_limits, mark_valid_block_idx, per_cu_seqlens
from kernels.ops import select_blocks_op
from msa.keep import kept

__all__ = ["select_blocks", "select_blocks_fwd", "doc_tiles"]


@triton.jit
def _block_max(b_q, p_k, p_ks, blk, o_kd, m_kd, o_n, DI, BK: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, IEEE: tl.constexpr, K_SCALE: tl.constexpr):
    """Row maxima ``[BLOCK_M]`` of ``b_q . k^T`` over the keys of whole block ``blk`` of the document whose
    keys start at ``p_k`` (scales at ``p_ks``)."""
    p_k += tl.cast(blk, tl.int64) * (BK * DI)
    for c in tl.static_range(0, BK, BLOCK_N):
        b_k = tl.load(p_k + c * DI + o_kd, mask=m_kd, other=0.0)
        # [BLOCK_M, BLOCK_N]
        if IEEE:
            b_sc = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_sc = tl.dot(b_q, tl.trans(b_k))
        if K_SCALE == 1:
            # fp8 keys with a per-token scale; the per-row query scale does not change the order
            b_sc *= tl.load(p_ks + blk * BK + c + o_n)[None, :]
        if c == 0:
            b_best = tl.max(b_sc, 1)
        else:
            b_best = tl.maximum(b_best, tl.max(b_sc, 1))
    if K_SCALE == 2:
        # one scale per key block (positive): it factors out of the block max, one multiply per row
        b_best *= tl.load(p_ks + blk * BK)
    return b_best


@triton.jit
def _topk_insert(b_s, b_i, thr, b_new, hit, blk):
    """Offer ``(b_new[m], blk)`` to each row's running top-(k-1) ``(b_s, b_i)``, whose minimum is ``thr``.

    Blocks arrive in ascending id order, so a new block enters only on a strictly higher score
    (``hit = b_new > thr``) and replaces the highest id among the row's minima; ids are distinct (empty
    slots hold -1, -2, ...), so exactly one slot changes. Returns the new set and its minimum."""
    evict = tl.max(tl.where(b_s == thr[:, None], b_i, -2147483647 - 1), 1)
    upd = (b_i == evict[:, None]) & hit[:, None]
    b_s = tl.where(upd, b_new[:, None], b_s)
    b_i = tl.where(upd, blk, b_i)
    return b_s, b_i, tl.min(b_s, 1)


@triton.jit
def select_blocks_fwd_kernel(
    q, k, k_scale, block_idx, tile_q0, tile_ds, tile_de,
    N, NQ, n_tiles, DI, gate_from,
    HKV: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TOPK: tl.constexpr, TK: tl.constexpr,
    TKO: tl.constexpr, IEEE: tl.constexpr, K_SCALE: tl.constexpr,
):
    # heaviest (latest) tiles first: the causal work grows with the tile index
    i_t = n_tiles - 1 - tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    # queries are the last NQ key positions; tiles wholly before them have no work
    off = N - NQ
    q0 = tl.load(tile_q0 + i_t)
    if (q0 < 0) | (q0 + BLOCK_T <= off):
        return
    ds = tl.load(tile_ds + i_t)
    de = tl.load(tile_de + i_t)
    own = (q0 - ds) // BK

    # row m is (token q0 + m // HKV, group m % HKV): consecutive rows are contiguous in q_idx
    o_m = tl.arange(0, BLOCK_M)
    o_tok = q0 + o_m // HKV
    o_r = o_m % HKV
    m_m = (o_m < BLOCK_T * HKV) & (o_tok < de) & (o_tok >= off)
    o_tq = tl.where(m_m, o_tok - off, 0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < DI
    p_q = q + ((i_b * NQ + o_tq) * HKV + o_r) * DI
    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)

    # running top-(k-1) per row: slots past TOPK - 1 (TK is a power of two) hold +inf, never the minimum;
    # empty slots -inf with distinct negative ids. thr: each row's minimum, its (k-1)-th best so far
    o_c = tl.arange(0, TK)
    m_c = (o_c < TOPK - 1)[None, :]
    b_s = tl.where(m_c, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, TK), tl.float32)
    b_i = -1 - o_c[None, :] + tl.zeros((BLOCK_M, TK), tl.int32)
    thr = tl.min(b_s, 1)
    # blocks before the own block are whole and visible to every row of the tile: one scalar base
    # pointer per block plus int32 offsets inside it
    o_n = tl.arange(0, BLOCK_N)
    o_kd = o_n[:, None] * DI + o_d[None, :]
    p_k = k + (i_b * N + ds) * DI
    p_ks = k_scale
    if K_SCALE:
        p_ks += i_b * N + ds
    if TOPK > 1:
        # early blocks almost always enter some row: insert unconditionally up to gate_from
        n_all = tl.minimum(own, gate_from)
        for blk in range(0, n_all):
            b_best = _block_max(b_q, p_k, p_ks, blk, o_kd, m_d[None, :], o_n, DI,
                                BK, BLOCK_M, BLOCK_N, IEEE, K_SCALE)
            b_s, b_i, thr = _topk_insert(b_s, b_i, thr, b_best, b_best > thr, blk)
        # later blocks: skip the insertion (two row reductions and the updates) unless some row of the
        # tile beats its running (k-1)-th best; one tile-wide reduction decides
        for blk in range(n_all, own):
            b_best = _block_max(b_q, p_k, p_ks, blk, o_kd, m_d[None, :], o_n, DI,
                                BK, BLOCK_M, BLOCK_N, IEEE, K_SCALE)
            hit = b_best > thr
            if tl.max(hit.to(tl.int32), 0) > 0:
                b_s, b_i, thr = _topk_insert(b_s, b_i, thr, b_best, hit, blk)

    # write out: own block, then the running set by descending score (ties to the lower id)
    o_co = tl.arange(0, TKO)
    b_out = tl.where(o_co[None, :] == 0, own, -1) + tl.zeros((BLOCK_M, TKO), tl.int32)
    for t in tl.static_range(1, TOPK):
        mx = tl.max(tl.where(m_c, b_s, float("-inf")), 1)
        hit = m_c & (b_s == mx[:, None]) & (b_i >= 0)
        sel = tl.min(tl.where(hit, b_i, 2147483647), 1)
        sel = tl.where(mx > float("-inf"), sel, -1)
        b_out = tl.where(o_co[None, :] == t, sel[:, None], b_out)
        b_s = tl.where(hit & (b_i == sel[:, None]), float("-inf"), b_s)
    p_out = block_idx + ((i_b * HKV + o_r) * NQ + o_tq) * TOPK
    tl.store(p_out[:, None] + o_co[None, :], b_out, mask=m_m[:, None] & (o_co < TOPK)[None, :])


# Tiles of one cu_seqlens tensor, for as long as it lives unwritten (every MSA layer of a step selects over the
# same one: building them was 14 small launches per layer on a packed row), and of one-document rows by shape.
_TILES = WeakIdKeyDictionary()  # cu_seqlens -> ((version, N, tile, device), tiles): kernels.common.per_cu_seqlens
_ONE_DOC_TILES: dict = {}  # (N, tile, device) -> tiles (read only)


def doc_tiles(N: int, tile: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
    """Query tiles aligned to document starts, built on the device without a host sync, once per
    ``cu_seqlens`` tensor (while it is not written to) and shape.

    Returns int32 ``(q0, doc_start, doc_end)`` of length ``N // tile + n_docs`` (an upper bound on the
    number of tiles); unused tiles have ``q0 = -1``. ``tile`` must divide the block size so that every
    token of a tile shares its own block. The tensors are shared: read them, do not write to them."""
    return per_cu_seqlens(_TILES, _ONE_DOC_TILES, cu_seqlens, (N, tile), device,
                          lambda dev: _build_doc_tiles(N, tile, cu_seqlens, dev))


def _build_doc_tiles(N: int, tile: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
    if cu_seqlens is None:
        q0 = torch.arange(0, N, tile, device=device, dtype=torch.int32)
        return q0, torch.zeros_like(q0), torch.full_like(q0, N)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    n_docs = cu.numel() - 1
    n_t = (cu[1:] - cu[:-1] + tile - 1) // tile
    cum = n_t.cumsum(0)
    t = torch.arange(N // tile + n_docs, device=device)
    doc = torch.searchsorted(cum, t, right=True)
    valid = doc < n_docs
    doc = doc.clamp(max=n_docs - 1)
    ds = cu[doc]
    q0 = torch.where(valid, ds + (t - (cum[doc] - n_t[doc])) * tile, -1)
    return q0.to(torch.int32), ds.to(torch.int32), cu[doc + 1].to(torch.int32)


def _to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) e4m3 quantisation: ``x ~= x8 * scale``."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def _keys_to_fp8_blocks(k: torch.Tensor, block_size: int, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 keys with one scale per (document-relative) key block: ``k [B, N, Di] ~= k8 * scale[..., None]``,
    every token carrying its block's scale (the kernel reads the block's first). e4m3 is a float format,
    so a token whose values are smaller than its block's largest loses precision only below ~2^-15 of it."""
    B, N, _ = k.shape
    pos = torch.arange(N, device=k.device)
    ds = build_layout(N, block_size, cu_seqlens, k.device).tok_start  # each token's document start
    start = (pos - (pos - ds) % block_size).expand(B, N)
    amax = k.float().abs().amax(-1)
    amax = torch.zeros_like(amax).scatter_reduce(1, start, amax, "amax").gather(1, start)
    scale = amax.clamp_min(1e-12) / 448.0
    return (k.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


# gate_from's value that never skips. Off by default: on the benchmark's random scores the gate never paid
# (H200, 1M tokens, Hkv = 2: 480 ms gated from block 2770, 490 from block 0, 462 off); scores of a
# trained indexer, which settle on few blocks early, may skip far more often (docs/kernels.md).
GATE_OFF = 2**31 - 1


def select_blocks_fwd(q_idx, k_idx, block_size, topk, cu_seqlens=None, fp8=False, block_t=None, block_n=None,
                      num_warps=None, num_stages=None, gate_from=GATE_OFF, fp8_key_scale="block"):
    """Launch settings as arguments: ``block_t`` query tokens per program (default ``128 / Hkv``
    rounded to a power of two), ``block_n`` keys per tile, warps and stages; ``gate_from``: first key
    block (document-relative id) from which a tile runs the top-k insertion only when some row beats its
    running (k-1)-th best; ``fp8_key_scale``: ``"block"`` (one e4m3 scale per key block, out of the block
    max) or ``"token"`` (one per key)."""
    B, NQ, Hkv, DI = q_idx.shape
    N = k_idx.shape[1]
    k_scale = None
    if fp8:
        if fp8_key_scale not in ("block", "token"):
            raise ValueError(f"fp8_key_scale must be 'block' or 'token', got {fp8_key_scale!r}")
        q_idx, _ = _to_fp8(q_idx)
        k_idx, k_scale = _keys_to_fp8_blocks(k_idx, block_size, cu_seqlens) if fp8_key_scale == "block" \
            else _to_fp8(k_idx)
    hkv_p = triton.next_power_of_2(Hkv)
    block_t = block_t or max(1, min(block_size, 128 // hkv_p))
    block_n = block_n or min(block_size, 128)
    if block_size % block_t or block_size % block_n:
        raise ValueError(f"block_t={block_t} and block_n={block_n} must divide block_size={block_size}")
    block_m = max(16, triton.next_power_of_2(block_t * Hkv))
    q0, ds, de = doc_tiles(N, block_t, cu_seqlens, q_idx.device)
    block_idx = torch.empty(B, Hkv, NQ, topk, dtype=torch.int32, device=q_idx.device)
    tk = triton.next_power_of_2(max(topk - 1, 1))
    grid = (q0.numel(), B)
    select_blocks_fwd_kernel[grid](
        q_idx, k_idx, k_scale, block_idx, q0, ds, de, N, NQ, q0.numel(), DI,
        min(max(gate_from, 0), 2**31 - 1),
        HKV=Hkv, BK=block_size, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(32 if fp8 else 16, triton.next_power_of_2(DI)), TOPK=topk, TK=tk,
        TKO=triton.next_power_of_2(topk), IEEE=q_idx.dtype == torch.float32,
        K_SCALE=0 if not fp8 else 2 if fp8_key_scale == "block" else 1,
        num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages or 2,
    )
    return block_idx


@torch.no_grad()
def select_blocks(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int,
                  cu_seqlens: torch.Tensor | None = None, *, fp8: bool = False, fp8_key_scale: str = "block",
                  gate_from: int = GATE_OFF) -> torch.Tensor:
    """Top-k key blocks per (query, group) by raw max-pooled index score, in one fused pass.

    ``q_idx [B, Nq, Hkv, Di]``, ``k_idx [B, N, Di]`` (bf16/fp16/fp32, same dtype; the queries are the
    last ``Nq <= N`` positions, ``Nq = N`` but for context parallelism) -> ``block_idx`` int32
    ``[B, Hkv, Nq, topk]``: own block in slot 0, the others by descending score, ``-1`` padding.
    ``cu_seqlens`` int32 ``[n_docs + 1]`` over the keys (``B == 1``) makes block ids document-relative.
    ``fp8=True`` (Hopper and newer) scores with e4m3 operands, the keys scaled per key block
    (``fp8_key_scale="block"``, or ``"token"``: per key): about twice the matmul rate, and a selection
    that differs from the exact one on near-ties. ``gate_from``: see ``select_blocks_fwd`` (off by default).
    """
    B, NQ, Hkv, DI = q_idx.shape
    N = k_idx.shape[1]
    if k_idx.ndim != 3 or k_idx.shape[0] != B or N < NQ or k_idx.shape[2] != DI:
        raise ValueError(f"k_idx must be [B, N >= Nq, Di] for q_idx {tuple(q_idx.shape)}, "
                         f"got {tuple(k_idx.shape)}")
    if k_idx.dtype != q_idx.dtype:
        raise ValueError(f"q_idx and k_idx must share a dtype, got {q_idx.dtype} and {k_idx.dtype}")
    if topk < 1:
        raise ValueError(f"attention.topk must be >= 1, got {topk}")
    check_limits(block_size=block_size, index_dim=DI, dtype=q_idx.dtype)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, N)
    # CPU tensors reach a kernel only under the Triton interpreter, which runs fp8 too (the tests use it)
    if fp8 and q_idx.is_cuda and torch.cuda.get_device_capability(q_idx.device) < (8, 9):
        raise ValueError("select_blocks(fp8=True) needs a GPU with fp8 matmuls (sm_89+); call it with "
                         "fp8=False here")
    # kept by selective checkpointing for the block's recompute (msa.keep)
    block_idx = kept("msa::select_blocks", lambda: select_blocks_op(
        q_idx.contiguous(), k_idx.contiguous(), block_size, topk, cu_seqlens, fp8, fp8_key_scale, gate_from))
    return mark_valid_block_idx(block_idx, -(-N // block_size))
