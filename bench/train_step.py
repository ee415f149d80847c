"""Training-step throughput of MSA against dense attention on one GPU, one model per run.

Each point is real training steps of the project's loop (``train.loop.start`` builds the model and the
DeepSpeed engine; ``train.loop.train_step`` runs forward, backward and the optimizer step) on a
synthetic row: one document of N tokens (``one-doc``, no ``cu_seqlens``), or a ``packed`` row of
documents of mixed lengths with ``cu_seqlens`` (``packed_lengths``: log-uniform between 256 tokens and
half the row, drawn from a seed, the last one cut to fit). bf16, ZeRO-1, sparse phase, and whatever the
overrides after ``--`` set (the GPU script passes ``parallel.activation_checkpointing=true``, the
project's measured configuration). One engine per attention kind serves every length of its series.
``--msa-overrides`` adds overrides to the MSA series alone (a sliding-window or no dense first layer), so
that dense runs as configured in the same process and the ratio is side by side. ``--rows R`` puts R
one-document rows in each step (``data.batch_size=R``; tokens and FLOPs per step R times one row's), to tell
host-bound short rows from GPU-bound ones (``docs/scaling.md`` 3y).

Per point: one warm-up step, ``--steps`` timed steps (a third where the first two each take under
``--cheap-s``; with ``--time-warmup-above S`` a point whose warm-up step took over S seconds is timed by
that step alone), the median; tokens/s = tokens per row / median step; peak memory = the largest
``torch.cuda.max_memory_allocated`` over the timed steps; MFU = ``train.metrics.step_flops``'s model
FLOPs (6 per weight and token plus the main attention over the attended pairs, no recomputation) over
the median step and the GPU's dense bf16 peak (``train.metrics.PEAK_TFLOPS``); then, where the step
takes at most ``--profile-max-s`` and the budget has room, one more step under ``torch.profiler``
sorted into buckets by kernel name (``bench/profile_buckets.py``), and with ``--host-profile`` another
under a CPU profile with Python stacks (``host_profile``: host time by op, by Python function and by
package where the profiler records those, and on CUDA the operations that made the host wait for the
GPU, by source line). Memory, where the run can tell: weights (the module's parameters), optimizer
state (the tensors the optimizer holds: fp32 master weights and Adam moments), the rest of what stays
allocated after a step (gradient buffers), the step's transient peak above that (activations,
recomputation, MSA buffers), and with
``--memory-breakdown`` one MSA layer's attention work measured alone (``msa_layer_gb``: selection,
sparse attention and index KL forward+backward at the model's shapes, beyond their inputs).

Budget: the MSA series runs first (lengths in increasing order, packed rows where their length falls),
then dense; a point whose projected cost (engine build, warm-up and timed steps, the step time fitted
as ``a*tokens + b*pairs`` over the points measured so far, x1.15; ``pairs``: the
(query, key) pairs the layers attend, see ``series_pairs``) does not fit in what is left
of ``--time-budget`` (less ``--dense-reserve`` while MSA runs) is recorded as skipped, with the
projection; where the warm-up step shows the timed steps would not fit, fewer run (at least one) and
the record says so; an out-of-memory is recorded with the allocator's numbers and ends that series.
The JSON is rewritten after every point (and after each warm-up step). Run (one GPU; overrides after ``--``):

    python3 -m bench.train_step --model small --lengths 16384 32768 131072 524288 1048576 \\
        --packed 196608 --time-budget 200 --json out.json -- parallel.activation_checkpointing=true
    python3 -m bench.train_step --render out.json [more.json ...]   # markdown tables for docs/scaling.md

``--device cpu`` runs the same code on the CPU (``model=tiny``-sized rows; the reference attention).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.meta import compose, git_commit
from bench.profile_buckets import BUCKETS, host_profile, profile_step
from bench.timing import timed, timed_steps
from train.oom import project_frames


def packed_lengths(total: int, seed: int, shortest: int = 256) -> list[int]:
    """Document lengths filling ``total`` tokens: log-uniform in ``[shortest, total/2]`` (many short
    documents, a few long ones, as a long-context mix packs them), the last one cut to what is left."""
    rng = np.random.default_rng(seed)
    lo, hi = math.log(shortest), math.log(max(shortest + 1, total // 2))
    out, left = [], total
    while left > 0:
        n = int(round(math.exp(rng.uniform(lo, hi))))
        out.append(min(n, left))
        left -= out[-1]
    return out


def make_batch(lengths: list[int], vocab: int, seed: int, packed: bool, rows: int = 1) -> dict:
    """``rows`` rows of ``sum(lengths)`` random tokens each (CPU tensors; every row the same documents, its own
    tokens); ``cu_seqlens`` only when ``packed`` (the loop packs one row per micro-batch, so ``packed`` needs
    ``rows=1``). The last token of each document has no target."""
    if packed and rows != 1:
        raise ValueError("a packed row carries its own cu_seqlens: run packed rows with --rows 1")
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ids = torch.randint(0, vocab, (rows, n), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    labels[:, cu[1:] - 1] = -100
    pos = torch.cat([torch.arange(m) for m in lengths])[None].expand(rows, n).contiguous()
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if packed:
        batch["cu_seqlens"] = cu.to(torch.int32)
    return batch


def series_pairs(cfg, lengths) -> float:
    """What a series' step time grows with beyond its tokens: the (query, key) pairs its layers attend
    (``train.metrics.main_pairs``, sparse phase). MSA's selection scores every visible block too, but at
    the index head's small dimension, so it counts with the tokens."""
    from train.metrics import main_pairs

    return main_pairs(cfg.model, cfg.attention, np.array(lengths, dtype=np.int64), "sparse")


