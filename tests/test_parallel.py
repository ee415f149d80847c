"""Sequence (Ulysses) and context parallelism: sharded runs equal the single-process run.

Each test spawns its processes (gloo, CPU). Every rank first computes the single-process result
itself (same seed: same weights and inputs everywhere), then its shard of the sharded run; outputs are
compared on the rank's tokens, parameter gradients after summing over the ranks (as DeepSpeed sums
them over the sequence/context ranks), input gradients on the rank's tokens. fp32, relative RMS.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa.layer import Attention, AttentionConfig, MSAAttention, MSACore
from msa.rope import Rotary
from msa.stats import FIELDS as STATS_FIELDS
from tests.utils import check_every_stage, compose_train_config, rel_rms
from train.config import check_config
from train.model import Decoder, ModelConfig
from train.parallel import (
    DistEnv,
    ParallelConfig,
    build_engine,
    build_mesh,
    init_distributed,
    kv_replicas,
    local_token_index,
    parallelize,
    shard_batch,
    shard_sum,
    truncate_cu_seqlens,
    zigzag_ranges,
)
from train.recipe import build_recipe

TOL = 1e-5
DIM, H, HKV, D, ROPE = 64, 4, 2, 16, 8
CU = [0, 13, 50, 51, 75, 96]  # packed documents of awkward lengths (one of a single token)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args):
    port = _free_port()
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank, world, port, fn, args):
    # A rank killed by a signal (the SIGABRT below) prints every thread's Python stack to stderr
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed(ParallelConfig(dist_backend="gloo", timeout_s=120))
    try:
        fn(rank, world, *args)
        # No rank leaves while another still talks to it: a peer's closed socket under a pending gloo op
        # (ZeRO-3 here, rank 0 still writing its file while rank 1 had returned) aborts the process
        # (SIGABRT, seen once in CI). After an error the others would only wait out the timeout here.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # With the barrier a SIGABRT ("terminate called without an active exception") was still seen twice in
    # CI, in the ZeRO-3 save phase of test_sp_layout_change_keeps_adam_moments, and not in 7 reruns of it.
    # If it comes from interpreter shutdown (gloo's worker threads or DeepSpeed's objects torn down with
    # the interpreter), leaving here skips it: every check has passed and the group is destroyed. If it
    # comes back, faulthandler's stacks above say where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check(name, ref, out, errors):
    err = rel_rms(ref, out)
    if not err < TOL:
        errors.append(f"{name}: rel RMS {err:.3g} (max abs {(ref - out).abs().max().item():.3g})")


def _sum_grads(module, group):
    grads = {}
    for n, p in module.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        grads[n] = g
    return grads


def _compare_grads(ref_module, grads, errors, prefix):
    for n, p in ref_module.named_parameters():
        if p.grad is None:
            if grads[n].abs().max() > 0:
                errors.append(f"{prefix}{n}: gradient only in the sharded run")
            continue
        _check(f"{prefix}{n}.grad", p.grad, grads[n], errors)


def _worker(rank, world, sp, cp):
    """Every check of one layout in one set of processes (starting them is the slow part)."""
    errors = _layer_checks(rank, world, sp, cp) + _model_checks(rank, world, sp, cp,
                                                                 "full" if sp * cp == 4 else "selective")
    assert not errors, "\n".join(errors)


def _layer_worker(rank, world, sp, cp):
    errors = _layer_checks(rank, world, sp, cp)
    assert not errors, "\n".join(errors)


def _strided_kl_worker(rank, world, sp, cp):
    errors = _layer_checks(rank, world, sp, cp, cases=(("msa", "sparse"), ("msa", "warmup")), kl_stride=5)
    assert not errors, "\n".join(errors)


def _triton_worker(rank, world, sp, cp, defer=False):
    # 16-key blocks, 2 of them: the 37-token document takes the sparse path (3 would hold it whole: dense)
    errors = _layer_checks(rank, world, sp, cp, backend="triton", block_size=16, topk=2, cases=(("msa", "sparse"),),
                           defer=defer)
    assert not errors, "\n".join(errors)


def _with_backward_kl(kl, module):
    """``kl`` plus what ``module``'s MSA cores reported from their backward (``attention.kl_in_backward``)."""
    taken = [c.take_backward_kl() for c in module.modules() if isinstance(c, MSACore)]
    return kl.detach() + sum(t for t in taken if t is not None)


