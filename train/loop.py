"""The training loop: set up, resume if there is a checkpoint, then step through the recipe's stages
until ``run.steps``. ``train`` reads top to bottom; each helper below it does one thing."""

from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from msa.host import remember_bounds
from train import metrics as M
from train.checkpoint import (
    StopSignal,
    any_rank,
    check_resume_config,
    find_resume,
    load_checkpoint,
    load_run_weights,
    read_meta,
    save_checkpoint,
)
from train.config import TrainConfig, check_config
from train.data import build_dataloader, build_tokenizer
from train.eval.config import eval_due, fit_default_tasks
from train.model import build_model
from train.oom import device_memory, oom_message
from train.optim import INDEX_PREFIX
from train.parallel import (
    DistEnv,
    Mesh,
    build_engine,
    build_mesh,
    deepspeed_config,
    init_distributed,
    kv_replicas,
    parallelize,
    shard_batch,
    shard_sum,
    write_deepspeed_json,
)
from train.recipe import Stage, build_recipe, describe, stage_at


@dataclass
class Run:
    """What the loop holds between steps."""

    cfg: TrainConfig
    env: DistEnv
    stages: list[Stage]
    stage: Stage
    model: torch.nn.Module
    mesh: Mesh
    engine: object
    scheduler: object
    loader: object
    batches: object
    tokenizer: object
    bad_steps: int = 0
    init_note: str = ""  # where the weights came from, when checkpoint.init_from gave them


def train(cfg: TrainConfig) -> dict:
    """Run the configured recipe; returns the last logged metrics."""
    env = init_distributed(cfg.parallel)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    cfg = from_pretrained(cfg, tokenizer.vocab_size, env.rank)
    stages = build_recipe(cfg)
    # evals with the default task list on a short run: leave out the tasks that cannot fit (said below)
    eval_left_out = fit_default_tasks(cfg.eval, min(s.seq_len for s in stages), tokenizer,
                                      cfg.data.image) if cfg.eval.every else None
    for stage in stages:  # every stage must be able to run: fail now, not hours in
        check_config(cfg, stage, env.world_size, tokenizer.vocab_size, env.device.type)
    resolved, resume, saved = open_run_dir(cfg, env)
    run = start(cfg, env, stages, stage_at(stages, saved["step"]), tokenizer, resuming=resume is not None)
    if resume:
        restore(run, resume)
    logger = M.MetricsLogger(cfg.logging, Path(cfg.run_dir), env.rank, cfg.run.steps, saved["step"], resolved)
    logger.message(describe(stages, cfg.run.steps) + (f"\nresumed from {resume}" if resume else "")
                   + (f"\n{run.init_note}" if run.init_note else ""))
    peak, note = M.peak_tflops(env.device, cfg.logging.peak_tflops)
    logger.message(note)
    if eval_left_out:
        logger.message(eval_left_out)
    if saved["step"] >= cfg.run.steps:
        logger.message(f"nothing to do: the checkpoint is at step {saved['step']}, run.steps={cfg.run.steps}")
    stop, metrics = StopSignal(), {}
    try:
        for step in range(saved["step"], cfg.run.steps):
            if not enter_stage(run, stage_at(stages, step), step, logger, resolved):
                break
            evals = eval_due(cfg.eval.every, step, cfg.run.steps)
            logged = step % cfg.logging.every == 0 or step == cfg.run.steps - 1 or evals
            stats_queries = cfg.logging.recall_queries if logged and step % cfg.logging.stats_every == 0 else 0
            lr = run.scheduler.get_last_lr()  # per group: what this step trains with (engine.step advances it)
            t0 = time.perf_counter()
            try:
                out = train_step(run, stats_queries, with_grad_norms=logged, step=step)
            except torch.cuda.OutOfMemoryError as e:  # say what the row held and what would fit it
                n_params = sum(p.numel() for p in run.model.parameters())
                raise torch.cuda.OutOfMemoryError(oom_message(cfg, run.stage, env.world_size, n_params, e, step,
                                                              device_memory(env.device))) from e
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t0
            if out["bad"]:
                run.bad_steps += 1
                logger.message(f"step {step}: non-finite loss, update skipped "
                               f"({run.bad_steps}/{cfg.run.max_bad_steps} run.max_bad_steps)")
            if logged or out["bad"]:
                metrics = step_metrics(run, out, step_s, lr, peak) | (run_evals(run, step, logger) if evals else {})
                logger.log(step, metrics)
            if run.bad_steps >= cfg.run.max_bad_steps:
                raise RuntimeError(f"{run.bad_steps} steps with a non-finite loss: stopping (raise "
                                   f"run.max_bad_steps to tolerate more)")
            if maybe_save(run, step + 1, stop, logger, resolved):
                break
    finally:
        stop.restore()
        close(run)
        logger.close()
    return metrics


