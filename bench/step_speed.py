"""Training-step speed of the step options side by side in one process: tokens/s, step time and peak
memory of real steps of the DeepSpeed engine (``train.loop.train_step``: forward, backward, optimizer
step, bf16 on a GPU) on synthetic rows, and from one profiled step the time per kernel bucket
(``bench/profile_buckets.py``) and the launches per step of each kernel (aten op on a CPU), which show the
attention forward running once per layer under ``parallel.checkpoint_policy=selective`` and twice under
``full``.

Rows: ``one:N`` (one document of N tokens), ``packed:N:L`` (documents of uniformly random length in
[L/16, L) filling N tokens, seeded). Points (``POINTS``): ``dense`` (every layer dense), ``dense_varlen``,
``msa_full`` (MSA, DeepSpeed's full checkpointing), ``msa_selective``, ``msa_selective_varlen`` (its
dense path, on rows of short documents, with one varlen call), ``msa_selective_compile``,
``msa_full_compile``, ``warmup_loop`` / ``warmup_varlen`` (MSA in the warm-up phase: dense attention with
the index KL, one SDPA call per document or one varlen call), ``msa_selective_klbwd`` / ``msa_full_klbwd``
(the KL's teacher computed in the attention backward, ``attention.kl_in_backward``), ``dense_groups`` /
``msa_selective_groups`` (``dense`` / ``msa_selective`` with the batch's ``loss_groups`` of
``LOSS_SOURCES`` data sources: what logging each source's loss and answer loss costs). Every point
checkpoints activations, and each sets its dense path on packed rows itself (the points without
``varlen`` in their name one SDPA call per document, ``attention.dense_varlen=false``), so a point means
the same whatever the default.

    python3 -m bench.step_speed --model small --rows one:32768 one:131072 --points dense msa_full \\
        msa_selective --profile-rows one:32768 --out runs/step_speed.jsonl -- <hydra overrides>

``tokens_per_s`` = row tokens over the median time of ``--steps`` steps after one warm-up step (which
also compiles), one step more where two differ by more than 1.2x (``bench.timing.one_more_step``);
``peak_gb`` = ``torch.cuda.max_memory_allocated`` over the timed steps, ``start_gb`` = what was allocated
before the point built its engine (0 expected: each point's engine is destroyed, ``train.loop.close``;
before that fix every earlier point's weights and optimizer state stayed, about 1.8 GB each at ``small``);
``loss`` = the first step's loss
(``lm + kl_weight * kl``): it should agree across points of one row and phase.
Each point's JSON line is appended as soon as it is measured, so a stage cut by a time limit keeps what
it finished; an error (out of memory, a compile failure) is recorded and the next point runs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.meta import compose, git_commit
from bench.timing import sync, timed, timed_steps
from train.config import check_config
from train.data.loader import collate
from train.data.packing import Row
from train.loop import close, start, train_step
from train.parallel import init_distributed
from train.recipe import build_recipe

CHECKPOINTING = ["parallel.activation_checkpointing=true"]
LOOP = ["attention.dense_varlen=false"]  # one SDPA call per document (the default until varlen was measured)
VARLEN = ["attention.dense_varlen=true"]
SELECTIVE = ["parallel.checkpoint_policy=selective"]
FULL = ["parallel.checkpoint_policy=full"]  # named, not the default: the default became selective (6d86724)
COMPILE = ["parallel.compile_blocks=true"]
KL_BWD = ["attention.kl_in_backward=true"]  # the KL's teacher inside the attention backward
POINTS = {  # name: (Hydra overrides, attention phase); each names its dense path, whatever the default
    "dense": (["attention=dense"] + LOOP, "sparse"),
    "dense_varlen": (["attention=dense"] + VARLEN, "sparse"),
    "msa_full": (FULL + LOOP, "sparse"),
    "msa_selective": (SELECTIVE + LOOP, "sparse"),
    "msa_selective_varlen": (SELECTIVE + VARLEN, "sparse"),
    "msa_selective_compile": (SELECTIVE + COMPILE + LOOP, "sparse"),
    "msa_full_compile": (FULL + COMPILE + LOOP, "sparse"),
    "warmup_loop": (LOOP, "warmup"),
    "warmup_varlen": (VARLEN, "warmup"),
    "msa_selective_klbwd": (SELECTIVE + LOOP + KL_BWD, "sparse"),
    "msa_full_klbwd": (FULL + LOOP + KL_BWD, "sparse"),
    "dense_groups": (["attention=dense"] + LOOP, "sparse"),
    "msa_selective_groups": (SELECTIVE + LOOP, "sparse"),
}
LOSS_SOURCES = 6  # the quality runs' count: the corpus, four tasks, the primer
ANSWER_TOKENS = 8  # the last targets of each document count as its answer (a pass key is 5-7 digits)


def grouped(point: str) -> bool:
    """Whether the point's batch carries ``loss_groups`` (``*_groups``)."""
    return point.endswith("_groups")


