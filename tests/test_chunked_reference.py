"""``msa.chunked_reference``: the reference ops run a group of whole documents at a time give the
reference's own selection, output, log-normaliser, KL and gradients on packed rows, and the reference
unchanged where a row cannot be split."""

from __future__ import annotations

import pytest
import torch

from msa import chunked_reference as chunked
from msa import reference
from tests.utils import rel_rms

TOL = 1e-6
H, HKV, D, DI, BK, TOPK = 4, 2, 16, 8, 8, 2
# documents of awkward lengths: one of a single token, one longer than the group size, an empty one
CU = [0, 13, 50, 51, 75, 75, 96, 150, 161]


def test_document_groups_by_hand():
    assert chunked.document_groups(torch.tensor([0, 13, 50, 51, 75, 96]), 40) == [
        (0, 13, 0, 1), (13, 51, 1, 3), (51, 75, 3, 4), (75, 96, 4, 5)]
    assert chunked.document_groups(torch.tensor([0, 100]), 40) == [(0, 100, 0, 1)]  # longer than a group: alone
    assert chunked.document_groups(torch.tensor([0, 10, 10, 60, 70]), 40) == [  # an empty document stays inside
        (0, 10, 0, 2), (10, 60, 2, 3), (60, 70, 3, 4)]
    assert chunked.document_groups(torch.tensor([0, 5, 9, 20]), 1024) == [(0, 20, 0, 3)]


def _inputs(seed=0, N=CU[-1]):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, N, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, N, HKV, D, generator=g, dtype=torch.float64)
    q_idx = torch.randn(1, N, HKV, DI, generator=g, dtype=torch.float64)
    k_idx = torch.randn(1, N, DI, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, q_idx, k_idx)]


STRIDED = dict(query_stride=5, query_offset=7)  # the KL over the queries at positions 2 mod 5


