"""Metric names, the numbers behind them, and where they go.

Names live here (the W&B dashboard, ``train/dashboard.py``, imports them). ``layer_metrics`` is the
one place that turns the model's per-layer outputs (index KL shares, selection-stat sums) into
numbers across layers and across the ranks of a sequence. ``step_flops`` counts a step's work from the
batch's document lengths, for ``perf/mfu``, ``perf/attn_tflops`` and ``perf/index_tflops``.
``MetricsLogger`` writes ``run_dir/metrics.jsonl`` (always), Weights & Biases (offline by default) and
a rank-0 progress bar. Other ranks log nothing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msa.stats import SelectionStats
from train.parallel.shard import shard_sum

LOSS_LM, LOSS_KL = "loss/lm", "loss/kl"
LOSS_LM_SOURCE_PREFIX = "loss/lm/"  # loss/lm/<name>: the LM loss of each data.sources entry (two or more)
LOSS_ANSWER_PREFIX = "loss/answer/"  # loss/answer/<name>: a synthetic source's loss on its answer tokens
INDEX_RECALL, SPARSITY, NONTRIVIAL = "msa/index_recall", "msa/sparsity", "msa/nontrivial_share"
ORACLE_RECALL = "msa/oracle_recall"  # the best topk blocks' teacher mass: index recall's ceiling
ORACLE_RECALL_2X = "msa/oracle_recall_2x"  # the best 2 * topk blocks': the ceiling with twice the selection
TILE_UNION = "msa/tile_union"  # a query-tile kernel's (query, block) pairs over the union, per pair selected
TOKENS_PER_S, STEP_S, MFU = "perf/tokens_per_s", "perf/step_s", "perf/mfu"
ATTN_TFLOPS, INDEX_TFLOPS = "perf/attn_tflops", "perf/index_tflops"
MAX_MEMORY = "mem/max_allocated_gb"
LR, SEQ_LEN, STAGE, PHASE_SPARSE, BAD_STEPS = "train/lr", "train/seq_len", "train/stage", "train/phase_sparse", \
    "train/bad_steps"
LR_GROUP_PREFIX = "train/lr/"
GRAD_NORM, GRAD_NORM_INDEX = "opt/grad_norm", "opt/grad_norm_index"
SKIPPED = "data/skipped"
LAYER_KL_PREFIX, LAYER_RECALL_PREFIX = "layer_kl/", "layer_recall/"
EVAL_PREFIX = "eval/"  # periodic evals (train/eval): eval/<task>/<length>[/<score>], see docs/evals.md
EVAL_SECONDS = "eval/seconds"


def eval_key(*parts: str) -> str:
    """``eval/bpb/8K``, ``eval/bpb/8K/0-1K``, ``eval/passkey/8K/choice``, ``eval/needle_recall/passkey/8K``..."""
    return EVAL_PREFIX + "/".join(parts)


def layer_kl_key(layer: int) -> str:
    return f"{LAYER_KL_PREFIX}{layer:02d}"


def layer_recall_key(layer: int) -> str:
    return f"{LAYER_RECALL_PREFIX}{layer:02d}"


# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, by the exact name
# torch.cuda.get_device_name reports: the SXM, PCIe and NVL boards of one chip differ.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA B200": 2250.0,
}


def peak_tflops(device: torch.device, configured: float | None) -> tuple[float | None, str]:
    """The peak for ``perf/mfu`` and where it came from (a line for the log)."""
    if configured:
        return configured, f"perf/mfu against logging.peak_tflops={configured:g}"
    if device.type != "cuda":
        return None, "perf/mfu off on CPU"
    name = torch.cuda.get_device_name(device)
    if name in PEAK_TFLOPS:
        return PEAK_TFLOPS[name], f"perf/mfu against {PEAK_TFLOPS[name]:g} TFLOP/s ({name}, dense bf16)"
    return None, f"perf/mfu off: no peak known for {name!r}; set logging.peak_tflops"


def max_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def doc_lengths(batch: dict) -> np.ndarray:
    """Lengths of the attention segments of a (global, unsharded) batch: its documents and padding."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        B, N = batch["input_ids"].shape
        return np.full(B, N, dtype=np.int64)
    return np.diff(cu.cpu().numpy().astype(np.int64))


