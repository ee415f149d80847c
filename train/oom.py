"""What a training step that ran out of GPU memory tells its user: how many tokens each GPU held, the memory
numbers, where in this repository it ran out, and the settings that lower the memory which the run does not
use yet, each with what it saves here (docs/scaling.md, "1M tokens and beyond", has the measured numbers)."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def project_frames(frames, n: int = 6) -> list[str]:
    """The innermost ``n`` frames of a traceback (``traceback.extract_tb``) or an allocation's recorded
    stack (dicts of ``filename``, ``line``, ``name``, innermost first) that lie in this repository, as
    ``path:line in function``, innermost last: where an out-of-memory was raised, or where a tensor was
    allocated. Packages installed inside the checkout (``.venv``, the GPU machines' ``.site``) are not it."""
    out = []
    for f in frames:
        name, line, fn = (f["filename"], f["line"], f["name"]) if isinstance(f, dict) else (f.filename, f.lineno,
                                                                                               f.name)
        if name.startswith("<"):  # <stdin>, <string>: no file
            continue
        try:
            rel = Path(name).resolve().relative_to(REPO)
        except ValueError:
            continue
        if rel.parts[0].startswith("."):
            continue
        out.append(f"{rel}:{line} in {fn}")
    return out[-n:]


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def oom_message(cfg, stage, world_size: int, n_params: int, error: BaseException, step: int,
                memory: dict | None = None) -> str:
    """The message for an out-of-memory in training ``step`` of ``stage``: ``memory`` holds the allocator's
    ``peak_gb`` and ``total_gb`` where the device has them; ``n_params`` is the model's parameter count."""
    par, model = cfg.parallel, cfg.model
    shards = stage.sp_size * stage.cp_size
    per_gpu = stage.batch_size * stage.seq_len // shards
    where = project_frames(traceback.extract_tb(error.__traceback__), 1)
    lines = [f"CUDA out of memory in step {step} (stage '{stage.name}'): {stage.batch_size} row(s) of "
             f"{stage.seq_len:,} tokens, {per_gpu:,} tokens per GPU (with sp_size={stage.sp_size} x "
             f"cp_size={stage.cp_size} sharing a row)"
             + (f"; {memory['peak_gb']:.1f} of {memory['total_gb']:.1f} GB allocated at the peak" if memory else "")
             + (f"; raised at {where[0]}" if where else "") + "."]
    options = []
    if not par.activation_checkpointing:
        options.append("parallel.activation_checkpointing=true: recompute each block in backward instead of keeping "
                       "its activations")
    elif par.checkpoint_policy != "full":
        options.append("parallel.checkpoint_policy=full: keep only each block's input, not its attention outputs too "
                       "(slower: the attention runs again in backward)")
    if par.activation_checkpointing and not par.checkpoint_offload:
        inputs = model.n_layers * model.dim * 2 * per_gpu
        options.append(f"parallel.checkpoint_offload=true: the checkpointed block inputs in pinned host memory "
                       f"(model.n_layers x model.dim x 2 bytes a token: {_gb(inputs)} here)")
    if not par.mlp_tile_tokens and per_gpu > 65536:
        options.append("parallel.mlp_tile_tokens=65536: the MLP over 64K-token tiles, so its hidden activations "
                       "never exist for the whole row")
    if stage.batch_size > 1:
        options.append(f"a smaller batch ({stage.key('batch_size', 'data.batch_size')}={stage.batch_size}), with "
                       "optim.grad_accum raised to keep the tokens per step")
    kv = model.n_kv_heads
    options.append(f"more GPUs on one row: parallel.cp_size (any) and parallel.sp_size (up to model.n_kv_heads="
                   f"{kv}); tokens per GPU = batch x seq_len / (sp_size x cp_size), {per_gpu:,} now")
    if par.zero_stage < 3:
        dp = max(world_size // shards, 1)
        state = 12 * n_params / (dp if par.zero_stage >= 1 else 1)
        options.append(f"optimizer state: {_gb(state)} a GPU here (fp32 master weights and two Adam moments, "
                       f"12 bytes a parameter, ZeRO-{par.zero_stage} over {dp} data-parallel rank(s)); "
                       "parallel.zero_stage=3, or parallel.deepspeed={zero_optimization: {offload_optimizer: "
                       "{device: cpu}}} to keep it in host memory")
    lines.append("What lowers it, roughly cheapest first (docs/scaling.md, '1M tokens and beyond', has measured "
                 "peaks):")
    lines += [f"  - {o}" for o in options]
    return "\n".join(lines)


def device_memory(device: torch.device) -> dict | None:
    """The allocator's peak and the device's capacity (GB), or None off CUDA."""
    if device.type != "cuda":
        return None
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "total_gb": torch.cuda.get_device_properties(device).total_memory / 1e9}
