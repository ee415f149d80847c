"""MSAAttention: phases against dense attention, gradient routing, config checks."""

import pytest
import torch

from msa.layer import Attention, AttentionConfig, MSAAttention, check_attention
from msa.reference import select_blocks
from msa.rope import Rotary
from msa.stats import selection_stats
from tests.utils import rel_rms

DIM, H, HKV, D, ROPE = 64, 4, 2, 16, 8


def _layers(topk=2, block_size=16):
    cfg = AttentionConfig(impl="reference", block_size=block_size, topk=topk, index_dim=8)
    msa = MSAAttention(DIM, H, HKV, D, ROPE, cfg)
    dense = Attention(DIM, H, HKV, D, ROPE)
    dense.load_state_dict(msa.state_dict(), strict=False)  # same main-branch weights
    return msa, dense


def _run(layer, N=70, cu_seqlens=None, B=1, phase="sparse"):
    x = torch.randn(B, N, DIM, requires_grad=True)
    positions = torch.arange(N).expand(B, N)
    if cu_seqlens is not None:
        starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1])
        positions = (torch.arange(N) - starts)[None]
    y, kl, _ = layer(x, Rotary(positions, 10000.0), cu_seqlens, phase)
    return x, y, kl


@pytest.mark.parametrize("cu", [None, torch.tensor([0, 1, 33, 70], dtype=torch.int32)])
def test_warmup_equals_dense_attention(cu):
    msa, dense = _layers()
    torch.manual_seed(1)
    _, y, kl = _run(msa, cu_seqlens=cu, phase="warmup")
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
def test_strided_kl_layer_averages_to_the_full_kl(phase):
    """``attention.kl_query_stride=3`` in the layer: each offset's KL (``MSACore.set_kl_offset``) differs from the
    full one, and their mean, with the index branch's gradients, is the full KL's; the output is untouched."""
    full, _ = _layers()
    strided = MSAAttention(DIM, H, HKV, D, ROPE, AttentionConfig(impl="reference", block_size=16, topk=2,
                                                                 index_dim=8, kl_query_stride=3))
    strided.load_state_dict(full.state_dict())
    cu = torch.tensor([0, 1, 33, 70], dtype=torch.int32)

    def kl_and_grads(layer, offset=0):
        layer.zero_grad()
        layer.core.set_kl_offset(offset)
        torch.manual_seed(4)
        _, y, kl = _run(layer, cu_seqlens=cu, phase=phase)
        kl.backward()
        return y.detach(), kl.detach(), [p.grad.clone() for p in layer.index_params()]

    y, kl, grads = kl_and_grads(full)
    each = [kl_and_grads(strided, o) for o in (3, 4, 5)]  # offsets are taken mod the stride
    assert all(torch.equal(y, e[0]) for e in each)
    assert all(abs(e[1] - kl) > 1e-3 * kl for e in each)
    assert rel_rms(kl, sum(e[1] for e in each) / 3) < 1e-6
    for i, g in enumerate(grads):
        assert rel_rms(g, sum(e[2][i] for e in each) / 3) < 1e-5


@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_gradient_routing(phase):
    msa, _ = _layers()
    x, y, kl = _run(msa, phase=phase)
    index = set(map(id, msa.index_params()))
    main = [p for p in msa.parameters() if id(p) not in index]

    lm_grads = torch.autograd.grad(y.square().mean(), [x, *main, *msa.index_params()], allow_unused=True)
    n_main = 1 + len(main)
    assert all(g is not None and g.abs().sum() > 0 for g in lm_grads[:n_main])
    assert all(g is None for g in lm_grads[n_main:]), "the LM loss must not reach the index branch"

    kl_grads = torch.autograd.grad(kl, [x, *main, *msa.index_params()], allow_unused=True)
    assert all(g is None for g in kl_grads[:n_main]), "the KL must reach only the index branch"
    assert all(g is not None and g.abs().sum() > 0 for g in kl_grads[n_main:])