def _env(rank, world):
    return DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def _layer_checks(rank, world, sp, cp, backend="reference", block_size=8,
                  cases=(("msa", "sparse"), ("msa", "warmup"), ("dense", "sparse"), ("window", "sparse")), defer=False,
                  topk=3, kl_stride=1):
    mesh = build_mesh(sp, cp, _env(rank, world), kv_replicas(sp, HKV))
    cu = torch.tensor(CU, dtype=torch.int32)
    T = CU[-1]
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    pos = (torch.arange(T) - starts)[None]
    idx = local_token_index(T, sp, cp, mesh.sp_rank, mesh.cp_rank)
    errors = []
    attn_cfg = AttentionConfig(impl=backend, block_size=block_size, topk=topk, index_dim=16, kl_in_backward=defer,
                               kl_query_stride=kl_stride)
    for kind, phase in cases:
        # window: a sliding-window layer (the long-context option for the first layer), 12 keys, shorter than
        # four of the five documents, so under CP a rank's second query chunk sees only part of its keys
        make = partial(MSAAttention, DIM, H, HKV, D, ROPE, attn_cfg) if kind == "msa" else \
            partial(Attention, DIM, H, HKV, D, ROPE, window=12 if kind == "window" else 0)
        layer, twin = make(), make()
        torch.manual_seed(0)
        layer.apply(_reinit)
        twin.load_state_dict(layer.state_dict())
        sharded = parallelize(_Holder(twin), mesh, ParallelConfig(sp_size=sp, cp_size=cp)).layers[0]
        for core in (m for m in (*layer.modules(), *sharded.modules()) if isinstance(m, MSACore)):
            core.set_kl_offset(kl_stride + 1)  # a strided KL: the queries at positions 1 mod the stride (5: the
            # zig-zag chunks start at multiples of 24, so a rank that counted its own positions would count others)
        x = torch.randn(1, T, DIM, requires_grad=True)
        g = torch.randn(1, T, DIM)
        stats_queries = T if kind == "msa" else 0  # every non-trivial query: the shards' sums must add up
        y, kl, stats = layer(x, Rotary(pos, 1e4), cu, phase, stats_queries)
        ((y * g).sum() + (3.0 * kl if kl is not None else 0)).backward()

        x_l = x.detach()[:, idx].requires_grad_()
        y_l, kl_l, stats_l = sharded(x_l, Rotary(pos[:, idx], 1e4), cu, phase, stats_queries)
        ((y_l * g[:, idx]).sum() + (3.0 * kl_l if kl_l is not None else 0)).backward()
        tag = f"{kind}/{phase} rank {rank}{' (KL in backward)' if defer else ''}: "
        _check(tag + "output", y.detach()[:, idx], y_l.detach(), errors)
        if kind == "msa":
            kl, kl_l = _with_backward_kl(kl, layer), _with_backward_kl(kl_l, sharded)
            if defer and not kl > 0:
                errors.append(tag + f"the KL in backward reported {kl}")
            _check(tag + "kl", kl.detach(), shard_sum(kl_l, mesh), errors)
            # the tile union's tiles start at each query chunk's first query, as a kernel's would: under CP they
            # are the single process's tiles only where a chunk holds a multiple of 64 / G queries (here 24, tiles of
            # 32); every other field is a sum over queries and must add up
            summed = shard_sum(stats_l.sums, mesh)
            same = [i for i, f in enumerate(STATS_FIELDS) if cp == 1 or f != "tile_work"]
            _check(tag + "stats", stats.sums[same], summed[same], errors)
            tile_work, selected = (summed[STATS_FIELDS.index(f)] for f in ("tile_work", "selected"))
            if not selected <= tile_work <= selected * 64 // (H // HKV):
                errors.append(tag + f"tile_work {tile_work} outside [selected, selected x queries per tile]")
        _check(tag + "x.grad", x.grad[:, idx], x_l.grad, errors)
        _compare_grads(layer, _sum_grads(sharded.attn, mesh.shard_group), errors, tag)
    return errors


def _reinit(m):
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.normal_(m.weight, std=0.2)


class _Holder(torch.nn.Module):
    """One attention layer where ``parallelize`` looks for blocks (``blocks()[i].attn``)."""

    def __init__(self, attn):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(attn)])

    def blocks(self):
        return list(self.layers)


