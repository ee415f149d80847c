"""What the MSA kernels share: checks and the token layout in plain torch on the inputs' device, the reverse
indexes of a selection (torch's sort between small Triton kernels), and ``work_keys`` (how a kernel reads
a work item of ``build_csr``'s index).

- ``LIMITS`` and ``check_limits``: the one copy of each shape rule the Triton kernels impose. The
  kernels check their arguments with it, and so do ``msa/layer.py`` and the trainer at start-up, so a
  config the kernels cannot run fails before the first step with the key to change.
- ``check_cu_seqlens`` and ``check_block_idx``: clear errors for malformed index inputs.
- the token layout of packed documents (``build_layout``): per token its document's first token
  (``tok_start``) and its key block inside the document; the *virtual blocks* ``[vb_start, vb_end)``
  tile every document with ``block_size`` keys from the document's start, so each token belongs to
  exactly one virtual block and the block id ``c`` of a query in the document starting at ``s`` names
  the virtual block ``vb_off(doc) + c``.
- two reverse (block -> entries) CSR indexes of a ``block_idx``, one per consumer, each one stable
  ``torch.sort`` of the entries' keys between small Triton kernels (keys, per-bucket counts by binary
  search, the work items or chunks): every (batch, group, query, slot) entry whose block holds a key the
  query can see, grouped by key block (the queries of a block stay in ascending order).
  ``build_csr`` (sparse_attention) cuts each block's entries into work items of at most ``chunk``,
  per query chunk, so a hot block (a sink every query picks) is spread over many programs;
  ``build_kl_csr`` (index_kl) pads each block's entries to ``block_m``-row chunks and groups chunks
  into a program table whose size is known on the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from triton.language.extra import libdevice

from msa.host import host_bounds, tensor_version


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
_LAYOUTS = WeakIdKeyDictionary()  # cu_seqlens -> ((version, N, block_size, device), Layout): per_cu_seqlens
_ONE_DOC_LAYOUTS: dict = {}  # (N, block_size, device) -> Layout of one document per row (read only)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, N: int) -> None:
    """Clear errors for a malformed ``cu_seqlens``: from its values on the host (``host_bounds``: one
    device->host read per tensor, shared), none for a tensor that passed with the same ``N`` and has not been
    written to since."""
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-d int32 tensor [n_docs + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    version = tensor_version(cu_seqlens)
    if version is not None and _CHECKED.get(cu_seqlens) == (version, N):
        return
    bounds = host_bounds(cu_seqlens)  # the step's one read of it, shared with the layout and dense layers
    if bounds[0] != 0 or bounds[-1] != N or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {bounds}")
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


def per_cu_seqlens(cache: WeakIdKeyDictionary, one_doc: dict, cu_seqlens: torch.Tensor | None, shape: tuple,
                   device, build):
    """``build(device)``, kept for reuse: per ``cu_seqlens`` tensor in ``cache`` while it lives unwritten (every
    MSA layer of a step gets the same one) with the ``shape`` it was built for, and for rows without one
    (``cu_seqlens`` None) per ``shape`` in ``one_doc``, a few shapes (a recipe's stages, evals at several
    lengths). What is kept is shared: read it, do not write to it."""
    device = torch.device(device)
    if cu_seqlens is None:
        key = (*shape, device)
        if key not in one_doc:
            if len(one_doc) >= 8:
                one_doc.pop(next(iter(one_doc)))
            one_doc[key] = build(device)
        return one_doc[key]
    key = (tensor_version(cu_seqlens), *shape, device)
    cached = cache.get(cu_seqlens)
    if key[0] is not None and cached is not None and cached[0] == key:
        return cached[1]
    value = build(device)
    if key[0] is not None:  # inference mode keeps no version counter: nothing to key on
        cache[cu_seqlens] = (key, value)
    return value


def build_layout(N: int, block_size: int, cu_seqlens: torch.Tensor | None, device) -> Layout:
    """The layout of ``N`` keys; ``cu_seqlens`` must have passed ``check_cu_seqlens``. Built once per
    ``cu_seqlens`` tensor (while it lives unwritten) and shape: the layers of a step share it."""
    n_blocks = -(-N // block_size)

    def build(dev):
        if cu_seqlens is not None:
            return _packed_layout(N, block_size, cu_seqlens, dev, n_blocks)
        vb_start = torch.arange(n_blocks, device=dev, dtype=torch.int32) * block_size
        return Layout(torch.zeros(N, dtype=torch.int32, device=dev), torch.zeros(N, dtype=torch.long, device=dev),
                      vb_start, (vb_start + block_size).clamp_max(N), n_blocks)

    return per_cu_seqlens(_LAYOUTS, _ONE_DOC_LAYOUTS, cu_seqlens, (N, block_size), device, build)


def _packed_layout(N: int, block_size: int, cu_seqlens: torch.Tensor, device, n_blocks: int) -> Layout:
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=N)
    doc_nvb = (lengths + block_size - 1) // block_size
    doc_vb_off = torch.cumsum(doc_nvb, 0) - doc_nvb
    bounds = host_bounds(cu_seqlens)
    NV = sum(-(-(e - s) // block_size) for s, e in zip(bounds[:-1], bounds[1:]))
    vb_doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), doc_nvb, output_size=NV)
    vb_start = cu[vb_doc] + (torch.arange(NV, device=device) - doc_vb_off[vb_doc]) * block_size
    vb_end = torch.minimum(vb_start + block_size, cu[vb_doc + 1])
    return Layout(cu[doc].to(torch.int32), doc_vb_off[doc], vb_start.to(torch.int32),
                  vb_end.to(torch.int32), n_blocks)


# The CSR builds below run as a handful of small Triton kernels around one torch.sort and one cumsum: in plain
# torch they were 47 and 59 kernel-launching ops per MSA layer and step (index arithmetic, gathers, casts), and
# a short row's step is bound by launches on the host (docs/scaling.md, section 3m).
_BLOCK = 1024


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, _BLOCK)),)


def _key_dtype(largest: int) -> torch.dtype:
    """Sort keys up to ``largest`` in int32 where they fit: a CUDA radix sort makes one pass per 8 key bits,
    so 4 passes instead of 8 (16 of a layer's launches were these passes)."""
    return torch.int32 if largest < 2**31 else torch.long


@triton.jit
def dot_ieee(a, b, IEEE: tl.constexpr):
    """``tl.dot``, in full fp32 precision where ``IEEE`` (fp32 inputs: the CPU tests' exact comparisons), else the
    tensor cores' default (tf32 for fp32, bf16/fp16 products with fp32 accumulation)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ``p log p`` of the index KL's teacher, computed per (entry, key) for the loss value only (the gradients do not use
# it). Compiled, the log is the hardware's approximate one (``lg2.approx`` times ln 2, relative error about 1e-7):
# ``tl.log`` compiles to libdevice's exact ``logf``, about 25 instructions, and the KL's pass 2 spent about 1,300
# instructions a thread per chunk of 128 entries on it (docs/kernels.md). The interpreter has no libdevice, so it
# keeps ``tl.log`` (the TRITON_INTERPRET switch is read at import, as Triton reads it). Below ``PLOGP_FLOOR`` a term
# is 0 in both (under 7e-29 each; the approximate log flushes subnormals to zero).
PLOGP_FLOOR: tl.constexpr = tl.constexpr(1e-30)
if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def _log(x):
        return tl.log(x)
else:
    @triton.jit
    def _log(x):
        return libdevice.fast_logf(x)


@triton.jit
def plogp(p):
    """``p * log(p)`` of an fp32 tile, 0 where ``p <= PLOGP_FLOOR`` (and where p is 0: the limit)."""
    keep = p > PLOGP_FLOOR
    return tl.where(keep, p * _log(tl.where(keep, p, 1.0)), 0.0)


@triton.jit
def _search(keys, n, target, n_iter, RIGHT: tl.constexpr):
    """Per lane, the first position ``p`` in the ascending ``keys[0:n]`` with ``keys[p] >= target`` (``>``
    with ``RIGHT``): ``torch.searchsorted``. ``n_iter`` = ``n.bit_length()`` halvings empty the interval."""
    lo = tl.zeros_like(target)
    hi = lo + n
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        k = tl.load(keys + mid, mask=active, other=0)
        if RIGHT:
            right = k <= target
        else:
            right = k < target
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _csr_bucket_stats_kernel(key, E, n_iter, n_buckets, out, PER: tl.constexpr, PER2: tl.constexpr,
                             BLOCK: tl.constexpr):
    u = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = u < n_buckets
    first = _search(key, E, u, n_iter, False)
    count = _search(key, E, u + 1, n_iter, False) - first
    pieces = (count + PER - 1) // PER
    tl.store(out + u, first, mask=m)
    tl.store(out + n_buckets + u, count, mask=m)
    tl.store(out + 2 * n_buckets + u, pieces, mask=m)
    tl.store(out + 3 * n_buckets + u, (pieces + PER2 - 1) // PER2, mask=m)


def _bucket_stats(key: torch.Tensor, n_buckets: int, per: int = 1, per2: int = 1) -> torch.Tensor:
    """``[4, n_buckets]`` int64 of the ascending int32 or int64 ``key`` (values above ``n_buckets - 1`` left out):
    each bucket's first position and entry count (a binary search each, as ``torch.searchsorted``: a
    ``torch.bincount`` over as many buckets, ``B * Hkv * N`` for the index KL, ran as a global-atomics
    histogram, 74-195 ms of a packed 192K step of ``model=small`` on an H200), its count in pieces of
    ``per`` (rounded up), and that in pieces of ``per2``."""
    out = torch.empty(4, n_buckets, dtype=torch.long, device=key.device)
    _csr_bucket_stats_kernel[_grid(n_buckets)](key, key.numel(), key.numel().bit_length(), n_buckets, out,
                                               PER=per, PER2=per2, BLOCK=_BLOCK)
    return out


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


@triton.jit
def _csr_key_kernel(block_idx, tok_start, tok_vb, key, E, NQ, TOPK, q_off, q_chunk, NV, NB, block_size, left_out,
                    BLOCK: tl.constexpr):
    """The sort key of every entry of ``block_idx``: (query chunk, batch and group, virtual block), or
    ``left_out`` for an empty slot or a block the query cannot see."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    idx = tl.load(block_idx + e, mask=m, other=-1).to(tl.int64)
    i = (e // TOPK) % NQ
    pos = q_off + i - tl.load(tok_start + q_off + i, mask=m, other=0)
    k = (i // q_chunk) * NB + (e // (TOPK * NQ)) * NV + tl.load(tok_vb + q_off + i, mask=m, other=0) + idx
    tl.store(key + e, tl.where((idx >= 0) & (idx * block_size <= pos), k, left_out), mask=m)


@triton.jit
def _csr_work_kernel(bucket_work, n_bw, n_iter, stats, n_buckets, W, chunk, NB, work_bucket, work_start, work_end,
                     BLOCK: tl.constexpr):
    """Work item ``w`` of bucket ``u`` (``bucket_work[u] <= w < bucket_work[u + 1]``): ``chunk`` of its entries."""
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = w < W
    u = _search(bucket_work, n_bw, w, n_iter, True) - 1
    u = tl.where(m, u, 0)
    first = tl.load(stats + u, mask=m, other=0)
    start = first + (w - tl.load(bucket_work + u, mask=m, other=0)) * chunk
    end = tl.minimum(start + chunk, first + tl.load(stats + n_buckets + u, mask=m, other=0))
    tl.store(work_bucket + w, (u % NB).to(tl.int32), mask=m)
    tl.store(work_start + w, start.to(tl.int32), mask=m)
    tl.store(work_end + w, end.to(tl.int32), mask=m)


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
    E = B * Hkv * NQ * topk
    if E >= 2**31:
        raise ValueError(f"B*Hkv*NQ*topk = {E} entries overflow int32 indices")
    key = torch.empty(E, dtype=_key_dtype(n_chunks * NB), device=device)
    _csr_key_kernel[_grid(E)](block_idx.contiguous(), layout.tok_start, layout.tok_vb, key, E, NQ, topk, q_off,
                              q_chunk, layout.vb_start.numel(), NB, block_size, n_chunks * NB, BLOCK=_BLOCK)
    key, order = torch.sort(key, stable=True)
    n_buckets = n_chunks * NB
    stats = _bucket_stats(key, n_buckets, per=chunk)
    bucket_work = torch.zeros(n_buckets + 1, dtype=torch.long, device=device)
    torch.cumsum(stats[2], 0, out=bucket_work[1:])
    chunk_work = bucket_work[::NB].tolist()  # the one host sync: the grid sizes
    W = chunk_work[-1]
    work = torch.empty(3, W, dtype=torch.int32, device=device)
    _csr_work_kernel[_grid(W)](bucket_work, n_buckets + 1, (n_buckets + 1).bit_length(), stats, n_buckets, W,
                               chunk, NB, work[0], work[1], work[2], BLOCK=_BLOCK)
    return CSR(order.to(torch.int32), work[0], work[1], work[2], bucket_work.to(torch.int32), chunk_work, q_chunk)


@triton.jit
def _kl_csr_key_kernel(blocks, sb, sr, si, ss, doc_start, key, E, HKV, NQ, S, N, block_size, n_keys,
                       BLOCK: tl.constexpr):
    """The sort key of entry ``e = ((b*Hkv + r)*NQ + i)*S + s`` of ``blocks`` (any strides): its key
    block's first token in batch and group ``b*Hkv + r``, or ``n_keys`` for an empty slot."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    i = (e // S) % NQ
    br = e // (S * NQ)
    blk = tl.load(blocks + (br // HKV) * sb + (br % HKV) * sr + i * si + (e % S) * ss, mask=m, other=-1).to(tl.int64)
    first = tl.load(doc_start + N - NQ + i, mask=m, other=0) + blk * block_size
    tl.store(key + e, tl.where(blk >= 0, br * N + first, n_keys), mask=m)


@triton.jit
def _kl_csr_ent_kernel(key, order, stats, cums, n_keys, E, ent, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """Sorted entry ``p`` of key ``k`` goes to row ``p - first[k]`` of ``k``'s first chunk."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(key + p, mask=p < E, other=n_keys)
    ok = k < n_keys
    kc = tl.where(ok, k, 0)
    chunk_start = tl.load(cums + kc, mask=ok, other=0) - tl.load(stats + 2 * n_keys + kc, mask=ok, other=0)
    pos = chunk_start * BLOCK_M + p - tl.load(stats + kc, mask=ok, other=0)
    tl.store(ent + pos, tl.load(order + p, mask=ok, other=0), mask=ok)


@triton.jit
def _kl_csr_table_kernel(stats, cums, n_keys, n_iter, P, chunks, pkey, pc0, pnc, BLOCK: tl.constexpr):
    """Program ``p`` takes piece ``p - (first piece of key k)`` of key ``k``: up to ``chunks`` of its chunks."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < P
    k = _search(cums + n_keys, n_keys, p, n_iter, True)
    ok = k < n_keys
    k = tl.minimum(k, n_keys - 1)
    n_chunk = tl.load(stats + 2 * n_keys + k, mask=m, other=0)
    local = p - (tl.load(cums + n_keys + k, mask=m, other=0) - tl.load(stats + 3 * n_keys + k, mask=m, other=0))
    c0 = tl.load(cums + k, mask=m, other=0) - n_chunk + local * chunks
    tl.store(pkey + p, tl.where(ok, k, -1), mask=m)
    tl.store(pc0 + p, c0.to(tl.int32), mask=m)
    tl.store(pnc + p, tl.where(ok, tl.minimum(n_chunk - local * chunks, chunks), 0).to(tl.int32), mask=m)


def build_kl_csr(blocks: torch.Tensor, N: int, doc_start: torch.Tensor, n_docs: int, block_size: int,
                 block_m: int, chunks: int) -> tuple[torch.Tensor, ...]:
    """index_kl's reverse CSR: the entries of ``blocks [B, Hkv, NQ, S]`` grouped by key block, padded to
    ``block_m`` rows per chunk (one chunk: one tile with its own loss partial), chunks grouped ``chunks``
    to a program. Sizes are upper bounds known on the host, so nothing waits for the device.

    Returns ``ent`` (flat entry ids, -1 padding) and the program table ``(key, first chunk, n chunks)``
    with ``key = (b * Hkv + r) * N + first key token`` (-1: an idle program)."""
    B, Hkv, NQ, S = blocks.shape
    device = blocks.device
    E = blocks.numel()
    n_keys = B * Hkv * N
    # a block id in range (below ceil(N / block_size)) keeps the key below n_keys + N (no visibility check here)
    key = torch.empty(E, dtype=_key_dtype(n_keys + N), device=device)
    _kl_csr_key_kernel[_grid(E)](blocks, *blocks.stride(), doc_start, key, E, Hkv, NQ, S, N, block_size, n_keys,
                                 BLOCK=_BLOCK)
    key, order = torch.sort(key, stable=True)
    stats = _bucket_stats(key, n_keys, per=block_m, per2=chunks)  # first, count, chunks, pieces per key
    cums = stats[2:].cumsum(1)  # [2, n_keys]: chunks and pieces up to each key, inclusive
    n_seg_max = B * Hkv * (triton.cdiv(N, block_size) + n_docs)
    c_max = E // block_m + n_seg_max
    ent = torch.full((c_max * block_m,), -1, dtype=torch.long, device=device)
    _kl_csr_ent_kernel[_grid(E)](key, order, stats, cums, n_keys, E, ent, BLOCK_M=block_m, BLOCK=_BLOCK)
    P = c_max // chunks + n_seg_max + 1
    table = torch.empty(P, dtype=torch.long, device=device)
    c0, nc = torch.empty(2, P, dtype=torch.int32, device=device)
    _kl_csr_table_kernel[_grid(P)](stats, cums, n_keys, n_keys.bit_length(), P, chunks, table, c0, nc, BLOCK=_BLOCK)
    return ent, table, c0, nc


@triton.jit
def entry_query_slot(entries, o_e, m_e, bh, NQ, TOPK: tl.constexpr):
    """Query and slot (int32) of the reverse CSR's entries ``o_e`` (``m_e``: valid; others give 0, 0), all of one
    batch and group ``bh = b * Hkv + r``. An entry is the flat index ``(bh * NQ + query) * TOPK + slot`` into
    ``block_idx``, below 2^31. With ``bh`` known no division by the runtime ``NQ`` is needed: on the GPU a 64-bit
    division is a subroutine of about 80 instructions, which the tile loops called per row (docs/kernels.md)."""
    b_ent = tl.load(entries + o_e, mask=m_e, other=0)
    o_row = b_ent // TOPK
    return tl.where(m_e, o_row - bh * NQ, 0), tl.where(m_e, b_ent - o_row * TOPK, 0)


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
