"""What the MSA kernels share, in plain torch on the inputs' device (and ``work_keys``, the one piece
inside kernels: how a kernel reads a work item of ``build_csr``'s index).

- ``LIMITS`` and ``check_limits``: the one copy of each shape rule the Triton kernels impose. The
  kernels check their arguments with it, and so do ``msa/layer.py`` and the trainer at start-up, so a
  config the kernels cannot run fails before the first step with the key to change.
- ``check_cu_seqlens`` and ``check_block_idx``: clear errors for malformed index inputs.
- the token layout of packed documents (``build_layout``): per token its document's first token
  (``tok_start``) and its key block inside the document; the *virtual blocks* ``[vb_start, vb_end)``
  tile every document with ``block_size`` keys from the document's start, so each token belongs to
  exactly one virtual block and the block id ``c`` of a query in the document starting at ``s`` names
  the virtual block ``vb_off(doc) + c``.
- two reverse (block -> entries) CSR indexes of a ``block_idx``, one per consumer, on one sorting
  core (``_sort_entries``): every (batch, group, query, slot) entry whose block holds a key the query
  can see, grouped by key block with a stable sort (the queries of a block stay in ascending order).
  ``build_csr`` (sparse_attention) cuts each block's entries into work items of at most ``chunk``,
  per query chunk, so a hot block (a sink every query picks) is spread over many programs;
  ``build_kl_csr`` (index_kl) pads each block's entries to ``block_m``-row chunks and groups chunks
  into a program table whose size is known on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from msa.dense import tensor_version


@dataclass(frozen=True)
class Limits:
    """Shapes and dtypes the Triton kernels support."""

    # D: the kernels hold whole ``tl.arange(0, D)`` rows (no padded head dims)
    head_dims: tuple[int, ...] = (16, 32, 64, 128)
    # Bk: tensor-core tiles need >= 16 keys; the KV-outer programs hold a whole K/V block (<= 128)
    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    # Di: padded to a power of two and held as one tile
    max_index_dim: int = 256
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


LIMITS = Limits()

_OR_REFERENCE = "or use attention.impl=reference"


def check_limits(*, head_dim: int | None = None, block_size: int | None = None, index_dim: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Raise ``ValueError`` naming the config key to change if a setting lies outside ``LIMITS``;
    ``None`` skips that check."""
    if head_dim is not None and head_dim not in LIMITS.head_dims:
        raise ValueError(f"model.head_dim={head_dim}: the Triton kernels support head dims "
                         f"{', '.join(map(str, LIMITS.head_dims))}; change model.head_dim {_OR_REFERENCE}")
    if block_size is not None and block_size not in LIMITS.block_sizes:
        raise ValueError(f"attention.block_size={block_size}: the Triton kernels support block sizes "
                         f"{', '.join(map(str, LIMITS.block_sizes))} (a program holds a whole key block); "
                         f"change attention.block_size {_OR_REFERENCE}")
    if index_dim is not None and not 1 <= index_dim <= LIMITS.max_index_dim:
        raise ValueError(f"attention.index_dim={index_dim}: the Triton kernels support index dims up to "
                         f"{LIMITS.max_index_dim}; change attention.index_dim {_OR_REFERENCE}")
    if dtype is not None and dtype not in LIMITS.dtypes:
        raise ValueError(f"inputs of dtype {dtype}: the Triton kernels take "
                         f"{', '.join(str(d) for d in LIMITS.dtypes)}; use one of them {_OR_REFERENCE}")