class _Block(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, *args):
        return self.attn(*args)


def _tiny_batch(B=2, N=96, sources=False):
    """A packed batch with documents crossing shard edges and two images (one straddling shards); with
    ``sources``, each document's data source (three, one document without: -1) as a mixed loader gives."""
    torch.manual_seed(1)
    lengths = [[30, 1, 40, 25], [96]]
    input_ids = torch.randint(0, 300, (B, N))
    labels = torch.roll(input_ids, -1, dims=1)
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    seg = torch.tensor([0] + [n for row in lengths for n in row])
    slots = torch.cat([torch.arange(20, 26), N + torch.arange(44, 52)])  # 2x3 and 2x4 patch grids
    labels.view(-1)[slots] = -100
    labels.view(-1)[seg.cumsum(0)[1:] - 1] = -100
    batch = {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "cu_seqlens": seg.cumsum(0).to(torch.int32),
        "image_patches": torch.randn(len(slots), 3 * 4 * 4), "image_slots": slots,
        "image_sizes": torch.tensor([[2, 3], [2, 4]]),
    }
    if sources:
        doc_source = torch.tensor([2, 0, -1, 1, 0])
        batch["loss_groups"] = torch.repeat_interleave(doc_source, seg[1:]).reshape(B, N)
        batch["loss_groups"][1, 50:56] += 3  # answer targets in row 1's document, of source 0 (groups S + s)
        batch["n_loss_groups"] = 6
    return batch


