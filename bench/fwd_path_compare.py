"""Two training runs that differ only in ``attention.fwd_path``, compared from their ``metrics.jsonl``: the
sparse phase's step time (steps that computed selection stats left out: those do extra work), the LM loss
step by step, and the selection's tile union, which decides what ``auto`` runs. The forwards differ only in
summation order, but two runs of the same code on a GPU already differ (nondeterministic kernels such as
FlashAttention's backward): the warm-up steps, the same code in both runs, give that floor, and a sparse-phase
difference is read against it. It does not tell a small error in the forward from that noise: the kernel
tests do.

    python3 -m bench.fwd_path_compare kv=runs/a/metrics.jsonl auto=runs/b/metrics.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: list[dict], skip: int = 5) -> dict:
    """Median ``perf/step_s`` of the sparse phase's steps without selection stats, after its first ``skip``
    (compilation, allocator growth); the last tile union logged."""
    sparse = [r for r in rows if r.get("train/phase_sparse") and "perf/step_s" in r]
    timed = [r["perf/step_s"] for r in sparse[skip:] if r.get("msa/tile_union") is None]
    unions = [r["msa/tile_union"] for r in rows if r.get("msa/tile_union") is not None]
    return {"sparse_steps": len(sparse), "timed_steps": len(timed),
            "step_s_median": statistics.median(timed) if timed else None,
            "tile_union_last": unions[-1] if unions else None, "tile_union_all": unions}


def compare(a: list[dict], b: list[dict], skip: int = 5) -> dict:
    """``b`` against ``a``: the speed-up of ``b``'s median sparse step, and the largest relative difference of
    the LM loss over the steps both logged, in the dense warm-up (the same code in both runs: what run-to-run
    nondeterminism alone gives, the floor) and in the sparse phase (where the forwards differ)."""
    sa, sb = summarize(a, skip), summarize(b, skip)
    la = {r["step"]: r for r in a if "loss/lm" in r}
    lb = {r["step"]: r for r in b if "loss/lm" in r}
    both = sorted(la.keys() & lb.keys())

    def worst(sparse: bool):
        steps = [s for s in both if bool(la[s].get("train/phase_sparse")) == sparse]
        return max((abs(la[s]["loss/lm"] - lb[s]["loss/lm"]) / abs(la[s]["loss/lm"]) for s in steps), default=None)

    speedup = sa["step_s_median"] / sb["step_s_median"] if sa["step_s_median"] and sb["step_s_median"] else None
    return {"a": sa, "b": sb, "speedup_b_over_a": speedup, "loss_steps_compared": len(both),
            "loss_max_rel_diff_warmup": worst(False), "loss_max_rel_diff_sparse": worst(True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs=2, help="name=metrics.jsonl, the baseline first")
    ap.add_argument("--skip", type=int, default=5, help="sparse steps left out at the start")
    ap.add_argument("--json", required=True)
    ap.add_argument("--meta", default="{}", help="JSON object merged into the output (GPU, commit, command)")
    a = ap.parse_args(argv)
    (na, pa), (nb, pb) = (r.split("=", 1) for r in a.runs)
    out = {**json.loads(a.meta), "baseline": na, "other": nb, **compare(read(pa), read(pb), a.skip)}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    s = out["speedup_b_over_a"]
    print(f"{na}: {out['a']['step_s_median']} s, {nb}: {out['b']['step_s_median']} s a sparse step "
          f"({'-' if s is None else f'{s:.3f}x'}); tile union {out['a']['tile_union_last']} / "
          f"{out['b']['tile_union_last']}; LM loss max rel diff {out['loss_max_rel_diff_sparse']} sparse, "
          f"{out['loss_max_rel_diff_warmup']} in the warm-up (the same code: the runs' own nondeterminism)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