def close(run: Run) -> None:
    """Release what ``run`` holds: the loader's worker processes (now rather than at garbage collection)
    and the DeepSpeed engine. Without ``engine.destroy()`` the engine outlives every reference to it
    (DeepSpeed 0.19.8; its hooks keep it reachable), and with it the model, gradients and optimizer state:
    a second run in the same process (a Hydra multirun, a notebook, a benchmark of several points) would
    hold both (`tests/test_checkpoint_resume.py::test_train_releases_its_engine`)."""
    if run.loader is not None:
        run.loader.close()
    destroy = getattr(run.engine, "destroy", None)
    if destroy is not None:
        try:
            destroy()
        except Exception as e:  # noqa: BLE001  (in a `finally`: never hide the error that ended the run)
            warnings.warn(f"releasing the DeepSpeed engine failed ({type(e).__name__}: {e}); its memory stays "
                          "allocated until the process exits", RuntimeWarning, stacklevel=2)


def open_run_dir(cfg: TrainConfig, env: DistEnv) -> tuple[dict, Path | None, dict]:
    """The resolved config, the checkpoint to resume from (if any) and its meta. A checkpoint of another
    configuration is refused before ``config.yaml`` is written over."""
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    resume = find_resume(cfg.run_dir, cfg.checkpoint.resume)
    saved = read_meta(resume) if resume else {"step": 0}
    if resume:
        check_resume_config(saved.get("config"), resolved, resume)
    if env.rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), Path(cfg.run_dir) / "config.yaml")
    return resolved, resume, saved


def from_pretrained(cfg: TrainConfig, vocab_size: int, rank: int) -> TrainConfig:
    """With ``model.path`` (a Hugging Face checkpoint) its config.json sets the decoder's options
    (``train/hf.py``), and its config and tokenizer files go to ``run_dir/hf_source`` so an export
    needs only the run directory."""
    if not cfg.model.path:
        return cfg
    from train.hf import copy_source_files, resolve_model_config

    cfg = replace(cfg, model=resolve_model_config(cfg.model, vocab_size))
    if rank == 0:
        copy_source_files(cfg.model.path, Path(cfg.run_dir) / "hf_source")
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(cfg: TrainConfig, env: DistEnv, stages: list[Stage], stage: Stage, tokenizer, batches=None,
          resuming: bool = False) -> Run:
    """Model, mesh, engine and loader for the stage the run starts (or resumes) in. Given ``batches``
    (an iterator of global batches, e.g. a benchmark's synthetic ones) it builds no loader."""
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, cfg.attention)
    if cfg.model.path:  # the checkpoint's weights; what it lacks (index branch, vision) keep their fresh init
        from train.hf import load_weights

        load_weights(model, cfg.model.path)
    note = ""
    if cfg.checkpoint.init_from and not resuming:  # a resumed run's own checkpoint has the weights
        source, kept = load_run_weights(model, cfg.checkpoint.init_from)
        note = (f"weights from {source} (step {read_meta(source)['step']})"
                + (f"; {len(kept)} parameters the source lacks keep their init ({kept[0]}, ...)" if kept else ""))
    model.set_rope(stage.rope_base, stage.rope_scaling)
    mesh = build_mesh(stage.sp_size, stage.cp_size, env, kv_replicas(stage.sp_size, cfg.model.n_kv_heads))
    parallelize(model, mesh, cfg.parallel)
    engine, scheduler = build_engine(model, cfg, stage, mesh, env)
    # after the engine: its optimizer and gradient hooks cover every weight, so a later stage unfreezes
    # the main weights without a new engine
    model.train_main(not stage.freeze_main)
    if batches is not None:
        return Run(cfg, env, stages, stage, model, mesh, engine, scheduler, None, batches, tokenizer, init_note=note)
    if env.rank == 0:
        write_deepspeed_json(deepspeed_config(cfg, stage, env.device), cfg.run_dir)
    loader = build_stage_loader(cfg, stage, tokenizer, env)
    return Run(cfg, env, stages, stage, model, mesh, engine, scheduler, loader, iter(loader), tokenizer,
               init_note=note)


def restore(run: Run, path: Path) -> None:
    """Weights, optimizer, schedule, RNG and (within one data stream) the loader position."""
    state = load_checkpoint(run.engine, path, rank=run.env.rank, world_size=run.env.world_size)
    if state["data_epoch"] == run.stage.data_epoch:  # else a new sp/cp layout starts a new stream
        run.loader.load_state_dict(state["loader"])
        run.batches = iter(run.loader)
    run.bad_steps = state["bad_steps"]


def build_stage_loader(cfg: TrainConfig, stage: Stage, tokenizer, env: DistEnv):
    """The data of one data-parallel rank for ``stage``. Stages of one sp/cp layout continue one
    document stream (same seed); a new layout splits the data anew, with a new seed."""
    group = stage.sp_size * stage.cp_size
    return build_dataloader(cfg.data, tokenizer, seq_len=stage.seq_len, batch_size=stage.batch_size,
                            dp_rank=env.rank // group, dp_world=env.world_size // group,
                            seed=cfg.run.seed + stage.data_epoch, weights=stage.data_weights or None)


def enter_stage(run: Run, upcoming: Stage, step: int, logger, resolved: dict) -> bool:
    """Move to ``upcoming`` if it is a new stage. A new sp/cp layout needs new process groups: save and
    return False (the relaunched command continues there). A new sequence length or batch continues
    the same document stream in the new shape, and new data weights the same sources in new shares."""
    old = run.stage
    if upcoming is old:
        return True
    if upcoming.layout() != old.layout():
        save(run, step, resolved)
        logger.message(f"step {step}: stage {upcoming.name} runs with sp_size={upcoming.sp_size}, cp_size="
                       f"{upcoming.cp_size}; checkpoint saved, relaunch the same command to continue")
        return False
    if (upcoming.seq_len, upcoming.batch_size, upcoming.data_weights) != (old.seq_len, old.batch_size,
                                                                          old.data_weights):
        position = run.loader.state_dict()
        run.loader.close()
        run.loader = build_stage_loader(run.cfg, upcoming, run.tokenizer, run.env)
        run.loader.load_state_dict(position)
        run.batches = iter(run.loader)
        if run.env.rank == 0:
            write_deepspeed_json(deepspeed_config(run.cfg, upcoming, run.env.device), run.cfg.run_dir)
    run.model.set_rope(upcoming.rope_base, upcoming.rope_scaling)
    run.model.train_main(not upcoming.freeze_main)
    run.stage = upcoming
    logger.message(f"step {step}: stage {upcoming.index} ({upcoming.name}), {upcoming.phase}, "
                   f"seq_len={upcoming.seq_len}")
    return True


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(run: Run, stats_queries: int = 0, with_grad_norms: bool = False, step: int | None = None) -> dict:
    """One optimizer step over ``optim.grad_accum`` micro-batches. A non-finite loss on any rank skips
    the update on every rank: that micro-batch's backward is a zero loss (no NaN reaches the gradients)
    and the step runs with learning rate 0, so the weights stay as they were. In a stage with frozen main
    weights they take no gradients (``Decoder.train_main``, set when the stage starts): the main path runs
    forward only, only the KL is back-propagated (the LM loss never reaches the index branch) and only the
    index branch's groups step (the others at learning rate 0). ``step``: the step's number, which picks the
    queries of a strided index KL (``attention.kl_query_stride``; None leaves them as they were)."""
    engine, mesh, stage, accum = run.engine, run.mesh, run.stage, run.cfg.optim.grad_accum
    if step is not None:
        run.model.set_kl_offset(step)
    lm_sum = kl_sum = 0.0
    n_tokens, bad, lengths, layer_kl, stats = 0, False, [], 0.0, None
    group_sum = group_n = None  # with several data sources: the LM sum and target count of each loss group
    for micro in range(accum):
        host = next(run.batches)
        lengths.append(M.doc_lengths(host))
        batch = to_device(host, run.env.device)
        if torch.is_tensor(host.get("cu_seqlens")) and host["cu_seqlens"].device.type == "cpu":
            # the layers need the document bounds on the host: from the host batch, not read back from the GPU
            remember_bounds(batch["cu_seqlens"], host["cu_seqlens"].tolist())
        out = engine(shard_batch(batch, mesh), phase=stage.phase, stats_queries=stats_queries)
        # with sequence/context shards each rank's loss is its share: LM over the whole sequence's
        # target count, KL as the cores scale it; DeepSpeed sums the shares' gradients
        n_targets = shard_sum(out["n_tokens"], mesh)
        lm = out["lm_sum"] / n_targets.clamp_min(1)
        loss = (lm.detach() if stage.freeze_main else lm) + stage.kl_weight * out["kl"]
        finite = bool(torch.isfinite(loss))
        bad = bad or not finite
        engine.backward(loss if finite else sum(p.sum() for p in run.model.parameters()) * 0.0)
        deferred = run.model.take_backward_kl()  # attention.kl_in_backward: the KL's value comes now
        if deferred is not None:
            out["layer_kl"] = out["layer_kl"] + deferred
            out["kl"] = out["kl"].detach() + deferred.sum()
            # its gradients were zeroed where it was not finite (sparse_attention_kl); skip the step as for
            # a non-finite forward loss
            bad = bad or not bool(torch.isfinite(out["kl"]))
        last = micro == accum - 1
        norms = grad_norms(run) if last and with_grad_norms else {}
        if last and any_rank(bad):
            bad = True
            with zero_lr(engine.optimizer):
                engine.step()
        else:
            with zero_lr(engine.optimizer, frozen_groups(engine.optimizer, stage)):
                engine.step()
        lm_sum += shard_sum(out["lm_sum"], mesh).item()
        n_tokens += int(n_targets)
        kl_sum += shard_sum(out["kl"], mesh).item()
        layer_kl = layer_kl + out["layer_kl"]
        if "group_lm_sum" in out:
            sums, counts = shard_sum(out["group_lm_sum"], mesh), shard_sum(out["group_n_tokens"], mesh)
            group_sum, group_n = (sums, counts) if group_sum is None else (group_sum + sums, group_n + counts)
        if stats_queries:
            stats = out["layer_stats"] if stats is None else [a + b for a, b in zip(stats, out["layer_stats"])]
    if with_grad_norms:
        norms[M.GRAD_NORM] = _float(engine.get_global_grad_norm())
    groups = None if group_sum is None else (group_sum.tolist(), group_n.tolist())
    return {"lm": lm_sum / max(n_tokens, 1), "kl": kl_sum / accum, "bad": bad, "lengths": lengths,
            "layer_kl": layer_kl, "layer_stats": stats, "norms": norms, "groups": groups}


def source_losses(names: list[str], groups: tuple[list, list] | None) -> dict:
    """``loss/lm/<name>`` of each source whose targets the step held (groups s and S + s of the loader's
    ``loss_groups``) and ``loss/answer/<name>`` where they include answer tokens of synthetic items."""
    if groups is None:
        return {}
    (sums, counts), S, out = groups, len(names), {}
    for s, name in enumerate(names):
        if counts[s] + counts[S + s]:
            out[M.LOSS_LM_SOURCE_PREFIX + name] = (sums[s] + sums[S + s]) / (counts[s] + counts[S + s])
        if counts[S + s]:
            out[M.LOSS_ANSWER_PREFIX + name] = sums[S + s] / counts[S + s]
    return out


def grad_norms(run: Run) -> dict:
    """The index branch's gradient norm, read after backward and before the step (a collective under
    ZeRO-3: every rank calls it alike)."""
    from deepspeed.utils import safe_get_full_grad

    squares = [safe_get_full_grad(p).float().pow(2).sum() for b in run.model.blocks()
               if hasattr(b.attn, "index_params") for p in b.attn.index_params()]
    return {M.GRAD_NORM_INDEX: float(torch.stack(squares).sum().sqrt()) if squares else None}


def _float(x) -> float | None:
    return None if x is None else float(x)


def frozen_groups(optimizer, stage: Stage) -> list[int]:
    """The parameter groups a stage with frozen main weights does not train: all but the index branch's."""
    if not stage.freeze_main:
        return []
    return [i for i, g in enumerate(optimizer.param_groups) if not g.get("name", "").startswith(INDEX_PREFIX)]


@contextmanager
def zero_lr(optimizer, groups: list[int] | None = None):
    """Learning rate 0 for one step (for ``groups``, default all; with AdamW that also stops the decay);
    the scheduler (or, if it did not step, this) sets it back."""
    chosen = [g for i, g in enumerate(optimizer.param_groups) if groups is None or i in groups]
    saved = [g["lr"] for g in chosen]
    for g in chosen:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(chosen, saved):
            if g["lr"] == 0.0:
                g["lr"] = lr


