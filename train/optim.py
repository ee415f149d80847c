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
    index_lr: float | None = None  # the MSA index branch's learning rate (None: optim.lr); a fresh branch
    # on a pretrained model wants more than the main weights' continued-pretraining rate
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
    if cfg.index_lr is not None and cfg.index_lr <= 0:
        raise ValueError(f"optim.index_lr={cfg.index_lr} must be > 0 (or null: optim.lr)")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas={cfg.betas} must be two numbers, e.g. [0.9, 0.95]")


INDEX_PREFIX = "index_"  # the MSA index branch's groups: their own learning rate, and they learn in a frozen stage


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on projection matrices only: embedding tables (tokens, image rows/columns), norms and
    other vectors are left alone. Decided by module type, not by parameter name. Groups are named
    (``decay``, ``no_decay``, and for the MSA index branch ``index_decay``, ``index_no_decay`` at
    ``optim.index_lr``) so their learning rates can be logged and a stage can freeze the others."""
    keep = (torch.nn.Embedding, torch.nn.RMSNorm, torch.nn.LayerNorm)
    index = {id(p) for m in model.modules() if hasattr(m, "index_params") for p in m.index_params()}
    groups: dict[str, list] = {"decay": [], "no_decay": [], "index_decay": [], "index_no_decay": []}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                name = "no_decay" if isinstance(module, keep) or p.ndim < 2 else "decay"
                groups[INDEX_PREFIX + name if id(p) in index else name].append(p)
    out = []
    for name, params in groups.items():
        is_index = name.startswith(INDEX_PREFIX)
        if is_index and not params:
            continue
        group = {"name": name, "params": params, "weight_decay": 0.0 if name.endswith("no_decay") else cfg.weight_decay}
        if is_index:
            group["lr"] = cfg.index_lr or cfg.lr
        out.append(group)
    return out


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


__all__ = ["OptimConfig", "INDEX_PREFIX", "check_optim", "param_groups", "build_optimizer", "build_scheduler"]
