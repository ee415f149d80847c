"""The training loop: set up, resume if there is a checkpoint, then step through the recipe's stages
until ``train.steps``. Reads top to bottom."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from train.checkpoint import StopSignal, any_rank, find_resume, load_checkpoint, read_meta, save_checkpoint
from train.config import TrainConfig, check_config
from train.data import build_dataloader, build_tokenizer
from train.metrics import LayerStats, MetricsLogger, max_memory_gb, peak_tflops
from train.model import build_model
from train.parallel import build_engine, init_distributed, shard_batch, shard_sum
from train.recipe import Stage, build_recipe, describe, stage_at, stage_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train(cfg: TrainConfig) -> dict:
    """Run the configured recipe; returns the last logged metrics."""
    env = init_distributed(cfg.parallel)
    run_dir = Path(cfg.run_dir)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    stages = build_recipe(cfg)
    for s in stages:  # every stage must be able to run: fail now, not hours in
        check_config(stage_config(cfg, s), env.world_size, tokenizer.vocab_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    if env.rank == 0:
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")

    resume = find_resume(run_dir, cfg.checkpoint.resume)
    saved = read_meta(resume) if resume else {"step": 0}
    start_step = saved["step"]
    stage = stage_at(stages, start_step)
    scfg = stage_config(cfg, stage)
    seed_everything(cfg.train.seed)
    model = build_model(scfg.model, scfg.attention)
    engine, _, scheduler = build_engine(model, scfg, env, run_dir)
    loader = build_stage_loader(cfg, stage, tokenizer, env)
    bad_steps = 0
    if resume:
        # a new sp/cp layout keeps the optimizer state too: ZeRO partitions it over every rank that holds
        # the parameters, which is all of them whatever sp/cp is (tests/test_parallel.py checks ZeRO-1 and 3)
        state = load_checkpoint(engine, resume, rank=env.rank, world_size=env.world_size)
        if state["data_epoch"] == stage.data_epoch:  # else a new sp/cp layout starts a new stream
            loader.load_state_dict(state["loader"])
        bad_steps = state["bad_steps"]
    batches = iter(loader)

    logger = MetricsLogger(cfg.logging, run_dir, env.rank, cfg.train.steps, start_step, resolved)
    logger.message(describe(stages, cfg.train.steps) + (f"\nresumed from {resume}" if resume else ""))
    if start_step >= cfg.train.steps:
        logger.message(f"nothing to do: the checkpoint is at step {start_step}, train.steps={cfg.train.steps}")
    layer_stats = LayerStats(model)
    stop = StopSignal()
    peak = peak_tflops(env.device, cfg.logging.peak_tflops)

    def save(done: int) -> None:
        save_checkpoint(engine, run_dir, done, rank=env.rank, world_size=env.world_size,
                        keep_last=cfg.checkpoint.keep_last, loader_state=loader.state_dict(),
                        meta={"stage": stage.index, "data_epoch": stage.data_epoch, "bad_steps": bad_steps,
                              "layout": list(stage.layout())})

    metrics = {}
    try:
        for step in range(start_step, cfg.train.steps):
            upcoming = stage_at(stages, step)
            if upcoming is not stage:
                if upcoming.layout() != stage.layout():  # new process groups: a relaunch builds them
                    save(step)
                    logger.message(f"step {step}: stage {upcoming.name} runs with parallel.sp_size="
                                   f"{upcoming.sp_size}, parallel.cp_size={upcoming.cp_size}; checkpoint "
                                   f"saved, relaunch the same command to continue")
                    break
                if upcoming.seq_len != stage.seq_len or upcoming.batch_size != stage.batch_size:
                    position = loader.state_dict()  # the new shape continues the same document stream
                    loader.close()
                    loader = build_stage_loader(cfg, upcoming, tokenizer, env)
                    loader.load_state_dict(position)
                    batches = iter(loader)
                stage = upcoming
                logger.message(f"step {step}: stage {stage.index} ({stage.name}), {stage.phase}, "
                               f"seq_len={stage.seq_len}")
            model.rope_base = stage.rope_base
            model.set_phase(stage.phase)
            logged = step % cfg.logging.every == 0 or step == cfg.train.steps - 1
            want_stats = logged and cfg.attention.backend != "dense" and step % cfg.logging.stats_every == 0
            model.track_stats(want_stats)
            lr = scheduler.get_last_lr()[0]  # the rate this step trains with (engine.step advances it)

            t0 = time.perf_counter()
            out = train_step(engine, model, batches, cfg, stage, env, layer_stats)
            if out["bad"]:
                bad_steps += 1
                logger.message(f"step {step}: non-finite loss, update skipped "
                               f"({bad_steps}/{cfg.train.max_bad_steps} train.max_bad_steps)")
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t0

            if logged or out["bad"]:
                dp_world = env.world_size // (stage.sp_size * stage.cp_size)
                tokens_per_s = stage.batch_size * stage.seq_len * cfg.train.grad_accum * dp_world / step_s
                metrics = {
                    "loss/lm": out["lm"],
                    "loss/kl": out["kl"],
                    "msa/index_recall": _mean_stat(model, "index_recall", env) if want_stats else None,
                    "msa/sparsity": _mean_stat(model, "sparsity", env) if want_stats else None,
                    "perf/tokens_per_s": tokens_per_s,
                    "perf/step_s": step_s,
                    "perf/mfu": (model.flops_per_token(stage.seq_len, stage.phase == "sparse") * tokens_per_s
                                 / env.world_size / (peak * 1e12)) if peak else None,
                    "mem/max_allocated_gb": max_memory_gb(env.device),
                    "train/lr": lr,
                    "train/seq_len": stage.seq_len,
                    "train/stage": stage.index,
                    "train/phase_sparse": int(stage.phase == "sparse"),
                    "train/bad_steps": bad_steps,
                    "data/skipped": sum(loader.skipped.values()),
                    **{f"data/skipped/{reason}": n for reason, n in loader.skipped.items()},
                    **layer_stats.metrics(want_stats, env.mesh),
                }
                logger.log(step, metrics)
            if bad_steps >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{bad_steps} steps with a non-finite loss: stopping (raise "
                                   f"train.max_bad_steps to tolerate more)")

            done = step + 1
            stopping = any_rank(stop.received is not None)
            if stopping or done == cfg.train.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                save(done)
            if stopping:
                logger.message(f"{stop.received or 'stop signal on another rank'}: saved a checkpoint after "
                               f"step {step}; run the same command to resume")
                break
    finally:
        stop.restore()
        layer_stats.close()
        logger.close()
    return metrics


def build_stage_loader(cfg: TrainConfig, stage: Stage, tokenizer, env):
    """The data of one data-parallel rank for ``stage``. Stages of one sp/cp layout continue one
    document stream (same seed); a new layout splits the data anew, with a new seed."""
    group = stage.sp_size * stage.cp_size
    return build_dataloader(cfg.data, tokenizer, seq_len=stage.seq_len, batch_size=stage.batch_size,
                            dp_rank=env.rank // group, dp_world=env.world_size // group,
                            seed=cfg.train.seed + stage.data_epoch, image_cfg=cfg.model.vision)


def train_step(engine, model, batches, cfg: TrainConfig, stage: Stage, env, layer_stats) -> dict:
    """One optimizer step over ``train.grad_accum`` micro-batches. A non-finite loss on any rank skips
    the update on every rank: that micro-batch's backward is a zero loss (no NaN reaches the gradients)
    and the step runs with learning rate 0, so the weights stay as they were."""
    lm_sum = kl_sum = 0.0
    n_tokens, bad = 0, False
    for micro in range(cfg.train.grad_accum):
        layer_stats.start()
        out = engine(shard_batch(to_device(next(batches), env.device), env.mesh))
        layer_stats.stop()
        # with sequence/context shards each rank's loss is its share: LM over the whole sequence's
        # target count, KL as the cores scale it; DeepSpeed sums the shares' gradients
        n_targets = shard_sum(out["n_tokens"], env.mesh)
        lm = out["lm_sum"] / n_targets.clamp_min(1)
        loss = lm + stage.kl_weight * out["kl"]
        finite = bool(torch.isfinite(loss))
        bad = bad or not finite
        engine.backward(loss if finite else sum(p.sum() for p in model.parameters()) * 0.0)
        if micro == cfg.train.grad_accum - 1 and any_rank(bad):
            bad = True
            with zero_lr(engine.optimizer):
                engine.step()
        else:
            engine.step()
        lm_sum += shard_sum(out["lm_sum"], env.mesh).item()
        n_tokens += int(n_targets)
        kl_sum += shard_sum(out["kl"], env.mesh).item()
    return {"lm": lm_sum / max(n_tokens, 1), "kl": kl_sum / cfg.train.grad_accum, "bad": bad}


@contextmanager
def zero_lr(optimizer):
    """Learning rate 0 for one step; the scheduler (or, if it did not step, this) sets it back."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            if g["lr"] == 0.0:
                g["lr"] = lr


def _mean_stat(model, key: str, env) -> float | None:
    """Mean over the MSA layers and over the ranks of a sequence (each holds an equal share: its GQA
    groups under SP, its zig-zag chunks under CP). Called on every rank alike: it is a collective."""
    values = [core.stats[key] for core in model.msa_cores() if key in core.stats]
    if not values:
        return None
    shards = env.mesh.shards if env.mesh is not None else 1
    return float(shard_sum(torch.tensor(float(np.mean(values)), device=env.device), env.mesh)) / shards


__all__ = ["train", "train_step", "seed_everything", "to_device", "build_stage_loader"]
