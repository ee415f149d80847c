"""The DeepSpeed engine and its JSON config, generated from the Hydra config (never hand-written).

``deepspeed_config`` builds the JSON for a recipe stage (its micro-batch) and merges
``parallel.deepspeed`` over it; ``check_deepspeed`` validates the result with DeepSpeed's own config
classes, so a misspelt key fails at start. ``build_engine`` wraps the parallelized model with the
optimizer and schedule of ``train/optim.py``; DeepSpeed gets the mesh as its ``mpu``, so it sums
gradients over the sequence/context ranks and averages them over the data-parallel ones.

Loss convention under sharding: each rank's loss is its share of the global loss (LM sum over the
whole sequence's target count, plus the cores' KL shares), so the shares add up to the single-process
loss and the summed gradients to its gradient.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

import torch

from train.optim import build_optimizer, build_scheduler
from train.parallel.mesh import DistEnv, Mesh


def deepspeed_config(cfg, stage, device: torch.device) -> dict:
    """The DeepSpeed JSON for ``stage`` (a ``train.recipe.Stage``) of the run ``cfg`` (a TrainConfig)."""
    bf16 = device.type == "cuda" and cfg.run.precision == "bf16"
    par = cfg.parallel
    ds = {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
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
    return _merge(ds, par.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _Reads(dict):
    """A dict that records which keys DeepSpeed's config parser looks at."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: set = set()

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def check_deepspeed(ds: dict) -> None:
    """Validate the JSON with DeepSpeed's config classes (their pydantic models reject unknown keys in a
    section); a top-level key DeepSpeed never reads is reported too, with the closest known key."""
    from deepspeed.runtime.config import DeepSpeedConfig

    reads = _Reads(ds)
    try:
        DeepSpeedConfig(reads)
    except Exception as e:  # pydantic's ValidationError, DeepSpeed's own asserts
        raise ValueError(f"parallel.deepspeed: DeepSpeed rejects the merged config: {e}") from e
    unknown = sorted(set(ds) - reads.seen)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(reads.seen), n=1) for k in unknown}
        raise ValueError("parallel.deepspeed: DeepSpeed does not read " + ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))


def write_deepspeed_json(ds: dict, run_dir: str | Path) -> None:
    (Path(run_dir) / "deepspeed.json").write_text(json.dumps(ds, indent=2))


def build_engine(model: torch.nn.Module, cfg, stage, mesh: Mesh, env: DistEnv):
    """A DeepSpeed engine over the (already parallelized) ``model`` with the optimizer and LR schedule
    of ``cfg.optim``; returns ``(engine, scheduler)``."""
    import deepspeed

    model.to(env.device)
    ds = deepspeed_config(cfg, stage, env.device)
    if cfg.parallel.activation_checkpointing:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds, mpu=mesh.mpu)
    return engine, scheduler


__all__ = ["deepspeed_config", "check_deepspeed", "write_deepspeed_json", "build_engine"]
