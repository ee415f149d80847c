"""The training recipe: the stages a run moves through by itself (dense warm-up with the index KL,
sparse training, a context curriculum). After ``build_recipe`` a ``Stage`` is the one source of every
per-stage setting: phase, sequence length, batch, ``sp/cp`` sizes, RoPE base and scaling, KL weight and
whether the main weights learn.

Each entry of ``recipe.stages`` sets its number of steps and phase (``warmup``: dense main branch
with the index KL on all visible tokens; ``sparse``: top-k selection with the KL on the selected
support) and optionally its sequence length, batch, ``sp/cp`` sizes, RoPE base and scaling, KL weight
and whether the main weights are frozen; an unset value keeps the base config's (``data.seq_len``,
``data.batch_size``, ``parallel.sp_size/cp_size``, ``model.rope_base``, ``model.rope_scaling``,
``recipe.kl_weight``; frozen: ``recipe.freeze_main_in_warmup`` for warm-up stages, else not).
With ``data.sources``, a stage may also set ``data_weights`` (one token share per source, 0 to leave one
out): a data curriculum over one stream, e.g. short retrieval documents first. Each source continues
where the last stage left it; the shares count from the stage's start.
A frozen stage trains only the index branch (the LM loss is logged but not back-propagated, the other
parameter groups run at learning rate 0): the warm-up of a pretrained model converted to MSA.
Example (abridged from ``conf/recipe/long_context.yaml``)::

    recipe:
      stages:
        - {name: warmup-8k, steps: 500, phase: warmup, seq_len: 8192, rope_base: 5.0e5}
        - {name: sparse-8k, steps: 10000, seq_len: 8192, rope_base: 5.0e5}
        - {name: 128k, steps: 1000, seq_len: 131072, sp_size: 2, cp_size: 2, rope_base: 2.0e6}

With no stages the recipe is ``recipe.warmup_steps`` of dense warm-up, then sparse training to
``run.steps``. The run ends at ``run.steps``, which may cut the recipe short but not exceed it. A stage
whose ``sp/cp`` sizes differ from the running ones needs new process groups: the run saves a checkpoint
at the boundary and exits, and the same command relaunched (``checkpoint.resume=auto``) continues in
the new stage with its layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from msa.layer import PHASES
from msa.rope import RopeScaling, check_rope_scaling


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
    rope_scaling: RopeScaling | None = None
    kl_weight: float | None = None
    freeze_main: bool | None = None  # only the index branch learns in this stage
    # one token share per data.sources entry, in its order (0 leaves a source out of this stage); None:
    # data.sources' own weights. The stage continues every source's stream where the last stage left it.
    data_weights: list[float] | None = None


@dataclass
class RecipeConfig:
    """``recipe.*``: the index KL weight, and either a warm-up length or explicit stages."""

    kl_weight: float = 1.0  # lambda in L = L_lm + lambda * sum_layers L_kl (a stage may set its own)
    freeze_main_in_warmup: bool = False  # warm-up stages train only the index branch (a pretrained model's)
    warmup_steps: int = 0  # with no stages: this many steps of dense warm-up, then sparse to run.steps
    stages: list[StageConfig] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A resolved stage: steps ``[start, end)`` and every setting filled in. ``key`` says where a
    setting came from when a check needs to name it (``recipe.stages[2].seq_len`` or ``data.seq_len``)."""

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
    rope_scaling: RopeScaling
    kl_weight: float
    freeze_main: bool
    data_epoch: int  # first stage of the run of stages with this sp/cp layout: they share one data stream
    explicit: tuple[str, ...] = ()  # the settings this stage's entry sets itself
    data_weights: tuple[float, ...] = ()  # () : data.sources' own weights

    def layout(self) -> tuple[int, int]:
        return self.sp_size, self.cp_size

    def key(self, name: str, base: str) -> str:
        return f"recipe.stages[{self.index}].{name}" if name in self.explicit else base


def _entries(cfg) -> list[StageConfig]:
    rec = cfg.recipe
    if rec.stages:
        if rec.warmup_steps:
            raise ValueError("recipe.warmup_steps applies only without recipe.stages: make the warm-up a stage "
                             "({phase: warmup, steps: N}) and set recipe.warmup_steps=0")
        return list(rec.stages)
    if cfg.attention.kind == "dense" or rec.warmup_steps <= 0:
        return [StageConfig(name="main", steps=cfg.run.steps)]
    return [StageConfig(name="warmup", steps=rec.warmup_steps, phase="warmup"),
            StageConfig(name="sparse", steps=max(cfg.run.steps - rec.warmup_steps, 1))]