def project_step_s(points: list[dict], tokens: float, pairs: float) -> tuple[float | None, str, list[dict]]:
    """Step time at (``tokens``, ``pairs``) from measured points (``tokens``, ``pairs``, ``step_s``): a
    least-squares fit of ``a*tokens + b*pairs`` (a, b >= 0) over the last three; from one point (or a
    fit with a negative term) the larger of the two proportional scalings of the latest. None: nothing
    measured yet. Also how, and the points it used."""
    if not points:
        return None, "no point measured yet", []
    last = points[-1]
    scaled = last["step_s"] * max(tokens / last["tokens"], pairs / last["pairs"])
    recent = points[-3:]
    if len(recent) >= 2:
        X = np.array([[p["tokens"], p["pairs"]] for p in recent], dtype=np.float64)
        y = np.array([p["step_s"] for p in recent])
        scale = X.max(0)
        (a, b), *_ = np.linalg.lstsq(X / scale, y, rcond=None)
        if a >= 0 and b >= 0:
            return float(a * tokens / scale[0] + b * pairs / scale[1]), f"fit over {len(recent)} points", recent
    return scaled, f"scaled from the point at {last['tokens']:.0f} tokens", [last]


def storage_bytes(tensors, skip: set | None = None) -> tuple[int, set]:
    """Bytes of the distinct storages behind ``tensors`` (views counted once), and their pointers."""
    seen, total = set(skip or ()), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total, seen - set(skip or ())


def persistent_memory(run) -> dict:
    """Weights and optimizer state of the engine, by the tensors that hold them (GB)."""
    weights, ptrs = storage_bytes(run.model.parameters())
    opt = run.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    held = [p for g in inner.param_groups for p in g["params"]]
    held += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    optimizer, _ = storage_bytes(held, skip=ptrs)
    return {"weights_gb": round(weights / 2**30, 3), "optimizer_gb": round(optimizer / 2**30, 3)}