def _model_checks(rank, world, sp, cp, policy):
    """``policy``: activation checkpointing, ``full`` (DeepSpeed's, with TiledMLP) or ``selective``
    (PyTorch's, whose recompute runs the all-to-alls and all-gathers again)."""
    full = policy == "full"
    par = ParallelConfig(sp_size=sp, cp_size=cp, activation_checkpointing=True, checkpoint_policy=policy,
                         mlp_tile_tokens=16 if full else 0)
    mesh = build_mesh(sp, cp, _env(rank, world), kv_replicas(sp, 2))
    if full:
        import deepspeed

        # no cpu_checkpointing here: on a CPU device DeepSpeed's "copy to CPU" is the tensor itself,
        # which it then empties (deepspeed 0.19.8), so offload can only run on a GPU
        deepspeed.checkpointing.configure(None, deepspeed_config={
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, rope_dim=8,
                      ce_chunk_tokens=40)
    cfg.vision.patch_size = 4
    attn = AttentionConfig(impl="reference", block_size=8, topk=3, index_dim=16, n_dense_layers=1)
    errors = []
    for phase in ("sparse", "warmup"):
        batch = _tiny_batch(sources=phase == "warmup")  # the loss by source: summed over the shards as one
        model, twin = Decoder(cfg, attn), Decoder(cfg, attn)
        twin.load_state_dict(model.state_dict())
        sharded = parallelize(twin, mesh, par)
        out = model(batch, phase=phase)
        (out["lm_sum"] / out["n_tokens"] + 0.5 * out["kl"]).backward()

        out_l = sharded(shard_batch(batch, mesh), phase=phase)
        n_tokens = shard_sum(out_l["n_tokens"], mesh)
        (out_l["lm_sum"] / n_tokens + 0.5 * out_l["kl"]).backward()
        tag = f"model/{phase} rank {rank}: "
        if int(n_tokens) != int(out["n_tokens"]):
            errors.append(f"{tag}target count {int(n_tokens)} != {int(out['n_tokens'])}")
        _check(tag + "lm_sum", out["lm_sum"].detach(), shard_sum(out_l["lm_sum"], mesh), errors)
        _check(tag + "kl", out["kl"].detach(), shard_sum(out_l["kl"], mesh), errors)
        _check(tag + "layer_kl", out["layer_kl"], shard_sum(out_l["layer_kl"], mesh), errors)
        if "loss_groups" in batch:
            _check(tag + "group_lm_sum", out["group_lm_sum"], shard_sum(out_l["group_lm_sum"], mesh), errors)
            if not torch.equal(out["group_n_tokens"], shard_sum(out_l["group_n_tokens"], mesh)):
                errors.append(f"{tag}group_n_tokens {out_l['group_n_tokens'].tolist()} summed != "
                              f"{out['group_n_tokens'].tolist()}")
        _compare_grads(model, _sum_grads(sharded, mesh.shard_group), errors, tag)
    return errors


@pytest.mark.parametrize("sp,cp", [pytest.param(2, 1, id="sp2"), pytest.param(1, 2, id="cp2"),
                                   pytest.param(2, 2, id="sp2xcp2"), pytest.param(4, 1, id="sp4-kv-replicated")])
def test_parity_with_single_process(sp, cp):
    """One MSA layer (sparse and warm-up phase), one dense layer and the tiny model (with packed
    documents and images straddling shards; the model under selective activation checkpointing with 2
    ranks, DeepSpeed's full checkpointing and TiledMLP with 4).
    sp4: more sequence ranks than the 2 KV heads, which are replicated over pairs of ranks that each
    hold one of the group's two query heads (outputs, KL, stats and every gradient as one process)."""
    _spawn(_worker, sp * cp, sp, cp)


def test_kv_replicated_ulysses_with_context_parallel():
    """sp=4 over 2 KV heads (replicated) times cp=2: 8 processes, the layer checks."""
    _spawn(_layer_worker, 8, 4, 2)


def test_context_parallel_with_triton_kernels():
    """The Triton kernels (interpreted on CPU) take the CP query chunks against the gathered keys
    (queries the last Nq <= N keys) and give the single-process result."""
    _spawn(_triton_worker, 2, 1, 2)


@pytest.mark.parametrize("sp,cp", [pytest.param(2, 1, id="sp2"), pytest.param(1, 2, id="cp2")])
def test_strided_kl_under_sequence_and_context_parallelism(sp, cp):
    """``attention.kl_query_stride``: the strided KL counts the same queries, by their position in the whole
    row, on every layout: each rank's share summed is the single process's KL, and every gradient matches."""
    _spawn(_strided_kl_worker, sp * cp, sp, cp)


@pytest.mark.parametrize("sp,cp", [pytest.param(2, 1, id="sp2"), pytest.param(1, 2, id="cp2")])
def test_kl_in_backward_under_sequence_and_context_parallelism(sp, cp):
    """``attention.kl_in_backward`` with the Triton kernels: each rank's KL read after backward, summed over
    the ranks, is the single process's (the wrappers' scaling reaches it), and every gradient matches."""
    _spawn(_triton_worker, sp * cp, sp, cp, True)


def test_zigzag_layout_covers_every_token_once():
    T, sp, cp = 96, 2, 3
    held = torch.cat([local_token_index(T, sp, cp, s, c) for c in range(cp) for s in range(sp)])
    assert torch.equal(held.sort().values, torch.arange(T))
    assert zigzag_ranges(96, 3, 0) == [(0, 16), (80, 96)]
    # causal work per context rank (sum of key counts of its queries) is balanced
    work = [sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in zigzag_ranges(T, cp, c)) for c in range(cp)]
    assert max(work) == min(work)
    assert truncate_cu_seqlens(torch.tensor([0, 13, 50, 96]), 50).tolist() == [0, 13, 50]
    assert truncate_cu_seqlens(torch.tensor([0, 13, 50, 96]), 40).tolist() == [0, 13, 40]


@pytest.mark.parametrize("overrides,world,keys", [
    (["parallel.sp_size=2"], 3, ["parallel.sp_size", "parallel.cp_size"]),  # world not a multiple of sp*cp
    (["parallel.sp_size=3"], 3, ["parallel.sp_size", "model.n_kv_heads"]),  # neither divides the other
    (["parallel.cp_size=2", "data.seq_len=192"], 2, ["data.seq_len"]),  # 192 % (2*2*32)
    (["parallel.checkpoint_offload=true", "parallel.checkpoint_policy=full"], 1, ["parallel.activation_checkpointing"]),
    (["parallel.checkpoint_offload=true", "parallel.activation_checkpointing=true"], 1,
     ["parallel.checkpoint_policy=full"]),  # offload is DeepSpeed's checkpointing; selective is the default
    (["parallel.mlp_tile_tokens=-1"], 1, ["parallel.mlp_tile_tokens"]),
])
def test_start_up_checks_name_the_keys(overrides, world, keys):
    cfg = compose_train_config(overrides)
    with pytest.raises(ValueError) as err:
        check_every_stage(cfg, world_size=world)
    for key in keys:
        assert key in str(err.value), str(err.value)


