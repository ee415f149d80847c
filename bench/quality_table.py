"""The per-seed comparison table of ``bench/quality.py`` reports, as ``docs/quality.md`` writes them.

Runs of several reports go in one table (a report made with ``--reference`` already holds the reference
arm's runs; give the reference report too for arms it trained that the later one did not take, e.g. dense):

    python -m bench.quality_table docs/results/quality_h100_run16.json docs/results/quality_h200_run10.json \\
        --arms dense msa_wide msa_window

One column per arm, one row per metric; a cell lists the seeds' values and their mean and standard deviation
over seeds (n - 1). Rows: the final LM loss and, for every arm after the first, its final loss against the
first arm's, seed by seed (``arm / first - 1``; the pairing the issue asks for: the same seed, batches and
initial weights); index recall, its ceiling, the tile union and bits per byte by eval length; per task the
log-likelihood choice by length, mean over seeds, over all needles and over the needles below depth 1 (``choice_far``:
a needle at depth 1 sits next to the question, where a window layer or MSA's own block finds it, so the
mean over depths can read well with no far retrieval); the needle recall over the items answered right at
the training length; per task, whether the answer's query selects the needle (``hit``), seed by seed at every
length: the mean over layers over the items answered right, and the best KV group of the best layer over all
items; the primer's answer loss at the end (below about 0.1: the run learned to copy).
A run that appears in two reports is taken from the first one given.

``--plain PLAIN_JSON`` (``bench/quality_plain.py``: the same runs evaluated again with the model's own RoPE)
adds the pass-key choice at each of its lengths, all needles and those below depth 1, seed by seed:

    python -m bench.quality_table docs/results/quality_h100_run19_fork.json --arms dense msa_window \\
        --plain docs/results/quality_h100_run19_plain.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.quality import _std, _tokens
from train.eval.runner import fmt_tokens as _fmt


def collect(reports: list[dict]) -> dict[tuple[str, int], dict]:
    """``(arm, seed) -> scalars`` over the reports, the first report's run where two hold one."""
    runs: dict[tuple[str, int], dict] = {}
    for rep in reports:
        for r in rep["runs"]:
            runs.setdefault((r["arm"], r["seed"]), r["scalars"])
    return runs


def choice_far(scalars: dict, task: str, length: str) -> float | None:
    """``eval/<task>/<L>/choice_far``, or for reports older than it, the mean of the per-depth choices below
    depth 1 (``depth/<task>/<L>/<d>/choice``; every depth holds the same number of items)."""
    if scalars.get(f"eval/{task}/{length}/choice_far") is not None:
        return scalars[f"eval/{task}/{length}/choice_far"]
    vals = [v for k, v in scalars.items() if k.startswith(f"depth/{task}/{length}/") and k.endswith("/choice")
            and float(k.split("/")[3]) < 1.0 and v is not None]
    return float(np.mean(vals)) if vals else None


def _cell(vals: list[float | None], fmt: str) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return ""
    seeds = " / ".join(fmt.format(v) if v is not None else "-" for v in vals)
    std = fmt.replace("+", "").format(_std(got))
    return f"{seeds} ({fmt.format(np.mean(got))} ± {std})" if len(got) > 1 else seeds


def by_length(scalars: dict, lengths: list[str], key, fmt: str = "{:.2f}") -> str | None:
    """One seed's values of ``key(length)`` joined over ``lengths`` (``-`` where missing); None if all are."""
    vals = [key(scalars, n) for n in lengths]
    return " / ".join("-" if v is None else fmt.format(v) for v in vals) if any(v is not None for v in vals) else None


def best_group(scalars: dict, task: str, length: str) -> float | None:
    """The best KV group of the best layer: the largest ``layer/needle_hit_best_group/<task>/<L>/<layer>``."""
    vals = [v for k, v in scalars.items() if k.startswith(f"layer/needle_hit_best_group/{task}/{length}/")
            and v is not None]
    return max(vals) if vals else None


