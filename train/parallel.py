"""Distributed set-up and the DeepSpeed engine, applied from outside the plain model.

``init_distributed`` brings up the process group (one process works too: it plays rank 0 of 1);
``build_engine`` wraps the model in a DeepSpeed engine whose JSON config is generated from the Hydra
config and saved in the run directory.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ParallelConfig:
    """``parallel.*``: how the world is split and how DeepSpeed shards state."""

    sp_size: int = 1  # Ulysses sequence parallel (heads <-> sequence all-to-all)
    cp_size: int = 1  # context parallel (K/V all-gather along the sequence)
    zero_stage: int = 1  # ZeRO stage 0-3
    activation_checkpointing: bool = False  # recompute each block in backward
    dist_backend: str = "auto"  # auto: nccl with CUDA, else gloo
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging on a dead rank


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join (or, run alone, create) the default process group; read ranks from the launcher's env."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
                                   verbose=False)
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


def deepspeed_config(cfg, device: torch.device) -> dict:
    """The DeepSpeed JSON, generated from the resolved Hydra config (never hand-written)."""
    bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norms, gains and embeddings are left alone)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
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
    """Wrap ``model`` in a DeepSpeed engine with a torch AdamW and the LR schedule."""
    import deepspeed

    model.to(env.device)
    ds_config = deepspeed_config(cfg, env.device)
    if run_dir is not None and env.rank == 0:
        (Path(run_dir) / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler
