"""Where metrics go: ``run_dir/metrics.jsonl`` (always), Weights & Biases (offline by default), and a
rank-0 progress bar. Other ranks log nothing."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 tensor-core peaks from the vendors' datasheets, for perf/mfu.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def max_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, rank: int, total_steps: int, start_step: int, config: dict):
        self.active = rank == 0
        self.wandb_run = None
        self.bar = None
        if not self.active:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        if cfg.wandb.mode != "disabled":
            import wandb

            w = cfg.wandb
            self.wandb_run = wandb.init(
                mode=w.mode, project=w.project, entity=w.entity, name=w.name, group=w.group,
                tags=list(w.tags), config=config, dir=str(run_dir), resume="allow",
                id=_run_id(Path(run_dir)))
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if v is not None}, step=step)
        if self.bar is not None:
            self.bar.n = step + 1
            self.bar.set_postfix(loss=f"{metrics.get('loss/lm', float('nan')):.4f}",
                                 tok_s=f"{metrics.get('perf/tokens_per_s', 0):.0f}", refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _run_id(run_dir: Path) -> str:
    """A W&B run id kept in the run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import wandb

        path.write_text(wandb.util.generate_id())
    return path.read_text().strip()