def table(reports: list[dict], arms: list[str] | None = None, plain: dict | None = None) -> str:
    runs = collect(reports)
    arms = arms or list(dict.fromkeys(a for a, _ in runs))
    seeds = sorted({s for a, s in runs if a in arms})
    first = arms[0]
    lengths = sorted({k.split("/")[2] for sc in runs.values() for k in sc
                      if k.startswith("eval/bpb/") and k.count("/") == 2}, key=_tokens)
    tasks = sorted({k.split("/")[1] for sc in runs.values() for k in sc
                    if k.startswith("eval/") and k.endswith("/choice")})
    # the rows' length in training (--seq-len; a last stage of longer rows, --final-len, aside)
    train_len = reports[0].get("settings", {}).get("seq_len")
    rows: list[tuple[str, list[str]]] = []

    def per_seed(name: str, get, fmt: str = "{:.3f}") -> None:
        cells = [_cell([get(runs[a, s]) if (a, s) in runs else None for s in seeds], fmt) for a in arms]
        if any(cells):
            rows.append((name, cells))

    per_seed("final LM loss", lambda sc: sc.get("final_loss"), "{:.4f}")
    rel = []
    for a in arms:
        vals = [100 * (runs[a, s]["final_loss"] / runs[first, s]["final_loss"] - 1)
                if a != first and (a, s) in runs and (first, s) in runs else None for s in seeds]
        rel.append(_cell(vals, "{:+.2f}") + "%" if any(v is not None for v in vals) else "")
    if any(rel):
        rows.append((f"final LM loss against {first}, paired by seed", rel))
    for n in lengths:
        per_seed(f"index recall at {n}", lambda sc, n=n: sc.get(f"eval/index_recall/{n}"))
    for n in lengths:
        per_seed(f"its ceiling at {n} (oracle_recall)", lambda sc, n=n: sc.get(f"eval/oracle_recall/{n}"))
    for n in lengths:  # windows inside one held-out document (reports before eval.doc_rows have none: no row)
        per_seed(f"index recall at {n}, inside one document", lambda sc, n=n: sc.get(f"eval/index_recall_doc/{n}"))
        per_seed(f"its ceiling at {n}, inside one document", lambda sc, n=n: sc.get(f"eval/oracle_recall_doc/{n}"))
    for n in lengths:  # reports from before c4f50fc have none: no row
        per_seed(f"tile union at {n}", lambda sc, n=n: sc.get(f"eval/tile_union/{n}"), "{:.2f}")
    for n in lengths:
        per_seed(f"bits per byte at {n}", lambda sc, n=n: sc.get(f"eval/bpb/{n}"))
    for n in lengths:
        per_seed(f"bits per byte at {n}, inside one document", lambda sc, n=n: sc.get(f"eval/bpb_doc/{n}"))
    for task in tasks:
        head = " / ".join(lengths)
        for metric, label in (("choice", "all needles"), ("far", "needles below depth 1")):
            cells = []
            for a in arms:
                by_len = []
                for n in lengths:
                    vals = [(choice_far(runs[a, s], task, n) if metric == "far"
                             else runs[a, s].get(f"eval/{task}/{n}/choice")) for s in seeds if (a, s) in runs]
                    vals = [v for v in vals if v is not None]
                    by_len.append(f"{np.mean(vals):.2f}" if vals else "-")
                cells.append(" / ".join(by_len) if any(v != "-" for v in by_len) else "")
            if any(cells):
                rows.append((f"{task} choice, {label}, {head} (mean over seeds)", cells))
    n = next((x for x in lengths if _tokens(x) == train_len), None)
    if n is not None:
        for task in tasks:
            per_seed(f"needle recall at {n}, {task}, items answered right",
                     lambda sc, task=task, n=n: sc.get(f"eval/needle_recall/{task}/{n}/correct"))
    for task in tasks:  # the lengths where some run has the metric, in order
        for name, key in ((f"`hit`, {task}: the needle selected at the answer's query, items answered right, "
                           "mean over layers", lambda sc, n, t=task: sc.get(f"eval/needle_recall/{t}/{n}/hit/correct")),
                          (f"`hit`, {task}: the best KV group of the best layer, all items",
                           lambda sc, n, t=task: best_group(sc, t, n))):
            have = [n for n in lengths if any(key(sc, n) is not None for sc in runs.values())]
            cells = ["; ".join(x for x in (by_length(runs[a, s], have, key) if (a, s) in runs else None
                                           for s in seeds) if x) for a in arms]
            if any(cells):
                rows.append((f"{name}, {' / '.join(have)}, seed by seed", cells))
    if plain:
        by_run = {(r["arm"], r["seed"]): r for r in plain["runs"].values()}
        for L in plain["lengths"]:
            for field, label in (("choice", "all needles"), ("choice_far", "needles below depth 1")):
                cells = [_cell([by_run[a, s][field].get(str(L)) if (a, s) in by_run else None for s in seeds],
                               "{:.2f}") for a in arms]
                if any(cells):
                    rows.append((f"{plain.get('task', 'passkey')} choice at {_fmt(L)} with the model's own RoPE "
                                 f"(no stretch), {label}", cells))
    per_seed("primer answer loss at the end (copying: below about 0.1)", lambda sc: sc.get("final_answer/primer"))
    out = [f"| seeds {' / '.join(map(str, seeds))} | " + " | ".join(f"`{a}`" for a in arms) + " |",
           "|---|" + "---|" * len(arms)]
    out += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="quality.json files; a run in two is taken from the first")
    ap.add_argument("--arms", nargs="+", default=None, help="columns in this order (default: as found); the "
                    "first is the one the others are paired against")
    ap.add_argument("--plain", type=Path, default=None, help="bench/quality_plain.py's JSON for these runs")
    args = ap.parse_args(argv)
    plain = json.loads(args.plain.read_text()) if args.plain else None
    print(table([json.loads(p.read_text()) for p in args.reports], args.arms, plain))


if __name__ == "__main__":
    main()
