"""kernels.sparse_tile (the query-tile-outer forward) against msa.reference.sparse_attention: o and lse.

CPU: the Triton interpreter on small fp32 shapes, with unwritten outputs NaN-poisoned; tiles of a few queries
so that the unions, the tiles across documents and a last partial tile are all exercised. GPU (marked): bf16 at
real sizes, against the reference and against the KV-outer forward.
"""

from dataclasses import replace

import pytest
import torch

from kernels.common import build_layout
from kernels.sparse_attention import resolve_dq_path
from kernels.sparse_tile import sparse_attention_tile_fwd, tile_union
from kernels.sparse_tiles import Tiles
from msa import reference as ref
from tests.test_kernel_sparse_attention import CPU_CASES, make_inputs, random_block_idx
from tests.utils import poison_empty, rel_rms


def run_tile(q, k, v, block_idx, block_size, cu=None, block_m=16):
    layout = build_layout(k.shape[1], block_size, cu, q.device)
    return sparse_attention_tile_fwd(q, k, v, block_idx, block_size, layout.tok_start, q.shape[-1] ** -0.5,
                                     Tiles(block_m=block_m, num_stages=1))


def check(q, k, v, block_idx, block_size, cu=None, block_m=16, tol=1e-5):
    with torch.no_grad():
        o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), block_idx, block_size, cu)
        o, lse = run_tile(q, k, v, block_idx, block_size, cu, block_m)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "an unwritten output"
    empty = torch.isinf(lse_ref)
    assert torch.equal(empty, torch.isinf(lse)), "lse: the -inf (empty support) rows differ"
    assert torch.equal(o.transpose(1, 2)[empty], torch.zeros_like(o.transpose(1, 2)[empty]))
    assert rel_rms(o_ref, o.float()) < tol
    assert rel_rms(lse_ref[~empty], lse[~empty]) < tol


@pytest.mark.parametrize("B,N,H,Hkv,D,block_size,topk", CPU_CASES)
def test_matches_reference(monkeypatch, B, N, H, Hkv, D, block_size, topk):
    q, k, v = make_inputs(B, N, H, Hkv, D)
    block_idx = random_block_idx(B, Hkv, N, topk, block_size)
    poison_empty(monkeypatch)
    check(q, k, v, block_idx, block_size)


@pytest.mark.parametrize("H,block_m", [(4, 16), (6, 16), (10, 16), (4, 64)])
def test_packed_documents_and_queries_that_are_the_last_positions(monkeypatch, H, block_m):
    """Tiles that span documents (block ids relative to each query's document), one-token documents, Nq < N
    (context parallelism's layout), G = 2, 3, 5 (whole queries per tile: 8, 5, 3 of 16 rows), one tile of 32
    queries (block_m 64)."""
    N, Nq, Hkv, D, block_size, topk = 111, 70, 2, 16, 16, 4
    cu = torch.tensor([0, 1, 30, 31, 70, 71, 111], dtype=torch.int32)
    q, k, v = make_inputs(1, N, H, Hkv, D, Nq=Nq)
    block_idx = random_block_idx(1, Hkv, N, topk, block_size, cu, Nq=Nq)
    poison_empty(monkeypatch)
    check(q, k, v, block_idx, block_size, cu, block_m)


def test_all_slots_empty_give_zero_and_minus_inf(monkeypatch):
    q, k, v = make_inputs(1, 40, 2, 1, 16)
    block_idx = torch.full((1, 1, 40, 2), -1, dtype=torch.int32)
    block_idx[0, 0, 20:, 0] = 1  # queries 20.. see block 1 ([16, 32)); 0..19 see nothing
    block_idx[0, 0, 5, 1] = 2  # a block past query 5's position: not visible, so still empty
    poison_empty(monkeypatch)
    with torch.no_grad():
        o, lse = run_tile(q, k, v, block_idx, 16)
    assert torch.equal(o[0, :20], torch.zeros_like(o[0, :20]))
    assert torch.isneginf(lse[0, :, :20]).all() and torch.isfinite(lse[0, :, 20:]).all()
    from kernels.sparse_attention import LAUNCH, sparse_attention

    q.requires_grad_(True)
    o, _ = sparse_attention(q, k, v, block_idx, 16, fwd_path="tile", dq_path="tile",
                            launch=replace(LAUNCH, tile_fwd=Tiles(block_m=16, num_stages=1)))
    (dq,) = torch.autograd.grad(o, q, torch.randn_like(o))
    assert torch.equal(dq[0, :20], torch.zeros_like(dq[0, :20])) and torch.isfinite(dq).all()


