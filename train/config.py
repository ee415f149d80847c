"""The training config: one dataclass per component, composed here; ``conf/`` YAML only sets values.

Hydra composes ``conf/train.yaml`` with the command line's dotted overrides; ``to_train_config``
validates the result against these dataclasses (an unknown key or a wrong type is an error that names
it) and ``check_config`` rejects combinations that cannot work, each message naming the keys to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from msa.layer import AttentionConfig
from train.data import DataConfig
from train.data.loader import check_data
from train.model import ModelConfig, check_model
from train.parallel import ParallelConfig, check_parallel
from train.recipe import RecipeConfig


@dataclass
class OptimConfig:
    """``train.*``: optimisation and the length of the run."""

    steps: int = 60
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    lr_warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 on CUDA; CPU always runs fp32
    seed: int = 0
    max_bad_steps: int = 5  # non-finite losses tolerated (each step skipped) before the run stops


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "msa"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """``logging.*``: where metrics go. metrics.jsonl is always written."""

    every: int = 1  # log every N optimizer steps
    stats_every: int = 10  # index recall / sparsity (they cost a small dense pass) every N steps
    progress: bool = True  # rank-0 progress bar
    peak_tflops: float | None = None  # for perf/mfu; None: from the GPU's name (no MFU on CPU)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    """``checkpoint.*``: atomic DeepSpeed checkpoints under ``run_dir/checkpoints``."""

    every: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any | never | a path


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)  # stages; empty: warm-up then sparse


def register_schema() -> None:
    """Make the dataclasses the schema under conf/train.yaml (its defaults list names train_schema):
    every field is then overridable from the command line and type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Validate a composed Hydra config against the dataclasses and return the typed object."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    return OmegaConf.to_object(merged)


def check_train(cfg: OptimConfig) -> None:
    if cfg.steps < 1:
        raise ValueError(f"train.steps={cfg.steps} must be >= 1")
    if cfg.grad_accum < 1:
        raise ValueError(f"train.grad_accum={cfg.grad_accum} must be >= 1")
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision={cfg.precision!r}: use bf16 or fp32")


def check_sequence(cfg: TrainConfig) -> None:
    """The sequence must hold the selection, and shard evenly over sequence/context ranks."""
    seq, attn, par = cfg.data.seq_len, cfg.attention, cfg.parallel
    if seq < 1 or cfg.data.batch_size < 1:
        raise ValueError("data.seq_len and data.batch_size must be >= 1")
    if attn.backend != "dense" and attn.topk * attn.block_size > seq:
        raise ValueError(f"attention.topk*attention.block_size={attn.topk * attn.block_size} exceeds "
                         f"data.seq_len={seq}: lower attention.topk/attention.block_size or raise data.seq_len")
    shards = par.sp_size * par.cp_size
    if shards > 1 and seq % (shards * 2 * attn.block_size):
        raise ValueError(f"data.seq_len={seq} must be divisible by parallel.sp_size*parallel.cp_size*2*"
                         f"attention.block_size={shards * 2 * attn.block_size}: change data.seq_len")
    if par.sp_size > cfg.model.n_kv_heads or cfg.model.n_kv_heads % par.sp_size:
        raise ValueError(f"parallel.sp_size={par.sp_size} must divide model.n_kv_heads={cfg.model.n_kv_heads}")


def check_config(cfg: TrainConfig, world_size: int, vocab_size: int) -> None:
    """Every start-up check; the first failure raises with the keys to change."""
    check_model(cfg.model, cfg.attention)
    check_train(cfg.train)
    check_parallel(cfg.parallel, world_size)
    check_sequence(cfg)
    if vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} ids but model.vocab_size={cfg.model.vocab_size}: "
                         f"raise model.vocab_size to at least {vocab_size}")
    if cfg.logging.wandb.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logging.wandb.mode={cfg.logging.wandb.mode!r}: use offline, online or disabled")
    if cfg.logging.every < 1 or cfg.logging.stats_every < 1:
        raise ValueError("logging.every and logging.stats_every must be >= 1 (steps between logs)")
    check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size, cfg.data.image)
    if cfg.model.vision.patch_size != cfg.data.image.patch_size:
        raise ValueError(f"model.vision.patch_size={cfg.model.vision.patch_size} differs from "
                         f"data.image.patch_size={cfg.data.image.patch_size}: set them equal")
