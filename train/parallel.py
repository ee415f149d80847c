"""Distributed set-up, sequence/context sharding and the DeepSpeed engine, applied from outside the
plain model.

``init_distributed`` brings up the process group (one process works too: it plays rank 0 of 1).
``build_mesh`` splits the world into ``dp x cp x sp`` (sp innermost, so Ulysses' all-to-all stays on
the fastest links) and builds the process groups once. ``parallelize`` wraps each attention core for
sequence (Ulysses) and context parallelism (``train/sequence_parallel.py``) and adds tiled MLPs and
per-layer activation checkpointing. ``shard_batch`` gives a rank its tokens (the cores keep the global
``cu_seqlens``). ``build_engine`` wraps the model in a DeepSpeed engine whose JSON config is generated
from the Hydra config and saved in the run directory; DeepSpeed gets the mesh as its ``mpu``, so it
sums gradients over the sequence/context ranks and averages them over the data-parallel ones.

Loss convention under sharding: each rank's loss is its share of the global loss (LM sum over the
whole sequence's target count, plus the cores' KL shares), so the shares add up to the single-process
loss and the summed gradients to its gradient.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """``parallel.*``: how the world is split and how DeepSpeed shards state."""

    sp_size: int = 1  # Ulysses sequence parallel (heads <-> sequence all-to-all)
    cp_size: int = 1  # context parallel (K/V all-gather along the sequence)
    zero_stage: int = 1  # ZeRO stage 0-3
    activation_checkpointing: bool = False  # recompute each block in backward
    checkpoint_offload: bool = False  # keep the checkpointed block inputs in CPU memory
    mlp_tile_tokens: int = 0  # >0: DeepSpeed's TiledMLP over tiles of this many tokens (recomputed in backward)
    dist_backend: str = "auto"  # auto: nccl with CUDA, else gloo
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging on a dead rank


@dataclass
class Mesh:
    """This rank's place in ``dp x cp x sp`` and the groups it talks in. A size-1 axis has no group.

    ``mpu`` is what DeepSpeed is told (``deepspeed.runtime.sequence_parallel.parallel_state_sp``): its
    "sequence parallel" group is our whole token-sharding group (``sp * cp`` ranks), its
    "sequence-data parallel" group every rank holding the same parameters."""

    sp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    sp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    sp_group: object = None
    cp_group: object = None
    shard_group: object = None  # the sp*cp ranks that split one sequence
    mpu: object = None

    @property
    def shards(self) -> int:
        return self.sp_size * self.cp_size


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Mesh | None = None  # the layout the engine was built for (build_engine sets it)


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join (or, run alone, create) the default process group; read ranks from the launcher's env."""
    import deepspeed

    init_method = None
    if "RANK" not in os.environ:
        # Alone: rendezvous through a file, not a port, so concurrent single-process runs never race
        # for a free port (seen as EADDRINUSE with several test runs on one machine).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
        init_method = "file://" + os.path.join(tempfile.mkdtemp(prefix="msa-rdzv-"), "store")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                   verbose=False, init_method=init_method, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def check_parallel(cfg: ParallelConfig, world_size: int) -> None:
    """Reject layouts that cannot work, naming the keys to change."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={cfg.zero_stage} must be 0, 1, 2 or 3")
    if cfg.sp_size < 1 or cfg.cp_size < 1:
        raise ValueError("parallel.sp_size and parallel.cp_size must be >= 1")
    if world_size % (cfg.sp_size * cfg.cp_size):
        raise ValueError(f"world size {world_size} is not a multiple of parallel.sp_size*parallel.cp_size="
                         f"{cfg.sp_size * cfg.cp_size}: change parallel.sp_size/parallel.cp_size or the launch")
    if cfg.mlp_tile_tokens < 0:
        raise ValueError(f"parallel.mlp_tile_tokens={cfg.mlp_tile_tokens} must be >= 0 (0: no tiling)")
    if cfg.checkpoint_offload and not cfg.activation_checkpointing:
        raise ValueError("parallel.checkpoint_offload=true needs parallel.activation_checkpointing=true")


_MESHES: dict[tuple[int, int], Mesh] = {}


def build_mesh(cfg: ParallelConfig, world_size: int, rank: int) -> Mesh:
    """Split the world into ``dp x cp x sp`` (rank = (dp*cp + cp_rank)*sp + sp_rank) and build the
    groups. Every rank must call this (group creation is collective); a process builds one layout."""
    check_parallel(cfg, world_size)
    S, C = cfg.sp_size, cfg.cp_size
    key = (S, C)
    if key in _MESHES:
        return _MESHES[key]
    if _MESHES:
        raise RuntimeError(f"this process already built parallel groups for sp_size x cp_size = {next(iter(_MESHES))}; "
                           "a new parallel.sp_size/parallel.cp_size needs a relaunch")
    mesh = Mesh(S, C, world_size // (S * C), rank % S, rank // S % C, rank // (S * C))
    if S * C > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(S * C)  # contiguous blocks of sp*cp ranks
        mesh.mpu = parallel_state_sp
        mesh.shard_group = parallel_state_sp.get_sequence_parallel_group()
        for base in range(0, world_size, S * C):
            for c in range(C):  # sp groups: consecutive ranks
                ranks = [base + c * S + s for s in range(S)]
                group = dist.new_group(ranks) if S > 1 else None
                if rank in ranks:
                    mesh.sp_group = group
            for s in range(S):  # cp groups: stride sp
                ranks = [base + c * S + s for c in range(C)]
                group = dist.new_group(ranks) if C > 1 else None
                if rank in ranks:
                    mesh.cp_group = group
    _MESHES[key] = mesh
    return mesh


def shard_batch(batch: dict, mesh: Mesh | None) -> dict:
    """This rank's tokens of a packed batch: ``[B, N]`` rows become one ``[1, B*N/(sp*cp)]`` shard
    (zig-zag chunks over cp, contiguous over sp); ``cu_seqlens`` stays global (rows without it become
    one document each); image patches stay whole (an image may straddle shards) and ``image_keep``
    picks the embeddings of this shard's patch slots, ``image_slots`` re-indexed to the shard."""
    if mesh is None or mesh.shards == 1:
        return batch
    from train.sequence_parallel import local_token_index

    B, N = batch["input_ids"].shape
    device = batch["input_ids"].device
    idx = local_token_index(B * N, mesh.sp_size, mesh.cp_size, mesh.sp_rank, mesh.cp_rank).to(device)
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        out[key] = batch[key].reshape(-1)[idx][None]
    if batch.get("cu_seqlens") is None:
        out["cu_seqlens"] = torch.arange(0, B * N + 1, N, dtype=torch.int32, device=device)
    slots = batch.get("image_slots")
    if slots is not None:
        local = torch.full((B * N,), -1, dtype=torch.long, device=device)
        local[idx] = torch.arange(len(idx), device=device)
        keep = (local[slots] >= 0).nonzero().squeeze(1)
        out["image_keep"], out["image_slots"] = keep, local[slots[keep]]
    return out


