"""The reference math against independent formulations: SDPA, per-document attention, FlexAttention."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from msa.reference import index_kl_loss, index_recall, select_blocks, sparse_attention
from tests.utils import rel_rms


def _inputs(B, N, H, Hkv, D, Di, grad=False):
    t = lambda *s: torch.randn(*s, requires_grad=grad)
    return t(B, N, H, D), t(B, N, Hkv, D), t(B, N, Hkv, D), t(B, N, Hkv, Di), t(B, N, Di)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


def _random_block_idx(B, Hkv, N, Bk, topk, cu_seqlens=None, gen=None):
    """Valid random selections: own block first, then distinct earlier blocks, -1 padded."""
    starts = [0] if cu_seqlens is None else cu_seqlens.tolist()[:-1]
    doc_start = torch.zeros(N, dtype=torch.long)
    for s in starts:
        doc_start[s:] = s
    out = torch.full((B, Hkv, N, topk), -1, dtype=torch.int32)
    for b in range(B):
        for r in range(Hkv):
            for i in range(N):
                own = (i - doc_start[i].item()) // Bk
                others = torch.randperm(own, generator=gen)[: topk - 1] if own else torch.empty(0, dtype=torch.long)
                chosen = [own, *others.tolist()]
                out[b, r, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@pytest.mark.parametrize("N,H,Hkv,Bk", [(63, 4, 2, 16), (111, 4, 1, 32), (200, 8, 2, 64)])
def test_full_selection_equals_dense(N, H, Hkv, Bk):
    q, k, v, q_idx, k_idx = _inputs(2, N, H, Hkv, 16, 8, grad=True)
    n_blocks = math.ceil(N / Bk)
    block_idx = select_blocks(q_idx, k_idx, Bk, n_blocks + 3)
    o, lse = sparse_attention(q, k, v, block_idx, Bk)
    ref = _sdpa(q, k, v)
    assert rel_rms(ref, o) < 1e-5
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        assert rel_rms(rg, g) < 1e-5
    assert lse.dtype == torch.float32 and lse.shape == (2, H, N) and not lse.requires_grad


def test_packed_documents_equal_per_document_attention():
    N, Bk = 100, 16
    cu = torch.tensor([0, 1, 30, 31, 77, 100], dtype=torch.int32)
    q, k, v, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8)
    block_idx = select_blocks(q_idx, k_idx, Bk, 8, cu_seqlens=cu)
    o, lse = sparse_attention(q, k, v, block_idx, Bk, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = _sdpa(q[:, s:e], k[:, s:e], v[:, s:e])
        assert rel_rms(ref, o[:, s:e]) < 1e-5, (s, e)


def test_random_selection_matches_flex_attention():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, N, H, Hkv, D, Bk, topk = 2, 96, 4, 2, 16, 16, 3
    G = H // Hkv
    q, k, v, _, _ = _inputs(B, N, H, Hkv, D, 8)
    block_idx = _random_block_idx(B, Hkv, N, Bk, topk, gen=torch.Generator().manual_seed(1))
    n_blocks = math.ceil(N / Bk)
    chosen = torch.zeros(B, Hkv, N, n_blocks + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(block_idx < 0, n_blocks, block_idx).long(), True)

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) & chosen[b, h // G, qi, kv // Bk]

    mask = create_block_mask(mask_mod, B, H, N, N, device="cpu", BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                             enable_gqa=True).transpose(1, 2)
    o, _ = sparse_attention(q, k, v, block_idx, Bk)
    assert rel_rms(ref, o) < 1e-5


def _check_selection(block_idx, N, Bk, topk, doc_start):
    B, Hkv = block_idx.shape[:2]
    assert block_idx.dtype == torch.int32 and block_idx.shape == (B, Hkv, N, topk)
    for i in range(N):
        own = (i - doc_start[i]) // Bk
        for row in block_idx[:, :, i].reshape(-1, topk).tolist():
            valid = [b for b in row if b >= 0]
            assert row[: len(valid)] == valid, "-1 only after the valid entries"
            assert valid[0] == own, "own block first"
            assert len(set(valid)) == len(valid), "no duplicates"
            assert all(0 <= b <= own for b in valid), "only visible blocks"
            assert len(valid) == min(topk, own + 1), "every visible block is used before -1 padding"


@pytest.mark.parametrize("N,Bk,topk,B", [(63, 16, 2, 1), (111, 32, 10, 2), (200, 16, 5, 3)])
def test_select_blocks_invariants(N, Bk, topk, B):
    _, _, _, q_idx, k_idx = _inputs(B, N, 4, 2, 16, 8)
    _check_selection(select_blocks(q_idx, k_idx, Bk, topk), N, Bk, topk, [0] * N)


def test_select_blocks_ranks_by_max_pooled_score():
    N, Bk, topk, Di = 64, 8, 3, 4
    q_idx = torch.zeros(1, N, 1, Di)
    k_idx = torch.zeros(1, N, Di)
    q_idx[..., 0] = 1.0
    k_idx[0, 13, 0] = 5.0  # block 1 holds the single strongest key
    k_idx[0, 40, 0] = 3.0  # block 5 the second
    block_idx = select_blocks(q_idx, k_idx, Bk, topk)
    assert block_idx[0, 0, 63].tolist() == [7, 1, 5]
    assert block_idx[0, 0, 41].tolist() == [5, 1, 0]  # own block 5 first, then 1, then the lowest tie
    assert block_idx[0, 0, 12].tolist() == [1, 0, -1]  # key 13 is still in the future for query 12


def test_select_blocks_packed_with_one_token_documents():
    N, Bk = 70, 16
    cu = torch.tensor([0, 1, 2, 40, 41, 70], dtype=torch.int32)
    _, _, _, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1]).tolist()
    _check_selection(select_blocks(q_idx, k_idx, Bk, 3, cu_seqlens=cu), N, Bk, 3, starts)


def test_kl_zero_when_student_equals_teacher():
    N, D, Bk = 80, 16, 16
    q = torch.randn(2, N, 1, D)
    k = torch.randn(2, N, 1, D)
    q_idx, k_idx = q.clone().requires_grad_(), k[:, :, 0].clone().requires_grad_()
    block_idx = select_blocks(q_idx, k_idx, Bk, 2)
    for support in (block_idx, None):
        loss = index_kl_loss(q, k, q_idx, k_idx, support, Bk)
        assert abs(loss.item()) < 1e-5


def test_kl_gradients_reach_only_the_index_branch():
    N, Bk = 50, 16
    q, k, _, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8, grad=True)
    cu = torch.tensor([0, 1, 20, 21, 50], dtype=torch.int32)  # 1-token documents
    block_idx = select_blocks(q_idx, k_idx, Bk, 2, cu_seqlens=cu)
    block_idx[..., 1:] = -1  # keep only the own block: -1 slots
    loss = index_kl_loss(q, k, q_idx, k_idx, block_idx, Bk, cu_seqlens=cu)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert q.grad is None and k.grad is None
    assert torch.isfinite(q_idx.grad).all() and q_idx.grad.abs().sum() > 0
    assert torch.isfinite(k_idx.grad).all() and k_idx.grad.abs().sum() > 0


def test_kl_dense_support_and_recall():
    N, Bk = 64, 16
    q, k, _, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8)
    dense = index_kl_loss(q, k, q_idx, k_idx, None, Bk)
    full = index_kl_loss(q, k, q_idx, k_idx, select_blocks(q_idx, k_idx, Bk, 4), Bk)
    assert torch.allclose(dense, full, atol=1e-6)  # all 4 blocks selected: same support
    partial = select_blocks(q_idx, k_idx, Bk, 1)
    assert index_recall(q, k, select_blocks(q_idx, k_idx, Bk, 4), Bk).item() == pytest.approx(1.0, abs=1e-6)
    assert 0 < index_recall(q, k, partial, Bk).item() < 1


def test_empty_support_is_zero_and_finite():
    N, Bk = 20, 8
    q, k, v, _, _ = _inputs(1, N, 2, 1, 8, 4, grad=True)
    block_idx = torch.full((1, 1, N, 2), -1, dtype=torch.int32)
    block_idx[0, 0, 10:, 0] = 0  # queries 0..9 select nothing
    o, lse = sparse_attention(q, k, v, block_idx, Bk)
    assert (o[:, :10] == 0).all() and torch.isinf(lse[..., :10]).all()
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_query_suffix_equals_full_sequence_rows():
    """Queries given as the last Nq positions (context parallelism) reproduce those rows exactly."""
    N, Nq, Bk = 90, 37, 16
    cu = torch.tensor([0, 20, 21, 90], dtype=torch.int32)
    q, k, v, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8)
    full_idx = select_blocks(q_idx, k_idx, Bk, 3, cu_seqlens=cu)
    tail_idx = select_blocks(q_idx[:, -Nq:], k_idx, Bk, 3, cu_seqlens=cu)
    assert torch.equal(full_idx[:, :, -Nq:], tail_idx)
    o, lse = sparse_attention(q, k, v, full_idx, Bk, cu_seqlens=cu)
    o_tail, lse_tail = sparse_attention(q[:, -Nq:], k, v, tail_idx, Bk, cu_seqlens=cu)
    assert rel_rms(o[:, -Nq:], o_tail) < 1e-6 and torch.allclose(lse[..., -Nq:], lse_tail)
    # KL sums over rows: the prefix rows (keys before them only) plus the tail rows give the total
    P = N - Nq
    cu_prefix = torch.tensor([0, 20, 21, P], dtype=torch.int32)
    total = index_kl_loss(q, k, q_idx, k_idx, full_idx, Bk, cu_seqlens=cu) * N
    head = index_kl_loss(q[:, :P], k[:, :P], q_idx[:, :P], k_idx[:, :P], full_idx[:, :, :P], Bk,
                         cu_seqlens=cu_prefix) * P
    tail = index_kl_loss(q[:, -Nq:], k, q_idx[:, -Nq:], k_idx, tail_idx, Bk, cu_seqlens=cu) * Nq
    assert torch.allclose(head + tail, total, rtol=1e-5)


def test_kl_with_the_main_forward_lse_equals_recomputed_teacher():
    N, Bk = 77, 16
    cu = torch.tensor([0, 1, 40, 77], dtype=torch.int32)
    q, k, v, q_idx, k_idx = _inputs(1, N, 4, 2, 16, 8)
    block_idx = select_blocks(q_idx, k_idx, Bk, 2, cu_seqlens=cu)
    _, lse = sparse_attention(q, k, v, block_idx, Bk, cu_seqlens=cu)
    own = index_kl_loss(q, k, q_idx, k_idx, block_idx, Bk, cu_seqlens=cu)
    given = index_kl_loss(q, k, q_idx, k_idx, block_idx, Bk, cu_seqlens=cu, lse=lse)
    assert torch.allclose(own, given, rtol=1e-5)
    shifted = index_kl_loss(q, k, q_idx, k_idx, block_idx, Bk, cu_seqlens=cu, lse=lse + 1.0)
    assert not torch.allclose(own, shifted, rtol=1e-3)  # the lse is really used
