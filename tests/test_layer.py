"""MSAAttention: phases against dense attention, gradient routing, config checks."""

import pytest
import torch

from msa.layer import Attention, AttentionConfig, MSAAttention, check_attention, selection_stats
from msa.reference import index_recall, select_blocks
from msa.rope import Rotary
from tests.utils import rel_rms

DIM, H, HKV, D, ROPE = 64, 4, 2, 16, 8


def _layers(topk=2, block_size=16):
    cfg = AttentionConfig(backend="reference", block_size=block_size, topk=topk, index_dim=8)
    msa = MSAAttention(DIM, H, HKV, D, ROPE, cfg)
    dense = Attention(DIM, H, HKV, D, ROPE)
    dense.load_state_dict(msa.state_dict(), strict=False)  # same main-branch weights
    return msa, dense


def _run(layer, N=70, cu_seqlens=None, B=1):
    x = torch.randn(B, N, DIM, requires_grad=True)
    positions = torch.arange(N).expand(B, N)
    if cu_seqlens is not None:
        starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1])
        positions = (torch.arange(N) - starts)[None]
    y, kl = layer(x, Rotary(positions, 10000.0), cu_seqlens)
    return x, y, kl


@pytest.mark.parametrize("cu", [None, torch.tensor([0, 1, 33, 70], dtype=torch.int32)])
def test_warmup_equals_dense_attention(cu):
    msa, dense = _layers()
    msa.core.phase = "warmup"
    torch.manual_seed(1)
    _, y, kl = _run(msa, cu_seqlens=cu)
    torch.manual_seed(1)
    _, y_dense, _ = _run(dense, cu_seqlens=cu)
    assert rel_rms(y_dense, y) < 1e-6
    assert kl.item() > 0


def test_sparse_with_large_topk_equals_dense():
    msa, dense = _layers(topk=64)
    torch.manual_seed(2)
    _, y, _ = _run(msa, B=2)
    torch.manual_seed(2)
    _, y_dense, _ = _run(dense, B=2)
    assert rel_rms(y_dense, y) < 1e-5


def test_sparse_with_small_topk_differs_from_dense():
    msa, dense = _layers(topk=1)
    torch.manual_seed(3)
    _, y, _ = _run(msa, N=96)
    torch.manual_seed(3)
    _, y_dense, _ = _run(dense, N=96)
    assert rel_rms(y_dense, y) > 1e-3  # guards the test above against a layer that ignores topk


@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_gradient_routing(phase):
    msa, _ = _layers()
    msa.core.phase = phase
    x, y, kl = _run(msa)
    index = set(map(id, msa.index_params()))
    main = [p for p in msa.parameters() if id(p) not in index]

    lm_grads = torch.autograd.grad(y.square().mean(), [x, *main, *msa.index_params()], allow_unused=True)
    n_main = 1 + len(main)
    assert all(g is not None and g.abs().sum() > 0 for g in lm_grads[:n_main])
    assert all(g is None for g in lm_grads[n_main:]), "the LM loss must not reach the index branch"

    kl_grads = torch.autograd.grad(kl, [x, *main, *msa.index_params()], allow_unused=True)
    assert all(g is None for g in kl_grads[:n_main]), "the KL must reach only the index branch"
    assert all(g is not None and g.abs().sum() > 0 for g in kl_grads[n_main:])


def test_selection_stats_match_reference_recall():
    B, N, Bk = 1, 64, 16
    q, k = torch.randn(B, N, H, D), torch.randn(B, N, HKV, D)
    block_idx = select_blocks(torch.randn(B, N, HKV, 8), torch.randn(B, N, 8), Bk, 2)
    stats = selection_stats(q, k, block_idx, Bk, n_queries=N)
    assert stats["index_recall"] == pytest.approx(index_recall(q, k, block_idx, Bk).item(), abs=1e-5)
    # queries past the second block keep 2 of their blocks: sparsity strictly between 0 and 1
    assert 0 < stats["sparsity"] < 1


@pytest.mark.parametrize("change,key", [
    ({"topk": 0}, "attention.topk"),
    ({"block_size": 48}, "attention.block_size"),
    ({"backend": "cuda"}, "attention.backend"),
])
def test_bad_attention_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        check_attention(AttentionConfig(**change), n_heads=4, n_kv_heads=2, n_layers=2)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        check_attention(AttentionConfig(), n_heads=6, n_kv_heads=4, n_layers=2)
