"""Where metrics go: ``run_dir/metrics.jsonl`` (always), Weights & Biases (offline by default), and a
rank-0 progress bar. Other ranks log nothing."""

from __future__ import annotations

import json
import math
import resource
import uuid
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
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists():  # a resumed run: drop rows past the checkpoint, which it logs again
            path.write_text("".join(_rows_before(path, start_step)))
        self.file = open(path, "a")
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
                                 tok_s=f"{metrics.get('perf/tokens_per_s', 0):.0f}",
                                 stage=metrics.get("train/stage", 0), refresh=False)
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


def _rows_before(path: Path, step: int) -> list[str]:
    """The complete rows of metrics.jsonl logged before ``step`` (a killed writer may leave half a line)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keep


def _run_id(run_dir: Path) -> str:
    """A W&B run id kept in the run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if not path.exists():  # wandb 0.31 has no public id generator; any [a-z0-9] string of 8 will do
        path.write_text(uuid.uuid4().hex[:8])
    return path.read_text().strip()


class LayerStats:
    """Per-layer index KL (``layer_kl/NN``, every step) and index recall (``layer_recall/NN``, on steps
    that track stats) of the MSA layers, numbered by their place in ``model.layers``. KL is taken from
    each MSA attention's forward output between ``start()`` and ``stop()``, so the recomputation of
    activation checkpointing in backward is not counted twice."""

    def __init__(self, model):
        from msa.layer import MSAAttention
        from train.dashboard import layer_kl_key, layer_recall_key

        self.kl_key, self.recall_key = layer_kl_key, layer_recall_key
        self.layers = {i: block.attn for i, block in enumerate(model.layers) if isinstance(block.attn, MSAAttention)}
        self.handles = [attn.register_forward_hook(self._hook(i)) for i, attn in self.layers.items()]
        self.kl: dict[int, torch.Tensor] = {}
        self.calls, self.active = 0, False

    def _hook(self, i: int):
        def hook(module, args, output):
            if self.active:
                self.kl[i] = self.kl.get(i, 0.0) + output[1].detach().float()
        return hook

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.calls += 1

    def metrics(self, with_recall: bool, mesh=None) -> dict[str, float]:
        """The values since the last call (KL averaged over micro-batches), then reset. Under sequence
        or context parallelism each rank of a sequence holds a share of every layer's KL (summed here)
        and of its recall (averaged): a collective, so every rank calls this alike."""
        from train.parallel import shard_sum

        layers = sorted(self.kl)
        out = {}
        if layers:
            kl = shard_sum(torch.stack([self.kl[i] for i in layers]) / max(self.calls, 1), mesh)
            out.update({self.kl_key(i): float(v) for i, v in zip(layers, kl)})
        recall_layers = [i for i, attn in self.layers.items()
                         if with_recall and "index_recall" in getattr(attn.core, "stats", {})]
        if recall_layers:
            device = next(iter(self.layers.values())).wo.weight.device
            recall = torch.tensor([float(self.layers[i].core.stats["index_recall"]) for i in recall_layers],
                                  device=device)
            shards = mesh.shards if mesh is not None else 1
            out.update({self.recall_key(i): float(v) / shards
                        for i, v in zip(recall_layers, shard_sum(recall, mesh))})
        self.kl, self.calls = {}, 0
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