def make_row(spec: str, vocab: int, device, sources: int = 0) -> dict:
    """The batch of a row spec (``one:N`` or ``packed:N:L``): one packed row with ``cu_seqlens``. With
    ``sources`` > 1, ``loss_groups`` as the loader's ``collate`` makes them: document ``d``'s targets in
    group ``d % sources``, its last ``ANSWER_TOKENS`` targets in ``sources + d % sources`` (an answer)."""
    kind, *sizes = spec.split(":")
    N = int(sizes[0])
    if kind == "one":
        lengths = [N]
    elif kind == "packed":
        longest = int(sizes[1])
        g = torch.Generator().manual_seed(N)
        lengths, left = [], N
        while left > 0:
            lengths.append(min(left, int(torch.randint(max(1, longest // 16), longest, (1,), generator=g))))
            left -= lengths[-1]
    else:
        raise ValueError(f"row {spec!r}: use one:N or packed:N:L")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, N), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    labels[0, cu[1:] - 1] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu.to(torch.int32)}
    if sources > 1:  # the loader's own collate makes the groups from a row's pieces, sources and answers
        bounds = cu.tolist()
        row = Row(ids[0], labels[0], pos[0], lengths, torch.zeros(0, 0, dtype=torch.uint8),
                  torch.zeros(0, dtype=torch.long), [], sources=[d % sources for d in range(len(lengths))],
                  # the target before a document's end is its last one
                  answers=[(max(lo, hi - 1 - ANSWER_TOKENS), hi - 1) for lo, hi in zip(bounds, bounds[1:])])
        batch["loss_groups"] = collate([row], sources)["loss_groups"]
    out = {k: v.to(device) for k, v in batch.items()}
    return {**out, "n_loss_groups": 2 * sources} if sources > 1 else out


def profiled_step(step, device_type: str, top: int = 40) -> dict:
    """One step under ``torch.profiler``: ``bench.profile_buckets.summarize`` of it (milliseconds per bucket,
    idle time) and ``launches``: per kernel name (aten op on a CPU) the calls and milliseconds, the ``top``
    longest first, which counts what ran once or twice per layer."""
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_buckets import kernels_of, summarize

    cuda = device_type == "cuda"
    sync(torch.device(device_type))
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        sync(torch.device(device_type))
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = kernels_of(prof, device_type)
    per_name: dict[str, list] = {}
    for name, k0, k1 in kernels:
        entry = per_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += (k1 - k0) / 1e3
    longest = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {**summarize(kernels, wall_ms),
            "launches": {name[:160]: {"count": n, "ms": round(ms, 3)} for name, (n, ms) in longest}}


def measure(cfg, env, stage, batch, steps: int, profile: bool) -> dict:
    cuda = env.device.type == "cuda"
    gc.collect()  # what the previous point left
    if cuda:
        torch.cuda.empty_cache()
    start_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None  # 0 expected: no earlier engine
    if cfg.parallel.compile_blocks:
        torch._dynamo.reset()  # a fresh compile per point: no recompile limit reached, no shapes made dynamic
    torch.manual_seed(cfg.run.seed)
    run = start(cfg, env, [stage], stage, None, batches=itertools.repeat(batch))
    try:
        # warm-up: Triton and torch.compile compile, the allocator grows
        warmup_s, first = timed(lambda: train_step(run), env.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = timed_steps(lambda: timed(lambda: train_step(run), env.device)[0], steps)
        step_s = statistics.median(times)  # of three where two disagreed by more than timing.UNEVEN
        row = {"step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
               "warmup_step_s": round(warmup_s, 2), "tokens_per_s": round(batch["input_ids"].numel() / step_s),
               "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               "start_gb": None if start_gb is None else round(start_gb, 2),
               "loss": round(first["lm"] + stage.kl_weight * first["kl"], 5)}
        if profile:
            row["profile"] = profiled_step(lambda: train_step(run), env.device.type)
        return row
    finally:
        close(run)  # the engine: without it the next point would carry its memory


def point_config(model: str, spec: str, point: str, overrides: list[str]):
    extra, phase = POINTS[point]
    seq_len = int(spec.split(":")[1])
    # with the warm-up phase the recipe's first stage is one warm-up step, else the only stage is sparse
    return compose([f"model={model}", "logging.wandb.mode=disabled", "data.batch_size=1", f"data.seq_len={seq_len}",
                    "run.steps=2", f"recipe.warmup_steps={int(phase == 'warmup')}", *CHECKPOINTING, *extra,
                    *overrides]), phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--rows", nargs="+", default=["one:32768", "one:131072", "packed:196608:6144"])
    ap.add_argument("--points", nargs="+", default=["dense", "msa_full", "msa_selective"], choices=list(POINTS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per point, after one warm-up step")
    ap.add_argument("--profile-rows", nargs="*", default=[], help="rows whose points also get a profiled step")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines, appended point by point")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every point, e.g. attention.impl=triton")
    args = ap.parse_args()
    env, results = None, []
    for spec, point in itertools.product(args.rows, args.points):
        cfg, phase = point_config(args.model, spec, point, args.overrides)
        env = env or init_distributed(cfg.parallel)
        stage = build_recipe(cfg)[0]
        assert stage.phase == phase or cfg.attention.kind == "dense", (point, stage.phase)
        check_config(cfg, stage, env.world_size, cfg.model.vocab_size, env.device.type)
        row = {"model": args.model, "row": spec, "point": point, "phase": stage.phase}
        try:
            batch = make_row(spec, cfg.model.vocab_size, env.device, LOSS_SOURCES if grouped(point) else 0)
            row["docs"] = batch["cu_seqlens"].numel() - 1
            row.update(measure(cfg, env, stage, batch, args.steps, spec in args.profile_rows))
        except Exception as e:  # noqa: BLE001  (an OOM or a compile failure is a result; the next point runs)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps({**row, **meta(env.device)}) + "\n")
    print_table(results)


def meta(device) -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_commit(), "command": " ".join(["python3"] + sys.argv),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_table(results: list[dict]) -> None:
    print(f"{'row':>20} {'point':>22} {'docs':>5} {'step_s':>8} {'tok/s':>9} {'peak_GB':>8} {'loss':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:>20} {r['point']:>22}  {r['error'][:70]}")
            continue
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        print(f"{r['row']:>20} {r['point']:>22} {r['docs']:>5} {r['step_s']:>8.3f} {r['tokens_per_s']:>9} "
              f"{peak:>8} {r['loss']:>9.4f}")


if __name__ == "__main__":
    main()