def build_recipe(cfg) -> list[Stage]:
    """Resolve ``cfg.recipe`` of a TrainConfig into stages; a bad stage raises naming its key."""
    stages: list[Stage] = []
    start = 0
    base = {"seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "sp_size": cfg.parallel.sp_size,
            "cp_size": cfg.parallel.cp_size, "rope_base": cfg.model.rope_base, "rope_scaling": cfg.model.rope_scaling,
            "kl_weight": cfg.recipe.kl_weight}
    for i, s in enumerate(_entries(cfg)):
        if s.steps < 1:
            raise ValueError(f"recipe.stages[{i}].steps={s.steps} must be >= 1")
        if s.phase not in PHASES:
            raise ValueError(f"recipe.stages[{i}].phase={s.phase!r}: use warmup or sparse")
        explicit = tuple(k for k in base if getattr(s, k) is not None)
        values = {k: (getattr(s, k) if k in explicit else v) for k, v in base.items()}
        if "rope_scaling" in explicit:
            check_rope_scaling(s.rope_scaling, f"recipe.stages[{i}].rope_scaling")
        frozen = s.freeze_main if s.freeze_main is not None else (
            cfg.recipe.freeze_main_in_warmup and s.phase == "warmup")
        stage = Stage(index=i, name=s.name or f"stage{i}", start=start, end=start + s.steps, phase=s.phase,
                      seq_len=int(values["seq_len"]), batch_size=int(values["batch_size"]),
                      sp_size=int(values["sp_size"]), cp_size=int(values["cp_size"]),
                      rope_base=float(values["rope_base"]), rope_scaling=values["rope_scaling"],
                      kl_weight=float(values["kl_weight"]), freeze_main=bool(frozen), data_epoch=i,
                      explicit=explicit + (("freeze_main",) if s.freeze_main is not None else ()))
        if s.data_weights is not None:
            stage = replace(stage, data_weights=_data_weights(cfg, s.data_weights, f"recipe.stages[{i}].data_weights"))
        if stages and stages[-1].layout() == stage.layout():
            stage = replace(stage, data_epoch=stages[-1].data_epoch)
        stages.append(stage)
        start = stage.end
    if cfg.run.steps > start:
        raise ValueError(f"run.steps={cfg.run.steps} runs past the recipe's {start} steps: lower "
                         f"run.steps or lengthen recipe.stages (the last stage's steps)")
    return stages


def _data_weights(cfg, weights, key: str) -> tuple[float, ...]:
    sources = cfg.data.sources
    if not sources:
        raise ValueError(f"{key} needs data.sources (one weight per source); with data.shards alone there is "
                         f"nothing to weigh: list the sources in data.sources, or drop {key}")
    weights = [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{key}={weights} has {len(weights)} weights for {len(sources)} data.sources: give one "
                         "per source, in data.sources' order (0 leaves a source out of the stage)")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"{key}={weights}: each weight must be finite and >= 0, and at least one > 0")
    return tuple(weights)


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs ``step`` (0-based); past the end, the last stage."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def _scaling(s: RopeScaling) -> str:
    return "" if s.type == "none" else f" rope_scaling={s.type} x{s.factor:g}"


def describe(stages: list[Stage], total_steps: int) -> str:
    lines = []
    for s in stages:
        if s.start >= total_steps:
            lines.append(f"  [{s.index}] {s.name}: not reached (run.steps={total_steps})")
            continue
        lines.append(f"  [{s.index}] {s.name}: steps {s.start}-{min(s.end, total_steps) - 1} {s.phase} "
                     f"seq_len={s.seq_len} batch={s.batch_size} sp={s.sp_size} cp={s.cp_size} "
                     f"rope_base={s.rope_base:g}{_scaling(s.rope_scaling)} kl_weight={s.kl_weight:g}"
                     f"{' main weights frozen' if s.freeze_main else ''}"
                     f"{f' data_weights={list(s.data_weights)}' if s.data_weights else ''}")
    return "recipe:\n" + "\n".join(lines)


__all__ = ["StageConfig", "RecipeConfig", "Stage", "build_recipe", "stage_at", "describe"]