def test_checkpoint_offload_needs_a_gpu():
    cfg = compose_train_config(["parallel.activation_checkpointing=true", "parallel.checkpoint_offload=true",
                                "parallel.checkpoint_policy=full"])
    (stage,) = build_recipe(cfg)[-1:]
    check_config(cfg, stage, world_size=1, vocab_size=261, device_type="cuda")
    with pytest.raises(ValueError, match=r"parallel\.checkpoint_offload"):
        check_config(cfg, stage, world_size=1, vocab_size=261, device_type="cpu")


def _moments_worker(rank, world, sp, zero, ckpt_dir, phase):
    """Phase "save": 2 steps under parallel.sp_size=sp, a checkpoint, 2 more steps (their losses are
    written beside it). Phase "load": under sp_size=sp, from the checkpoint, 2 steps with the saved
    optimizer state must give those losses; 2 steps with fresh Adam moments must not."""
    import itertools

    from train import checkpoint as ckpt
    from train.loop import Run, train_step

    cfg = compose_train_config(["model=tiny", "attention.impl=reference", "data.seq_len=256", "recipe.kl_weight=0.5",
                                f"parallel.sp_size={sp}", f"parallel.zero_stage={zero}", "logging.wandb.mode=disabled"])
    env = _env(rank, world)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 256), generator=g)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "cu_seqlens": torch.tensor([0, 100, 256]).int(),
             "position_ids": torch.cat([torch.arange(100), torch.arange(156)])[None]}
    stage = build_recipe(cfg)[-1]  # the sparse stage
    assert stage.phase == "sparse" and stage.kl_weight == 0.5

    def steps(run, n):
        return [o["lm"] + stage.kl_weight * o["kl"] for o in (train_step(run) for _ in range(n))]

    def fresh(seed):
        torch.manual_seed(seed)
        model = Decoder(cfg.model, cfg.attention)
        mesh = build_mesh(sp, 1, env)
        parallelize(model, mesh, cfg.parallel)
        engine, scheduler = build_engine(model, cfg, stage, mesh, env)
        return Run(cfg, env, [stage], stage, model, mesh, engine, scheduler, None, itertools.repeat(batch), None)

    losses = ckpt_dir / "losses.pt"
    if phase == "save":
        run = fresh(0)
        steps(run, 2)
        ckpt.save_checkpoint(run.engine, ckpt_dir, 2, rank=rank, world_size=world, keep_last=1)
        after = steps(run, 2)
        if rank == 0:
            torch.save(after, losses)
        return
    path, expected = ckpt.find_resume(ckpt_dir, "auto"), torch.load(losses)
    runs = {}
    for keep in (True, False) if zero == 1 else (True,):
        run = fresh(1)  # other weights until the checkpoint loads
        if keep:
            ckpt.load_checkpoint(run.engine, path, rank=rank, world_size=world)
        else:  # the negative control: weights and schedule only, fresh Adam moments
            run.engine.load_checkpoint(str(path), tag=ckpt.DS_TAG, load_optimizer_states=False)
        runs[keep] = steps(run, 2)
    assert torch.allclose(torch.tensor(runs[True]), torch.tensor(expected), rtol=1e-5, atol=0), (runs, expected)
    if False in runs:  # the check can fail: fresh moments take another second step
        assert abs(runs[False][1] - expected[1]) > 1e-4 * abs(expected[1]), (runs, expected)


@pytest.mark.parametrize("zero", [1, 3])
def test_sp_layout_change_keeps_adam_moments(tmp_path, zero):
    """A recipe stage that changes parallel.sp_size relaunches on the same ranks. ZeRO partitions the
    optimizer state over every rank that holds the parameters, whatever sp/cp is, so the checkpoint's
    Adam moments load into the new layout and the run continues as if the layout had not changed."""
    _spawn(_moments_worker, 2, 1, zero, tmp_path, "save")
    _spawn(_moments_worker, 2, 2, zero, tmp_path, "load")


def test_an_old_extension_build_lock_is_reported(tmp_path, monkeypatch):
    """A run killed while DeepSpeed built an op leaves torch's build lock behind, and every later run waits
    on it silently: init_distributed names the file (seen with the shm op of CPU runs)."""
    from train.parallel.mesh import stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (0, 1000))  # 1970: a build long dead
    assert stale_build_locks() == [str(old)]
    assert stale_build_locks(older_than_s=-1.0) == sorted([str(old), str(fresh)])
