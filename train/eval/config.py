"""Eval settings: what to measure (``EvalSpec``), when during training (``EvalConfig``, the ``eval.*`` keys
of ``python -m train``) and on which checkpoint (``EvalAppConfig``, ``python -m train.eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from train.eval.tasks import TASKS

BPB = "bpb"
ALL_TASKS = (BPB, *TASKS)


@dataclass
class EvalSpec:
    """What an eval measures. ``bpb``: held-out bits per byte, overall and by position, with MSA's index
    recall on the same rows; the retrieval tasks of train/eval/tasks.py, each at every depth."""

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    lengths: list[int] = field(default_factory=list)  # tokens; empty: the training length
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # first needle's place
    items: int = 4  # items per (task, length, depth)
    rows: int = 4  # held-out rows per length for bits per byte and index recall
    buckets: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536, 262144])  # position edges
    choices: int = 4  # candidate answers for the log-likelihood choice (chance: 1/choices)
    generate: bool = False  # also score exact match of greedy generation (decode steps: slower)
    seed: int = 0  # the items (their random streams are never the training source's)
    heldout: Any = "default"  # default: the standard-library files the embedded corpus leaves out; or shards
    recall_queries: int = 256  # queries per layer and row sampled for the index recall
    batch_tokens: int = 65536  # rows (items) of one length go through one forward up to this many tokens


@dataclass
class EvalConfig(EvalSpec):
    """``eval.*`` of a training run."""

    every: int = 0  # run the evals every N optimizer steps and after the last one (0: never)


@dataclass
class EvalAppConfig(EvalSpec):
    """``python -m train.eval``: the evals of a trained model, written as JSON and PNG files."""

    checkpoint: str = MISSING  # a run directory (its newest checkpoint) or a step_* checkpoint directory
    out: str | None = None  # default: <run dir>/eval/step_<N>
    generate: bool = True
    phase: str | None = None  # warmup | sparse; default: the phase of the checkpoint's last stage
    rope_base: float | None = None  # default: the checkpoint's last stage's
    rope_scaling: Any = None  # e.g. {type:yarn,factor:4,original_max_len:8192}; default: the stage's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    impl: str = "auto"  # MSA ops: auto (Triton on CUDA) | triton | reference
    precision: str = "auto"  # auto (the run's on CUDA, fp32 on CPU) | bf16 | fp32


def eval_due(every: int, step: int, total_steps: int) -> bool:
    """Whether the evals run after optimizer step ``step`` (0-based) of ``total_steps``."""
    return every > 0 and ((step + 1) % every == 0 or step + 1 == total_steps)


def check_eval(cfg: EvalSpec, length: int, key: str = "eval", tokenizer=None, image_cfg=None) -> None:
    """Settings that cannot work, naming the key to change (``key``: their section, ``eval`` in training,
    "" in the app); ``length`` is the default eval length. With ``tokenizer`` (and ``image_cfg``) each
    retrieval task's needles and question must fit every length."""
    key = f"{key}." if key else ""
    unknown = [t for t in cfg.tasks if t not in ALL_TASKS]
    if not cfg.tasks or unknown:
        raise ValueError(f"{key}tasks={list(cfg.tasks)}: name one or more of {', '.join(ALL_TASKS)}")
    lengths = list(cfg.lengths) or [length]
    if min(lengths) < 2:
        raise ValueError(f"{key}lengths={list(cfg.lengths)}: each must be >= 2 tokens")
    if not cfg.depths or not all(0.0 <= d <= 1.0 for d in cfg.depths):
        raise ValueError(f"{key}depths={list(cfg.depths)}: give one or more depths in [0, 1]")
    for name in ("items", "rows", "recall_queries", "batch_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{key}{name}={getattr(cfg, name)} must be >= 1")
    if cfg.choices < 2:
        raise ValueError(f"{key}choices={cfg.choices} must be >= 2")
    if list(cfg.buckets) != sorted(set(cfg.buckets)) or not all(b > 0 for b in cfg.buckets):
        raise ValueError(f"{key}buckets={list(cfg.buckets)}: give rising positive position edges")
    if tokenizer is not None:
        from train.eval.tasks import fixed_tokens

        for task in (t for t in cfg.tasks if t != BPB):
            need = fixed_tokens(task, tokenizer, image_cfg, cfg.choices)
            if need > min(lengths):
                raise ValueError(f"{key}lengths: {task} needs at least {need} tokens, the shortest length is "
                                 f"{min(lengths)}: raise {key}lengths or drop {task} from {key}tasks")


def check_train_eval(cfg: EvalConfig, stage, zero_stage: int, data_cfg) -> None:
    """``eval.*`` of a training run, for one recipe stage (``data_cfg``: the run's DataConfig)."""
    if cfg.every < 0:
        raise ValueError(f"eval.every={cfg.every} must be >= 0 (0: no evals during training)")
    if not cfg.every:
        return
    if stage.sp_size * stage.cp_size > 1:
        raise ValueError(f"eval.every runs unsharded forwards, but stage {stage.name} shards the sequence "
                         f"(sp_size={stage.sp_size}, cp_size={stage.cp_size}): set eval.every=0 and evaluate the "
                         "checkpoints with python -m train.eval")
    if zero_stage == 3:
        raise ValueError("eval.every needs whole weights on each rank, not ZeRO-3 partitions: set eval.every=0 "
                         "(and run python -m train.eval on the checkpoints) or parallel.zero_stage<=2")
    from train.data import build_tokenizer

    check_eval(cfg, stage.seq_len, "eval", build_tokenizer(data_cfg.tokenizer), data_cfg.image)


__all__ = ["BPB", "ALL_TASKS", "EvalSpec", "EvalConfig", "EvalAppConfig", "eval_due", "check_eval",
           "check_train_eval"]