def test_tile_union_counts_distinct_visible_blocks():
    """By hand: two documents [0, 5) and [5, 12), blocks of 4 keys, tiles of 3 queries."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    layout = build_layout(12, 4, cu, "cpu")
    idx = torch.full((1, 1, 12, 2), -1, dtype=torch.int32)
    idx[0, 0, 3] = torch.tensor([0, -1])  # doc 0, key 0
    idx[0, 0, 4] = torch.tensor([1, 0])  # doc 0, keys 4 and 0
    idx[0, 0, 5] = torch.tensor([0, 1])  # doc 1 position 0: block 1 (key 9) not visible yet; key 5
    idx[0, 0, 9] = torch.tensor([1, 0])  # doc 1 position 4: keys 9 and 5
    idx[0, 0, 11] = torch.tensor([1, -1])  # key 9
    starts, union, count = tile_union(idx, layout.tok_start, 12, 4, T=3)
    none = 2**31 - 1
    assert starts[0, 0, 5].tolist() == [5, none]
    assert starts[0, 0, 4].tolist() == [4, 0]
    assert count[0, 0].tolist() == [0, 3, 0, 2]  # queries 0-2: {}, 3-5: {0, 4, 5}, 6-8: {}, 9-11: {5, 9}
    assert union[0, 0, 1, :3].tolist() == [0, 4, 5] and union[0, 0, 3, :2].tolist() == [5, 9]
    assert (union[0, 0, 1, 3:] == none).all()


@pytest.mark.gpu
@pytest.mark.parametrize("G", [4, 16])
def test_gpu_bf16_matches_reference_and_the_kv_outer_forward(G):
    from kernels.sparse_attention import sparse_attention

    B, N, Hkv, D, block_size, topk = 1, 4000, 2, 128, 128, 16
    q, k, v = make_inputs(B, N, G * Hkv, Hkv, D, torch.bfloat16, "cuda")
    block_idx = random_block_idx(B, Hkv, N, topk, block_size, device="cuda")
    with torch.no_grad():
        o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), block_idx, block_size)
        o_kv, lse_kv = sparse_attention(q, k, v, block_idx, block_size)
        o, lse = sparse_attention_tile_fwd(q, k, v, block_idx, block_size,
                                           build_layout(N, block_size, None, "cuda").tok_start, D ** -0.5)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse))
    err, err_kv = rel_rms(o_ref, o.float()), rel_rms(o_ref, o_kv.float())
    assert err < 5e-3 and err <= 1.5 * err_kv, (err, err_kv)
    assert (lse - lse_ref)[finite].abs().max() < 1e-4
    # the tile dQ, against the reference's dQ and the KV-outer one's error
    do = torch.randn_like(q)
    q32 = q.detach().float().requires_grad_()
    o32, _ = ref.sparse_attention(q32, k.float(), v.float(), block_idx, block_size)
    (dq_ref,) = torch.autograd.grad(o32, q32, do.float())
    errs = {}
    for path in (resolve_dq_path("auto", G), "tile"):  # the KV-outer dQ that auto takes by G, and the tile one
        qq = q.detach().clone().requires_grad_()
        o_p, _ = sparse_attention(qq, k, v, block_idx, block_size, dq_path=path, fwd_path="tile")
        (dq_p,) = torch.autograd.grad(o_p, qq, do)
        errs[path] = rel_rms(dq_ref, dq_p.float())
    assert errs["tile"] < 5e-3 and errs["tile"] <= 1.5 * errs[resolve_dq_path("auto", G)], errs


@pytest.mark.parametrize("fwd,dq", [("tile", "kv"), ("tile", "dkdv"), ("tile", "tile"), ("kv", "tile")])
def test_sparse_attention_with_the_tile_kernels_matches_reference(monkeypatch, fwd, dq):
    """``sparse_attention(..., fwd_path=, dq_path=)`` with the tile forward, the tile dQ or both: output and every
    gradient equal the reference's, packed documents and Nq < N."""
    from kernels.sparse_attention import LAUNCH, sparse_attention
    from tests.test_kernel_sparse_attention import assert_close

    N, Nq, H, Hkv, D, block_size, topk = 111, 70, 4, 2, 16, 16, 4
    cu = torch.tensor([0, 1, 30, 31, 70, 71, 111], dtype=torch.int32)
    q, k, v = make_inputs(1, N, H, Hkv, D, Nq=Nq)
    block_idx = random_block_idx(1, Hkv, N, topk, block_size, cu, Nq=Nq)
    do = torch.randn_like(q)
    q32, k32, v32 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = ref.sparse_attention(q32, k32, v32, block_idx, block_size, cu)
    refs = (o_ref, lse_ref, *torch.autograd.grad(o_ref, (q32, k32, v32), do))
    poison_empty(monkeypatch)
    o, lse = sparse_attention(q, k, v, block_idx, block_size, cu, dq_path=dq, fwd_path=fwd,
                              launch=replace(LAUNCH, tile_fwd=Tiles(block_m=16, num_stages=1)))
    assert_close(refs, (o, lse, *torch.autograd.grad(o, (q, k, v), do)), 1e-5)
    with pytest.raises(ValueError, match="fwd_path"):
        sparse_attention(q, k, v, block_idx, block_size, cu, fwd_path="query")


