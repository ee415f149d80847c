"""The optimizer, its parameter groups and the learning-rate schedule (``optim.*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class OptimConfig:
    """``optim.*``: AdamW, its schedule, clipping and gradient accumulation."""

    name: str = "adamw"  # adamw (torch) | cpu_adam (DeepSpeed's, needed when ZeRO offloads the optimizer to CPU)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 10  # linear learning-rate warm-up (not the attention warm-up: recipe.warmup_steps)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step


def check_optim(cfg: OptimConfig) -> None:
    if cfg.name not in ("adamw", "cpu_adam"):
        raise ValueError(f"optim.name={cfg.name!r}: use adamw or cpu_adam")
    if cfg.grad_accum < 1:
        raise ValueError(f"optim.grad_accum={cfg.grad_accum} must be >= 1")
    if cfg.lr <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"optim.lr={cfg.lr} must be > 0 and optim.min_lr_ratio={cfg.min_lr_ratio} in [0, 1]")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas={cfg.betas} must be two numbers, e.g. [0.9, 0.95]")


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on projection matrices only: embedding tables (tokens, image rows/columns), norms and
    other vectors are left alone. Decided by module type, not by parameter name. Groups are named
    (``decay``, ``no_decay``) so their learning rates can be logged."""
    keep = (torch.nn.Embedding, torch.nn.RMSNorm, torch.nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, keep) or p.ndim < 2 else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up over ``optim.warmup_steps``, then cosine decay to ``optim.min_lr_ratio`` at
    ``total_steps``."""
    warm, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["OptimConfig", "check_optim", "param_groups", "build_optimizer", "build_scheduler"]