def _run(ops, cu, support: str, kl_kw=None, **kw):
    q, k, v, q_idx, k_idx = inputs = _inputs()
    block_idx = ops.select_blocks(q_idx.detach(), k_idx.detach(), BK, TOPK, cu, **kw)
    o, lse = ops.sparse_attention(q, k, v, block_idx, BK, cu, **kw)
    kl = ops.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, block_idx if support == "sparse" else None, BK,
                           cu, lse=lse if support == "sparse" else None, **kw, **(kl_kw or {}))
    g = torch.Generator().manual_seed(1)
    (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum().add(kl).backward()
    return block_idx, o, lse, kl, [t.grad for t in inputs]


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("support", ["sparse", "dense"])
def test_groups_equal_the_whole_row(support, strided):
    """Also with a strided KL (``query_stride``): a group counts the queries at their positions in the row, not
    in the group (the groups start at 13, 51, ...: not multiples of 5)."""
    cu = torch.tensor(CU, dtype=torch.int32)
    assert len(chunked.document_groups(cu, 40)) >= 4  # several groups, or the test would compare a row to itself
    kl_kw = STRIDED if strided else None
    ref = _run(reference, cu, support, kl_kw)
    out = _run(chunked, cu, support, kl_kw, chunk=40)
    assert torch.equal(ref[0], out[0])  # the same blocks
    for name, a, b in [("o", ref[1], out[1]), ("kl", ref[3], out[3])] + [
            (f"grad {n}", a, b) for n, a, b in zip(("q", "k", "v", "q_idx", "k_idx"), ref[4], out[4])]:
        assert rel_rms(a, b) < TOL, name
    finite = torch.isfinite(ref[2])
    assert torch.equal(finite, torch.isfinite(out[2])) and rel_rms(ref[2][finite], out[2][finite]) < TOL


def test_rows_that_cannot_be_split_run_the_reference_whole(monkeypatch):
    """No ``cu_seqlens`` (scores under ``max_scores``), one group, fewer queries than keys (context
    parallelism): one reference call, with the row as given."""
    calls = []
    real = reference.sparse_attention
    monkeypatch.setattr(reference, "sparse_attention",
                        lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
    q, k, v, q_idx, k_idx = (t.detach() for t in _inputs())
    cu = torch.tensor(CU, dtype=torch.int32)
    for rows, cu_seqlens, chunk in [(slice(None), None, 40), (slice(None), cu, 4096), (slice(100, None), cu, 40)]:
        calls.clear()
        block_idx = chunked.select_blocks(q_idx[:, rows], k_idx, BK, TOPK, cu_seqlens, chunk=chunk)
        o, _ = chunked.sparse_attention(q[:, rows], k, v, block_idx, BK, cu_seqlens, chunk=chunk)
        assert calls == [q[:, rows].shape[1]]
        assert torch.equal(o, real(q[:, rows], k, v, block_idx, BK, cu_seqlens)[0])
    calls.clear()
    chunked.sparse_attention(q, k, v, chunked.select_blocks(q_idx, k_idx, BK, TOPK, cu, chunk=40), BK, cu, chunk=40)
    assert sum(calls) == CU[-1] and len(calls) > 1  # split: every token once


@pytest.mark.parametrize("support", ["sparse", "dense"])
@pytest.mark.parametrize("n_queries,strided", [(150, False), (61, False), (61, True)])
def test_query_chunks_of_one_document_rows_equal_the_whole_rows(support, n_queries, strided):
    """Two one-document rows whose scores pass ``max_scores`` run in query chunks (37 queries: uneven,
    the last one short), also when the queries are the last of the keys (context parallelism): the
    reference's blocks, output, log-normaliser, KL and every gradient."""
    def run(ops, **kw):
        g = torch.Generator().manual_seed(3)
        q, k, v, q_idx, k_idx = inputs = [torch.randn(2, 150, h, d, generator=g, dtype=torch.float64).squeeze(2)
                                          .requires_grad_() for h, d in ((H, D), (HKV, D), (HKV, D), (HKV, DI),
                                                                         (1, DI))]
        qs, qis = q[:, 150 - n_queries:], q_idx[:, 150 - n_queries:]
        block_idx = ops.select_blocks(qis.detach(), k_idx.detach(), BK, TOPK, **kw)
        o, lse = ops.sparse_attention(qs, k, v, block_idx, BK, **kw)
        kl = ops.index_kl_loss(qs.detach(), k.detach(), qis, k_idx, block_idx if support == "sparse" else None, BK,
                               lse=lse if support == "sparse" else None, **kw, **(STRIDED if strided else {}))
        (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum().add(kl).backward()
        return block_idx, o, lse, kl, [t.grad for t in inputs]

    calls = []
    real = reference.sparse_attention
    ref = run(reference)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "sparse_attention", lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
        out = run(chunked, max_scores=2 * H * 150 * 37)
    assert calls == [37] * (n_queries // 37) + [n_queries % 37]  # every query once, in chunks
    assert torch.equal(ref[0], out[0])
    for name, a, b in [("o", ref[1], out[1]), ("lse", ref[2], out[2]), ("kl", ref[3], out[3])] + [
            (f"grad {n}", a, b) for n, a, b in zip(("q", "k", "v", "q_idx", "k_idx"), ref[4], out[4])]:
        assert rel_rms(a, b) < TOL, name


def test_the_layer_trains_through_the_groups():
    """``attention.impl=reference`` resolves to the grouped ops, and a packed MSA layer's output and KL
    equal the oracle's with the default group size (several groups in a row of several 1K documents)."""
    from msa.layer import AttentionConfig, MSACore

    core = MSACore(AttentionConfig(impl="reference", block_size=BK, topk=TOPK))
    assert core.ops is chunked
    cu = torch.tensor([0, 700, 1500, 1501, 2600], dtype=torch.int32)
    assert len(chunked.document_groups(cu)) == 3
    q, k, v, q_idx, k_idx = (t.detach().float() for t in _inputs(N=2600))
    out = core(q, k, v, cu, (q_idx, k_idx), "sparse")
    block_idx = reference.select_blocks(q_idx, k_idx, BK, TOPK, cu)
    o, lse = reference.sparse_attention(q, k, v, block_idx, BK, cu)
    kl = reference.index_kl_loss(q, k, q_idx, k_idx, block_idx, BK, cu, lse=lse)
    assert rel_rms(o, out.o) < 1e-5 and rel_rms(kl, out.kl) < 1e-5