def attended_pairs(lengths: np.ndarray, block_size: int | None = None, topk: int | None = None,
                   window: int | None = None) -> float:
    """Causal (query, key) pairs of documents of ``lengths``; with ``block_size``/``topk``, only the keys
    of the selected blocks: the query's own block up to it plus ``topk - 1`` full earlier blocks; with
    ``window``, only the last ``window`` keys of each query, its own included (a sliding-window layer)."""
    lengths = lengths[lengths > 0]
    if window is not None:
        W = np.minimum(lengths, window)
        return float((W * (W + 1) // 2 + (lengths - W) * W).sum())
    if block_size is None:
        return float((lengths * (lengths + 1) // 2).sum())
    p = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)
    return float((p % block_size + 1 + block_size * np.minimum(topk - 1, p // block_size)).sum())


def layer_kinds(model_cfg, attn_cfg) -> tuple[int, int, int]:
    """How many layers are dense over every causal pair, dense over a sliding window, and MSA (the
    sliding-window layers of an imported checkpoint stay dense whatever ``attention.n_dense_layers``)."""
    from train.model import sliding_layers

    L = model_cfg.n_layers
    window = sliding_layers(model_cfg)
    msa = set() if attn_cfg.kind == "dense" else set(range(attn_cfg.n_dense_layers, L)) - window
    return L - len(window) - len(msa), len(window), len(msa)


def _pairs(model_cfg, attn_cfg, lengths: np.ndarray, phase: str) -> tuple[int, float, float, float]:
    """``(n_msa, causal, support, main)``: the MSA layers, one layer's causal pairs and MSA support pairs
    (warm-up: the causal ones), and ``main_pairs``."""
    n_dense, n_window, n_msa = layer_kinds(model_cfg, attn_cfg)
    causal = attended_pairs(lengths)
    support = causal if phase == "warmup" or not n_msa else attended_pairs(lengths, attn_cfg.block_size,
                                                                           attn_cfg.topk)
    windowed = attended_pairs(lengths, window=model_cfg.sliding_window) if n_window else 0.0
    return n_msa, causal, support, n_dense * causal + n_window * windowed + n_msa * support


def main_pairs(model_cfg, attn_cfg, lengths: np.ndarray, phase: str) -> float:
    """(query, key) pairs the main attention of every layer attends in one forward, summed over layers:
    dense layers every causal pair, sliding-window layers the last ``model.sliding_window`` keys, MSA
    layers the selected keys (warm-up: every causal pair)."""
    return _pairs(model_cfg, attn_cfg, lengths, phase)[3]


def step_flops(model_cfg, attn_cfg, n_params: int, lengths: np.ndarray, phase: str) -> dict[str, float]:
    """Training FLOPs of one sequence (forward + backward = 3x forward; recomputation under activation
    checkpointing is not counted).

    - ``model``: 6 per weight per token (the tied LM head counted as a matmul) plus the main attention;
    - ``attn``: the main attention alone, ``4 H D`` per attended (query, key) pair forward (``main_pairs``:
      dense layers over every causal pair, sliding-window layers over their window, MSA layers over the
      selected keys, in warm-up every causal pair);
    - ``index``: MSA's extra work, not in ``model``: the block scoring ``2 Hkv Di`` per causal pair
      (forward only) and the index KL ``2 H D + 6 Hkv Di`` per support pair (teacher scores, student
      scores and their two gradients)."""
    tokens = float(lengths.sum())
    H, D, Hkv, Di = model_cfg.n_heads, model_cfg.head_dim, model_cfg.n_kv_heads, attn_cfg.index_dim
    n_msa, causal, support, main = _pairs(model_cfg, attn_cfg, lengths, phase)
    attn = 3.0 * 4 * H * D * main
    head = model_cfg.vocab_size * model_cfg.dim if model_cfg.tie_embeddings else 0
    index = n_msa * (2.0 * Hkv * Di * causal + (2.0 * H * D + 6.0 * Hkv * Di) * support)
    return {"model": 6.0 * (n_params + head) * tokens + attn, "attn": attn, "index": index}


def layer_metrics(layer_ids: list[int], kl_sum: torch.Tensor, n_micro: int, stats: list[SelectionStats | None],
                  mesh) -> dict[str, float]:
    """Per-layer index KL (``layer_kl_sum [n_msa]``, summed over ``n_micro`` micro-batches: averaged
    here) and, where ``stats`` were taken, per-layer and overall index recall, sparsity, the share of
    queries with more than ``topk`` visible blocks and the tile union. Each rank of a sequence holds a
    share of both (its GQA groups, its query chunks); they are summed over the shard group: a collective,
    so every rank calls this alike."""
    out = {INDEX_RECALL: None, ORACLE_RECALL: None, ORACLE_RECALL_2X: None, SPARSITY: None,
           NONTRIVIAL: None, TILE_UNION: None}  # None: not measured
    if layer_ids:
        kl = shard_sum(kl_sum / max(n_micro, 1), mesh)
        out.update({layer_kl_key(i): float(v) for i, v in zip(layer_ids, kl)})
    if stats and all(s is not None for s in stats):
        sums = shard_sum(torch.stack([s.sums for s in stats]), mesh)  # [n_msa, fields]
        per_layer = [SelectionStats(row) for row in sums]
        out.update({layer_recall_key(i): s.ratios()["index_recall"] for i, s in zip(layer_ids, per_layer)})
        total = SelectionStats.pooled(per_layer).ratios()
        out.update({INDEX_RECALL: total["index_recall"], ORACLE_RECALL: total["oracle_recall"],
                    ORACLE_RECALL_2X: total["oracle_recall_2x"], SPARSITY: total["sparsity"],
                    NONTRIVIAL: total["nontrivial_share"], TILE_UNION: total["tile_union"]})
    return out


class MetricsLogger:
    """``metrics.jsonl`` rows, W&B and the progress bar, on rank 0. W&B settings a user put in the
    environment (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_RUN_GROUP``,
    ``WANDB_TAGS``) win over ``logging.wandb.*``; the log says which."""

    ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "name": "WANDB_NAME",
           "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS"}

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
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        settings, source = self.wandb_settings(cfg.wandb)
        self.message(f"W&B mode {settings['mode']} (from {source})")
        if settings["mode"] != "disabled":
            import wandb

            self.wandb_run = wandb.init(**settings, config=config, dir=str(run_dir), resume="allow",
                                        id=_run_id(Path(run_dir)))

    @classmethod
    def wandb_settings(cls, cfg) -> tuple[dict, str]:
        """``wandb.init`` arguments: a setting whose WANDB_* variable is set is left to wandb (None), so the
        environment wins; and where the mode came from."""
        settings = {k: (None if os.environ.get(var) else getattr(cfg, k)) for k, var in cls.ENV.items()}
        settings["tags"] = None if settings["tags"] is None else list(settings["tags"])
        mode_env = os.environ.get("WANDB_MODE")
        settings["mode"] = mode_env or cfg.mode
        return settings, ("WANDB_MODE" if mode_env else "logging.wandb.mode")

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
            self.bar.set_postfix(loss=f"{metrics.get(LOSS_LM, float('nan')):.4f}",
                                 tok_s=f"{metrics.get(TOKENS_PER_S, 0):.0f}", stage=metrics.get(STAGE, 0),
                                 refresh=False)
            self.bar.refresh()

    def log_media(self, step: int, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]]) -> None:
        """PNG files and tables (columns, rows) to W&B at ``step`` (they are already files on disk, so
        metrics.jsonl gets nothing); wandb is imported only when a W&B run is active."""
        if self.wandb_run is None:
            return
        import wandb

        media = {name: wandb.Image(str(path)) for name, path in images.items()}
        media.update({name: wandb.Table(columns=cols, data=rows) for name, (cols, rows) in tables.items()})
        self.wandb_run.log(media, step=step)

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