def msa_layer_gb(cfg, n_tokens: int, device) -> float:
    """Peak GPU memory of one MSA layer's attention work (selection, sparse attention and index KL,
    forward and backward) at the model's shapes, beyond its inputs, measured alone."""
    import kernels

    m, a = cfg.model, cfg.attention
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)

    q, k, v = rand(1, n_tokens, m.n_heads, m.head_dim), rand(1, n_tokens, m.n_kv_heads, m.head_dim), \
        rand(1, n_tokens, m.n_kv_heads, m.head_dim)
    q_idx, k_idx = rand(1, n_tokens, m.n_kv_heads, a.index_dim), rand(1, n_tokens, a.index_dim)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sel = kernels.select_blocks(q_idx.detach(), k_idx.detach(), a.block_size, a.topk)
    o, lse = kernels.sparse_attention(q, k, v, sel, a.block_size)
    o.backward(torch.ones_like(o))
    kernels.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, sel, a.block_size, lse=lse).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del q, k, v, q_idx, k_idx, sel, o, lse
    return round(peak / 2**30, 3)


class Series:
    """One attention kind's engine and its measured points."""

    def __init__(self, kind: str, overrides: list[str]):
        self.kind, self.overrides = kind, overrides
        self.run = self.cfg = None
        self.attn_cfg = compose([*overrides, f"attention={kind}"])  # for the step-time projection
        self.points: list[dict] = []  # measured: tokens, pairs, step_s, layout
        self.stopped: str | None = None
        self.build_s = None

    def build(self, env, max_len: int):
        from train.config import check_config
        from train.loop import start
        from train.recipe import build_recipe

        t0 = time.perf_counter()
        self.cfg = compose([*self.overrides, f"attention={self.kind}", f"data.seq_len={max_len}"])
        stage = build_recipe(self.cfg)[-1]  # the sparse phase (recipe.warmup_steps=0)
        check_config(self.cfg, stage, env.world_size, self.cfg.model.vocab_size, env.device.type)
        self.run = start(self.cfg, env, [stage], stage, None, batches=iter(()))
        self.build_s = time.perf_counter() - t0

    def free(self):
        from train.loop import close

        if self.run is not None:
            close(self.run)  # else the engine, its weights and optimizer state outlive it (train.loop.close)
        self.run = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_point(series: Series, env, lengths: list[int], packed: bool, args, deadline: float, progress) -> dict:
    """Warm-up, timed and profiled steps of one row; the point's record. Where the warm-up step shows
    that ``--steps`` timed steps would pass ``deadline`` (``time.perf_counter``), fewer run (at least
    one) and the record says so; ``progress(partial_record)`` is called after the warm-up."""
    from train.loop import train_step
    from train.metrics import PEAK_TFLOPS, step_flops

    run, cfg, dev = series.run, series.cfg, env.device
    cuda = dev.type == "cuda"
    batch = make_batch(lengths, cfg.model.vocab_size, seed=sum(lengths), packed=packed, rows=args.rows)
    run.batches = itertools.repeat(batch)
    n = sum(lengths) * args.rows  # tokens per step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start_gb = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    warm_s, first = timed(lambda: train_step(run), dev)
    memory = persistent_memory(run)
    # the warm-up's allocator peaks, read before msa_layer_gb resets them: a step timed by its warm-up alone reports
    # these (before 2026-12-07 it reported msa_layer_gb's peaks as the step's)
    warm_stats = torch.cuda.memory_stats() if cuda else {}
    if cuda:
        memory.update(start_gb=round(start_gb, 3), after_step_gb=round(torch.cuda.memory_allocated() / 2**30, 3),
                      warmup_peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3))
    # before the timed steps, which a long point (1M tokens) may not finish inside its budget
    if cuda and series.kind == "msa" and args.memory_breakdown:
        try:
            memory["msa_layer_gb"] = msa_layer_gb(cfg, n, dev)
        except torch.cuda.OutOfMemoryError as e:
            memory["msa_layer_gb"] = f"OOM: {str(e).splitlines()[0][:200]}"
    progress({"status": f"running (warm-up step done in {warm_s:.1f} s)", "warmup_s": round(warm_s, 4),
              "memory": memory})
    # a step of minutes (dense at 1M) is its own warm-up: its first step's compilation and autotuning are a
    # negligible share (section 3k of docs/scaling.md: 181.3 s warm-up, 180.5 s timed), so it runs once
    warm_only = args.time_warmup_above is not None and warm_s > args.time_warmup_above
    if warm_only:
        n_timed, times = 1, [warm_s]
    else:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fits = int((deadline - time.perf_counter()) / (1.1 * warm_s))
        n_timed = min(args.steps, max(1, fits))
        times = timed_steps(lambda: timed(lambda: train_step(run), dev)[0], n_timed, args.cheap_s, deadline)
    step_s = statistics.median(times)
    row = {"tokens": n, "rows": args.rows, "docs": len(lengths) * args.rows, "status": "ok",
           "warmup_s": round(warm_s, 4),
           "step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times], "tokens_per_s": round(n / step_s),
           "loss_first": round(first["lm"] + run.stage.kl_weight * first["kl"], 5),
           "lm_first": round(first["lm"], 5), "kl_first": round(first["kl"], 5)}
    if warm_only:
        row["steps_note"] = (f"timed by its warm-up step alone: it took {warm_s:.1f} s, over --time-warmup-above "
                             f"{args.time_warmup_above:g}")
        row["warmup_only"] = True
    elif n_timed < args.steps:
        row["steps_note"] = (f"{n_timed} timed step(s), not {args.steps}: the warm-up step took {warm_s:.1f} s "
                             f"and the time budget had room for {fits}")
    if packed:
        row["doc_lengths"] = lengths
    flops = step_flops(cfg.model, cfg.attention, run.model.num_params(), np.array(lengths * args.rows),
                       run.stage.phase)
    peak = PEAK_TFLOPS.get(torch.cuda.get_device_name()) if cuda else None
    row.update(model_flop=float(flops["model"]), model_tflop=round(flops["model"] / 1e12, 3),
               attn_tflop=round(flops["attn"] / 1e12, 3),
               index_tflop=round(flops["index"] / 1e12, 3), model_tflops=round(flops["model"] / step_s / 1e12, 2),
               mfu=round(flops["model"] / step_s / (peak * 1e12), 4) if peak else None,
               peak_tflops=peak)
    mem = row["memory"] = memory
    if cuda:
        mem.update(step_peaks(warm_stats, torch.cuda.memory_stats(), warm_only),
                   checkpointed_inputs_gb_computed=round(cfg.model.n_layers * n * cfg.model.dim * 2 / 2**30, 3))
        mem["other_persistent_gb"] = round(mem["after_step_gb"] - mem["weights_gb"] - mem["optimizer_gb"], 3)
        mem["step_transient_gb"] = round(mem["peak_gb"] - mem["after_step_gb"], 3)
    if not args.profile:
        pass
    elif args.profile_max_s is not None and step_s > args.profile_max_s:
        row["profile_note"] = f"not profiled: step {step_s:.1f} s > --profile-max-s {args.profile_max_s:g}"
    elif time.perf_counter() + 1.2 * step_s > deadline:
        row["profile_note"] = "not profiled: no time left in the budget for one more step"
    else:
        row["profile"] = profile_step(lambda: train_step(run), dev.type)
        if args.host_profile and time.perf_counter() + 3 * step_s < deadline:
            row["host_profile"] = host_profile(lambda: train_step(run), dev.type)
    return row