@pytest.mark.usefixtures("restore_dist_env")
def test_model_with_the_tile_forward_under_selective_checkpointing(monkeypatch):
    """``attention.fwd_path=tile attention.kl_path=tile attention.dq_path=tile`` in a model (Triton, interpreted):
    the loss and gradients (the index weights' from the KL) of the KV-outer forms; under selective checkpointing
    the tile forward and the tile KL run once per MSA layer (kept for the recompute, as ``parallel.SAVED_OPS``
    says), the tile dQ once per MSA layer's backward, and the KV-outer ones (the forward; the KL's reverse index)
    never."""
    import collections
    import importlib

    from tests.test_checkpointing import _batch, _check_same, _checkpointed, _model, _step
    from tests.utils import counting

    calls = collections.Counter()
    for module_name, name in (("kernels.sparse_tile", "sparse_attention_tile_fwd"),
                              ("kernels.sparse_attention", "sparse_attention_fwd"),
                              ("kernels.index_kl", "index_kl_tile_fwd"), ("kernels.index_kl", "build_kl_csr"),
                              ("kernels.sparse_attention_bwd", "sparse_attention_tile_dq")):
        module = importlib.import_module(module_name)  # kernels.sparse_attention is also a function's name
        monkeypatch.setattr(module, name, counting(calls, name, getattr(module, name)))
    batch = _batch()
    ref = _step(_model("triton", n_layers=3), batch, "sparse")
    assert calls == {"sparse_attention_fwd": 2, "build_kl_csr": 2}
    calls.clear()
    model = _model("triton", n_layers=3, fwd_path="tile", kl_path="tile", dq_path="tile")
    out = _step(_checkpointed(model, "selective"), batch, "sparse")
    assert calls == {"sparse_attention_tile_fwd": 2, "index_kl_tile_fwd": 2, "sparse_attention_tile_dq": 2}
    (loss, grads, _), (loss_t, grads_t, _) = ref, out
    assert abs(loss - loss_t) < 1e-6 * abs(loss)  # another summation order than the KV-outer forward's
    _check_same((loss, grads, None), (loss, grads_t, None), "tile forward, selective")