def step_metrics(run: Run, out: dict, step_s: float, lr: list[float], peak: float | None) -> dict:
    """The logged numbers of one step (a collective where the mesh or the world must be summed)."""
    cfg, stage, env = run.cfg, run.stage, run.env
    dp_world = env.world_size // (stage.sp_size * stage.cp_size)
    flops = {"model": 0.0, "attn": 0.0, "index": 0.0}
    for lengths in out["lengths"]:
        for key, value in M.step_flops(cfg.model, cfg.attention, run.model.num_params(), lengths,
                                       stage.phase).items():
            flops[key] += value / run.mesh.shards  # the ranks of a sequence share its work
    if env.world_size > 1:
        total = torch.tensor(list(flops.values()), dtype=torch.float64,
                             device=env.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
        flops = dict(zip(flops, total.tolist()))
    groups = run.engine.optimizer.param_groups
    frozen = frozen_groups(run.engine.optimizer, stage)
    lr = [0.0 if i in frozen else v for i, v in enumerate(lr)]
    return {
        M.LOSS_LM: out["lm"], M.LOSS_KL: out["kl"],
        **source_losses([name for name, _, _ in run.loader.sources], out["groups"]),
        M.TOKENS_PER_S: stage.batch_size * stage.seq_len * cfg.optim.grad_accum * dp_world / step_s,
        M.STEP_S: step_s,
        M.MFU: flops["model"] / step_s / env.world_size / (peak * 1e12) if peak else None,
        M.ATTN_TFLOPS: flops["attn"] / step_s / env.world_size / 1e12,
        M.INDEX_TFLOPS: flops["index"] / step_s / env.world_size / 1e12,
        M.MAX_MEMORY: M.max_memory_gb(env.device),
        M.LR: lr[0], **{M.LR_GROUP_PREFIX + g.get("name", str(i)): v for i, (g, v) in enumerate(zip(groups, lr))},
        M.SEQ_LEN: stage.seq_len, M.STAGE: stage.index, M.PHASE_SPARSE: int(stage.phase == "sparse"),
        M.BAD_STEPS: run.bad_steps, **out["norms"],
        M.SKIPPED: sum(run.loader.skipped.values()),
        **{f"{M.SKIPPED}/{reason}": n for reason, n in run.loader.skipped.items()},
        **M.layer_metrics(run.model.msa_layers(), out["layer_kl"], cfg.optim.grad_accum, out["layer_stats"],
                          run.mesh),
    }


def run_evals(run: Run, step: int, logger) -> dict:
    """The evals after optimizer step ``step`` (``eval.*``): every rank runs them alike (no rank waits at a
    collective meanwhile); rank 0 writes ``run_dir/eval/step_<N>`` and logs the plots and tables to W&B.
    Returns the ``eval/...`` metrics."""
    from train.eval.report import write_report
    from train.eval.runner import evaluate, flatten

    cfg, done = run.cfg, step + 1
    results = evaluate(run.model, run.tokenizer, cfg.eval, train_len=run.stage.seq_len, phase=run.stage.phase,
                       image_cfg=cfg.data.image, heldout_every=cfg.data.corpus.heldout_every, step=done)
    if run.env.rank == 0:
        logger.log_media(step, *write_report(results, Path(cfg.run_dir) / "eval" / f"step_{done:08d}"))
        logger.message(f"step {step}: evals in {results['seconds']:.1f} s, written to eval/step_{done:08d}")
    return flatten(results)


def save(run: Run, done: int, resolved: dict) -> None:
    cfg, stage = run.cfg, run.stage
    save_checkpoint(run.engine, cfg.run_dir, done, rank=run.env.rank, world_size=run.env.world_size,
                    keep_last=cfg.checkpoint.keep_last, loader_state=run.loader.state_dict(),
                    meta={"stage": stage.index, "data_epoch": stage.data_epoch, "bad_steps": run.bad_steps,
                          "layout": list(stage.layout()), "config": resolved})


def maybe_save(run: Run, done: int, stop: StopSignal, logger, resolved: dict) -> bool:
    """Save at ``checkpoint.every``, at the end and on a stop signal; True when the run must stop."""
    every = run.cfg.checkpoint.every
    stopping = any_rank(stop.received is not None)
    if stopping or done == run.cfg.run.steps or (every and done % every == 0):
        save(run, done, resolved)
    if stopping:
        logger.message(f"{stop.received or 'stop signal on another rank'}: saved a checkpoint after "
                       f"step {done - 1}; run the same command to resume")
    return stopping


__all__ = ["train", "train_step", "seed_everything", "to_device", "build_stage_loader", "Run", "start"]
