"""``sparse_attention_kl``: the index KL computed in the sparse attention's backward
(``attention.kl_in_backward``) equals ``sparse_attention`` plus ``index_kl_loss``: the attention output
and gradients, the KL's value (reported after backward) and the index gradients, against the reference
on awkward shapes; and through the model and the trainer, under every checkpointing policy."""

import itertools
from dataclasses import replace

import pytest
import torch

from kernels.sparse_attention import LAUNCH, Tiles, sparse_attention_kl
from msa import reference as ref
from tests.test_kernel_sparse_attention import random_block_idx
from tests.utils import poison_empty, rel_rms

CU = [0, 1, 1, 50, 51, 52, 140, 140, 200]  # 1-token and empty documents
NAMES = ("o", "kl", "dq", "dk", "dv", "dq_idx", "dk_idx")


def _inputs(B, Nq, N, H, Hkv, D, Di, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()

    return leaf(B, Nq, H, D), leaf(B, N, Hkv, D), leaf(B, N, Hkv, D), leaf(B, Nq, Hkv, Di), leaf(B, N, Di)


def _reference(q, k, v, q_idx, k_idx, block_idx, bs, cu, do, weight):
    """Reference attention and KL, ``<o, do> + weight * kl`` back-propagated, in float32."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, q_idx, k_idx)]
    q, k, v, q_idx, k_idx = leaves
    o, _ = ref.sparse_attention(q, k, v, block_idx, bs, cu)
    kl = ref.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, block_idx, bs, cu)
    ((o * do.float()).sum() + weight * kl).backward()
    return [o.detach(), kl.detach(), *(x.grad for x in leaves)]


def _fused(q, k, v, q_idx, k_idx, block_idx, bs, cu, do, weight, **kwargs):
    for x in (q, k, v, q_idx, k_idx):
        x.grad = None
    sink = []
    o, _, kl = sparse_attention_kl(q, k, v, q_idx, k_idx, block_idx, bs, cu, sink=sink, **kwargs)
    assert kl.item() == 0.0 and not sink, "the value comes from the backward"
    ((o * do).sum() + weight * kl).backward()
    assert len(sink) == 1
    return [o.detach(), sink[0], *(x.grad for x in (q, k, v, q_idx, k_idx))]


def _check(want, got, tol, what=""):
    errs = {n: rel_rms(w.float(), g.float()) for n, w, g in zip(NAMES, want, got)}
    assert all(e < tol for e in errs.values()), f"{what}: {errs}"


@pytest.mark.parametrize("B,Nq,N,H,Hkv,Di,bs,topk,cu,dq_path", [
    (2, 63, 63, 4, 2, 16, 16, 3, None, "kv"),
    (1, 200, 200, 8, 2, 16, 32, 4, CU, "kv"),            # packed, 1-token and empty documents
    (1, 200, 200, 8, 2, 24, 32, 4, CU, "dkdv"),          # index dim not a power of two
    (1, 90, 200, 16, 1, 16, 16, 5, CU, "dkdv"),          # the last Nq queries (context parallelism), G = 16
    (2, 90, 120, 2, 2, 16, 16, 20, None, "kv"),          # G = 1, topk above the blocks there are
])
def test_matches_reference(monkeypatch, B, Nq, N, H, Hkv, Di, bs, topk, cu, dq_path):
    q, k, v, q_idx, k_idx = _inputs(B, Nq, N, H, Hkv, 16, Di)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), bs, topk, cu)
    do = torch.randn_like(q)
    want = _reference(q, k, v, q_idx, k_idx, block_idx, bs, cu, do, 0.7)
    poison_empty(monkeypatch)
    _check(want, _fused(q, k, v, q_idx, k_idx, block_idx, bs, cu, do, 0.7, dq_path=dq_path), 1e-5)


@pytest.mark.parametrize("dq_path", ["kv", "dkdv"])
def test_random_slots_and_several_key_tiles_per_block(monkeypatch, dq_path):
    """Empty (-1) slots, blocks chosen at random (not the index's top-k), and 16-key tiles of 32-key blocks:
    a block's KL is split over two programs, each adding its share of ``dk_idx``."""
    B, N, H, Hkv, bs, topk = 1, 150, 4, 2, 32, 3
    q, k, v, q_idx, k_idx = _inputs(B, N, N, H, Hkv, 16, 16)
    block_idx = random_block_idx(B, Hkv, N, topk, bs)
    do = torch.randn_like(q)
    want = _reference(q, k, v, q_idx, k_idx, block_idx, bs, None, do, 1.0)
    poison_empty(monkeypatch)
    launch = replace(LAUNCH, dkdv_kl=Tiles(block_m=16, block_n=16))  # the KL's dK/dV tiles, either dQ path
    _check(want, _fused(q, k, v, q_idx, k_idx, block_idx, bs, None, do, 1.0, dq_path=dq_path, launch=launch), 1e-5)


@pytest.mark.parametrize("dq_path,field", [("kv", "dkdv"), ("dkdv", "dkdv_dq")])
def test_the_kl_runs_its_own_dkdv_tiles(monkeypatch, dq_path, field):
    """``sparse_attention_kl`` hands the autograd function a launch whose dQ path's dK/dV field is
    ``Launch.dkdv_kl`` (the tiles measured best with the KL in the kernel), so its reverse index and its
    backward agree on the key tiles; ``sparse_attention`` keeps the plain ones."""
    import importlib

    sa = importlib.import_module("kernels.sparse_attention")  # the package re-exports a function of that name
    seen = []
    real = sa.SparseAttentionFunction.apply
    monkeypatch.setattr(sa.SparseAttentionFunction, "apply", lambda *a: seen.append(a[8]) or real(*a))
    q, k, v, q_idx, k_idx = _inputs(1, 70, 70, 4, 2, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    kl_tiles = Tiles(block_m=16, block_n=8, num_warps=2)
    launch = replace(LAUNCH, dkdv_kl=kl_tiles)
    sparse_attention_kl(q, k, v, q_idx, k_idx, block_idx, 16, sink=[], dq_path=dq_path, launch=launch)
    sa.sparse_attention(q, k, v, block_idx, 16, dq_path=dq_path, launch=launch)
    assert getattr(seen[0], field) == kl_tiles and getattr(seen[1], field) == getattr(LAUNCH, field)


def test_index_gradients_follow_the_incoming_gradient():
    """The index gradients are the KL's times what reaches ``kl``: 3x for weight 3, none for weight 0
    (while the value is still reported); the attention's gradients do not depend on it."""
    q, k, v, q_idx, k_idx = _inputs(1, 60, 60, 4, 2, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    do = torch.randn_like(q)
    one, three, zero = (_fused(q, k, v, q_idx, k_idx, block_idx, 16, None, do, w) for w in (1.0, 3.0, 0.0))
    for i in (0, 1, 2, 3, 4):  # o, kl and the attention's gradients
        assert torch.allclose(one[i], three[i]) and torch.allclose(one[i], zero[i])
    for i in (5, 6):
        assert rel_rms(3 * one[i], three[i]) < 1e-6
        assert torch.count_nonzero(zero[i]) == 0


def test_non_finite_kl_gives_the_index_no_gradient():
    """A NaN index query: the reported KL is not finite (the trainer skips that step), and no NaN reaches
    the index weights' gradients."""
    q, k, v, q_idx, k_idx = _inputs(1, 60, 60, 4, 2, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    with torch.no_grad():
        q_idx[0, 40, 1, 3] = float("nan")
    got = _fused(q, k, v, q_idx, k_idx, block_idx, 16, None, torch.randn_like(q), 0.5)
    assert not torch.isfinite(got[1])
    assert torch.count_nonzero(got[5]) == 0 and torch.count_nonzero(got[6]) == 0


def test_group_size_not_a_power_of_two_is_refused():
    q, k, v, q_idx, k_idx = _inputs(1, 40, 40, 6, 2, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    with pytest.raises(ValueError, match="power of two"):
        sparse_attention_kl(q, k, v, q_idx, k_idx, block_idx, 16, sink=[])


# ---------------------------------------------------------------- through the model and the trainer

def _model(defer: bool, n_layers: int = 3):
    from tests.test_checkpointing import _model as checkpointing_model

    model = checkpointing_model("triton", n_layers=n_layers)  # 1 dense layer, then MSA; G = 2
    for core in model.modules():
        if hasattr(core, "kl_in_backward"):
            core.kl_in_backward = defer
    return model


def _model_step(model, batch, launches):
    model.zero_grad(set_to_none=True)
    before = dict(launches)
    out = model(batch, phase="sparse")
    (out["lm_sum"] / out["n_tokens"] + 0.5 * out["kl"]).backward()
    deferred = model.take_backward_kl()
    layer_kl = out["layer_kl"] + (0.0 if deferred is None else deferred)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ran = {op: launches.get(op, 0) - before.get(op, 0) for op in ("sparse_attention_fwd", "index_kl_fwd")}
    return layer_kl, grads, ran


@pytest.mark.usefixtures("restore_dist_env")
def test_model_reports_the_forward_kl_and_gradients_under_every_policy(launches):
    """Per MSA layer, the KL read after backward equals the forward's KL of ``kl_in_backward=false``, and
    every gradient matches, without checkpointing and under the selective and full policies (full runs
    the forward twice, the first time without autograd: the KL is skipped there, not computed twice).
    The index KL's own forward (two passes over ``q k^T``) never runs."""
    from tests.test_checkpointing import _batch, _checkpointed

    batch = _batch()
    want_kl, want_grads, ran = _model_step(_model(False), batch, launches)
    assert ran == {"sparse_attention_fwd": 2, "index_kl_fwd": 2}
    for policy, forwards in ((None, 1), ("selective", 1), ("full", 2)):
        model = _model(True)
        if policy:
            model = _checkpointed(model, policy)
        layer_kl, grads, ran = _model_step(model, batch, launches)
        assert ran == {"sparse_attention_fwd": 2 * forwards, "index_kl_fwd": 0}, (policy, ran)
        assert rel_rms(want_kl, layer_kl) < 1e-6, (policy, want_kl, layer_kl)
        assert grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            assert rel_rms(g, grads[name]) < 1e-5, (policy, name)
        assert model.take_backward_kl() is None, "read once"


@pytest.mark.usefixtures("restore_dist_env")
def test_replicated_kv_heads_keep_the_kl_in_the_forward():
    """With more sequence ranks than KV heads a rank holds part of a group's query heads; the KL's teacher
    needs them all (gathered from the other ranks), so the KL stays in the forward, and parallelize says so.
    (The sharded cases that do take it: tests/test_parallel.py.)"""
    import warnings

    from train.parallel import Mesh, ParallelConfig, init_distributed, parallelize

    init_distributed(ParallelConfig())  # the wrappers ask their (here one-rank) groups for their size
    with pytest.warns(UserWarning, match="kl_in_backward has no effect"):
        parallelize(_model(True), Mesh(sp_size=4, kv_replicas=2), ParallelConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallelize(_model(True), Mesh(cp_size=2), ParallelConfig())


def test_eval_forward_computes_the_kl_itself():
    """Without autograd (an eval) nothing would run the backward: the forward computes the KL as before."""
    from tests.test_checkpointing import _batch

    batch = _batch()
    with torch.no_grad():
        want = _model(False)(batch, phase="sparse")["layer_kl"]
        got = _model(True)(batch, phase="sparse")["layer_kl"]
    assert rel_rms(want, got) < 1e-6


@pytest.mark.usefixtures("restore_dist_env")
def test_train_step_logs_the_kl_and_trains_the_same_weights():
    """``train_step`` (DeepSpeed engine, 2 micro-batches, full checkpointing) reads the KL after backward:
    the same ``kl`` and per-layer KL as with the KL in the forward, and the same weights after the step."""
    from tests.utils import compose_train_config
    from train import loop
    from train.parallel import init_distributed
    from train.recipe import build_recipe

    def run(defer):
        cfg = compose_train_config([
            "model=tiny", "model.n_layers=2", "attention.impl=triton", f"attention.kl_in_backward={str(defer).lower()}",
            "attention.block_size=16", "attention.topk=2", "data.seq_len=96", "optim.grad_accum=2",
            "parallel.activation_checkpointing=true", "parallel.checkpoint_policy=full", "parallel.zero_stage=1",
            "logging.wandb.mode=disabled"])
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(2):
            ids = torch.randint(0, cfg.model.vocab_size, (1, 96), generator=g)
            batches.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1),
                            "cu_seqlens": torch.tensor([0, 70, 96]).int(),
                            "position_ids": torch.cat([torch.arange(70), torch.arange(26)])[None]})
        stage = build_recipe(cfg)[-1]
        assert stage.phase == "sparse"
        torch.manual_seed(0)
        r = loop.start(cfg, init_distributed(cfg.parallel), [stage], stage, None, batches=itertools.cycle(batches))
        before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
        out = loop.train_step(r)
        return out, {n: p.detach() - before[n] for n, p in r.model.named_parameters()}

    (want, want_step), (got, got_step) = run(False), run(True)
    assert abs(want["kl"] - got["kl"]) < 1e-5 * abs(want["kl"]) and want["kl"] > 0
    assert rel_rms(want["layer_kl"], got["layer_kl"]) < 1e-5
    assert want["lm"] == pytest.approx(got["lm"], rel=1e-6) and not got["bad"]
    # the weights' updates: Adam's first step moves each entry by about lr * sign(gradient), so a near-zero
    # gradient entry whose sign the 1e-7 rounding differences flip moves 2 lr the other way: 0.2% rel RMS
    # seen; a missing or misplaced index gradient is ~100% (the gradients themselves: the test above, 1e-5)
    assert all(d.abs().sum() > 0 for name, d in want_step.items() if "_idx" in name)
    for name, d in want_step.items():
        if d.abs().sum() == 0:  # the image path of a text-only batch
            assert got_step[name].abs().sum() == 0, name
        else:
            assert rel_rms(d, got_step[name]) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("G,dq_path", [(4, "kv"), (8, "kv"), (16, "dkdv")])
def test_gpu_bf16_matches_reference(G, dq_path):
    """bf16 on the GPU against the fp32 reference on the same values, with the tolerances of the separate
    kernels (``KL_GPU_TOL`` of tests/test_kernel_index.py; attention 5e-3 as in
    tests/test_kernel_sparse_attention.py)."""
    from tests.test_kernel_index import KL_GPU_TOL

    B, N, Hkv, D, Di, bs, topk = 1, 4096 + 77, 2, 128, 64, 128, 8
    q, k, v, q_idx, k_idx = _inputs(B, N, N, G * Hkv, Hkv, D, Di, "cuda", torch.bfloat16)
    block_idx = ref.select_blocks(q_idx.detach().float(), k_idx.detach().float(), bs, topk)
    do = torch.randn_like(q)
    want = _reference(q, k, v, q_idx, k_idx, block_idx, bs, None, do, 1.0)
    got = _fused(q, k, v, q_idx, k_idx, block_idx, bs, None, do, 1.0, dq_path=dq_path)
    tol = {"o": 5e-3, "dq": 5e-3, "dk": 5e-3, "dv": 5e-3, "kl": KL_GPU_TOL["loss"], "dq_idx": KL_GPU_TOL["dq_idx"],
           "dk_idx": KL_GPU_TOL["dk_idx"]}
    errs = {n: rel_rms(w.float(), g.float()) for n, w, g in zip(NAMES, want, got)}
    assert all(errs[n] < tol[n] for n in NAMES), errs