def _hand_recall(q, k, block_idx, Bk, rows):
    """Teacher mass in the selection for query ``rows`` of one sequence, by brute force: softmax of each
    head over the visible keys, the selected blocks' share of it, averaged over the group's heads."""
    H, Hkv = q.shape[2], k.shape[2]
    G = H // Hkv
    total = 0.0
    for i in rows:
        for r in range(Hkv):
            keys = torch.arange(i + 1)
            chosen = torch.isin(keys // Bk, block_idx[0, r, i].long())
            for h in range(r * G, (r + 1) * G):
                p = torch.softmax(q[0, i, h].double() @ k[0, :i + 1, r].double().T * D ** -0.5, dim=0)
                total += p[chosen].sum().item() / G
    return total / (len(rows) * Hkv)


def _one_document_stats(N, Bk, topk, key_chunk):
    """Random ``q, k`` and an index selection on one document; its stats over every non-trivial query,
    and those queries (more than ``topk`` visible blocks)."""
    q, k = torch.randn(1, N, H, D), torch.randn(1, N, HKV, D)
    block_idx = select_blocks(torch.randn(1, N, HKV, 8), torch.randn(1, N, 8), Bk, topk)
    stats = selection_stats(q, k, block_idx, Bk, topk, n_recall=N, key_chunk=key_chunk).ratios()
    return q, k, block_idx, stats, [i for i in range(N) if i // Bk + 1 > topk]


def test_selection_stats_against_a_hand_computation():
    """Recall averages only queries with more than topk visible blocks (the others keep every block,
    recall 1 by construction); sparsity is the share of visible (query, group, key) triples skipped."""
    N, Bk, topk = 64, 8, 2
    q, k, block_idx, stats, nontrivial = _one_document_stats(N, Bk, topk, key_chunk=24)
    assert stats["index_recall"] == pytest.approx(_hand_recall(q, k, block_idx, Bk, nontrivial), abs=1e-6)
    assert stats["nontrivial_share"] == pytest.approx(len(nontrivial) / N)
    kept = sum(min(Bk, i - b * Bk + 1) for i in range(N) for r in range(HKV)
               for b in block_idx[0, r, i].tolist() if b >= 0)
    assert stats["sparsity"] == pytest.approx(1 - kept / (HKV * N * (N + 1) / 2))
    # sampled: the evenly spaced subset of the non-trivial queries
    few = selection_stats(q, k, block_idx, Bk, topk, n_recall=5).ratios()["index_recall"]
    picked = [nontrivial[j] for j in torch.linspace(0, len(nontrivial) - 1, 5).long().tolist()]
    assert few == pytest.approx(_hand_recall(q, k, block_idx, Bk, picked), abs=1e-6)
    # no query beyond topk blocks: no recall (not a 1.0 that reads as a perfect indexer)
    short = selection_stats(q[:, :16], k[:, :16], block_idx[:, :, :16], Bk, topk).ratios()
    assert short["index_recall"] is None and short["nontrivial_share"] == 0


def _hand_oracle(q, k, Bk, topk, rows, cu=None):
    """The best ``topk`` blocks' head-mean teacher mass (the own block among them; every block where a row
    sees fewer), by trying every such selection of every row and group; documents from ``cu`` (block ids
    inside each document)."""
    import itertools

    H, Hkv = q.shape[2], k.shape[2]
    G = H // Hkv
    starts = [0] if cu is None else cu.tolist()[:-1]
    total = 0.0
    for i in rows:
        s0 = max(s for s in starts if s <= i)
        keys = torch.arange(s0, i + 1)
        blocks = (keys - s0) // Bk
        own = (i - s0) // Bk
        p = torch.stack([torch.softmax(q[0, i, h].double() @ k[0, keys, h // G].double().T * D ** -0.5, dim=0)
                         for h in range(H)])  # [H, keys]
        for r in range(Hkv):
            mass = [p[r * G:(r + 1) * G, blocks == b].sum().item() / G for b in range(own + 1)]
            others = [b for b in range(own + 1) if b != own]
            picks = itertools.combinations(others, min(topk - 1, len(others)))
            total += max(mass[own] + sum(mass[b] for b in pick) for pick in picks)
    return total / (len(rows) * Hkv)


def test_oracle_recall_against_a_hand_computation():
    """The oracle recall is the best selection's mass (tried exhaustively), on one document and on packed
    documents; it bounds the index recall of the indexer's selection."""
    N, Bk, topk = 56, 8, 3
    q, k, _, stats, nontrivial = _one_document_stats(N, Bk, topk, key_chunk=20)
    assert stats["oracle_recall"] == pytest.approx(_hand_oracle(q, k, Bk, topk, nontrivial), abs=1e-6)
    assert stats["oracle_recall_2x"] == pytest.approx(_hand_oracle(q, k, Bk, 2 * topk, nontrivial), abs=1e-6)
    assert stats["index_recall"] < stats["oracle_recall"] < stats["oracle_recall_2x"] < 1
    cu = torch.tensor([0, 13, 50, N], dtype=torch.int32)  # the middle document alone has > topk blocks
    packed = selection_stats(q, k, select_blocks(torch.randn(1, N, HKV, 8), torch.randn(1, N, 8), Bk, topk, cu),
                             Bk, topk, cu, n_recall=N, key_chunk=16).ratios()
    rows = [i for i in range(13, 50) if (i - 13) // Bk + 1 > topk]
    assert packed["oracle_recall"] == pytest.approx(_hand_oracle(q, k, Bk, topk, rows, cu), abs=1e-6)
    assert packed["oracle_recall_2x"] == pytest.approx(_hand_oracle(q, k, Bk, 2 * topk, rows, cu), abs=1e-6)
    assert packed["index_recall"] <= packed["oracle_recall"]


def _hand_tile_union(block_idx, T):
    """Queries x distinct blocks per tile of ``T`` consecutive queries, summed, per selected entry: by sets."""
    work = selected = 0
    B, Hkv, Nq, _ = block_idx.shape
    for b in range(B):
        for r in range(Hkv):
            for t0 in range(0, Nq, T):
                rows = block_idx[b, r, t0:t0 + T].tolist()
                work += len(rows) * len({j for row in rows for j in row if j >= 0})
                selected += sum(j >= 0 for row in rows for j in row)
    return work / selected


@pytest.mark.parametrize("tile_rows,chunk", [(64, 65536), (8, 65536), (8, 12), (1, 65536)])
def test_tile_union_against_sets(tile_rows, chunk):
    """The tile union: (queries x union blocks) per selected entry, tiles of tile_rows / G queries, the last
    tile short; chunked the same (chunks cut at tile boundaries)."""
    import msa.stats as S
    N, Bk, topk = 61, 4, 3
    torch.manual_seed(0)
    q, k = torch.randn(2, N, H, D), torch.randn(2, N, HKV, D)
    block_idx = select_blocks(torch.randn(2, N, HKV, 8), torch.randn(2, N, 8), Bk, topk)
    T = max(1, tile_rows // (H // HKV))
    got = selection_stats(q, k, block_idx, Bk, topk, n_recall=4, tile_rows=tile_rows).ratios()["tile_union"]
    assert got == pytest.approx(_hand_tile_union(block_idx, T), rel=1e-12)
    work, sel = S._tile_union(block_idx, T, chunk=chunk)
    assert float(work / sel) == pytest.approx(got, rel=1e-12)
    # one query per tile: the union is its own selection; every query of a tile the same: the per-query count
    assert selection_stats(q, k, block_idx, Bk, topk, n_recall=4, tile_rows=1).ratios()["tile_union"] == 1
    same = block_idx[:, :, -1:].expand_as(block_idx).contiguous()
    assert float(S._tile_union(same, 8)[0] / S._tile_union(same, 8)[1]) == 1
    # query chunks (context parallelism's) of a multiple of T queries give the whole row's tiles and sum
    whole = S._tile_union(block_idx, 4)
    parts = [S._tile_union(block_idx[:, :, a:b], 4) for a, b in ((0, 12), (12, 40), (40, N))]
    assert all(float(sum(p[i] for p in parts)) == float(whole[i]) for i in range(2))
    # tiles whose queries share no block: the tile's query count
    disjoint = torch.arange(2 * HKV * 8 * 2).view(2, HKV, 8, 2)
    assert float(S._tile_union(disjoint, 4)[0] / S._tile_union(disjoint, 4)[1]) == 4


@pytest.mark.parametrize("change,key", [
    ({"topk": 0}, "attention.topk"),
    ({"block_size": 48}, "attention.block_size"),
    ({"impl": "cuda"}, "attention.impl"),
    ({"kind": "sparse"}, "attention.kind"),
    ({"fwd_path": "query"}, "attention.fwd_path"),
    ({"kl_path": "query"}, "attention.kl_path"),
    ({"dq_path": "query"}, "attention.dq_path"),
    ({"kl_query_stride": 0}, "attention.kl_query_stride"),
    ({"kl_query_stride": 2, "kl_in_backward": True}, "attention.kl_in_backward"),
])
def test_bad_attention_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        check_attention(AttentionConfig(**change), n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        check_attention(AttentionConfig(), n_heads=6, n_kv_heads=4, head_dim=16, n_layers=2)


def test_auto_impl_follows_the_tensors_device(monkeypatch):
    """On a CUDA machine, ``attention.impl=auto`` runs a model kept on the CPU with the reference (the
    compiled kernels take CUDA tensors only); on CUDA tensors it takes the kernels."""
    import kernels
    from msa import chunked_reference
    from msa.layer import AttentionConfig, MSACore

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    core = MSACore(AttentionConfig(impl="auto"))
    assert core.ops is kernels  # what a CUDA machine resolves at build time
    assert core.ops_for(torch.device("cpu")) is chunked_reference
    assert core.ops_for(torch.device("cuda", 0)) is kernels
    assert MSACore(AttentionConfig(impl="triton")).ops_for(torch.device("cpu")) is kernels  # asked for: kept


@pytest.mark.parametrize("N,cu,dense_path", [
    (48, None, True),  # one document of 3 blocks = topk
    (70, torch.tensor([0, 20, 31, 64, 70], dtype=torch.int32), True),  # packed, every document <= 3 blocks
    (70, torch.tensor([0, 60, 70], dtype=torch.int32), False),  # one document of 4 blocks
])
def test_rows_of_short_documents_take_the_dense_path_with_the_same_numbers(N, cu, dense_path, monkeypatch):
    """When every document has at most ``topk`` blocks, each query selects all its visible blocks: the core
    skips the top-k and the sparse kernel (dense attention, the KL on the dense support) and gives what the
    sparse ops give, forward and every gradient. A longer document sends the row down the sparse path."""
    from msa import layer as L
    from msa import reference as R

    Bk, topk = 16, 3
    core = L.MSACore(AttentionConfig(impl="reference", block_size=Bk, topk=topk, index_dim=8))
    torch.manual_seed(4)
    q, k, v = torch.randn(1, N, H, D), torch.randn(1, N, HKV, D), torch.randn(1, N, HKV, D)
    q_idx, k_idx, w = torch.randn(1, N, HKV, 8), torch.randn(1, N, 8), torch.randn(1, N, H, D)
    leaves = [t.requires_grad_() for t in (q, k, v, q_idx, k_idx)]

    block_idx = R.select_blocks(q_idx.detach(), k_idx.detach(), Bk, topk, cu)
    o, lse = R.sparse_attention(q, k, v, block_idx, Bk, cu)
    kl = R.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, block_idx, Bk, cu, lse=lse)
    want = torch.autograd.grad((o * w).sum() + kl, leaves)

    calls = []

    def counted(name):
        fn = getattr(R, name)
        return lambda *a, **kw: calls.append(name) or fn(*a, **kw)

    for name in ("select_blocks", "sparse_attention"):
        monkeypatch.setattr(R, name, counted(name))
    out = core(q, k, v, cu, (q_idx, k_idx), "sparse")
    assert calls == ([] if dense_path else ["select_blocks", "sparse_attention"])
    got = torch.autograd.grad((out.o * w).sum() + out.kl, leaves)
    assert rel_rms(o, out.o) < 1e-5 and abs(out.kl.item() - kl.item()) < 1e-5 * abs(kl.item())
    assert all(rel_rms(a, b) < 1e-5 for a, b in zip(want, got))
