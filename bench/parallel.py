"""Sequence/context parallel training throughput: tokens/s, peak memory per GPU and the share of
step time in communication, for one layout (``--sp``, ``--cp``) at several sequence lengths.

Each measurement is a real training step of the DeepSpeed engine (``train.loop.train_step``: sharded
batch, forward, backward, optimizer step) on a synthetic packed batch (documents of random length,
the same on every rank), sparse MSA phase. Launch one process per GPU:

    torchrun --nproc-per-node 2 -m bench.parallel --sp 2 --seq-lens 32768 131072 524288 --out x.json
    python -m bench.parallel --sp 1 ...   # one GPU

Numbers: ``tokens_per_s`` = sequence tokens per step (one sequence per data-parallel replica) over
the median step time of ``--steps`` steps after one warm-up step; ``peak_gb`` = the largest
``torch.cuda.max_memory_allocated`` over the ranks during the timed steps; ``comm_share`` = time of
the NCCL kernels (all-to-all, all-gather, reduce-scatter, gradient reduction) in one profiled step
over that step's time, on rank 0; NCCL kernels run on their own streams, so part of it may overlap
compute (an upper bound on exposed communication). ``loss`` is the first step's loss: it must agree
across layouts at a length (bf16). Every override after ``--`` goes to the Hydra config.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.meta import compose, git_commit
from bench.timing import sync
from train.config import check_config
from train.loop import close, start, train_step
from train.parallel import init_distributed
from train.recipe import build_recipe


def synthetic_batch(seq_len: int, vocab: int, seed: int, device) -> dict:
    """One packed row of documents of random length (mean ~seq_len/8, some short), same on every rank."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], seq_len
    while left > 0:
        n = int(torch.randint(1, max(2, seq_len // 4), (1,), generator=g))
        lengths.append(min(n, left))
        left -= lengths[-1]
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    labels[0, cu[1:] - 1] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu.to(torch.int32)}
    return {k: v.to(device) for k, v in batch.items()}


def nccl_seconds(fn) -> tuple[float, float]:
    """(NCCL kernel seconds, wall seconds) of one call of ``fn``, from the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    comm = sum(e.self_device_time_total for e in prof.key_averages() if "nccl" in e.key.lower()) / 1e6
    return comm, wall


def measure(cfg, env, seq_len: int, steps: int) -> dict:
    gc.collect()  # what the previous length left
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0  # from an earlier length: 0 expected
    stage = build_recipe(cfg)[-1]  # the sparse phase
    torch.manual_seed(cfg.run.seed)  # the same weights in every layout
    batch = synthetic_batch(seq_len, cfg.model.vocab_size, seed=seq_len, device=env.device)
    run = start(cfg, env, [stage], stage, None, batches=itertools.repeat(batch))
    try:
        def step():
            return train_step(run)

        first = step()  # warm-up: Triton compiles, allocator grows
        sync(env.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync(env.device)
            times.append(time.perf_counter() - t0)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=env.device)
        comm, wall = nccl_seconds(step) if env.world_size > 1 and cuda else (0.0, 0.0)
        if env.world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        step_s = statistics.median(times)
        dp = env.world_size // (cfg.parallel.sp_size * cfg.parallel.cp_size)
        tokens_per_s = seq_len * dp / step_s
        return {"seq_len": seq_len, "sp": cfg.parallel.sp_size, "cp": cfg.parallel.cp_size, "gpus": env.world_size,
                "step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
                "tokens_per_s": round(tokens_per_s), "tokens_per_s_per_gpu": round(tokens_per_s / env.world_size),
                "peak_gb": round(float(peak), 2), "leftover_gb": round(leftover, 2),
                "comm_share": round(comm / wall, 3) if wall else 0.0,
                "loss": round(first["lm"] + stage.kl_weight * first["kl"], 5)}
    finally:
        close(run)  # the engine: without it the next length would carry its memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 524288])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", default="small")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines, one per length, appended as measured")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=small")
    args = ap.parse_args()
    results = []
    env = None
    for seq_len in args.seq_lens:
        cfg = compose([f"model={args.model}", "logging.wandb.mode=disabled", "data.batch_size=1",
                       "recipe.warmup_steps=0", f"data.seq_len={seq_len}", f"parallel.sp_size={args.sp}",
                       f"parallel.cp_size={args.cp}",
                       *args.overrides])
        env = env or init_distributed(cfg.parallel)
        for stage in build_recipe(cfg):
            check_config(cfg, stage, env.world_size, cfg.model.vocab_size, env.device.type)
        try:
            row = measure(cfg, env, seq_len, args.steps)
        except torch.cuda.OutOfMemoryError as e:  # a fact worth recording; the larger lengths would fail too
            row = {"seq_len": seq_len, "sp": args.sp, "cp": args.cp, "gpus": env.world_size,
                   "error": f"OOM: {str(e).splitlines()[0]}"}
        results.append(row)
        if env.rank == 0:
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    gpu = torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu"
                    f.write(json.dumps({**row, "gpu": gpu, "torch": torch.__version__,
                                        "host": os.uname().nodename, "commit": git_commit(),
                                        "overrides": args.overrides}) + "\n")
        if "error" in row:
            break
    if env is not None and env.rank == 0:
        print(f"{'seq_len':>8} {'sp':>3} {'cp':>3} {'gpus':>4} {'step_s':>8} {'tok/s':>9} {'tok/s/gpu':>9} "
              f"{'peak_GB':>8} {'comm':>5} {'loss':>8}")
        for r in results:
            if "error" in r:
                print(f"{r['seq_len']:>8} {r['sp']:>3} {r['cp']:>3} {r['gpus']:>4}  {r['error'][:60]}")
                continue
            print(f"{r['seq_len']:>8} {r['sp']:>3} {r['cp']:>3} {r['gpus']:>4} {r['step_s']:>8.3f} "
                  f"{r['tokens_per_s']:>9} {r['tokens_per_s_per_gpu']:>9} {r['peak_gb']:>8.2f} "
                  f"{r['comm_share']:>5.2f} {r['loss']:>8.4f}")


if __name__ == "__main__":
    main()