def plan(args) -> list[tuple[str, str, int]]:
    """(kind, layout, length) in run order: MSA first, then dense; lengths increasing, each packed row
    where its length falls. Dense takes ``--dense-lengths`` where given."""
    def items(lengths):
        return sorted([(n, "one-doc") for n in lengths] + [(n, "packed") for n in args.packed])

    dense_lengths = args.lengths if args.dense_lengths is None else args.dense_lengths
    return [(kind, layout, n) for kind in args.attention
            for n, layout in items(dense_lengths if kind == "dense" else args.lengths)]


def extrapolate_dense(result: dict, dense_points: list[dict], dense_cfg) -> list[dict]:
    """Dense step times at the one-document lengths where MSA ran and dense did not, from the dense points
    measured (``project_step_s``: ``a*tokens + b*pairs`` fitted over the last three, here two or three
    one-document rows), labelled as extrapolations: the issue allows dense at 1M extrapolated from 256K and
    512K where a measured step does not fit the time."""
    done = {p["seq_len"] for p in result["points"] if p["attention"] == "dense" and p["status"] == "ok"}
    out = []
    for p in result["points"]:
        n = p["seq_len"]
        if p["attention"] != "msa" or p["layout"] != "one-doc" or p["status"] != "ok" or n in done:
            continue
        est, how, used = project_step_s(dense_points, n, series_pairs(dense_cfg, [n]))
        if est is not None:
            out.append({"seq_len": n, "step_s": round(est, 3), "tokens_per_s": round(n / est), "how": how,
                        "from": [q["tokens"] for q in used]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--attention", nargs="+", default=["msa", "dense"], choices=["msa", "dense"])
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 131072, 524288, 1048576])
    ap.add_argument("--dense-lengths", type=int, nargs="*", default=None,
                    help="dense's one-document lengths where they differ from --lengths (e.g. 262144 524288 "
                         "beside MSA at 1048576, with --extrapolate-dense)")
    ap.add_argument("--extrapolate-dense", action="store_true",
                    help="record dense's step time at the MSA lengths dense did not run, fitted over its measured "
                         "one-document points (a*tokens + b*pairs), as an extrapolation (dense_extrapolated)")
    ap.add_argument("--packed", type=int, nargs="*", default=[196608], help="packed-row lengths")
    ap.add_argument("--rows", type=int, default=1,
                    help="rows per micro-batch (data.batch_size), each one document of the point's length "
                         "(one-doc points only; packed rows need 1): tokens per step = rows x length")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per point (a third where cheap)")
    ap.add_argument("--cheap-s", type=float, default=2.0, help="a third timed step where both took less")
    ap.add_argument("--time-budget", type=float, default=200.0, help="seconds for this whole run")
    ap.add_argument("--dense-reserve", type=float, default=40.0, help="seconds the MSA series leaves to dense")
    ap.add_argument("--no-skip", action="store_true",
                    help="run every point, even where the step-time projection says it will not fit (a long "
                         "point projected from one short one is coarse); the warm-up step still limits the timed "
                         "steps to what is left")
    ap.add_argument("--time-warmup-above", type=float, default=None, metavar="SECONDS",
                    help="a point whose warm-up step takes longer is timed by that step alone (no timed steps "
                         "after it; the record says so): for steps of minutes, where the first step's "
                         "compilation and autotuning are a negligible share")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--host-profile", action="store_true",
                    help="where a point is profiled, also its host time (bench.profile_buckets.host_profile)")
    ap.add_argument("--profile-max-s", type=float, default=10.0, help="profile only points with shorter steps")
    ap.add_argument("--memory-breakdown", action="store_true", help="also one MSA layer's memory, measured alone")
    ap.add_argument("--oom-history", action="store_true",
                    help="record the Python stack of every live CUDA allocation, so that an out-of-memory's record "
                         "says where its largest live tensors were allocated (a little host time per allocation)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--render", nargs="*", default=None, help="print markdown tables of result JSONs and exit")
    ap.add_argument("--msa-overrides", nargs="*", default=[], metavar="OVERRIDE",
                    help="Hydra overrides for the MSA series only, e.g. a sliding-window first layer "
                         "(model.sliding_window=4096 'model.sliding_layers=[0]'), so that dense runs as it is "
                         "configured beside it in the same process")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.activation_checkpointing=true")
    args = ap.parse_args()
    if args.render is not None:
        from bench.render_docs import render_train_step

        print(render_train_step([json.loads(Path(p).read_text()) for p in args.render]))
        return
    if args.rows < 1 or (args.rows > 1 and args.packed):
        ap.error(f"--rows {args.rows}: rows per micro-batch must be >= 1, and above 1 only for one-document rows "
                 "(pass --packed with no length: a packed row carries its own cu_seqlens)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/train_step.py needs a CUDA GPU (or --device cpu)")
    run_bench(args)