# What one cu_seqlens tensor has already been found to be, for as long as it lives and is not written
# to: every MSA layer of a step gets the same tensor three times (selection, attention, KL), and each
# check or layout built again cost device->host reads (which stall the launch queue) and small launches.
_CHECKED = WeakIdKeyDictionary()  # cu_seqlens -> (version, N) it passed check_cu_seqlens with
_LAYOUTS = WeakIdKeyDictionary()  # cu_seqlens -> ((version, N, block_size, device), Layout)
_ONE_DOC_LAYOUTS: dict = {}  # (N, block_size, device) -> Layout of one document per row (read only)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, N: int) -> None:
    """Clear errors for a malformed ``cu_seqlens``: one small device->host read, none for a tensor that
    passed with the same ``N`` and has not been written to since."""
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-d int32 tensor [n_docs + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    version = tensor_version(cu_seqlens)
    if version is not None and _CHECKED.get(cu_seqlens) == (version, N):
        return
    cu = cu_seqlens.long()
    if bool((cu[0] != 0) | (cu[-1] != N) | (cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {cu.tolist()}")
    if version is not None:
        _CHECKED[cu_seqlens] = (version, N)


# block_idx tensors that select_blocks made (valid by construction) for ``n_blocks``: checking one cost a
# device->host read per MSA layer and forward, which stalls the launch queue (22 per step of model=small)
_VALID = WeakIdKeyDictionary()  # block_idx -> (version, n_blocks)


def mark_valid_block_idx(block_idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Record that ``block_idx`` holds valid ids for ``n_blocks`` (``select_blocks``'s own output), so
    ``check_block_idx`` need not read it back while it is not written to."""
    version = tensor_version(block_idx)
    if version is not None:
        _VALID[block_idx] = (version, n_blocks)
    return block_idx


def check_block_idx(block_idx: torch.Tensor, n_blocks: int) -> None:
    """Clear errors for ids outside ``[-1, n_blocks)``: one device->host read, none for a tensor that
    ``mark_valid_block_idx`` recorded and nothing has written to since."""
    version = tensor_version(block_idx)
    if version is not None and _VALID.get(block_idx) == (version, n_blocks):
        return
    lo, hi = torch.stack(torch.aminmax(block_idx)).tolist()  # one device->host read
    if lo < -1 or hi >= n_blocks:
        raise ValueError(f"block_idx entries must lie in [-1, {n_blocks}), got {lo}..{hi}")


@dataclass
class Layout:
    tok_start: torch.Tensor  # [N] int32: first token of each token's document
    tok_vb: torch.Tensor  # [N] int64: virtual block id of block 0 of each token's document
    vb_start: torch.Tensor  # [NV] int32: first key of each virtual block
    vb_end: torch.Tensor  # [NV] int32: one past its last key
    n_blocks: int  # ceil(N / block_size): the valid range of block ids, as in the reference


def build_layout(N: int, block_size: int, cu_seqlens: torch.Tensor | None, device) -> Layout:
    """The layout of ``N`` keys; ``cu_seqlens`` must have passed ``check_cu_seqlens``. Built once per
    ``cu_seqlens`` tensor (while it lives unwritten) and shape: the layers of a step share it."""
    n_blocks = -(-N // block_size)
    if cu_seqlens is None:  # one document per row: the same layout for every layer and step of a shape
        key = (N, block_size, torch.device(device))
        if key not in _ONE_DOC_LAYOUTS:
            if len(_ONE_DOC_LAYOUTS) >= 8:  # a few shapes (a recipe's stages, evals at several lengths)
                _ONE_DOC_LAYOUTS.pop(next(iter(_ONE_DOC_LAYOUTS)))
            vb_start = torch.arange(n_blocks, device=key[2], dtype=torch.int32) * block_size
            _ONE_DOC_LAYOUTS[key] = Layout(torch.zeros(N, dtype=torch.int32, device=key[2]),
                                           torch.zeros(N, dtype=torch.long, device=key[2]),
                                           vb_start, (vb_start + block_size).clamp_max(N), n_blocks)
        return _ONE_DOC_LAYOUTS[key]
    key = (tensor_version(cu_seqlens), N, block_size, torch.device(device))
    cached = _LAYOUTS.get(cu_seqlens)
    if key[0] is not None and cached is not None and cached[0] == key:
        return cached[1]
    layout = _packed_layout(N, block_size, cu_seqlens, key[3], n_blocks)
    if key[0] is not None:
        _LAYOUTS[cu_seqlens] = (key, layout)
    return layout


def _packed_layout(N: int, block_size: int, cu_seqlens: torch.Tensor, device, n_blocks: int) -> Layout:
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=N)
    doc_nvb = (lengths + block_size - 1) // block_size
    doc_vb_off = torch.cumsum(doc_nvb, 0) - doc_nvb
    NV = int(doc_nvb.sum())
    vb_doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), doc_nvb, output_size=NV)
    vb_start = cu[vb_doc] + (torch.arange(NV, device=device) - doc_vb_off[vb_doc]) * block_size
    vb_end = torch.minimum(vb_start + block_size, cu[vb_doc + 1])
    return Layout(cu[doc].to(torch.int32), doc_vb_off[doc], vb_start.to(torch.int32),
                  vb_end.to(torch.int32), n_blocks)


def _sort_entries(key: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, ...]:
    """Entries grouped by bucket ``key`` (``n_buckets``: left out, sorted last) with one stable sort:
    the sorted keys, the entry ids in that order, each bucket's entry count and its first position."""
    key, order = torch.sort(key, stable=True)
    # the buckets' first positions in the sorted keys, by binary search: torch.bincount over as many
    # buckets (B * Hkv * N for the index KL) ran as a global-memory-atomics histogram, 74-195 ms of a
    # packed 192K step of model=small on an H200 (bench/step_speed.py profile, 2026-12-03)
    first = torch.searchsorted(key, torch.arange(n_buckets + 1, device=key.device, dtype=key.dtype))
    return key, order, first[1:] - first[:-1], first[:-1]


@dataclass
class CSR:
    entries: torch.Tensor  # [E] int32: flat index (((b*Hkv + r)*NQ + i)*topk + slot) into block_idx
    work_bucket: torch.Tensor  # [W] int32: bucket (b*Hkv + r)*NV + vb of each work item
    work_start: torch.Tensor  # [W] int32: its first entry
    work_end: torch.Tensor  # [W] int32: one past its last entry
    bucket_work: torch.Tensor  # [n_chunks*NB + 1] int32: chunk c's work items of bucket u are
    #                            [bw[c*NB + u], bw[c*NB + u + 1])
    chunk_work: list  # [n_chunks + 1]: the work items of query chunk c are [cw[c], cw[c+1])
    q_chunk: int  # queries per chunk


def build_csr(block_idx: torch.Tensor, layout: Layout, block_size: int, q_off: int, chunk: int,
              q_chunk: int) -> CSR:
    """sparse_attention's reverse CSR of ``block_idx [B, Hkv, NQ, topk]`` whose queries sit at key
    positions ``q_off ..``, for query chunks of ``q_chunk`` queries: one stable sort by (query chunk,
    bucket) gives each chunk its own bucket-sorted run of entries (the KV-outer forward and dQ work chunk
    by chunk; dK/dV takes all chunks at once). Unpadded work items, sized on the host (one sync) because
    each chunk's launch needs its grid anyway."""
    B, Hkv, NQ, topk = block_idx.shape
    device = block_idx.device
    NB = B * Hkv * layout.vb_start.numel()
    n_chunks = max(1, -(-NQ // q_chunk))
    if B * Hkv * NQ * topk >= 2**31:
        raise ValueError(f"B*Hkv*NQ*topk = {B * Hkv * NQ * topk} entries overflow int32 indices")
    pos = torch.arange(q_off, q_off + NQ, device=device) - layout.tok_start[q_off:q_off + NQ]
    idx = block_idx.long()
    valid = (idx >= 0) & (idx * block_size <= pos[:, None])
    br = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1) * layout.vb_start.numel()
    qc = (torch.arange(NQ, device=device) // q_chunk)[:, None] * NB
    key = torch.where(valid, qc + br + layout.tok_vb[q_off:q_off + NQ, None] + idx, n_chunks * NB).flatten()
    _, order, counts, offsets = _sort_entries(key, n_chunks * NB)
    splits = (counts + chunk - 1) // chunk
    split_end = torch.cumsum(splits, 0)
    bucket_work = torch.cat([split_end.new_zeros(1), split_end])
    chunk_work = bucket_work[::NB].tolist()  # the one host sync: the grid sizes
    W = chunk_work[-1]
    work_key = torch.repeat_interleave(torch.arange(n_chunks * NB, device=device), splits, output_size=W)
    k_in = torch.arange(W, device=device) - bucket_work[work_key]
    work_start = offsets[work_key] + k_in * chunk
    work_end = torch.minimum(work_start + chunk, offsets[work_key] + counts[work_key])
    i32 = torch.int32
    return CSR(order.to(i32), (work_key % NB).to(i32), work_start.to(i32), work_end.to(i32),
               bucket_work.to(i32), chunk_work, q_chunk)


def build_kl_csr(blocks: torch.Tensor, N: int, doc_start: torch.Tensor, n_docs: int, block_size: int,
                 block_m: int, chunks: int) -> tuple[torch.Tensor, ...]:
    """index_kl's reverse CSR: the entries of ``blocks [B, Hkv, NQ, S]`` grouped by key block, padded to
    ``block_m`` rows per chunk (one chunk: one tile with its own loss partial), chunks grouped ``chunks``
    to a program. Sizes are upper bounds known on the host, so nothing waits for the device.

    Returns ``ent`` (flat entry ids, -1 padding) and the program table ``(key, first chunk, n chunks)``
    with ``key = (b * Hkv + r) * N + first key token`` (-1: an idle program)."""
    B, Hkv, NQ, S = blocks.shape
    device = blocks.device
    flat = blocks.reshape(-1).long()
    E = flat.numel()
    e = torch.arange(E, device=device)
    n_keys = B * Hkv * N
    first = doc_start[N - NQ + (e // S) % NQ] + flat * block_size
    key, order, counts, seg_start = _sort_entries(torch.where(flat >= 0, (e // (S * NQ)) * N + first, n_keys),
                                                  n_keys)
    n_chunk = (counts + block_m - 1) // block_m
    chunk_start = n_chunk.cumsum(0) - n_chunk
    n_seg_max = B * Hkv * (triton.cdiv(N, block_size) + n_docs)
    c_max = E // block_m + n_seg_max
    k_ = key.clamp(max=n_keys - 1)
    pos = torch.where(key < n_keys, chunk_start[k_] * block_m + e - seg_start[k_], c_max * block_m)
    ent = torch.full((c_max * block_m + 1,), -1, dtype=torch.long, device=device).scatter_(0, pos, order)
    n_piece = (n_chunk + chunks - 1) // chunks
    piece_cum = n_piece.cumsum(0)
    p = torch.arange(c_max // chunks + n_seg_max + 1, device=device)
    k = torch.searchsorted(piece_cum, p, right=True)
    ok = k < n_keys
    k = k.clamp(max=n_keys - 1)
    local = p - (piece_cum[k] - n_piece[k])
    c0 = chunk_start[k] + local * chunks
    nc = torch.clamp(n_chunk[k] - local * chunks, max=chunks)
    return ent[:-1], torch.where(ok, k, -1), c0.to(torch.int32), torch.where(ok, nc, 0).to(torch.int32)


@triton.jit
def work_keys(work_bucket, work_start, work_end, vb_start, vb_end, i_w, t0, NV,
              HKV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Inside a kernel, work item ``i_w`` of ``build_csr``'s reverse CSR: its entries ``[e0, e1)``, batch,
    group, and ``BLOCK_N`` key positions from key ``t0`` of its block (``o_k``; ``m_k`` inside the block)."""
    i_u = tl.load(work_bucket + i_w)
    e0 = tl.load(work_start + i_w)
    e1 = tl.load(work_end + i_w)
    i_br = i_u // NV
    i_b = i_br // HKV
    i_r = i_br % HKV
    o_k = tl.load(vb_start + i_u % NV) + t0 + tl.arange(0, BLOCK_N)
    m_k = o_k < tl.load(vb_end + i_u % NV)
    return e0, e1, i_b, i_r, o_k, m_k
