"""The training config: one dataclass per component, composed here; ``conf/`` YAML only sets values.

Hydra composes ``conf/train.yaml`` with the command line's dotted overrides; ``to_train_config``
validates the result against these dataclasses (an unknown key or a wrong type is an error that names
it). ``check_config(cfg, stage, ...)`` rejects combinations that cannot work for one recipe stage, each
message naming the keys to change; the loop runs it for every stage before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from msa.layer import AttentionConfig
from train.data import DataConfig
from train.data.loader import check_data
from train.eval.config import EvalConfig, check_train_eval
from train.model import ModelConfig, check_model, sliding_layers
from train.optim import OptimConfig, check_optim
from train.parallel import ParallelConfig, check_deepspeed, deepspeed_config
from train.recipe import RecipeConfig, Stage


@dataclass
class RunConfig:
    """``run.*``: how long, from which seed, in which precision, and what the run tolerates."""

    steps: int = 60
    seed: int = 0
    precision: str = "bf16"  # bf16 on CUDA; CPU always runs fp32
    max_bad_steps: int = 5  # non-finite losses tolerated (each step skipped) before the run stops


@dataclass
class WandbConfig:
    """``logging.wandb.*``; a WANDB_* variable the user set (WANDB_MODE, WANDB_PROJECT, ...) wins."""

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
    stats_every: int = 10  # selection stats (index recall, sparsity) every N steps
    recall_queries: int = 256  # queries sampled per layer (and shard) for the index recall
    progress: bool = True  # rank-0 progress bar
    peak_tflops: float | None = None  # for perf/mfu; None: from the GPU's name (no MFU on CPU)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    """``checkpoint.*``: atomic DeepSpeed checkpoints under ``run_dir/checkpoints``."""

    every: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any | never | a path
    # start from another run's weights (its run dir: the newest complete checkpoint, or a checkpoint dir);
    # optimizer, schedule, step and data start fresh; only attention may differ (a dense run continued with
    # MSA keeps the index branch at its init). Read when the run starts, not when it resumes.
    init_from: str = ""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys that moved: a command line that still uses one gets the new name instead of Hydra's "not in struct".
MOVED_KEYS = {
    "train.steps": "run.steps", "train.seed": "run.seed", "train.precision": "run.precision",
    "train.max_bad_steps": "run.max_bad_steps", "train.lr": "optim.lr", "train.min_lr_ratio": "optim.min_lr_ratio",
    "train.lr_warmup_steps": "optim.warmup_steps", "train.weight_decay": "optim.weight_decay",
    "train.betas": "optim.betas", "train.grad_clip": "optim.grad_clip", "train.grad_accum": "optim.grad_accum",
    "attention.backend": "attention.kind (msa|dense) and attention.impl (auto|triton|reference)",
    "attention.kl_weight": "recipe.kl_weight", "attention.warmup_steps": "recipe.warmup_steps",
}


def check_moved_keys(overrides: list[str]) -> None:
    """Refuse overrides of keys that moved, naming where each went."""
    for item in overrides:
        if item.startswith("+recipe="):
            raise ValueError(f"{item}: the recipe group has a default now, write {item[1:]}")
        key = item.lstrip("+~").split("=", 1)[0]
        if key in MOVED_KEYS:
            raise ValueError(f"{key} moved: use {MOVED_KEYS[key]} (see docs/architecture.md, config layout)")


def register_schema() -> None:
    """Make the dataclasses the schema under conf/train.yaml (its defaults list names train_schema):
    every field is then overridable from the command line and type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Validate a composed Hydra config against the dataclasses and return the typed object."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), plain))


def check_run(cfg: RunConfig) -> None:
    if cfg.steps < 1:
        raise ValueError(f"run.steps={cfg.steps} must be >= 1")
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"run.precision={cfg.precision!r}: use bf16 or fp32")


def check_checkpoint(cfg: CheckpointConfig, model_path: str) -> None:
    if cfg.init_from and model_path:
        raise ValueError(f"checkpoint.init_from={cfg.init_from!r} and model.path={model_path!r}: start from one "
                         "(model.path: a Hugging Face checkpoint; checkpoint.init_from: a run of this trainer)")
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise FileNotFoundError(f"checkpoint.init_from={cfg.init_from!r} does not exist: give a run directory "
                                "or one of its checkpoints/step_* directories")


def check_logging(cfg: LoggingConfig) -> None:
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logging.wandb.mode={cfg.wandb.mode!r}: use offline, online or disabled")
    if cfg.every < 1 or cfg.stats_every < 1 or cfg.recall_queries < 1:
        raise ValueError("logging.every, logging.stats_every and logging.recall_queries must be >= 1")


