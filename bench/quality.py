"""The quality run (issue 13): does MSA train on par with dense GQA, and does its indexer find the blocks
that matter? The same model is trained dense and MSA (dense warm-up, then top-k) on the same data and
tokens, for several seeds, and each run is evaluated at 1x, 2x, 4x and 8x its training length.

    python3 -m bench.quality --budget-s 480 --out runs/quality          # model=small, 8K rows, seeds 0 1 2
    python3 -m bench.quality --model tiny --seq-len 512 --budget-s 300 --out /tmp/q -- attention.block_size=32

Time-budgeted: a probe builds each arm, times its training steps (after steps that compile) per
attention phase and runs the evals once on that model (timing them, and compiling what they need); the
number of steps N is then the largest that fits every run (set-up + N steps + evals + the final
checkpoint save, ``--save-s``) into what is left of ``--budget-s``, and every arm and seed trains
exactly N steps of the same batches (``run.seed`` fixes the data order; the MSA arm's first
``--warmup-frac`` of them are the dense warm-up). ``--final-len L`` ends both arms with a stage at rows
of ``L`` tokens (``--final-frac`` of the steps, as many tokens per step where ``batch x seq_len`` is a
multiple of ``L``), as the long-context recipe ends at its longest length; the probe times every stage.
Runs go seed by seed, dense then MSA, so if time runs out the finished ones are complete pairs; a run
that would not fit is skipped and listed. ``--jobs J`` runs J of them at once, each in its own process on
the same GPU: a small model at 8K tokens is bound by kernel launches on the host, so several runs share
one GPU at a higher total rate. The probe then runs J-fold concurrently too (its step times are those
of a loaded GPU), and the plan fits every wave of J runs into the budget; the tokens/s of a run are not
a speed measurement then, only its losses and evals are results. ``--eval-s`` gives the evals' time
instead of probing it. ``--steps N`` fixes N (no probe) and makes the run resumable across calls: runs
save every ``--save-every`` steps, the budget's end stops them with SIGTERM (``--grace-s`` to save), and
the same command again reads the finished runs from ``--work`` and resumes the others. Both arms use the
same RoPE base (``--rope-base``, the long_context recipe's base for 8K stages) in training and at every
eval length. ``--arms`` picks the arms (default ``dense msa``): ``msa_nodense`` is MSA with no dense first
layer (``attention.n_dense_layers=0``), ``msa_window`` MSA with the first layer a sliding window of
``--window`` keys (``model.sliding_window``, ``model.sliding_layers=[0]``): what the options that make
the 1M step fastest (docs/scaling.md) cost in quality; ``msa_kl`` MSA with ``recipe.kl_weight`` set to
``--kl-weight`` (the index branch's share of the clipped gradient norm); ``msa_wide`` MSA with
``attention.topk`` set to ``--wide-topk`` (the ceiling of index recall with more blocks); ``msa_fine`` MSA
with ``attention.block_size`` = ``--fine-block`` and ``attention.topk`` = ``--fine-topk`` (by default 64 blocks of
64 keys: the keys of ``msa_wide``'s 32 blocks of 128, in finer blocks). Every MSA arm has the dense warm-up.

Data: the embedded corpus mixed with the synthetic retrieval tasks (``--mix`` of the tokens, a source per
task in equal shares, so each logs its own answer loss; documents of ``--synthetic-len`` tokens), so a small
model can learn retrieval in a short run. Evals (train/eval):
held-out bits per byte by position and index recall, retrieval accuracy (log-likelihood choice;
``--generate`` adds greedy exact match) per task, length and depth, the indexer's needle recall; the same
items for every run.

Writes to ``--out``: ``quality.json`` (settings, probe, steps and tokens, each run's loss curve, final
loss, how much the gradient clip shrank its steps (``clip_stats``) and eval results, and mean / std / min /
max over seeds per arm; rewritten after every run) and ``quality_loss.png``, ``quality_bpb.png``,
``quality_retrieval.png``, ``quality_recall.png``, ``quality_paired.png``. Hydra overrides after ``--``
apply to every arm, before the settings that make an arm what it is. ``--reference`` takes an earlier
report's runs of one arm (trained with the same settings) as this report's first arm, so new arms are
paired against them without training that arm again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.meta import compose, git_commit
from bench.timing import sync
from train.config import check_config
from train.data import build_tokenizer
from train.data.build_corpus import ensure_corpus
from train.eval.runner import evaluate, flatten, fmt_tokens
from train.loop import close, enter_stage, start, train, train_step
from train.metrics import LOSS_ANSWER_PREFIX, LOSS_LM_SOURCE_PREFIX
from train.parallel import init_distributed
from train.recipe import build_recipe

ARMS = ("dense", "msa")  # the default arms
# every arm there is: its overrides (``--window`` sets msa_window's window, ``--kl-weight`` msa_kl's weight,
# ``--wide-topk`` msa_wide's blocks per query, ``--fine-block`` and ``--fine-topk`` msa_fine's blocks)
ARM_CHOICES = ("dense", "msa", "msa_nodense", "msa_window", "msa_kl", "msa_wide", "msa_fine")
TASKS = ("passkey", "multikey", "vartrack", "image_needle")
# the primer may also hold the training-only drill (train/eval/tasks.py TRAIN_TASKS): K lookups a document
PRIMER_TASKS = (*TASKS, "multikey_drill")
PROBE_STEPS = 4  # timed steps per phase, after COMPILE_STEPS that compile and autotune
COMPILE_STEPS = 2
# the schedule a probe's config is composed for: long enough that every stage of stage_plan has a step (its
# own loop enters each stage and steps it COMPILE_STEPS + PROBE_STEPS times, whatever the schedule says)
PROBE_RUN_STEPS = 4 * (COMPILE_STEPS + PROBE_STEPS)
MARGIN = 0.9  # the share of the time left that a plan fills (the rest absorbs timing noise)
STOPPED = -15  # the exit status Pool.wait reports for a worker stopped at the deadline


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall seconds for everything, start-up included")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: <out>/work, removed)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--arms", nargs="+", choices=ARM_CHOICES, default=list(ARMS),
                    help="arms to train (each with every seed); the first is the reference of the reports")
    ap.add_argument("--window", type=int, default=1024, help="msa_window: the first layer's sliding window (keys)")
    ap.add_argument("--kl-weight", type=float, default=0.01,
                    help="msa_kl: recipe.kl_weight (small: the index branch's gradients leave the clipped global "
                         "norm, while AdamW's update of the index branch does not depend on their scale)")
    ap.add_argument("--wide-topk", type=int, default=32,
                    help="msa_wide: attention.topk (more selected blocks: whether the teacher mass they can hold, "
                         "eval/oracle_recall, reaches what the index recall target asks)")
    ap.add_argument("--fine-block", type=int, default=64,
                    help="msa_fine: attention.block_size (finer blocks: whether the same number of selected keys "
                         "holds more of the teacher's mass)")
    ap.add_argument("--fine-topk", type=int, default=64, help="msa_fine: attention.topk")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.15, help="MSA arm: dense warm-up share of the steps")
    ap.add_argument("--rope-base", type=float, default=5e5)
    ap.add_argument("--mix", type=float, default=0.25,
                    help="share of tokens from the synthetic retrieval tasks (a source per task, equal shares)")
    ap.add_argument("--synthetic-len", type=int, nargs=2, default=[1024, 0], metavar=("MIN", "MAX"),
                    help="the synthetic documents' lengths in tokens, uniform in [MIN, MAX] (MAX 0: the row "
                         "length); shorter documents give more questions per token")
    ap.add_argument("--primer", type=float, default=0.0, metavar="SHARE",
                    help="share of tokens from a second synthetic source of short documents of --primer-tasks "
                         "(--primer-len): dense copy signal, where a small model first learns to copy "
                         "(docs/quality.md, the CPU check)")
    ap.add_argument("--primer-len", type=int, nargs=2, default=[128, 192], metavar=("MIN", "MAX"))
    ap.add_argument("--primer-tasks", nargs="+", default=["passkey"], choices=list(PRIMER_TASKS), metavar="TASK",
                    help="the primer's tasks (default passkey, the one the GPU sources learned to copy from it; "
                         "multikey documents need --primer-len of about 400 tokens and more, the data check says; "
                         "multikey_drill, training only, answers every other key before the asked one: about 650)")
    ap.add_argument("--primer-choices", type=int, default=4, metavar="K",
                    help="the primer source's candidates per item, and keys per multikey or multivalue document "
                         "(data.sources[i].choices; 2: two-key multikey documents from about 280 tokens)")
    ap.add_argument("--primer-first", type=float, default=0.0, metavar="FRAC",
                    help="with --primer: the first FRAC of the steps read the primer alone (a stage whose "
                         "data_weights leave the other sources out), before the mix; part of the MSA arm's "
                         "dense warm-up, so at most --warmup-frac")
    ap.add_argument("--final-len", type=int, default=0,
                    help="both arms end with a stage at this row length (0: none), as many tokens per step")
    ap.add_argument("--final-frac", type=float, default=0.2, help="with --final-len: its share of the steps")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="eval lengths / training length")
    ap.add_argument("--extra-lengths", type=int, nargs="+", default=[], metavar="N",
                    help="eval lengths in tokens besides the multiples, e.g. the synthetic documents' length: "
                         "retrieval there tells a task never learned from one not carried to longer rows")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--items", type=int, default=2, help="items per (task, length, depth)")
    ap.add_argument("--rows", type=int, default=2, help="held-out rows per length for bits per byte")
    ap.add_argument("--generate", action="store_true", help="also score greedy exact match (decode steps)")
    ap.add_argument("--eval-s", type=float, default=None,
                    help="seconds a run's evals take, if known: the probe then skips timing them (a whole eval)")
    ap.add_argument("--save-s", type=float, default=8.0, help="planned seconds of a run's final checkpoint save")
    ap.add_argument("--min-steps", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (one GPU)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run, fixed (no probe): runs resume from their checkpoints in --work, so one "
                         "quality run can span several calls of this script")
    ap.add_argument("--save-every", type=int, default=50, help="with --steps: a checkpoint every N steps")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's last checkpoint in --work (else removed): a later run can "
                         "start from its weights (checkpoint.init_from, bench/quality_fork_gpu.sh)")
    ap.add_argument("--grace-s", type=float, default=60.0,
                    help="at the budget's end, seconds a stopped worker has to save its checkpoint (SIGTERM)")
    ap.add_argument("--reference", type=Path, default=None, metavar="QUALITY_JSON",
                    help="an earlier run's quality.json whose --reference-arm runs (same training settings) "
                         "become this report's first arm: new arms are paired against them without retraining")
    ap.add_argument("--reference-arm", default="dense", choices=ARM_CHOICES)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # probe:ARM:I or run:ARM:SEED:STEPS
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (after --; an arm's own settings win)")
    args = ap.parse_args(argv)
    if len(set(args.arms)) != len(args.arms):
        ap.error(f"--arms {' '.join(args.arms)}: each arm once")
    if args.reference and args.reference_arm in args.arms:
        ap.error(f"--reference-arm {args.reference_arm} comes from {args.reference}: leave it out of --arms")
    if args.reference and not args.steps:
        ap.error("--reference needs --steps: the reference's runs trained a fixed number of steps")
    if not (0 <= args.primer and args.mix + args.primer < 1):
        ap.error(f"--mix {args.mix} + --primer {args.primer} must stay below 1: the rest is the corpus")
    if args.primer_first and not args.primer:
        ap.error("--primer-first needs --primer SHARE (the primer source it reads alone)")
    if not 0 <= args.primer_first < 1:
        ap.error(f"--primer-first {args.primer_first} must lie in [0, 1): a share of the steps")
    if any(sparse(a) for a in args.arms) and args.primer_first > args.warmup_frac:
        ap.error(f"--primer-first {args.primer_first} must be at most --warmup-frac {args.warmup_frac}: the primer "
                 "stage is part of the MSA arm's dense warm-up (a run of --arms dense alone has no warm-up to fit)")
    return args


# what makes two reports' runs of one seed comparable: the same model, data, schedule and steps, and what
# the reference arm itself is made of
TRAINING_SETTINGS = ("model", "seq_len", "batch", "lr", "warmup_frac", "rope_base", "mix", "synthetic_len",
                     "primer", "primer_len", "primer_tasks", "primer_choices", "primer_first", "final_len",
                     "final_frac", "overrides")
ARM_SETTINGS = {"msa_window": ("window",), "msa_kl": ("kl_weight",), "msa_wide": ("wide_topk",),
                "msa_fine": ("fine_block", "fine_topk")}


def add_reference(args, report: dict, reference: dict) -> None:
    """Put ``reference``'s ``--reference-arm`` runs of this report's seeds first in ``report``: they trained
    with the same settings (``TRAINING_SETTINGS``; a difference is refused, naming it), on the same batches
    and from the same initial weights, so ``paired`` compares the new arms against them as if they had run
    beside them (up to GPU nondeterminism between two processes). Overrides after ``--`` may differ where the
    reference arm's training config comes out the same: ``-- attention.topk=32`` gives ``msa_nodense`` and
    ``msa_window`` 32 blocks, and leaves ``msa_wide`` (32 blocks of its own) as the reference trained it."""
    defaults = vars(parse(["--out", "."]))  # a report from before a setting existed ran with its default
    keys = TRAINING_SETTINGS + ARM_SETTINGS.get(args.reference_arm, ())
    mine = {k: vars(args)[k] for k in keys} | {"steps": args.steps}
    theirs = {k: defaults[k] if reference["settings"].get(k) is None else reference["settings"][k] for k in keys}
    theirs["steps"] = reference.get("steps")
    differ = [k for k in mine if theirs[k] != mine[k] and k != "overrides"]
    if differ:
        raise SystemExit(f"--reference {args.reference}: its runs trained with other settings: "
                         + ", ".join(f"{k}={theirs[k]!r} (here {mine[k]!r})" for k in differ))
    if theirs["overrides"] != mine["overrides"]:
        ref_args = argparse.Namespace(**{**vars(args), **{k: v for k, v in theirs.items() if k != "steps"}})
        differ = config_diff(reference_config(ref_args, args.reference_arm, args.steps),
                             reference_config(args, args.reference_arm, args.steps))
        if differ:
            raise SystemExit(f"--reference {args.reference}: with the overrides {mine['overrides']} (its runs: "
                             f"{theirs['overrides']}) the {args.reference_arm} arm would train otherwise: "
                             + ", ".join(f"{k}={a!r} (here {b!r})" for k, a, b in differ[:6]))
    runs = [r for r in reference["runs"] if r["arm"] == args.reference_arm and r["seed"] in args.seeds]
    if not runs:
        raise SystemExit(f"--reference {args.reference}: no {args.reference_arm} run of seeds {args.seeds}")
    report["runs"] = [{**r, "reference": str(args.reference)} for r in runs] + report["runs"]
    report["settings"]["arms"] = [args.reference_arm, *args.arms]
    report["reference"] = {"path": str(args.reference), "arm": args.reference_arm,
                           "commit": reference.get("commit"), "date_utc": reference.get("date_utc"),
                           "seeds": sorted(r["seed"] for r in runs)}


def reference_config(args, arm: str, steps: int) -> dict:
    """The training config one run of ``arm`` composes with ``args`` (seed 0, no evals), as nested dicts,
    without what does not change training (its directory, how often it saves)."""
    import dataclasses

    cfg = dataclasses.asdict(compose(overrides(args, arm, 0, steps, Path("run"), evals=False)))
    cfg.pop("run_dir", None)
    cfg.get("checkpoint", {}).pop("every", None)
    return cfg


def config_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, a's value, b's value)`` wherever two nested configs differ."""
    from train.checkpoint import flatten_config

    a, b = flatten_config(a), flatten_config(b)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def overrides(args, arm: str, seed: int, steps: int, run_dir: Path, evals: bool) -> list[str]:
    lo, hi = args.synthetic_len
    # a source per task, each named after it and with its share of --mix, so that each logs its own answer
    # loss (loss/answer/<task>); each its own seed, so the tasks do not draw the same lengths and depths
    synthetic = ",".join(f"{{name:{task},kind:synthetic,weight:{args.mix / len(args.tasks)},tasks:[{task}],"
                         f"min_len:{min(lo, args.seq_len)},max_len:{hi},seed:{seed + 100 * k}}}"
                         for k, task in enumerate(args.tasks))
    if args.primer:  # its own seed: not the main source's draws with another task list
        synthetic += (f",{{name:primer,kind:synthetic,weight:{args.primer},tasks:[{','.join(args.primer_tasks)}],"
                      f"min_len:{args.primer_len[0]},max_len:{args.primer_len[1]},seed:{1000 + seed}"
                      + (f",choices:{args.primer_choices}" if args.primer_choices != 4 else "") + "}")
    out = [f"model={args.model}", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}",
           f"model.rope_base={args.rope_base}", f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, steps // 20)}",
           f"data.sources=[{{name:corpus,kind:shards,weight:{1 - args.mix - args.primer}}},{synthetic}]",
           "data.num_workers=2",
           "logging.wandb.mode=disabled", "logging.progress=false", "logging.stats_every=10",
           f"checkpoint.every={args.save_every if args.steps else 0}", "checkpoint.keep_last=1",
           f"run.steps={steps}", f"run.seed={seed}",
           f"run_dir={run_dir}"]
    out += recipe_overrides(args, arm, steps)
    if evals:  # once, after the last step, inside the run (the model is still on the GPU)
        lengths = eval_lengths(args)
        out += [f"eval.every={steps}", f"eval.lengths=[{','.join(map(str, lengths))}]",
                f"eval.tasks=[bpb,{','.join(args.tasks)}]", f"eval.depths=[{','.join(map(str, args.depths))}]",
                f"eval.items={args.items}", f"eval.rows={args.rows}", f"eval.generate={str(args.generate).lower()}",
                f"eval.batch_tokens={max(lengths)}"]
    # the arm's own settings last: an override for every arm (e.g. attention.topk=...) does not undo what
    # makes an arm what it is (msa_wide's topk, msa_kl's weight)
    return out + list(args.overrides) + arm_overrides(args, arm)


