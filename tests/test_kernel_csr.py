"""The reverse indexes of ``kernels/common.py`` (``build_csr``, ``build_kl_csr``, ``_bucket_stats``: small Triton
kernels around one ``torch.sort``) against the plain-torch builders they replaced, kept here as the oracle
(``kernels/common.py`` at commit 96edf29): every output equal, element for element, on awkward shapes.
"""

import itertools

import pytest
import torch
import triton

from bench.launch_count import Launches
from kernels.common import _bucket_stats, _key_dtype, build_csr, build_kl_csr, build_layout

pytestmark = pytest.mark.interpreter
# under the interpreter on the CPU; compiled on a GPU (the builders run on the inputs' device)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _sort_entries_torch(key, n_buckets):
    key, order = torch.sort(key, stable=True)
    first = torch.searchsorted(key, torch.arange(n_buckets + 1, device=key.device, dtype=key.dtype))
    return key, order, first[1:] - first[:-1], first[:-1]


def build_csr_torch(block_idx, layout, block_size, q_off, chunk, q_chunk):
    B, Hkv, NQ, topk = block_idx.shape
    device = block_idx.device
    NB = B * Hkv * layout.vb_start.numel()
    n_chunks = max(1, -(-NQ // q_chunk))
    pos = torch.arange(q_off, q_off + NQ, device=device) - layout.tok_start[q_off:q_off + NQ]
    idx = block_idx.long()
    valid = (idx >= 0) & (idx * block_size <= pos[:, None])
    br = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1) * layout.vb_start.numel()
    qc = (torch.arange(NQ, device=device) // q_chunk)[:, None] * NB
    key = torch.where(valid, qc + br + layout.tok_vb[q_off:q_off + NQ, None] + idx, n_chunks * NB).flatten()
    _, order, counts, offsets = _sort_entries_torch(key, n_chunks * NB)
    splits = (counts + chunk - 1) // chunk
    split_end = torch.cumsum(splits, 0)
    bucket_work = torch.cat([split_end.new_zeros(1), split_end])
    chunk_work = bucket_work[::NB].tolist()
    W = chunk_work[-1]
    work_key = torch.repeat_interleave(torch.arange(n_chunks * NB, device=device), splits, output_size=W)
    k_in = torch.arange(W, device=device) - bucket_work[work_key]
    work_start = offsets[work_key] + k_in * chunk
    work_end = torch.minimum(work_start + chunk, offsets[work_key] + counts[work_key])
    i32 = torch.int32
    return (order.to(i32), (work_key % NB).to(i32), work_start.to(i32), work_end.to(i32), bucket_work.to(i32),
            chunk_work)


def build_kl_csr_torch(blocks, N, doc_start, n_docs, block_size, block_m, chunks):
    B, Hkv, NQ, S = blocks.shape
    device = blocks.device
    flat = blocks.reshape(-1).long()
    E = flat.numel()
    e = torch.arange(E, device=device)
    n_keys = B * Hkv * N
    first = doc_start[N - NQ + (e // S) % NQ] + flat * block_size
    key, order, counts, seg_start = _sort_entries_torch(torch.where(flat >= 0, (e // (S * NQ)) * N + first, n_keys),
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


def _selection(g, B, Hkv, NQ, N, topk, block_size, doc_start, hot=False):
    """Random block ids per (batch, group, query, slot): visible ones, invisible ones, -1 padding; with
    ``hot`` every query also picks block 0 of its document (a sink: one bucket with many entries)."""
    own = (torch.arange(N - NQ, N) - doc_start[N - NQ:]) // block_size
    idx = (torch.rand(B, Hkv, NQ, topk, generator=g) * (own + 2)[:, None]).long()  # some past the query's block
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.2, -1, idx)
    if hot:
        idx[..., 0] = 0
    return idx.to(torch.int32)


CASES = [  # B, Hkv, N, NQ, topk, block_size, cu_seqlens, q_chunk, chunk
    (1, 1, 40, 40, 3, 16, None, 40, 4),
    (2, 3, 100, 70, 4, 16, None, 33, 5),  # Nq < N, query chunks, two batches
    (1, 2, 130, 130, 5, 32, [0, 7, 60, 61, 130], 50, 3),  # packed documents, one of 1 token
    (1, 1, 200, 200, 6, 16, None, 200, 256),  # work items of 256 (the default), the hot block
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_build_csr_equals_the_torch_builder(case, device):
    B, Hkv, N, NQ, topk, bs, cu, q_chunk, chunk = case
    g = torch.Generator().manual_seed(N)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    layout = build_layout(N, bs, cu, device)
    for hot in (False, True):
        block_idx = _selection(g, B, Hkv, NQ, N, topk, bs, layout.tok_start.long().cpu(), hot).to(device)
        got = build_csr(block_idx, layout, bs, N - NQ, chunk, q_chunk)
        want = build_csr_torch(block_idx, layout, bs, N - NQ, chunk, q_chunk)
        fields = (got.entries, got.work_bucket, got.work_start, got.work_end, got.bucket_work)
        for name, a, b in zip(("entries", "work_bucket", "work_start", "work_end", "bucket_work"), fields, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, hot)
        assert got.chunk_work == want[5] and got.q_chunk == q_chunk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_build_kl_csr_equals_the_torch_builder(case, device):
    """On a selection, on a strided slice of it (index_kl's slot chunks) and on an expanded one (the
    dense warm-up's every-visible-block lists)."""
    B, Hkv, N, NQ, topk, bs, cu, _, _ = case
    g = torch.Generator().manual_seed(N + 1)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    doc_start = build_layout(N, bs, cu_t, device).tok_start.long()
    n_docs = 1 if cu is None else len(cu) - 1
    sel = _selection(g, B, Hkv, NQ, N, topk, bs, doc_start.cpu(), hot=True).to(device)
    own = (torch.arange(N - NQ, N, device=device) - doc_start[N - NQ:]) // bs
    first3 = torch.arange(3, device=device)[None, :]
    dense = torch.where(first3 <= own[:, None], first3, -1).to(torch.int32)
    for blocks in (sel, sel[..., 1:3], dense.expand(B, Hkv, NQ, 3)):
        for block_m, chunks in ((16, 2), (128, 8)):
            got = build_kl_csr(blocks, N, doc_start, n_docs, bs, block_m, chunks)
            want = build_kl_csr_torch(blocks, N, doc_start, n_docs, bs, block_m, chunks)
            for name, a, b in zip(("ent", "key", "c0", "nc"), got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), (name, tuple(blocks.stride()), block_m)


@pytest.mark.parametrize("device", DEVICES)
def test_bucket_stats_equal_bincount(device):
    """Each bucket's first position and count come from a binary search over the sorted keys; they equal
    torch.bincount's, empty buckets and the left-out key (``n_buckets``) included, and so do the counts in
    pieces of ``per`` and of ``per2``."""
    g = torch.Generator().manual_seed(0)
    for (n_buckets, n), dtype in itertools.product(((1, 5), (7, 100), (1000, 300), (50, 0), (3, 2000)),
                                                   (torch.int32, torch.long)):
        key = torch.randint(0, n_buckets + 1, (n,), generator=g).sort().values.to(device)
        first, count, pieces, pieces2 = _bucket_stats(key.to(dtype), n_buckets, per=4, per2=3)
        want = torch.bincount(key, minlength=n_buckets + 1)[:n_buckets]
        assert torch.equal(count, want) and torch.equal(first, torch.cumsum(want, 0) - want)
        assert torch.equal(pieces, (want + 3) // 4) and torch.equal(pieces2, (pieces + 2) // 3)


def test_sort_keys_are_int32_where_they_fit():
    """A CUDA radix sort makes a pass per 8 key bits: the builders sort int32 keys (4 passes) unless the
    largest key they can make needs int64."""
    assert _key_dtype(2**31 - 1) == torch.int32 and _key_dtype(2**31) == torch.long


def test_the_builders_launch_a_handful_of_torch_kernels():
    """A short row's training step is bound by kernel launches on the host, and each MSA layer builds both
    indexes in every step: in plain torch they dispatched 47 and 59 kernel-launching ops here
    (``bench.launch_count``'s count); now only the sorts, the cumsums, two fills and two int32 casts run
    through torch, and three and four Triton kernels the rest."""
    B, Hkv, N, NQ, topk, bs, cu, q_chunk, chunk = CASES[2]
    cu = torch.tensor(cu, dtype=torch.int32)
    layout = build_layout(N, bs, cu, "cpu")
    g = torch.Generator().manual_seed(0)
    block_idx = _selection(g, B, Hkv, NQ, N, topk, bs, layout.tok_start.long(), hot=True)
    doc_start = layout.tok_start.long()
    with Launches() as csr:
        build_csr(block_idx, layout, bs, N - NQ, chunk, q_chunk)
    with Launches() as kl:
        build_kl_csr(block_idx, N, doc_start, len(cu) - 1, bs, 16, 2)
    assert csr.aten == {"aten.sort": 1, "aten.zeros": 1, "aten.cumsum": 1, "aten._to_copy": 2}, csr.aten
    assert csr.triton == {"_csr_key_kernel": 1, "_csr_bucket_stats_kernel": 1, "_csr_work_kernel": 1}, csr.triton
    assert kl.aten == {"aten.sort": 1, "aten.cumsum": 1, "aten.full": 1}, kl.aten
    assert kl.triton == {"_kl_csr_key_kernel": 1, "_csr_bucket_stats_kernel": 1, "_kl_csr_ent_kernel": 1,
                         "_kl_csr_table_kernel": 1}
    with Launches() as old_csr:
        build_csr_torch(block_idx, layout, bs, N - NQ, chunk, q_chunk)
    with Launches() as old_kl:
        build_kl_csr_torch(block_idx, N, doc_start, len(cu) - 1, bs, 16, 2)
    assert (old_csr.total, old_kl.total) == (47, 59)