def test_auto_takes_the_tile_forward_where_the_selection_is_local(monkeypatch):
    """``fwd_path="auto"``: a local selection (each query its own block and the ones before it; tile union
    1.0 in tiles of 4 queries) runs the tile forward and, ``dq_path="auto"``, the tile dQ; an unrelated one per
    query (tile union about 2.6) the KV-outer forward and dQ; both give the reference's output and gradients.
    A dQ path asked for by name is kept whichever forward ran."""
    import collections
    import importlib

    from bench.selection import pattern_blocks
    from kernels.sparse_attention import LAUNCH, sparse_attention
    from kernels.sparse_tile import tile_pays
    from tests.utils import counting

    calls = collections.Counter()
    for module_name, name in (("kernels.sparse_tile", "sparse_attention_tile_fwd"),
                              ("kernels.sparse_attention", "sparse_attention_fwd"),
                              ("kernels.sparse_attention_bwd", "sparse_attention_tile_dq")):
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, name, counting(calls, name, getattr(module, name)))
    sa = importlib.import_module("kernels.sparse_attention")
    bwd = sa.sparse_attention_bwd

    def backward(*args):  # the dQ path the backward was given (its 12th argument)
        calls[f"dq={args[11]}"] += 1
        return bwd(*args)

    monkeypatch.setattr(sa, "sparse_attention_bwd", backward)
    N, H, Hkv, D, block_size, topk = 512, 4, 1, 16, 16, 4  # G = 4: tiles of 16 // 4 = 4 queries
    launch = replace(LAUNCH, tile_fwd=Tiles(block_m=16, num_stages=1))
    q, k, v = make_inputs(1, N, H, Hkv, D)
    do = torch.randn_like(q)
    tile, kv = "sparse_attention_tile_fwd", "sparse_attention_fwd"
    for pattern, dq_path, want in (("local", "auto", {tile, "dq=tile", "sparse_attention_tile_dq"}),
                                   ("random", "auto", {kv, "dq=kv"}), ("local", "kv", {tile, "dq=kv"})):
        if pattern == "local":
            block_idx = pattern_blocks("local", N, Hkv, block_size, topk)
        else:  # tile union 2.54-2.65 over seeds 0-4
            block_idx = random_block_idx(1, Hkv, N, topk, block_size, drop=0.0)
        calls.clear()
        qq = q.detach().clone().requires_grad_()
        o, _ = sparse_attention(qq, k, v, block_idx, block_size, fwd_path="auto", dq_path=dq_path, launch=launch)
        (dq,) = torch.autograd.grad(o, qq, do)
        q32 = q.detach().clone().requires_grad_()
        o_ref, _ = ref.sparse_attention(q32, k, v, block_idx, block_size)
        (dq_ref,) = torch.autograd.grad(o_ref, q32, do)
        assert set(calls) == want and calls[tile] + calls[kv] == 1, (pattern, dq_path, calls)
        assert rel_rms(o_ref, o) < 1e-5 and rel_rms(dq_ref, dq) < 1e-5
    # the rule by hand: 40 queries with 2 visible blocks each and 10 with a third (90 pairs), in 10 tiles of 4
    starts = torch.zeros(1, 1, 40, 4, dtype=torch.int32)
    starts[..., 2:] = 2**31 - 1  # unused slots
    starts[0, 0, :10, 2] = 0
    count = torch.full((1, 1, 10), 6, dtype=torch.int32)  # unions of 6 blocks: 240 / 90 = 2.67
    assert not tile_pays(4, starts, count, 4)
    count[:] = 4  # 160 / 90 = 1.78: under 2.2 at G = 4, over 1.65 at G = 16
    assert tile_pays(4, starts, count, 4) and not tile_pays(16, starts, count, 4)
