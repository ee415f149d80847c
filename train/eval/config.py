"""Eval settings: what to measure (``EvalSpec``), when during training (``EvalConfig``, the ``eval.*`` keys
of ``python -m train``) and on which checkpoint (``EvalAppConfig``, ``python -m train.eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from msa.rope import RopeScaling, check_rope_scaling
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
    rows: int = 4  # held-out rows per length for bits per byte and index recall: windows of the whole stream
    # held-out rows per length inside single held-out documents, as training rows segment text (each document its
    # own attention segment): eval/bpb_doc/..., eval/index_recall_doc/...; 0: none
    doc_rows: int = 2
    buckets: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536, 262144])  # position edges
    choices: int = 4  # candidate answers for the log-likelihood choice (chance: 1/choices)
    generate: bool = False  # also score exact match of greedy generation (decode steps: slower)
    seed: int = 0  # the items (their random streams are never the training source's)
    heldout: Any = "default"  # default: the standard-library files the embedded corpus leaves out; or shards
    recall_queries: int = 256  # queries per layer and row sampled for the index recall
    batch_tokens: int = 65536  # rows (items) of one length go through one forward up to this many tokens
    rope_base: float | None = None  # RoPE base of the evals; default: the model's (its last stage's)
    # the keys of model.rope_scaling, e.g. {type:yarn,factor:4,original_max_len:8192}; factor auto: each length
    # over the training length (1 up to it), original_max_len default the training length; default: the model's
    rope_scaling: Any = None


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    impl: str = "auto"  # MSA ops: auto (Triton on CUDA) | triton | reference
    precision: str = "auto"  # auto (the run's on CUDA, fp32 on CPU) | bf16 | fp32


def eval_due(every: int, step: int, total_steps: int) -> bool:
    """Whether the evals run after optimizer step ``step`` (0-based) of ``total_steps``."""
    return every > 0 and ((step + 1) % every == 0 or step + 1 == total_steps)


def eval_rope(spec: EvalSpec, model_rope: tuple[float, RopeScaling], length: int | None, train_len: int | None,
              key: str = "") -> tuple[float, RopeScaling]:
    """The RoPE (base, scaling) an eval at ``length`` runs with: ``spec.rope_base`` and ``spec.rope_scaling``
    where set, each replacing the model's (``model_rope``) and keeping the other. A scaling ``factor`` of
    ``auto`` is ``length / train_len`` (at least 1: no stretch up to the trained length), and its
    ``original_max_len`` defaults to ``train_len`` (``length`` None: auto is refused)."""
    base, scaling = model_rope
    given = spec.rope_scaling
    if given is not None:
        known = {f.name for f in fields(RopeScaling)}
        if not isinstance(given, dict) or set(given) - known:
            raise ValueError(f"{key}rope_scaling={given!r}: give a dict of {', '.join(sorted(known))}, e.g. "
                             f"{key}rope_scaling={{type:yarn,factor:4,original_max_len:8192}}")
        given = dict(given)
        if given.get("factor") == "auto":
            if length is None:
                raise ValueError(f"{key}rope_scaling.factor=auto needs an eval length: give a number")
            given["factor"] = max(1.0, length / train_len)
            given.setdefault("original_max_len", train_len)
        scaling = RopeScaling(**given)  # its keys are known (checked above)
        if not isinstance(scaling.factor, (int, float)):
            raise ValueError(f"{key}rope_scaling.factor={scaling.factor!r}: give a number or auto")
        check_rope_scaling(scaling, f"{key}rope_scaling")
    if spec.rope_base is not None and spec.rope_base <= 0:
        raise ValueError(f"{key}rope_base={spec.rope_base} must be > 0 (or unset: the model's)")
    return (spec.rope_base or base), scaling


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
    if cfg.doc_rows < 0:
        raise ValueError(f"{key}doc_rows={cfg.doc_rows} must be >= 0 (0: no windows inside single documents)")
    if cfg.choices < 2:
        raise ValueError(f"{key}choices={cfg.choices} must be >= 2")
    if list(cfg.buckets) != sorted(set(cfg.buckets)) or not all(b > 0 for b in cfg.buckets):
        raise ValueError(f"{key}buckets={list(cfg.buckets)}: give rising positive position edges")
    eval_rope(cfg, (1e4, RopeScaling()), max(lengths), length, key)
    if tokenizer is not None:
        from train.eval.tasks import fixed_tokens

        for task in (t for t in cfg.tasks if t != BPB):
            need = fixed_tokens(task, tokenizer, image_cfg, cfg.choices)
            if need > min(lengths):
                raise ValueError(f"{key}lengths: {task} needs at least {need} tokens, the shortest length is "
                                 f"{min(lengths)}: raise {key}lengths or drop {task} from {key}tasks")


def fit_default_tasks(cfg: EvalSpec, length: int, tokenizer, image_cfg=None, key: str = "eval") -> str | None:
    """With ``tasks`` at its default (every task), leave out of ``cfg.tasks`` the retrieval tasks whose needles
    and question do not fit the shortest eval length (``length``, the training length, when ``lengths`` is
    empty), so the defaults work on a short model (the README's run trains at 256 tokens, multikey needs about
    400). Returns a note naming what was left out and the tokens each needs (None when nothing was), with the
    keys of section ``key`` as ``check_eval`` names them; tasks named in ``tasks`` stay as given, and
    ``check_eval`` refuses one that does not fit."""
    if list(cfg.tasks) != list(ALL_TASKS) or cfg.choices < 2:  # bad choices: check_eval names the fix
        return None
    from train.eval.tasks import fixed_tokens

    key = f"{key}." if key else ""
    shortest = min(list(cfg.lengths) or [length])
    need = {t: 0 if t == BPB else fixed_tokens(t, tokenizer, image_cfg, cfg.choices) for t in cfg.tasks}
    cfg.tasks = [t for t in cfg.tasks if need[t] <= shortest]
    left_out = [f"{t} ({need[t]})" for t in need if need[t] > shortest]
    return (f"{key}tasks: left out {', '.join(left_out)}: the tokens each needs at least, more than the shortest "
            f"eval length {shortest}; give longer {key}lengths=[...] to run them") if left_out else None


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


__all__ = ["BPB", "ALL_TASKS", "EvalSpec", "EvalConfig", "EvalAppConfig", "eval_due", "eval_rope", "check_eval",
           "fit_default_tasks", "check_train_eval"]
