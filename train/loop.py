"""The training loop: set up, then step until ``train.steps``. Reads top to bottom."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from train.config import TrainConfig, check_config
from train.data import build_dataloader, build_tokenizer
from train.metrics import MetricsLogger, max_memory_gb, peak_tflops
from train.model import build_model
from train.parallel import build_engine, init_distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train(cfg: TrainConfig) -> dict:
    """Run the configured training; returns the last step's metrics."""
    env = init_distributed(cfg.parallel)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    if env.rank == 0:
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    check_config(cfg, env.world_size, tokenizer.vocab_size)
    model = build_model(cfg.model, cfg.attention)
    engine, _, scheduler = build_engine(model, cfg, env, run_dir)
    dp_world = env.world_size // (cfg.parallel.sp_size * cfg.parallel.cp_size)
    dp_rank = env.rank // (cfg.parallel.sp_size * cfg.parallel.cp_size)
    loader = build_dataloader(cfg.data, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                              dp_rank=dp_rank, dp_world=dp_world, seed=cfg.train.seed,
                              image_cfg=cfg.model.vision)
    batches = iter(loader)

    start_step = 0
    logger = MetricsLogger(cfg.logging, run_dir, env.rank, cfg.train.steps, start_step, resolved)
    peak = peak_tflops(env.device, cfg.logging.peak_tflops)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * dp_world
    bad_steps, metrics = 0, {}
    for step in range(start_step, cfg.train.steps):
        phase = "warmup" if step < cfg.attention.warmup_steps else "sparse"
        model.set_phase(phase)
        want_stats = cfg.attention.backend != "dense" and step % cfg.logging.stats_every == 0
        model.track_stats(want_stats)
        t0 = time.perf_counter()
        lm_sum = kl_sum = 0.0
        n_tokens = 0
        finite = True
        for _ in range(cfg.train.grad_accum):
            out = engine(to_device(next(batches), env.device))
            lm = out["lm_sum"] / out["n_tokens"].clamp_min(1)
            loss = lm + cfg.attention.kl_weight * out["kl"]
            finite = finite and bool(torch.isfinite(loss))
            engine.backward(loss if finite else loss.detach().nan_to_num(0.0).requires_grad_())
            engine.step()
            lm_sum += out["lm_sum"].item()
            n_tokens += int(out["n_tokens"])
            kl_sum += out["kl"].item()
        if not finite:
            bad_steps += 1
            logger.message(f"step {step}: non-finite loss, update skipped ({bad_steps}/{cfg.train.max_bad_steps})")
            if bad_steps >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{bad_steps} non-finite losses: stopping (train.max_bad_steps)")
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        tokens_per_s = tokens_per_step / step_s
        if step % cfg.logging.every == 0 or step == cfg.train.steps - 1:
            metrics = {
                "loss/lm": lm_sum / max(n_tokens, 1),
                "loss/kl": kl_sum / cfg.train.grad_accum,
                "msa/index_recall": _mean_stat(model, "index_recall") if want_stats else None,
                "msa/sparsity": _mean_stat(model, "sparsity") if want_stats else None,
                "perf/tokens_per_s": tokens_per_s,
                "perf/step_s": step_s,
                "perf/mfu": (model.flops_per_token(cfg.data.seq_len, phase == "sparse") * tokens_per_s
                             / env.world_size / (peak * 1e12)) if peak else None,
                "mem/max_allocated_gb": max_memory_gb(env.device),
                "train/lr": scheduler.get_last_lr()[0],
                "train/seq_len": cfg.data.seq_len,
                "train/phase_sparse": int(phase == "sparse"),
                "train/bad_steps": bad_steps,
                "data/skipped": sum(loader.skipped.values()),
            }
            logger.log(step, metrics)
    logger.close()
    return metrics


def _mean_stat(model, key: str) -> float | None:
    values = [core.stats[key] for core in model.msa_cores() if key in core.stats]
    return float(np.mean(values)) if values else None


__all__ = ["train", "seed_everything", "to_device"]
