"""The training recipe: stages the run moves through by itself (dense warm-up with the index KL,
sparse training, a context curriculum).

Each stage sets its number of steps, the attention phase (``warmup``: dense main branch with the index
KL on all visible tokens; ``sparse``: top-k selection with the KL on the selected support), and
optionally its sequence length, batch, ``sp/cp`` sizes, RoPE base and KL weight; an unset value keeps
the base config's (``data.seq_len``, ``data.batch_size``, ``parallel.*``, ``model.rope_base``,
``attention.kl_weight``). Example (abridged from ``conf/recipe/long_context.yaml``)::

    recipe:
      stages:
        - {name: warmup-8k, steps: 500, phase: warmup, seq_len: 8192, rope_base: 5.0e5}
        - {name: sparse-8k, steps: 10000, seq_len: 8192, rope_base: 5.0e5}
        - {name: 128k, steps: 1000, seq_len: 131072, sp_size: 2, cp_size: 2, rope_base: 2.0e6}

With no stages the recipe is the base config with ``attention.warmup_steps`` of dense warm-up then
sparse training. The run ends at ``train.steps``, which may cut the recipe short but not exceed it.
A stage whose ``sp/cp`` sizes differ from the running ones needs new process groups: the run saves a
checkpoint at the boundary and exits, and the same command relaunched (``checkpoint.resume=auto``)
continues in the new stage with its layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

PHASES = ("warmup", "sparse")


@dataclass
class StageConfig:
    """One entry of ``recipe.stages``; None keeps the base config's value."""

    name: str = ""
    steps: int = 0
    phase: str = "sparse"  # warmup | sparse
    seq_len: int | None = None
    batch_size: int | None = None
    sp_size: int | None = None
    cp_size: int | None = None
    rope_base: float | None = None
    kl_weight: float | None = None


@dataclass
class RecipeConfig:
    """``recipe.*``: the stages, in order."""

    stages: list[StageConfig] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A resolved stage: steps ``[start, end)`` and every setting filled in."""

    index: int
    name: str
    start: int
    end: int
    phase: str
    seq_len: int
    batch_size: int
    sp_size: int
    cp_size: int
    rope_base: float
    kl_weight: float
    data_epoch: int  # first stage of the run of stages with this sp/cp layout: they share one data stream

    def layout(self) -> tuple[int, int]:
        return self.sp_size, self.cp_size


def _entries(cfg) -> list[StageConfig]:
    if cfg.recipe.stages:
        return list(cfg.recipe.stages)
    warm = cfg.attention.warmup_steps
    if cfg.attention.backend == "dense" or warm <= 0:
        return [StageConfig(name="main", steps=cfg.train.steps)]
    return [StageConfig(name="warmup", steps=warm, phase="warmup"),
            StageConfig(name="sparse", steps=max(cfg.train.steps - warm, 1))]


def build_recipe(cfg) -> list[Stage]:
    """Resolve ``cfg.recipe`` (a TrainConfig) into stages; a bad stage raises naming its key."""
    stages: list[Stage] = []
    start = 0
    for i, s in enumerate(_entries(cfg)):
        key = f"recipe.stages[{i}]"
        if s.steps < 1:
            raise ValueError(f"{key}.steps={s.steps} must be >= 1")
        if s.phase not in PHASES:
            raise ValueError(f"{key}.phase={s.phase!r}: use warmup or sparse")
        pick = lambda v, base: base if v is None else v
        stage = Stage(
            index=i, name=s.name or f"stage{i}", start=start, end=start + s.steps, phase=s.phase,
            seq_len=pick(s.seq_len, cfg.data.seq_len), batch_size=pick(s.batch_size, cfg.data.batch_size),
            sp_size=pick(s.sp_size, cfg.parallel.sp_size), cp_size=pick(s.cp_size, cfg.parallel.cp_size),
            rope_base=float(pick(s.rope_base, cfg.model.rope_base)),
            kl_weight=float(pick(s.kl_weight, cfg.attention.kl_weight)), data_epoch=i)
        if stages and stages[-1].layout() == stage.layout():
            stage = replace(stage, data_epoch=stages[-1].data_epoch)
        stages.append(stage)
        start = stage.end
    if cfg.train.steps > start:
        raise ValueError(f"train.steps={cfg.train.steps} runs past the recipe's {start} steps: lower "
                         f"train.steps or lengthen recipe.stages (the last stage's steps)")
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs ``step`` (0-based); past the end, the last stage."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def stage_config(cfg, stage: Stage):
    """A copy of the TrainConfig with the stage's settings in the base keys, for checks and builders."""
    out = copy.deepcopy(cfg)
    out.data.seq_len, out.data.batch_size = stage.seq_len, stage.batch_size
    out.parallel.sp_size, out.parallel.cp_size = stage.sp_size, stage.cp_size
    out.model.rope_base, out.attention.kl_weight = stage.rope_base, stage.kl_weight
    return out


def describe(stages: list[Stage], total_steps: int) -> str:
    lines = []
    for s in stages:
        if s.start >= total_steps:
            lines.append(f"  [{s.index}] {s.name}: not reached (train.steps={total_steps})")
            continue
        lines.append(f"  [{s.index}] {s.name}: steps {s.start}-{min(s.end, total_steps) - 1} {s.phase} "
                     f"seq_len={s.seq_len} batch={s.batch_size} sp={s.sp_size} cp={s.cp_size} "
                     f"rope_base={s.rope_base:g} kl_weight={s.kl_weight:g}")
    return "recipe:\n" + "\n".join(lines)