def eval_lengths(args) -> list[int]:
    """The eval lengths, ascending: the multiples of the training length and ``--extra-lengths``."""
    return sorted({m * args.seq_len for m in args.multiples} | set(getattr(args, "extra_lengths", [])))


def sparse(arm: str) -> bool:
    """Whether an arm is MSA (a dense warm-up, then top-k)."""
    return arm != "dense"


def arm_overrides(args, arm: str) -> list[str]:
    """The Hydra overrides that make an arm what it is (``ARM_CHOICES``)."""
    if arm == "dense":
        return ["attention=dense"]
    out = ["attention=msa"]
    if arm == "msa_nodense":
        out.append("attention.n_dense_layers=0")
    elif arm == "msa_window":
        out += [f"model.sliding_window={args.window}", "model.sliding_layers=[0]"]
    elif arm == "msa_kl":
        out.append(f"recipe.kl_weight={args.kl_weight}")
    elif arm == "msa_wide":
        out.append(f"attention.topk={args.wide_topk}")
    elif arm == "msa_fine":
        out += [f"attention.block_size={args.fine_block}", f"attention.topk={args.fine_topk}"]
    elif arm != "msa":
        raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARM_CHOICES)}")
    return out


def stage_plan(args, arm: str, steps: int) -> list[dict]:
    """The stages of a run of ``steps``: with ``--primer-first`` a first stage of the primer source alone
    (both arms; the MSA arm's in its warm-up), the MSA arm's dense warm-up (``--warmup-frac``), then the main
    stage at ``--seq-len``, and with ``--final-len`` a last stage (``--final-frac`` of the steps, both arms)
    at that length with as many tokens per step (``batch x seq_len / final_len`` rows, at least 1)."""
    final = max(1, round(args.final_frac * steps)) if args.final_len else 0
    primer = max(1, round(args.primer_first * steps)) if args.primer_first else 0
    warm = max(1, round(args.warmup_frac * steps), primer) if sparse(arm) else primer
    if warm + final >= steps:
        raise SystemExit(f"{steps} steps leave no main stage after {warm} warm-up (or primer) and {final} final steps: "
                         "lower --warmup-frac or --final-frac, or train more steps")
    # --primer-first: the primer source alone (data_weights in data.sources' order: the corpus, a source per
    # task, the primer), the first steps of the MSA arm's warm-up
    phase = {"phase": "warmup"} if sparse(arm) else {}
    alone = [0] * (1 + len(args.tasks)) + [1] if primer else []
    stages = ([{"name": "primer", "steps": primer, **phase, "data_weights": alone}] if primer else []) + (
        [{"name": "warmup", "steps": warm - primer, "phase": "warmup"}] if warm > primer else []) + [
        {"name": "main", "steps": steps - warm - final}]
    if final:
        rows = max(1, args.batch * args.seq_len // args.final_len)
        stages.append({"name": "final", "steps": final, "seq_len": args.final_len, "batch_size": rows})
    return stages


def recipe_overrides(args, arm: str, steps: int) -> list[str]:
    """``stage_plan`` as Hydra overrides (``recipe.stages``), so the stages have the names the probe times them
    by (the default recipe would call the main stage ``sparse``)."""
    stages = stage_plan(args, arm, steps)
    value = lambda v: f"[{','.join(map(str, v))}]" if isinstance(v, list) else v
    entries = ",".join("{" + ",".join(f"{k}:{value(v)}" for k, v in st.items()) + "}" for st in stages)
    return ["recipe.warmup_steps=0", f"recipe.stages=[{entries}]"]


def free(env) -> None:
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def probe_arm(args, env, tokenizer, arm: str, run_dir: Path) -> dict:
    """Seconds per training step of one arm per attention phase (median of PROBE_STEPS after COMPILE_STEPS
    that compile and autotune), the set-up time of a run (model, engine, loader) and of its evals."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose(overrides(args, arm, 0, PROBE_RUN_STEPS, run_dir, evals=True))
    stages = build_recipe(cfg)
    for stage in stages:
        check_config(cfg, stage, env.world_size, tokenizer.vocab_size, env.device.type)
    t0 = time.perf_counter()
    run = start(cfg, env, stages, stages[0], tokenizer)
    out = {"setup_s": time.perf_counter() - t0}
    quiet = SimpleNamespace(message=lambda text: None)
    for stage in stages:  # stage_plan's: the MSA arm's warm-up, the main stage, the final stage
        enter_stage(run, stage, stage.start, quiet, {})
        t0 = time.perf_counter()
        for _ in range(COMPILE_STEPS):
            train_step(run)
        sync(env.device)
        out[f"first_{stage.name}_s"] = time.perf_counter() - t0
        times = []
        for _ in range(PROBE_STEPS):
            t0 = time.perf_counter()
            train_step(run)
            sync(env.device)
            times.append(time.perf_counter() - t0)
        out[f"{stage.name}_step_s"] = statistics.median(times)
    out["eval_s"] = args.eval_s
    if args.eval_s is None:
        t0 = time.perf_counter()
        evaluate(run.model, tokenizer, cfg.eval, train_len=args.seq_len, phase=run.stage.phase,
                 image_cfg=cfg.data.image, heldout_every=cfg.data.corpus.heldout_every)
        sync(env.device)
        out["eval_s"] = time.perf_counter() - t0
    close(run)  # the loader's workers and the engine (else its memory stays for the runs after the probe)
    del run
    free(env)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def probe(args, env, tokenizer, work: Path) -> dict:
    """Each arm's timings (probe_arm), one arm after the other."""
    out = {}
    for arm in args.arms:
        out[arm] = probe_arm(args, env, tokenizer, arm, work / f"probe-{arm}")
        print(f"probe {arm}: {json.dumps({k: round(v, 3) for k, v in out[arm].items()})}", flush=True)
    return out


def plan(args, timing: dict, left_s: float) -> tuple[int, dict]:
    """Steps per run so that every run fits ``left_s``, and the per-run estimate it used. One job: the
    runs one after the other. ``--jobs J``: waves of J runs at once, each wave as long as its slowest run
    (the timings come from a probe that loaded the GPU alike)."""
    step_s = {arm: mean_step_s(args, arm, timing[arm]) for arm in args.arms}
    fixed = {arm: timing[arm]["setup_s"] + timing[arm]["eval_s"] + args.save_s for arm in args.arms}
    n_runs = len(args.seeds)
    if args.jobs <= 1:
        steps = int((left_s - n_runs * sum(fixed.values())) / (n_runs * sum(step_s.values())))
    else:
        waves = -(-len(args.arms) * n_runs // args.jobs)
        steps = int((MARGIN * left_s - waves * max(fixed.values())) / (waves * max(step_s.values())))
    steps = max(args.min_steps, min(args.max_steps, steps))
    return steps, {arm: fixed[arm] + steps * step_s[arm] for arm in args.arms}


def mean_step_s(args, arm: str, timing: dict, nominal: int = 1000) -> float:
    """An arm's seconds per step over a whole run: its stages' probed step times (``<name>_step_s``)
    weighted by their shares of the steps in ``stage_plan``."""
    stages = stage_plan(args, arm, nominal)
    return sum(st["steps"] * timing[f"{st['name']}_step_s"] for st in stages) / nominal


def loss_curve(rows: list[dict]) -> list[list[float]]:
    return [[r["step"], r["loss/lm"]] for r in rows if r.get("loss/lm") is not None]


def source_curves(rows: list[dict]) -> dict[str, list[list[float]]]:
    """Each ``loss/lm/<source>`` and ``loss/answer/<source>`` against the step, over the steps that logged it
    (to 4 decimals: a curve per source and run, every step, in the report)."""
    keys = sorted({k for r in rows for k in r if k.startswith((LOSS_LM_SOURCE_PREFIX, LOSS_ANSWER_PREFIX))})
    return {k: [[r["step"], round(r[k], 4)] for r in rows if r.get(k) is not None] for k in keys}


def final_losses(rows: list[dict]) -> dict[str, float]:
    """``final_loss``: the mean LM loss over the last tenth of the logged steps; ``final_loss/<source>``: each
    data source's loss (``loss/lm/<source>``) and ``final_answer/<source>`` a synthetic source's loss on its
    answer tokens (``loss/answer/<source>``), over the same steps, those whose batches held them (a mean over
    steps, not weighted by each step's tokens of the source)."""
    logged = [r for r in rows if r.get("loss/lm") is not None]
    tail = logged[-max(1, len(logged) // 10):]
    out = {"final_loss": float(np.mean([r["loss/lm"] for r in tail]))}
    for prefix, name in ((LOSS_LM_SOURCE_PREFIX, "final_loss/"), (LOSS_ANSWER_PREFIX, "final_answer/")):
        for key in sorted({k for r in tail for k in r if k.startswith(prefix)}):
            out[name + key[len(prefix):]] = float(np.mean([r[key] for r in tail if key in r]))
    return out


def clip_stats(rows: list[dict], clip: float, steps: int) -> dict:
    """How much the global gradient clip shrank the steps, from the logged pre-clip norms: each logged
    step's scale ``min(1, clip / opt/grad_norm)`` (every parameter's update, the trunk's included, is
    scaled by it), averaged per tenth of ``steps`` (``clip_scale_by_tenth``, None for a tenth with no
    logged norm) and overall (``train/clip_scale``), the share of logged steps clipped
    (``train/clipped_share``) and the index branch's mean share of the squared norm
    (``train/index_norm_share``, None without an index branch). ``clip <= 0``: no clipping, scale 1."""
    norms = [(r["step"], r["opt/grad_norm"], r.get("opt/grad_norm_index")) for r in rows
             if r.get("opt/grad_norm") is not None]
    scale = [(step, min(1.0, clip / total) if clip > 0 and total > 0 else 1.0) for step, total, _ in norms]
    tenths = [[s for step, s in scale if i * steps <= 10 * step < (i + 1) * steps] for i in range(10)]
    shares = [(index / total) ** 2 for _, total, index in norms if index is not None and total > 0]
    return {"clip_scale_by_tenth": [float(np.mean(t)) if t else None for t in tenths],
            "train/clip_scale": float(np.mean([s for _, s in scale])) if scale else None,
            "train/clipped_share": float(np.mean([s < 1.0 for _, s in scale])) if scale else None,
            "train/index_norm_share": float(np.mean(shares)) if shares else None}


def run_one(args, arm: str, seed: int, steps: int, work: Path) -> dict:
    """Train one run with its evals after the last step; with ``--steps`` a run directory left by an
    earlier call is resumed from its newest checkpoint (``checkpoint.resume=auto``), else started anew."""
    run_dir = work / f"{arm}-s{seed}"
    if not args.steps:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = compose(overrides(args, arm, seed, steps, run_dir, evals=True))
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = run_dir / "eval" / f"step_{steps:08d}" / "results.json"
    if not evals.exists():  # a stop signal ended the run early (its checkpoint saved): no result yet
        raise SystemExit(f"{arm} seed {seed}: stopped after step {rows[-1]['step'] if rows else 0} of {steps}")
    results = json.loads(evals.read_text())
    curve = loss_curve(rows)
    recall = [r["msa/index_recall"] for r in rows if r.get("msa/index_recall") is not None]
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len
    clipping = clip_stats(rows, cfg.optim.grad_clip, steps)
    scalars = {**final_losses(rows), "train/index_recall": recall[-1] if recall else None,
               **{k: v for k, v in clipping.items() if k.startswith("train/")},
               **{k: v for k, v in flatten(results).items() if k != "eval/seconds"}}
    for task, by_length in results["retrieval"].items():
        for length, r in by_length.items():
            for depth, d in r["depths"].items():
                scalars[f"depth/{task}/{fmt_tokens(int(length))}/{depth}/choice"] = d["choice"]
                scalars[f"depth/{task}/{fmt_tokens(int(length))}/{depth}/exact"] = d["exact"]
            # whether each MSA layer (and its best KV group) finds the needle at the answer's query
            for table, metric in (("hit_layers", "needle_hit"), ("hit_best_group", "needle_hit_best_group")):
                for layer, v in r.get("needle_recall", {}).get(table, {}).items():
                    scalars[f"layer/{metric}/{task}/{fmt_tokens(int(length))}/{layer}"] = v
    per_layer = {"layers": "index_recall", "oracle_layers": "oracle_recall", "oracle_2x_layers": "oracle_recall_2x"}
    for length, r in results["bpb"].items():
        for table, metric in per_layer.items():
            for layer, v in r.get("index_recall", {}).get(table, {}).items():
                scalars[f"layer/{metric}/{fmt_tokens(int(length))}/{layer}"] = v
    return {"arm": arm, "seed": seed, "steps": steps, "tokens": tokens, "wall_s": wall,
            "eval_s": results["seconds"], "train_s": wall - results["seconds"], "loss_curve": curve,
            "source_curves": source_curves(rows),
            "clip_scale_by_tenth": clipping["clip_scale_by_tenth"], "scalars": scalars, "eval": results}


def progress(work: Path, spec: str) -> dict:
    """How far a stopped run got, from its ``metrics.jsonl``: the last step logged, its loss curve, each
    source's loss and answer loss curves and its last logged index recall, in the report so that they come
    back even if the machine (and with it the checkpoints that would resume the run) does not."""
    _, arm, seed, _ = spec.split(":")
    metrics = work / f"{arm}-s{seed}" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    recall = [r["msa/index_recall"] for r in rows if r.get("msa/index_recall") is not None]
    return {"step": rows[-1]["step"] if rows else None, "loss_curve": loss_curve(rows),
            "source_curves": source_curves(rows), "train/index_recall": recall[-1] if recall else None}


def report_arms(report: dict) -> list[str]:
    """The arms of a report (reports written before ``--arms`` had dense and msa)."""
    return list(report["settings"].get("arms", ARMS))


def _std(vals) -> float:
    """The sample standard deviation over seeds (n - 1); 0 for a single seed."""
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarise(runs: list[dict], arms=ARMS) -> dict:
    """Per arm and scalar: mean, standard deviation over seeds (n - 1), min, max, n (None values left out)."""
    out = {}
    for arm in arms:
        mine = [r["scalars"] for r in runs if r["arm"] == arm]
        keys = sorted({k for s in mine for k in s})
        stats = {}
        for k in keys:
            vals = [s[k] for s in mine if s.get(k) is not None]
            if vals:
                stats[k] = {"mean": float(np.mean(vals)), "std": _std(vals),
                            "min": float(min(vals)), "max": float(max(vals)), "n": len(vals)}
        out[arm] = stats
    return out


def _tokens(name: str) -> int:
    """``fmt_tokens``'s names back to numbers, for ordering: ``2K`` -> 2048, ``1M`` -> 2**20, ``384`` -> 384."""
    scale = {"K": 2**10, "M": 2**20}.get(name[-1:], 1)
    return int(name[:-1] if scale > 1 else name) * scale


def eval_by_length(scalars: dict, metric: str, task: str | None = None) -> dict[str, list[float]]:
    """The values of ``eval/<task>/<L>/<metric>`` per eval length L (every task, or only ``task``)."""
    by_length: dict[str, list[float]] = {}
    for k, v in scalars.items():
        parts = k.split("/")
        if (len(parts) == 4 and parts[0] == "eval" and parts[3] == metric and v is not None
                and task in (None, parts[1])):
            by_length.setdefault(parts[2], []).append(v)
    return by_length


def share_by_length(scalars: dict, metric: str = "share") -> dict[str, float]:
    """Per eval length: the mean over tasks of the answer's share of the candidates' probability
    (``eval/<task>/<L>/share``), a retrieval score that moves before the accuracy leaves chance;
    ``metric="share_far"``: the same over the needles below depth 1 only."""
    return {length: float(np.mean(vals)) for length, vals in eval_by_length(scalars, metric).items()}


def paired(runs: list[dict], arms=ARMS) -> dict:
    """Each arm after the first against the first (dense), seed by seed: both see the same batches and,
    since the initial weights depend only on the seed and the parameter's name, start from the same
    shared weights. Per arm: the relative difference of the final loss per seed (``arm / first - 1``),
    their mean and standard deviation (n - 1), ``by_tenth``: the mean over seeds of the relative
    difference of the mean LM loss in each tenth of the steps (where in training a gap opens), and
    ``retrieval_share``: per eval length, the difference (``arm - first``) of ``share_by_length`` per seed,
    its mean and standard deviation (the issue's "retrieval at 4x the training length at least dense's"), and
    ``retrieval_share_far``: the same over the needles below depth 1 (reports with ``share_far`` only): a
    needle next to the question is found by a window layer or the question's own block, so the share over
    all needles can differ with no far retrieval."""
    ref, out = arms[0], {}
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    for arm in arms[1:]:
        seeds = sorted(s for a, s in by_seed if a == arm and (ref, s) in by_seed)
        if not seeds:
            continue
        diffs = {s: by_seed[arm, s]["scalars"]["final_loss"] / by_seed[ref, s]["scalars"]["final_loss"] - 1
                 for s in seeds}
        tenths = []
        for s in seeds:
            a, b = (dict(map(tuple, by_seed[x, s]["loss_curve"])) for x in (arm, ref))
            steps = sorted(set(a) & set(b))
            parts = np.array_split(np.array(steps), min(10, len(steps))) if steps else []
            tenths.append([float(np.mean([a[i] for i in part]) / np.mean([b[i] for i in part]) - 1)
                           for part in parts])
        vals = list(diffs.values())
        out[arm] = {"against": ref, "seeds": seeds, "final_loss_rel": diffs, "mean": float(np.mean(vals)),
                    "std": _std(vals),
                    "by_tenth": [float(np.mean(col)) for col in zip(*tenths)],
                    "by_tenth_seeds": dict(zip(seeds, tenths)), "retrieval_share": {}}
        for metric, key in (("share", "retrieval_share"), ("share_far", "retrieval_share_far")):
            shares = {(x, s): share_by_length(by_seed[x, s]["scalars"], metric) for x in (arm, ref) for s in seeds}
            for length in sorted({n for sh in shares.values() for n in sh}, key=_tokens):
                per_seed = {s: shares[arm, s][length] - shares[ref, s][length] for s in seeds
                            if length in shares[arm, s] and length in shares[ref, s]}
                if per_seed:
                    d = list(per_seed.values())
                    out[arm].setdefault(key, {})[length] = {"seeds": per_seed, "mean": float(np.mean(d)),
                                                            "std": _std(d)}
    return out


# ---- plots


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def plot_loss(report: dict, path: Path) -> None:
    fig = _figure(7, 4)
    ax = fig.subplots()
    for arm in report_arms(report):
        curves = [r["loss_curve"] for r in report["runs"] if r["arm"] == arm]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        y = np.array([[v for _, v in c[:n]] for c in curves])
        k = max(1, n // 50)  # a moving average over ~2% of the run
        kernel = np.ones(k) / k
        smooth = np.array([np.convolve(row, kernel, mode="valid") for row in y])
        x = (np.arange(smooth.shape[1]) + k) * report["tokens_per_step"] / 1e6
        ax.plot(x, smooth.mean(0), label=f"{arm} (mean of {len(curves)})")
        ax.fill_between(x, smooth.min(0), smooth.max(0), alpha=0.25)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("LM loss (nats/token)")
    ax.legend()
    ax.set_title("training loss, band: min-max over seeds", fontsize=10)
    fig.savefig(path)


def plot_paired(report: dict, path: Path) -> None:
    """``paired``: each arm's relative loss difference against the first arm per tenth of the steps, one
    thin line per seed and the mean: where in training a gap opens."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    for arm, d in report["paired"].items():
        for seed, ys in d["by_tenth_seeds"].items():
            ax.plot(np.arange(len(ys)) * 10 + 5, 100 * np.array(ys), lw=0.8, alpha=0.5, label=f"{arm}, seed {seed}")
        ax.plot(np.arange(len(d["by_tenth"])) * 10 + 5, 100 * np.array(d["by_tenth"]), lw=2.5, marker="o",
                label=f"{arm}, mean")
    ax.axhline(0.0, color="black", lw=0.8)
    settings = report.get("settings", {})
    if settings.get("warmup_frac"):
        ax.axvline(100 * settings["warmup_frac"], color="gray", ls=":", lw=1.0, label="end of the dense warm-up")
    if settings.get("final_len"):
        ax.axvline(100 * (1 - settings["final_frac"]), color="gray", ls="--", lw=1.0, label="last stage starts")
    ax.set(xlabel="share of the steps (%)", ylabel="LM loss against the reference arm (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"paired against {report_arms(report)[0]} (same seed and batches)", fontsize=10)
    fig.savefig(path)


def plot_bpb(report: dict, path: Path) -> None:
    lengths = report["eval_lengths"]
    fig = _figure(3.2 * len(lengths), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(lengths)))
    for ax, L in zip(axes, lengths):
        name = fmt_tokens(L)
        evaluated = [r["eval"]["bpb"][str(L)] for r in report["runs"] if str(L) in r.get("eval", {}).get("bpb", {})]
        if not evaluated:  # a length only some arms were evaluated at (--reference)
            continue
        order = list(evaluated[0]["buckets"])  # by position, as evaluated
        for arm in report_arms(report):
            stats = report["summary"].get(arm, {})
            keys = [f"eval/bpb/{name}/{b}" for b in order if f"eval/bpb/{name}/{b}" in stats]
            if not keys:
                continue
            ax.errorbar(range(len(keys)), [stats[k]["mean"] for k in keys], [stats[k]["std"] for k in keys],
                        marker="o", capsize=3, label=arm)
            ax.set_xticks(range(len(keys)), [k.rsplit("/", 1)[1] for k in keys], fontsize=7)
        ax.set_title(f"eval length {name}", fontsize=9)
        ax.set_xlabel("token positions")
    axes[0].set_ylabel("held-out bits per byte")
    axes[0].legend()
    fig.savefig(path)


def plot_retrieval(report: dict, path: Path) -> None:
    tasks, lengths, depths = report["settings"]["tasks"], report["eval_lengths"], report["settings"]["depths"]
    fig = _figure(2.2 + 1.0 * len(lengths) * len(tasks), 1.5 + 1.3 * len(report_arms(report)))
    axes = np.atleast_2d(fig.subplots(len(report_arms(report)), len(tasks), squeeze=False))
    image = None
    for i, arm in enumerate(report_arms(report)):
        stats = report["summary"].get(arm, {})
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            grid = np.array([[stats.get(f"depth/{task}/{fmt_tokens(L)}/{d}/choice", {}).get("mean", np.nan)
                              for L in lengths] for d in depths])
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (a, b), v in np.ndenumerate(grid):
                ax.text(b, a, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [fmt_tokens(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{arm}: {task}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7,
                 label=f"choice accuracy, mean over seeds (chance {1 / report['settings']['choices']:.2f})")
    fig.supxlabel("eval length")
    fig.supylabel("needle depth")
    fig.savefig(path)


def plot_share(report: dict, path: Path) -> bool:
    """Per task, the answer's share of the candidates' probability against eval length, a line per arm
    (mean and standard deviation over seeds) and chance: retrieval that the accuracy heatmaps, at a few
    items a cell, cannot tell from chance. False (no file) for a report without shares (before the
    metric)."""
    tasks, lengths = report["settings"]["tasks"], [fmt_tokens(L) for L in report["eval_lengths"]]
    arms = [a for a in report_arms(report)
            if any(f"eval/{t}/{n}/share" in report["summary"].get(a, {}) for t in tasks for n in lengths)]
    if not arms:
        return False
    fig = _figure(2.8 * len(tasks), 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=True))
    for ax, task in zip(axes, tasks):
        for arm in arms:
            stats = [report["summary"][arm].get(f"eval/{task}/{n}/share", {}) for n in lengths]
            ax.errorbar(range(len(lengths)), [s.get("mean", np.nan) for s in stats],
                        [s.get("std", 0.0) for s in stats], marker="o", capsize=3, label=arm)
        ax.axhline(1 / report["settings"]["choices"], color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("eval length")
    axes[0].set(ylabel="answer's share of the candidates'\nprobability (dotted: chance)", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    fig.savefig(path)
    return True


def answer_curves(report: dict, bins: int = 30) -> dict[str, dict[str, dict]]:
    """Per synthetic source and arm: the training loss on the answer tokens (``loss/answer/<source>``) in
    ``bins`` equal spans of the steps, each run's mean over the steps of a span that logged it, then the
    mean, min and max over the arm's runs (spans no run logged left out); ``step`` is each span's middle."""
    out: dict[str, dict[str, dict]] = {}
    logged = [(r["arm"], k, c) for r in report["runs"] for k, c in r.get("source_curves", {}).items()
              if k.startswith(LOSS_ANSWER_PREFIX) and c]
    if not logged:
        return out
    edges = np.linspace(0, report.get("steps") or 1 + max(c[-1][0] for _, _, c in logged), bins + 1)
    for arm, key, curve in logged:
        steps, values = np.array(curve, dtype=float).T
        which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, bins - 1)
        means = [values[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
        out.setdefault(key[len(LOSS_ANSWER_PREFIX):], {}).setdefault(arm, []).append(means)
    for arms in out.values():
        for arm, runs in arms.items():
            y = np.array(runs)
            keep = ~np.isnan(y).all(0)  # a span some run logged: the nan-aware statistics below see a value
            arms[arm] = {"step": ((edges[:-1] + edges[1:]) / 2)[keep].tolist(), "n": len(runs),
                         **{k: f(y[:, keep], 0).tolist() for k, f in (("mean", np.nanmean), ("min", np.nanmin),
                                                                      ("max", np.nanmax))}}
    return out


def plot_answer(report: dict, path: Path) -> bool:
    """Per synthetic source, the training loss on its answer tokens against the step, a line per arm (mean
    over seeds, band min-max): whether and when the models learn to answer the items they train on. False
    (no file) for a report whose runs did not log it (before the metric)."""
    curves = answer_curves(report)
    if not curves:
        return False
    fig = _figure(3.5 * len(curves), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(curves), sharey=True))
    for ax, (source, arms) in zip(axes, sorted(curves.items())):
        for arm, c in arms.items():
            ax.plot(c["step"], c["mean"], marker=".", label=f"{arm} (mean of {c['n']})")
            ax.fill_between(c["step"], c["min"], c["max"], alpha=0.25)
        ax.axhline(np.log(10), color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="training step", title=f"source {source}")
    axes[0].set(ylabel="loss on answer tokens (nats/token)\ndotted: a random digit, ln 10")
    axes[0].legend(fontsize=7)
    fig.savefig(path)
    return True


def recall_lengths(stats: dict, eval_lengths: list[int]) -> list[str]:
    """The eval lengths (as ``fmt_tokens`` names) at which ``stats`` has an index or needle recall."""
    measured = {part for k in stats if k.startswith(("eval/index_recall/", "eval/needle_recall/"))
                for part in k.split("/")}
    return [name for name in map(fmt_tokens, eval_lengths) if name in measured]


def plot_recall(report: dict, path: Path, arm: str | None = None) -> None:
    """Index and needle recall of ``arm`` (default: the report's first MSA arm), at the lengths that have
    them (none at a length of at most ``topk`` blocks); no file while the arm has no recall yet (the dense
    runs finish first)."""
    arm = arm or next((a for a in report_arms(report) if sparse(a)), "msa")
    stats = report["summary"].get(arm, {})
    lengths = recall_lengths(stats, report["eval_lengths"])
    if not lengths:
        return
    fig = _figure(11, 3.5)
    left, right = fig.subplots(1, 2)
    layers = sorted({int(k.rsplit("/", 1)[1]) for k in stats if k.startswith("layer/index_recall/")})
    width = 0.8 / max(1, len(lengths))
    for i, name in enumerate(lengths):
        ys = [stats.get(f"layer/index_recall/{name}/{layer}", {}).get("mean", np.nan) for layer in layers]
        bars = left.bar(np.arange(len(layers)) + i * width, ys, width, label=name)
        ceiling = [stats.get(f"layer/oracle_recall/{name}/{layer}", {}).get("mean", np.nan) for layer in layers]
        color = bars.patches[0].get_facecolor() if bars.patches else None
        left.bar(np.arange(len(layers)) + i * width, ceiling, width, fill=False,  # outline: the best topk blocks
                 edgecolor=color, linewidth=0.8)
        wide = [stats.get(f"layer/oracle_recall_2x/{name}/{layer}", {}).get("mean", np.nan) for layer in layers]
        left.bar(np.arange(len(layers)) + i * width, wide, width, fill=False,  # dashed: the best 2 topk blocks
                 edgecolor=color, linewidth=0.6, linestyle="--")
    left.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [str(x) for x in layers])
    left.set(xlabel="MSA layer", ylabel="index recall\n(outline: best topk, dashed: 2 topk)", ylim=(0, 1.3))
    # the legend in a row above the bars (ylim 1.3), not over the first layers' bars
    left.legend(title="eval length", fontsize=7, title_fontsize=7, loc="upper center", ncol=len(lengths))
    for task in report["settings"]["tasks"]:
        ys = [stats.get(f"eval/needle_recall/{task}/{name}", {}).get("mean", np.nan) for name in lengths]
        errs = [stats.get(f"eval/needle_recall/{task}/{name}", {}).get("std", 0.0) for name in lengths]
        right.errorbar(range(len(lengths)), ys, errs, marker="o", capsize=3, label=task)
    right.set_xticks(range(len(lengths)), lengths)
    right.set(xlabel="eval length", ylabel="needle blocks selected by the question", ylim=(0, 1.05))
    right.legend(fontsize=7)
    fig.suptitle(f"MSA indexer ({arm}), mean over seeds", fontsize=10)
    fig.savefig(path)


def write(report: dict, out: Path, plots: bool) -> None:
    report["summary"] = summarise(report["runs"], report_arms(report))
    report["paired"] = paired(report["runs"], report_arms(report))
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    if plots and report["runs"]:
        for name, fn in (("loss", plot_loss), ("bpb", plot_bpb), ("retrieval", plot_retrieval),
                         ("recall", plot_recall)):
            fn(report, out / f"quality_{name}.png")
        for arm in [a for a in report_arms(report) if sparse(a)][1:]:  # the first MSA arm's is quality_recall.png
            plot_recall(report, out / f"quality_recall_{arm}.png", arm)
        if report["paired"]:
            plot_paired(report, out / "quality_paired.png")
        plot_share(report, out / "quality_share.png")
        plot_answer(report, out / "quality_answer.png")


def work_dir(args) -> Path:
    """Run directories and worker results: ``--work``, else ``<out>/work`` (removed at the end)."""
    return args.work or args.out / "work"


def worker(args, spec: str) -> None:
    """One probe or run in its own process (``--jobs``): its result as JSON in the work folder."""
    kind, arm, *rest = spec.split(":")
    work = work_dir(args)
    if kind == "probe":
        # composed for the probe's schedule: one step leaves no main stage beside a final one (--final-len)
        cfg = compose(overrides(args, arm, 0, PROBE_RUN_STEPS, work / "check", evals=False))
        env, tokenizer = init_distributed(cfg.parallel), build_tokenizer(cfg.data.tokenizer)
        result = probe_arm(args, env, tokenizer, arm, work / f"probe-{arm}-{rest[0]}")
    else:
        seed, steps = map(int, rest)
        result = run_one(args, arm, seed, steps, work)
    path = result_path(work, spec)  # the worker's last act (atomic): what follows is the interpreter's teardown
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


class Pool:
    """Worker processes of this script (``--worker SPEC`` plus the main process's arguments), at most
    ``--jobs`` at once, each with its output in ``<out>/logs/<spec>.log``."""

    def __init__(self, args, argv: list[str]):
        self.args, self.argv, self.logs, self.running = args, argv, args.out / "logs", {}
        self.logs.mkdir(parents=True, exist_ok=True)
        # alone, each worker makes its own process group (init_distributed), not the one of this process
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def log(self, spec: str) -> Path:
        return self.logs / f"{file_name(spec)}.log"

    def start(self, spec: str) -> None:
        result_path(work_dir(self.args), spec).unlink(missing_ok=True)  # what the worker writes marks it done
        with open(self.log(spec), "w") as log:
            self.running[spec] = subprocess.Popen(
                [sys.executable, "-m", "bench.quality", "--worker", spec, *self.argv],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def wait(self, deadline: float) -> list[tuple[str, int]]:
        """The workers that ended, with their exit status, as soon as one has; past the deadline every
        running worker gets SIGTERM (a training run then saves a checkpoint and stops), ``--grace-s``
        seconds later (with ``--steps``; else 5 s) SIGKILL. A worker that still exited 0 in the grace (a run
        in its evals finishes them and writes its result) is reported with 0, the others with STOPPED: a
        finished run's result is collected in this call (it has dropped its checkpoints, so a next call on
        another machine could only start it again)."""
        while True:
            ended = [(spec, p.returncode) for spec, p in self.running.items() if p.poll() is not None]
            if not ended and time.perf_counter() > deadline:
                for p in self.running.values():
                    p.terminate()
                for p in self.running.values():
                    try:
                        p.wait(timeout=max(1.0, deadline + grace(self.args) - time.perf_counter()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                ended = [(spec, 0 if p.returncode == 0 else STOPPED) for spec, p in self.running.items()]
            if ended:
                for spec, _ in ended:
                    del self.running[spec]
                return ended
            time.sleep(0.5)

    def tail(self, spec: str, n: int = 5) -> str:
        return "\n".join(self.log(spec).read_text(errors="replace").splitlines()[-n:])


def grace(args) -> float:
    """Seconds a worker stopped at the deadline has to save: only resumable runs (``--steps``) save."""
    return args.grace_s if args.steps else 5.0


def file_name(spec: str) -> str:
    """A worker spec (``run:msa:0:900``) as a file name (``run-msa-0-900``)."""
    return spec.replace(":", "-")


def result_path(work: Path, spec: str) -> Path:
    return work / f"{file_name(spec)}.json"


def run_all(args, argv: list[str], specs: list[str], work: Path, deadline: float, on_result) -> dict:
    """Runs the worker ``specs`` J at a time; ``on_result(spec, result)`` for each that finished. Returns
    ``{"failed": [...], "stopped": [...], "not_started": [...]}``: the specs that failed (the last lines of
    their logs printed), that the deadline stopped (with ``--steps`` the next call resumes them), and
    that it left unstarted."""
    pool, queue, out = Pool(args, argv), list(specs), {"failed": [], "stopped": [], "not_started": []}
    while queue or pool.running:
        while queue and len(pool.running) < args.jobs:
            pool.start(queue.pop(0))
        for spec, rc in pool.wait(deadline):
            if result_path(work, spec).exists():  # written last, so the run finished whatever the exit status
                if rc != 0:  # the deadline's SIGTERM came in its teardown (seen: two MSA runs of the fifth run)
                    print(f"{spec} finished (result written) but exited {rc} after it", flush=True)
                on_result(spec, json.loads(result_path(work, spec).read_text()))
                continue
            if rc == STOPPED:
                out["stopped"].append(spec)
                out["not_started"], queue = out["not_started"] + queue, []
                print(f"stopped {spec} at the deadline", flush=True)
                continue
            out["failed"].append(spec)
            print(f"failed {spec} (exit {rc}):\n{pool.tail(spec)}", flush=True)
    return out


def probe_jobs(args, argv: list[str], work: Path, deadline: float) -> dict:
    """The probe under the load of the runs: J probes at once (arms alternating, as the runs will be),
    each arm's timing the slowest of its probes."""
    n = min(args.jobs, len(args.arms) * len(args.seeds))
    got = {arm: [] for arm in args.arms}
    ended = run_all(args, argv, [f"probe:{args.arms[i % len(args.arms)]}:{i}" for i in range(n)], work, deadline,
                    lambda spec, r: got[spec.split(":")[1]].append(r))
    if any(ended.values()) or not all(got.values()):
        raise SystemExit(f"probe did not finish: {ended}; logs in {args.out / 'logs'}")
    out = {arm: {k: max(r[k] for r in rs) for k in rs[0]} for arm, rs in got.items()}
    for arm in args.arms:
        print(f"probe {arm} (slowest of {len(got[arm])} at once): "
              f"{json.dumps({k: round(v, 3) for k, v in out[arm].items()})}", flush=True)
    return out


def run_serial(args, env, steps: int, work: Path, report: dict, t_start: float) -> None:
    for seed in args.seeds:
        paired = True
        for arm in args.arms:
            left = args.budget_s - (time.perf_counter() - t_start) - 10.0
            need = sum(report["estimate_s"].values()) if arm == args.arms[0] else report["estimate_s"][arm]
            paired = paired and left >= need  # a seed starts only with all its arms
            if not paired:
                report["skipped"].append({"arm": arm, "seed": seed, "left_s": left, "needed_s": need})
                print(f"skip {arm} seed {seed}: {left:.0f} s left, about {need:.0f} s needed", flush=True)
                continue
            add_run(args, report, run_one(args, arm, seed, steps, work))
            free(env)


def add_run(args, report: dict, r: dict) -> None:
    report["runs"].append(r)
    sources = "".join(f", {k} {v:.4f}" for k, v in r["scalars"].items()
                      if k.startswith(("final_loss/", "final_answer/")))
    print(f"{r['arm']} seed {r['seed']}: final loss {r['scalars']['final_loss']:.4f}{sources}, "
          f"train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s", flush=True)
    write(report, args.out, plots=True)  # a run cut short by a time limit leaves these behind


def main(argv=None) -> None:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        return worker(args, args.worker)
    args.out.mkdir(parents=True, exist_ok=True)
    work = work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for arm in args.arms:  # fail now on a bad setting of any arm
        cfg = compose(overrides(args, arm, 0, 100, work / "check", evals=True))
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        for stage in build_recipe(cfg):
            check_config(cfg, stage, 1, tokenizer.vocab_size, device)
    # --jobs or --steps: only the worker processes use the GPU; else every run in this process
    env = init_distributed(cfg.parallel) if args.jobs <= 1 and not args.steps else None
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "choices": cfg.eval.choices},
              "gpu": gpu, "torch": torch.__version__, "commit": git_commit(), "command": " ".join(sys.argv),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "eval_lengths": eval_lengths(args), "runs": [], "skipped": [],
              "failed": [], "stopped": [], "not_started": []}
    if args.reference:
        add_reference(args, report, json.loads(args.reference.read_text()))
    ensure_corpus(cfg.data.corpus_dir, cfg.data.corpus)  # built once, before anything is timed
    deadline = t_start + args.budget_s - 10.0 - grace(args)  # 10 s: the report and plots
    if args.steps:
        steps, estimate, report["probe"] = args.steps, None, None
    else:
        report["probe"] = probe(args, env, tokenizer, work) if env else probe_jobs(args, argv, work, deadline)
        steps, estimate = plan(args, report["probe"], deadline - time.perf_counter())
    report.update(steps=steps, tokens_per_step=args.batch * args.seq_len, tokens_per_run=steps * args.batch *
                  args.seq_len, estimate_s=estimate, startup_s=time.perf_counter() - t_start)
    print(f"plan: {steps} steps x {args.batch} x {args.seq_len} tokens = {report['tokens_per_run'] / 1e6:.2f} M "
          f"tokens per run{f', {args.jobs} at once' if args.jobs > 1 else ''}"
          + (f"; estimated run seconds {json.dumps({k: round(v) for k, v in estimate.items()})}" if estimate
             else "; resumable (--steps)"), flush=True)
    try:
        if env:
            run_serial(args, env, steps, work, report, t_start)
        else:
            specs = [f"run:{arm}:{seed}:{steps}" for seed in args.seeds for arm in args.arms]
            for spec in [s for s in specs if result_path(work, s).exists()]:  # finished in an earlier call
                add_run(args, report, json.loads(result_path(work, spec).read_text()))
                specs.remove(spec)
            report.update(run_all(args, argv, specs, work, deadline, lambda spec, r: add_run(args, report, r)))
    finally:
        report["total_s"] = time.perf_counter() - t_start
        report["progress"] = {spec: progress(work, spec) for spec in report["stopped"] if spec.startswith("run:")}
        write(report, args.out, plots=True)
        left = report["stopped"] + report["not_started"]
        if args.work is None and not (args.steps and left):
            shutil.rmtree(work, ignore_errors=True)
    hint = ("the same command again resumes them from " + str(work) if args.steps else
            "not resumable without --steps") if left else ""
    print(f"done in {report['total_s']:.0f} s: {len(report['runs'])} runs, {len(report['skipped'])} skipped, "
          f"{len(report['failed'])} failed, {len(left)} stopped or not started{f' ({hint})' if hint else ''}; "
          f"{args.out}/quality.json")
    for arm, d in report.get("paired", {}).items():
        print(f"{arm} against {d['against']}, paired over seeds {d['seeds']}: final loss {100 * d['mean']:+.2f}% "
              f"(std {100 * d['std']:.2f}%); by tenth of the steps "
              + " ".join(f"{100 * x:+.1f}" for x in d["by_tenth"]) + " %")
        for key, what in (("retrieval_share", ""), ("retrieval_share_far", ", needles below depth 1")):
            if d.get(key):
                print(f"{arm} against {d['against']}, answer share (mean over tasks{what}), difference by eval "
                      "length: " + ", ".join(f"{n} {r['mean']:+.3f} (std {r['std']:.3f})" for n, r in d[key].items()))


if __name__ == "__main__":
    main()