def check_stage(cfg: TrainConfig, stage: Stage, world_size: int) -> None:
    """The stage's sequence must hold the selection and shard evenly over its sequence/context ranks."""
    seq, attn = stage.seq_len, cfg.attention
    seq_key, sp_key = stage.key("seq_len", "data.seq_len"), stage.key("sp_size", "parallel.sp_size")
    layout_keys = f"{sp_key}/{stage.key('cp_size', 'parallel.cp_size')}"
    if stage.sp_size < 1 or stage.cp_size < 1:
        raise ValueError(f"{layout_keys} must be >= 1")
    if world_size % (stage.sp_size * stage.cp_size):
        raise ValueError(f"world size {world_size} is not a multiple of sp_size*cp_size="
                         f"{stage.sp_size * stage.cp_size}: change {layout_keys} or the launch")
    H, Hkv = cfg.model.n_heads, cfg.model.n_kv_heads
    if Hkv % stage.sp_size and (stage.sp_size % Hkv or H % stage.sp_size):
        raise ValueError(f"{sp_key}={stage.sp_size} must divide model.n_kv_heads={Hkv}, or be a multiple of it "
                         f"that divides model.n_heads={H} (the KV heads are then replicated)")
    if attn.kind == "msa" and attn.topk * attn.block_size > seq:
        raise ValueError(f"attention.topk*attention.block_size={attn.topk * attn.block_size} exceeds "
                         f"{seq_key}={seq}: lower attention.topk/attention.block_size or raise {seq_key}")
    shards = stage.sp_size * stage.cp_size
    if shards > 1 and seq % (shards * 2 * attn.block_size):
        raise ValueError(f"{seq_key}={seq} must be divisible by sp_size*cp_size*2*attention.block_size="
                         f"{shards * 2 * attn.block_size}: change {seq_key}")
    if stage.rope_scaling.type == "dynamic" and shards > 1:
        raise ValueError(f"{stage.key('rope_scaling', 'model.rope_scaling')}.type=dynamic scales RoPE by the longest "
                         f"document, which a sequence shard cannot see: use yarn, linear or llama3, or {layout_keys}=1")
    msa_layers = set(range(attn.n_dense_layers, cfg.model.n_layers)) - sliding_layers(cfg.model)
    if stage.freeze_main and (attn.kind != "msa" or not msa_layers):
        raise ValueError(f"{stage.key('freeze_main', 'recipe.freeze_main_in_warmup')}: with the main weights frozen "
                         f"only an MSA index branch learns, and this model has none (attention.kind={attn.kind}, "
                         f"attention.n_dense_layers={attn.n_dense_layers}, sliding-window layers stay dense)")
    check_data(cfg.data, seq, stage.batch_size, seq_key=seq_key)


def check_parallel(cfg: TrainConfig, device_type: str) -> None:
    par = cfg.parallel
    if par.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    if par.mlp_tile_tokens < 0:
        raise ValueError(f"parallel.mlp_tile_tokens={par.mlp_tile_tokens} must be >= 0 (0: no tiling)")
    if par.checkpoint_policy not in ("full", "selective"):
        raise ValueError(f"parallel.checkpoint_policy={par.checkpoint_policy!r}: use full or selective")
    if not par.checkpoint_keep_selection and par.checkpoint_policy != "full":
        raise ValueError("parallel.checkpoint_keep_selection=false applies to parallel.checkpoint_policy=full "
                         "(selective keeps every attention result): set checkpoint_policy=full or drop the override")
    if par.checkpoint_offload and par.checkpoint_policy != "full":
        raise ValueError("parallel.checkpoint_offload=true is DeepSpeed's (parallel.checkpoint_policy=full): set "
                         "parallel.checkpoint_policy=full or parallel.checkpoint_offload=false")
    if par.checkpoint_offload and not par.activation_checkpointing:
        raise ValueError("parallel.checkpoint_offload=true needs parallel.activation_checkpointing=true")
    if par.checkpoint_offload and device_type != "cuda":
        raise ValueError("parallel.checkpoint_offload=true needs a GPU (DeepSpeed's CPU checkpointing empties the "
                         "block input when it already lives on the CPU): set parallel.checkpoint_offload=false")
    offload = (par.deepspeed.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device") in ("cpu", "nvme") and cfg.optim.name != "cpu_adam":
        raise ValueError("parallel.deepspeed offloads the optimizer: DeepSpeed then needs its CPU Adam, "
                         "set optim.name=cpu_adam")


def check_config(cfg: TrainConfig, stage: Stage, world_size: int, vocab_size: int, device_type: str = "cpu") -> None:
    """Every start-up check for one stage; the first failure raises with the keys to change."""
    check_model(cfg.model, cfg.attention)
    check_run(cfg.run)
    check_checkpoint(cfg.checkpoint, cfg.model.path)
    check_optim(cfg.optim)
    check_logging(cfg.logging)
    check_parallel(cfg, device_type)
    check_stage(cfg, stage, world_size)
    if vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} ids but model.vocab_size={cfg.model.vocab_size}: "
                         f"raise model.vocab_size to at least {vocab_size}")
    if cfg.model.vision.patch_size != cfg.data.image.patch_size:
        raise ValueError(f"model.vision.patch_size={cfg.model.vision.patch_size} differs from "
                         f"data.image.patch_size={cfg.data.image.patch_size}: set them equal")
    check_deepspeed(deepspeed_config(cfg, stage, torch.device(device_type)))
    check_train_eval(cfg.eval, stage, cfg.parallel.zero_stage, cfg.data)


__all__ = ["TrainConfig", "RunConfig", "LoggingConfig", "WandbConfig", "CheckpointConfig", "MOVED_KEYS",
           "check_moved_keys", "register_schema", "to_train_config", "check_config"]
