"""The benchmark's synthetic selections, their support sizes and FLOP counts, and the FlexAttention block
mask built from a selection (checked against the reference attention on the CPU)."""

import pytest
import torch

from bench.msa_attention import Shapes, case_flops, summarize
from bench.selection import PATTERNS, flex_block_mask, pattern_blocks, support_sizes, tile_blocks
from msa import reference


def expected_blocks(name: str, own: int, topk: int) -> list[int]:
    """The pattern's blocks for a query in block ``own``, written out by hand."""
    if own + 1 <= topk:
        return list(range(own, -1, -1))  # every visible block
    if name == "local":
        return list(range(own, own - topk, -1))
    if name == "same":
        return [own, *range(topk - 2, -1, -1)]
    if name == "sink_local":
        return [own, 0, *range(own - 1, own - topk + 1, -1)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("N,bs,topk", [(200, 16, 4), (300, 8, 16), (1000, 16, 16)])
def test_patterns_follow_their_definition_and_the_selection_layout(name, N, bs, topk):
    sel = pattern_blocks(name, N, 3, bs, topk)
    assert sel.shape == (1, 3, N, topk) and sel.dtype == torch.int32
    assert torch.equal(sel[:, 0], sel[:, 2])  # the same for every group
    for i in range(N):
        row = sel[0, 1, i].tolist()
        want = expected_blocks(name, i // bs, topk)
        valid = [b for b in row if b >= 0]
        assert valid == want, (i, row)
        assert row[len(valid):] == [-1] * (topk - len(valid))  # valid entries first, -1 after
        assert row[0] == i // bs  # own block in slot 0
        assert len(set(valid)) == len(valid) and all(0 <= b <= i // bs for b in valid)


def test_same_pattern_shares_its_blocks_across_queries():
    sel = pattern_blocks("same", 4096, 1, 128, 16)[0, 0]
    late = sel[15 * 128:, 1:]  # queries with more than 16 visible blocks
    assert torch.equal(late, late[:1].expand_as(late))
    assert set(late[0].tolist()) == set(range(15))


def brute_support(block_idx: torch.Tensor, bs: int) -> int:
    total = 0
    for r in range(block_idx.shape[1]):
        for i in range(block_idx.shape[2]):
            blocks = {b for b in block_idx[0, r, i].tolist() if b >= 0}
            total += sum(1 for j in range(i + 1) if j // bs in blocks)
    return total


@pytest.mark.parametrize("name", PATTERNS)
def test_support_sizes_count_visible_tokens_of_the_selected_blocks(name):
    sel = pattern_blocks(name, 90, 2, 8, 4)
    assert support_sizes(sel, 8) == brute_support(sel, 8)
    rnd = torch.randint(-1, 12, (1, 2, 90, 4), dtype=torch.int32)
    own = (torch.arange(90) // 8)[None, None, :, None]
    rnd = torch.where(rnd <= own, rnd, -1)  # only visible blocks, as a selection has
    rnd = torch.where(torch.arange(4)[None, None, None] > 0, rnd, own.int())  # own block in slot 0
    rnd[..., 1:][rnd[..., 1:] == rnd[..., :1]] = -1  # no duplicate of the own block
    for s in range(1, 4):
        for t in range(s + 1, 4):
            rnd[..., t][rnd[..., t] == rnd[..., s]] = -1
    assert support_sizes(rnd, 8) == brute_support(rnd, 8)


def test_case_flops_match_a_hand_count():
    # N = 4 tokens, H = 2 query heads over Hkv = 1, D = 3, Di = 5, blocks of 2, each query only its own
    # block: supports 1, 2, 1, 2 tokens -> T = 6; causal pairs 1 + 2 + 3 + 4 = 10
    s = Shapes(H=2, D=3, DI=5, BK=2, TOPK=1)
    sel = torch.tensor([0, 0, 1, 1], dtype=torch.int32).view(1, 1, 4, 1)
    T = support_sizes(sel, 2)
    assert T == 6
    fl = case_flops(4, 1, T, s)
    per_pair = 2 * 3 + 2 * 3  # q.k and p.v per head: 2D each
    assert fl["dense"] == 2 * per_pair * 10  # two heads, every causal pair
    assert fl["sparse"] == 2 * per_pair * 6  # two heads (G = 2), the selected pairs
    assert fl["index"] == 2 * 5 * 10  # one index head, every causal pair, 2 Di each
    assert fl["kl"] == 6 * (2 * 3 * 2 + 6 * 5)  # teacher scores (2 D G) + student and its gradients (6 Di)


def test_step_flops_the_train_step_bench_reports_match_a_hand_count():
    from types import SimpleNamespace

    import numpy as np

    from train.metrics import step_flops

    model = SimpleNamespace(n_heads=2, head_dim=4, n_kv_heads=1, n_layers=2, vocab_size=10, dim=6,
                            tie_embeddings=True, sliding_window=0, sliding_layers=None)
    attn = SimpleNamespace(index_dim=8, kind="msa", n_dense_layers=1, block_size=2, topk=2)
    fl = step_flops(model, attn, 100, np.array([5]), "sparse")
    # causal pairs 15; support per position p (own block up to p, one earlier block): 1, 2, 3, 4, 3 = 13
    attn_fwd = 4 * 2 * 4 * (15 + 13)  # 4 H D per pair: the dense layer over 15, the MSA layer over 13
    assert fl["attn"] == 3 * attn_fwd
    assert fl["model"] == 6 * (100 + 10 * 6) * 5 + 3 * attn_fwd
    assert fl["index"] == 2 * 1 * 8 * 15 + (2 * 2 * 4 + 6 * 1 * 8) * 13
    dense = step_flops(model, SimpleNamespace(**{**vars(attn), "kind": "dense"}), 100, np.array([5]), "sparse")
    assert dense["attn"] == 3 * 4 * 2 * 4 * (15 + 15) and dense["index"] == 0


def test_tile_blocks_full_and_partial():
    bs = tile = 8
    local = pattern_blocks("local", 64, 1, bs, 3)
    partial, full = tile_blocks(local, bs, tile)
    for t in range(8):
        want_full = {b for b in (t - 1, t - 2) if b >= 0}  # earlier blocks every query of the tile picks
        assert set(torch.nonzero(full[0, 0, t]).flatten().tolist()) == want_full
        assert torch.nonzero(partial[0, 0, t]).flatten().tolist() == [t]  # the causal diagonal
    # a block only some queries of the tile pick stays partial
    sel = local.clone()
    sel[0, 0, 40, 2] = -1  # query 40 (tile 5) drops block 3
    partial, full = tile_blocks(sel, bs, tile)
    assert not full[0, 0, 5, 3] and partial[0, 0, 5, 3] and full[0, 0, 5, 4]


def effective_mask(mask, N: int, H: int) -> torch.Tensor:
    """``[H, N, N]``: what a compiled FlexAttention kernel attends with this block mask: its full blocks
    whole, its partial blocks through ``mask_mod`` (eager FlexAttention applies ``mask_mod`` everywhere,
    so it cannot tell a wrong full block)."""
    qt, kt = mask.BLOCK_SIZE
    out = torch.zeros(H, N, N, dtype=torch.bool)
    for h in range(H):
        for t in range(mask.kv_num_blocks.shape[2]):
            rows = torch.arange(t * qt, min(N, (t + 1) * qt))
            for j in range(int(mask.kv_num_blocks[0, h, t])):
                b = int(mask.kv_indices[0, h, t, j])
                cols = torch.arange(b * kt, min(N, (b + 1) * kt))
                out[h, rows[:, None], cols[None]] = mask.mask_mod(0, h, rows[:, None], cols[None])
            for j in range(int(mask.full_kv_num_blocks[0, h, t])):
                b = int(mask.full_kv_indices[0, h, t, j])
                out[h, rows[:, None], torch.arange(b * kt, min(N, (b + 1) * kt))[None]] = True
    return out


@pytest.mark.parametrize("name", ["local", "same", "sink_local", "random"])
@pytest.mark.parametrize("q_tile", [8, 16])
def test_flex_block_mask_attends_exactly_the_selected_support(name, q_tile):
    torch.manual_seed(0)
    N, H, Hkv, bs, topk = 72, 4, 2, 8, 3
    if name == "random":
        sel = reference.select_blocks(torch.randn(1, N, Hkv, 8), torch.randn(1, N, 8), bs, topk)
    else:
        sel = pattern_blocks(name, N, Hkv, bs, topk)
    mask = flex_block_mask(sel, bs, H // Hkv, q_tile=q_tile)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    for h in range(H):
        chosen = (sel[0, h // (H // Hkv)][:, :, None] == (j // bs)[:, None, :]).any(1)  # [N, N]
        assert torch.equal(effective_mask(mask, N, H)[h], chosen & (j <= i)), (name, h)
    if name == "local" and q_tile == bs:
        assert int(mask.full_kv_num_blocks.sum()) > 0  # tile-shared: the earlier blocks go in whole


@pytest.mark.parametrize("name", ["local", "same", "random"])
def test_flex_block_mask_computes_the_selected_attention(name):
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    N, H, Hkv, D, bs, topk = 64, 4, 2, 16, 8, 3
    if name == "random":
        q_idx, k_idx = torch.randn(1, N, Hkv, 8), torch.randn(1, N, 8)
        sel = reference.select_blocks(q_idx, k_idx, bs, topk)
    else:
        sel = pattern_blocks(name, N, Hkv, bs, topk)
    q, k, v = torch.randn(1, N, H, D), torch.randn(1, N, Hkv, D), torch.randn(1, N, Hkv, D)
    ref = reference.sparse_attention(q, k, v, sel, bs)[0]
    mask = flex_block_mask(sel, bs, H // Hkv, q_tile=bs)
    got = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_slowdowns_against_random_from_rows():
    rows = [{"case": "msa_main", "mode": "fwd", "N": 131072, "Hkv": 2, "ms": 20.0, "status": "ok"},
            {"case": "msa_main[same]", "mode": "fwd", "N": 131072, "Hkv": 2, "ms": 40.0, "status": "ok",
             "pattern": "same"},
            {"case": "msa_main[local]", "mode": "fwd", "N": 131072, "Hkv": 2, "ms": 25.0, "status": "ok",
             "pattern": "local"},
            {"case": "flex_msa[local]", "mode": "fwd", "N": 131072, "Hkv": 2, "ms": 10.0, "status": "ok",
             "pattern": "local"}]
    speedups, slowdowns = summarize(rows)
    got = {s["what"]: (s["slowdown"], s["within_target"]) for s in slowdowns}
    assert got == {"msa_main[same] / msa_main": (2.0, False), "msa_main[local] / msa_main": (1.25, True)}
    assert {s["what"]: s["speedup"] for s in speedups} == {"msa_main[local] vs flex_msa[local]": 0.4}
