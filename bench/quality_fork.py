"""The source of a forked quality run (``bench/quality_fork_gpu.sh``): among a quality report's dense runs, the
one that retrieves best, whose weights both arms then continue from (``checkpoint.init_from``):

    python3 -m bench.quality_fork runs/quality_fork/source/quality.json --work runs/quality_src --min-choice 0.75

prints the chosen run's directory on stdout and a table of every run on stderr; exits 1, naming the best
score, when no run reaches ``--min-choice``. The score is the pass key's choice accuracy (the answer ranked
first of the candidates) averaged over the eval lengths of at least ``--min-tokens`` (2K: copying over a
distance, not within a primer document); a tie goes to the lower answer loss on the primer documents.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.quality import _tokens, eval_by_length


def retrieval_score(scalars: dict, min_tokens: int = 2048) -> float | None:
    """Mean of ``eval/passkey/<L>/choice`` over the lengths L >= ``min_tokens``; None without such an eval."""
    vals = [v for length, vs in eval_by_length(scalars, "choice", "passkey").items()
            if _tokens(length) >= min_tokens for v in vs]
    return float(np.mean(vals)) if vals else None


def pick(report: dict, work: Path, min_choice: float, min_tokens: int = 2048) -> tuple[Path | None, list[dict]]:
    """The best dense run's directory (None when none scores ``min_choice``) and every dense run's row."""
    rows = []
    for r in report["runs"]:
        if r["arm"] != "dense":
            continue
        s = r["scalars"]
        rows.append({"seed": r["seed"], "score": retrieval_score(s, min_tokens),
                     "primer_answer": s.get("final_answer/primer"), "dir": work / f"dense-s{r['seed']}"})
    scored = [row for row in rows if row["score"] is not None]
    best = max(scored, key=lambda row: (row["score"], -(row["primer_answer"] or float("inf"))), default=None)
    return (best["dir"] if best and best["score"] >= min_choice else None), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the source phase's quality.json")
    ap.add_argument("--work", type=Path, required=True, help="its --work folder (run directories)")
    ap.add_argument("--min-choice", type=float, default=0.75)
    ap.add_argument("--min-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    chosen, rows = pick(json.loads(args.report.read_text()), args.work, args.min_choice, args.min_tokens)
    for row in rows:
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        answer = "-" if row["primer_answer"] is None else f"{row['primer_answer']:.3f}"
        print(f"dense seed {row['seed']}: pass-key choice at >= {args.min_tokens} tokens {score}, "
              f"primer answer loss {answer}", file=sys.stderr)
    if chosen is None:
        best = max((r["score"] for r in rows if r["score"] is not None), default=None)
        print(f"no source: the best pass-key choice is {best}, below --min-choice {args.min_choice}", file=sys.stderr)
        return 1
    print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
