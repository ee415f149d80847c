"""The forked quality run's evals again with other RoPE settings (``bench/quality_fork_gpu.sh``, its last phase):
every run of a ``bench.quality --keep-checkpoints`` work folder evaluated by ``python -m train.eval`` on the pass
key at ``--lengths``, with the same items as the run's own evals (its ``eval.items``, ``eval.depths``,
``eval.seed`` and ``eval.choices``) and the model's own RoPE unless ``--eval-overrides`` says otherwise:

    python3 -m bench.quality_plain --work runs/quality_fork_work/fork --lengths 32768 65536 --out plain.json

The in-training evals of the fork stretch RoPE past the training length (YaRN, ``eval.rope_scaling``); this
reads the same runs without the stretch, so one fork says what the stretch does. Each run's results go to
``<run>/eval/<--name>/results.json`` (``plain``; a run that has them at every length is not evaluated again:
the same command resumes; other ``--eval-overrides`` want another ``--name``); ``--out`` gets one JSON of every
run, and stdout a table of the pass key's choice by arm and length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

TASK = "passkey"


def runs_in(work: Path) -> list[Path]:
    """The run folders of a ``bench.quality`` work folder that kept a checkpoint (``<arm>-s<seed>``)."""
    return sorted(p for p in work.iterdir()
                  if p.is_dir() and (p / "config.yaml").exists() and any((p / "checkpoints").glob("step_*")))


def eval_command(run: Path, lengths: list[int], extra: list[str], name: str = "plain") -> list[str]:
    """``python -m train.eval`` for ``run`` on the pass key at ``lengths``, with the items of its own evals."""
    ev = OmegaConf.load(run / "config.yaml").eval
    depths = ",".join(str(float(d)) for d in ev.depths)
    return [sys.executable, "-m", "train.eval", f"checkpoint={run}", f"tasks=[{TASK}]",
            f"lengths=[{','.join(map(str, lengths))}]", f"items={ev['items']}", f"depths=[{depths}]",
            f"seed={ev.seed}", f"choices={ev.choices}", "generate=false", f"out={run / 'eval' / name}", *extra]


def results_of(run: Path, lengths: list[int], name: str) -> dict | None:
    """The run's results under ``name`` when they hold every length, else None (to evaluate)."""
    path = run / "eval" / name / "results.json"
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    return res if set(map(str, lengths)) <= set(res["retrieval"].get(TASK, {})) else None


def evaluate_runs(runs: list[Path], lengths: list[int], extra: list[str], jobs: int, budget_s: float,
                  name: str = "plain") -> dict:
    """Run the evals not yet made, ``jobs`` at once, each stopped at the budget; the runs' failures by name."""
    deadline = time.monotonic() + budget_s
    failed = {}

    def one(run: Path) -> None:
        left = deadline - time.monotonic()
        if left < 5:
            failed[run.name] = "not started: the budget was spent"
            return
        log = run / "eval" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with log.open("w") as f:
                done = subprocess.run(eval_command(run, lengths, extra, name), stdout=f, stderr=subprocess.STDOUT,
                                      timeout=left)
        except subprocess.TimeoutExpired:
            failed[run.name] = f"stopped at the budget ({budget_s:.0f} s)"
            return
        if done.returncode:
            failed[run.name] = f"train.eval exited {done.returncode}: {log}"

    todo = [r for r in runs if results_of(r, lengths, name) is None]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, todo))
    return failed


def collect(runs: list[Path], lengths: list[int], name: str = "plain") -> dict:
    """Per run: the pass key's choice, over all needles and below depth 1, the answer's NLL per token, and the
    RoPE each length ran with."""
    out = {}
    for run in runs:
        res = results_of(run, lengths, name)
        if res is None:
            continue
        by_len = res["retrieval"][TASK]
        arm, _, seed = run.name.rpartition("-s")
        out[run.name] = {"arm": arm, "seed": int(seed), "step": res["step"], "rope": res["rope"],
                         "choice": {str(n): by_len[str(n)]["choice"] for n in lengths},
                         "choice_far": {str(n): (by_len[str(n)].get("far") or {}).get("choice") for n in lengths},
                         "nll": {str(n): by_len[str(n)]["nll"] for n in lengths},
                         "items": {str(n): by_len[str(n)]["items"] for n in lengths}}
    return out


def table(collected: dict, lengths: list[int]) -> str:
    """Mean over seeds of the choice (and below depth 1) per arm and length, with each seed's value."""
    lines = ["| arm | " + " | ".join(f"{n} choice / far" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for arm in sorted({r["arm"] for r in collected.values()}):
        rows = sorted((r for r in collected.values() if r["arm"] == arm), key=lambda r: r["seed"])
        cells = []
        for n in lengths:
            c = [r["choice"][str(n)] for r in rows]
            f = [r["choice_far"][str(n)] for r in rows if r["choice_far"][str(n)] is not None]
            far = f"{np.mean(f):.2f}" if f else "-"
            cells.append(f"{np.mean(c):.2f} / {far} (seeds {' '.join(f'{v:.2f}' for v in c)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a bench.quality --work folder (--keep-checkpoints)")
    ap.add_argument("--lengths", type=int, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True, help="the JSON of every run's results")
    ap.add_argument("--jobs", type=int, default=3, help="evals at once, each in its own process")
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--name", default="plain", help="the runs' eval subfolder for these results")
    ap.add_argument("--eval-overrides", nargs="*", default=[],
                    help="more train.eval overrides, e.g. rope_scaling={type:yarn,factor:auto} (default: none, the "
                         "model's own RoPE)")
    args = ap.parse_args(argv)
    runs = runs_in(args.work)
    if not runs:
        print(f"no run with a kept checkpoint in {args.work}: train with --keep-checkpoints", file=sys.stderr)
        return 1
    failed = evaluate_runs(runs, args.lengths, args.eval_overrides, args.jobs, args.budget_s, args.name)
    collected = collect(runs, args.lengths, args.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"lengths": args.lengths, "task": TASK, "eval_overrides": args.eval_overrides,
                                    "runs": collected, "failed": failed}, indent=1))
    for name, why in failed.items():
        print(f"plain {name}: {why}")
    if collected:
        print(table(collected, args.lengths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