def shard_sum(x: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """Sum of ``x`` over the ranks sharing one sequence (no gradient); ``x`` itself when unsharded."""
    if mesh is None or mesh.shards == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=mesh.shard_group)
    return total


def parallelize(model: torch.nn.Module, mesh: Mesh, cfg: ParallelConfig) -> torch.nn.Module:
    """Apply sharding and memory savers to a plain ``Decoder`` in place: context-parallel then Ulysses
    wrappers around every attention core, DeepSpeed's TiledMLP, per-block activation checkpointing."""
    from train.sequence_parallel import ContextParallelCore, UlyssesCore

    for block in model.layers:
        core = block.attn.core
        if mesh.cp_size > 1:
            core = ContextParallelCore(core, mesh.cp_group)
        if mesh.sp_size > 1:
            core = UlyssesCore(core, mesh.sp_group)
        block.attn.core = core
        if cfg.mlp_tile_tokens:
            block.mlp.forward = types.MethodType(functools.partial(_tiled_mlp_forward, tile=cfg.mlp_tile_tokens),
                                                 block.mlp)
        if cfg.activation_checkpointing:
            block.forward = functools.partial(_checkpointed, block.forward)
    return model


def _tiled_mlp_forward(mlp, x, tile: int):
    """The SwiGLU MLP over sequence tiles of ``tile`` tokens, recomputed tile by tile in backward, so
    its ``[tokens, ffn]`` intermediates exist for one tile at a time (DeepSpeed's TiledMLP)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    n_tiles = max(1, math.ceil(x.shape[-2] / tile))
    params = [mlp.w_gate.weight, mlp.w_up.weight, mlp.w_down.weight]
    return TiledMLP.apply(type(mlp).forward, mlp, x, n_tiles, params)


def _checkpointed(forward, x, *args):
    """One block under DeepSpeed activation checkpointing (inputs kept on CPU if configured)."""
    import deepspeed

    if not torch.is_grad_enabled():
        return forward(x, *args)
    return deepspeed.checkpointing.checkpoint(forward, x, *args)


def deepspeed_config(cfg, device: torch.device) -> dict:
    """The DeepSpeed JSON, generated from the resolved Hydra config (never hand-written)."""
    bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
    par = cfg.parallel
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": par.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if par.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": par.checkpoint_offload,
                                          "contiguous_memory_optimization": False,
                                          "synchronize_checkpoint_boundary": False, "profile": False}
    return ds


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on projection matrices only: embedding tables (tokens, image rows/columns),
    norms and other vectors are left alone. Decided by module type, not by parameter name."""
    keep = (torch.nn.Embedding, torch.nn.RMSNorm, torch.nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, keep) or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.lr_warmup_steps``, then cosine decay to ``train.min_lr_ratio``."""
    warm, total, floor = cfg.train.lr_warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model: torch.nn.Module, cfg, env: DistEnv, run_dir: Path | None = None):
    """Shard ``model`` for ``cfg.parallel`` (``env.mesh`` records the layout) and wrap it in a
    DeepSpeed engine with a torch AdamW and the LR schedule."""
    import deepspeed

    if cfg.parallel.checkpoint_offload and env.device.type != "cuda":
        raise ValueError("parallel.checkpoint_offload=true needs a GPU (DeepSpeed's CPU checkpointing empties the "
                         "block input when it already lives on the CPU): set parallel.checkpoint_offload=false")
    env.mesh = build_mesh(cfg.parallel, env.world_size, env.rank)
    parallelize(model, env.mesh, cfg.parallel)
    model.to(env.device)
    ds_config = deepspeed_config(cfg, env.device)
    if run_dir is not None and env.rank == 0:
        (Path(run_dir) / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    if cfg.parallel.activation_checkpointing:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=env.mesh.mpu)
    return engine, optimizer, scheduler