def meta_of(args, env) -> dict:
    import deepspeed
    import triton

    cuda = env.device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda,
            "commit": git_commit(), "command": " ".join(["python3", "-m", "bench.train_step", *sys.argv[1:]]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
            "overrides": args.overrides, "msa_overrides": args.msa_overrides, "time_budget_s": args.time_budget,
            "dense_reserve_s": args.dense_reserve, "steps": args.steps, "rows": args.rows,
            "host": os.uname().nodename}


def run_bench(args) -> None:
    from train.metrics import layer_kinds
    from train.parallel import init_distributed

    t_start = time.perf_counter()
    base = [f"model={args.model}", "logging.wandb.mode=disabled", f"data.batch_size={args.rows}",
            "recipe.warmup_steps=0", "run.precision=bf16", *args.overrides]
    env = init_distributed(compose(base).parallel)
    if args.oom_history and env.device.type == "cuda":
        torch.cuda.memory._record_memory_history(enabled="state", context="state", stacks="python")
    result = {"meta": meta_of(args, env), "points": []}
    series = {kind: Series(kind, base + (args.msa_overrides if kind == "msa" else [])) for kind in args.attention}
    todo = plan(args)
    max_len = max(n for _, _, n in todo)

    def save():
        result["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))

    for i, (kind, layout, n) in enumerate(todo):
        s = series[kind]
        lengths = packed_lengths(n, seed=n) if layout == "packed" else [n]
        point = {"attention": kind, "layout": layout, "seq_len": n,
                 "layers": dict(zip(("dense", "window", "msa"), layer_kinds(s.attn_cfg.model, s.attn_cfg.attention)))}
        left = args.time_budget - (time.perf_counter() - t_start)
        if kind == "msa" and "dense" in series:
            left -= args.dense_reserve
        pairs = series_pairs(s.attn_cfg, lengths * args.rows)
        est, how, _ = project_step_s(s.points, n * args.rows, pairs)
        # warm-up and timed steps (a third where cheap); the profiled step runs only if time is left
        n_steps = None if est is None else 1 + args.steps + (1 if est < args.cheap_s else 0)
        cost = None if est is None else 1.15 * n_steps * est + (0 if s.run else (s.build_s or 0))
        if s.stopped:
            point["status"] = f"skipped ({s.stopped})"
        elif cost is not None and cost > left and not args.no_skip:
            point["status"] = (f"skipped (projected {cost:.0f} s: {n_steps} steps of {est:.2f} s, {how}, x1.15; "
                               f"{max(left, 0):.0f} s left of --time-budget {args.time_budget:.0f} s"
                               + (f" less --dense-reserve {args.dense_reserve:.0f} s)" if kind == "msa"
                                  and "dense" in series else ")"))
            point["projected_step_s"] = round(est, 3)
        else:
            def progress(partial, point=point):
                result["points"].append({**point, **partial})
                save()
                result["points"].pop()

            deadline = t_start + args.time_budget - (args.dense_reserve if kind == "msa" and "dense" in series else 0)
            point.update(measure_or_record(s, env, lengths, layout, args, max_len, deadline, progress))
            if point["status"] == "ok":
                s.points.append({"tokens": point["tokens"], "pairs": pairs, "step_s": point["step_s"],
                                 "layout": layout})
            elif point["status"].startswith("OOM"):
                s.stopped = f"OOM at {n} tokens ({layout})"
        brief = {k: v for k, v in point.items() if k not in ("profile", "host_profile", "doc_lengths")}
        print(json.dumps(brief), flush=True)
        result["points"].append(point)
        if all(k != kind for k, _, _ in todo[i + 1:]):
            s.free()
        save()
    if args.extrapolate_dense and "dense" in series:
        dense = series["dense"]
        result["dense_extrapolated"] = extrapolate_dense(
            result, [q for q in dense.points if q["layout"] == "one-doc"], dense.attn_cfg)
        for e in result["dense_extrapolated"]:
            print(f"dense at {e['seq_len']} extrapolated ({e['how']}, from {e['from']}): {e['step_s']:.1f} s a step")
    print_table(result["points"])
    save()


def measure_or_record(s: Series, env, lengths, layout, args, max_len, deadline, progress) -> dict:
    """``measure_point``, building the engine first if needed; an OOM becomes a record: the message, where in
    this repository it was raised, the allocator's peaks and the largest live tensors, read before the
    engine is freed (after the exception's frames are gone, so its tensors can be freed too)."""
    try:
        if s.run is None:
            s.build(env, max_len)
        row = measure_point(s, env, lengths, layout == "packed", args, deadline, progress)
        return {**row, "build_s": round(s.build_s, 2)}
    except torch.cuda.OutOfMemoryError as e:
        # read while the failed step's frames, and so its tensors, are still alive
        record = {"status": f"OOM: {str(e).splitlines()[0][:400]}",
                  "oom_where": project_frames(traceback.extract_tb(e.__traceback__)),
                  "memory_at_oom": oom_memory(env.device.type == "cuda")}
    s.free()  # the engine and what the failed step held
    return record


def allocator_peaks(stats: dict) -> dict:
    """``torch.cuda.memory_stats()``'s allocated and reserved peaks (GiB) and its retry count."""
    return {"peak_gb": round(stats.get("allocated_bytes.all.peak", 0) / 2**30, 3),
            "reserved_peak_gb": round(stats.get("reserved_bytes.all.peak", 0) / 2**30, 3),
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def step_peaks(warm_stats: dict, now_stats: dict, warm_only: bool) -> dict:
    """A point's step peaks: those of its timed steps (``now_stats``: the peaks were reset before them), or, for
    a step timed by its warm-up alone, the warm-up's (``warm_stats``, read before ``msa_layer_gb`` reset the peaks
    for its own measurement, whose peaks ``now_stats`` then holds)."""
    return allocator_peaks(warm_stats if warm_only else now_stats)


def oom_memory(cuda: bool) -> dict:
    """The allocator's peaks and the largest tensors alive at an out-of-memory (GiB)."""
    if not cuda:
        return {}
    peaks = allocator_peaks(torch.cuda.memory_stats())
    return {"peak_gb": peaks["peak_gb"], "reserved_peak_gb": peaks["reserved_peak_gb"],
            "largest_live": largest_live_blocks(torch.cuda.memory_snapshot())}


def largest_live_blocks(segments: list[dict], n: int = 8) -> list[dict]:
    """The ``n`` largest allocated blocks of ``torch.cuda.memory_snapshot()``'s segments (GiB), each with
    where in this repository it was allocated when the allocator recorded stacks (``--oom-history``)."""
    blocks = [b for seg in segments for b in seg.get("blocks", []) if b.get("state") == "active_allocated"]
    blocks.sort(key=lambda b: -b["size"])
    # a recorded stack is innermost first; project_frames wants a traceback's order
    return [{"gib": round(b["size"] / 2**30, 3), "where": project_frames(list(reversed(b.get("frames", []))), 3)}
            for b in blocks[:n]]


def print_table(points: list[dict]) -> None:
    print(f"\n{'attn':5} {'layout':8} {'seq_len':>8} {'step_s':>8} {'tok/s':>9} {'MFU':>6} {'peak_GB':>8}  "
          + " ".join(f"{b[:5]:>6}" for b in BUCKETS) + "  status")
    for p in points:
        if p["status"] != "ok":
            print(f"{p['attention']:5} {p['layout']:8} {p['seq_len']:>8}  {p['status'][:110]}")
            continue
        mem = p.get("memory", {}).get("peak_gb", 0.0)
        mfu = f"{p['mfu']:.3f}" if p.get("mfu") is not None else "-"
        share = p.get("profile", {}).get("share", {})
        print(f"{p['attention']:5} {p['layout']:8} {p['seq_len']:>8} {p['step_s']:>8.3f} {p['tokens_per_s']:>9} "
              f"{mfu:>6} {mem:>8.2f}  " + " ".join(f"{share.get(b, 0):>6.2f}" for b in BUCKETS) + "  ok")


if __name__ == "__main__":
    main()
