"""This tree's MSA kernels against another commit's, side by side in one process on one GPU.

Prepare the baseline's ``kernels`` package in a folder, then run from the repository root:

    mkdir -p .baseline && git archive <commit> kernels | tar -x -C .baseline
    python3 bench/compare_kernels.py --baseline .baseline --json out.json [--sizes 131072] [--hkv 2 4]

(``--this <folder>`` times a kernels package prepared the same way instead of this tree's.)

For each shape (B=1, H=32, D=Di=128, Bk=128, k=16, bf16; inputs as in ``bench/msa_attention.py``:
random, with a sink direction in block 0) it times, for both trees: ``select_blocks`` (bf16 and fp8),
``sparse_attention`` forward and forward+backward, ``index_kl_loss`` forward+backward with the main
forward's ``lse``, and one attention training step (index + main fwd+bwd + KL); it checks that the two
trees' outputs agree (selections: share of equal blocks; attention: rel. RMS of o and every gradient)
and prints the CUDA kernel breakdown of this tree's training step and the peak GPU memory of the main
branch's forward and forward+backward (beyond the inputs) for both trees. ``--env NAME=VALUE`` pairs time
this tree's step again with each setting (e.g. ``MSA_KV_DQ_PATH=query``). Timing: ``measure`` of
``bench/msa_attention.py`` (``do_bench`` median under 50 ms a call, else the median of 3 CUDA-event
timed calls).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import env_setting, run_meta  # noqa: E402
from bench.msa_attention import make_inputs, measure, measure_peaks  # noqa: E402

BK, TOPK = 128, 16


def load_kernels(root: str | None):
    """The ``kernels`` package under ``root`` (None: this tree's), with its own submodules."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "kernels" or name.startswith("kernels.")}
    for name in saved:
        del sys.modules[name]
    if root:
        sys.path.insert(0, os.path.abspath(root))
    try:
        pkg = importlib.import_module("kernels")
        mods = {n: importlib.import_module(f"kernels.{n}") for n in ("sparse_attention", "index_topk", "index_kl")}
    finally:
        if root:
            sys.path.pop(0)
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return pkg, mods


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def train_step(kp, q, k, v, q_idx, k_idx, do):
    """One attention training step: selection, main forward+backward, index KL forward+backward."""
    def step():
        sel = kp.select_blocks(q_idx.detach(), k_idx.detach(), BK, TOPK)
        o, lse = kp.sparse_attention(q, k, v, sel, BK)
        o.backward(do)
        kp.index_kl_loss(q, k, q_idx, k_idx, sel, BK, lse=lse).backward()
        for t in (q, k, v, q_idx, k_idx):
            t.grad = None
    return step


def main_fwd_bwd(kp, q, k, v, do, block_idx):
    def step():
        o, _ = kp.sparse_attention(q, k, v, block_idx, BK)
        o.backward(do)
        q.grad = k.grad = v.grad = None
    return step


def grads_of(kp, q, k, v, q_idx, k_idx, do, block_idx):
    for t in (q, k, v, q_idx, k_idx):
        t.grad = None
    o, lse = kp.sparse_attention(q, k, v, block_idx, BK)
    o.backward(do)
    loss = kp.index_kl_loss(q, k, q_idx, k_idx, block_idx, BK, lse=lse)
    loss.backward()
    out = {"o": o.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad, "kl": loss.detach(),
           "dq_idx": q_idx.grad, "dk_idx": k_idx.grad}
    for t in (q, k, v, q_idx, k_idx):
        t.grad = None
    return out


def peak_gb(fn):
    """GPU memory ``fn`` allocates at its peak beyond what was allocated before it, GB."""
    fn()  # compiled and warm: the measured call allocates only what a call needs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 1e9, 3)


def selection_overlap(a, b):
    a, b = a[..., 1:].long(), b[..., 1:].long()
    return (((a[..., :, None] == b[..., None, :]).any(-1) & (a >= 0)).sum() / (a >= 0).sum().clamp_min(1)).item()


def breakdown(fn, top=12):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return {e.key[:70]: round(e.device_time_total / 1e3, 3) for e in ev}


def compare_shape(N, Hkv, trees, env_variants, rows):
    torch.manual_seed(0)
    q, k, v, q_idx, k_idx, do = make_inputs(N, Hkv)
    res = {"N": N, "Hkv": Hkv, "times": {}, "checks": {}, "peak_gb": {}}
    sel = {name: kp.select_blocks(q_idx, k_idx, BK, TOPK) for name, kp in trees.items()}
    res["checks"]["selection_equal_share"] = selection_overlap(sel["base"], sel["this"])
    block_idx = sel["this"]
    for name, kp in trees.items():
        t = res["times"].setdefault(name, {})
        t["select_blocks"] = measure(lambda kp=kp: kp.select_blocks(q_idx, k_idx, BK, TOPK), True)[0]
        t["select_blocks[fp8]"] = measure(lambda kp=kp: kp.select_blocks(q_idx, k_idx, BK, TOPK, fp8=True), True)[0]
        mem = res["peak_gb"].setdefault(name, {})
        t["main_fwd"] = measure(lambda kp=kp: kp.sparse_attention(q, k, v, block_idx, BK), True)[0]
        mem["main_fwd"] = peak_gb(lambda kp=kp: kp.sparse_attention(q, k, v, block_idx, BK))
        if N > 2**19:  # the forward-only long shapes: selection plus main forward
            continue
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(True)
        t["main_fwd_bwd"] = measure(main_fwd_bwd(kp, q, k, v, do, block_idx), True)[0]
        mem["main_fwd_bwd"] = peak_gb(main_fwd_bwd(kp, q, k, v, do, block_idx))
        lse = kp.sparse_attention(q, k, v, block_idx, BK)[1]

        def kl_fb(kp=kp, lse=lse):
            kp.index_kl_loss(q, k, q_idx, k_idx, block_idx, BK, lse=lse).backward()
            q_idx.grad = k_idx.grad = None
        t["kl_fwd_bwd"] = measure(kl_fb, True)[0]
        t["train_step"] = measure(train_step(kp, q, k, v, q_idx, k_idx, do), True)[0]
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(False)
    if N <= 2**19:
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(True)
        ga = grads_of(trees["base"], q, k, v, q_idx, k_idx, do, block_idx)
        gb = grads_of(trees["this"], q, k, v, q_idx, k_idx, do, block_idx)
        res["checks"]["rel_rms_this_vs_base"] = {n: rel_rms(ga[n][torch.isfinite(ga[n])], gb[n][torch.isfinite(ga[n])])
                                                 for n in ga}
        for env in env_variants:
            name, _, value = env.partition("=")
            with env_setting(name, value):
                res["times"]["this"][f"train_step[{env}]"] = measure(
                    train_step(trees["this"], q, k, v, q_idx, k_idx, do), True)[0]
                res["times"]["this"][f"main_fwd_bwd[{env}]"] = measure(
                    main_fwd_bwd(trees["this"], q, k, v, do, block_idx), True)[0]
        res["breakdown_this"] = breakdown(train_step(trees["this"], q, k, v, q_idx, k_idx, do))
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(False)
    print(json.dumps(res, indent=1), flush=True)
    rows.append(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="folder holding the baseline's kernels/ package")
    ap.add_argument("--this", default=None, help="folder holding the kernels/ package to time (default: this tree's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072])
    ap.add_argument("--hkv", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE settings to time this tree with as well")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trees = {"base": load_kernels(args.baseline)[0], "this": load_kernels(args.this)[0]}
    meta = {**run_meta(), **measure_peaks()}
    print(json.dumps(meta), flush=True)
    rows = []
    for N in args.sizes:
        for Hkv in args.hkv:
            compare_shape(N, Hkv, trees, args.env, rows)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{'N':>8} {'Hkv':>3} {'case':<24} {'base ms':>9} {'this ms':>9} {'speed-up':>8}")
    for r in rows:
        for case, t in r["times"]["this"].items():
            b = r["times"]["base"].get(case)
            print(f"{r['N']:>8} {r['Hkv']:>3} {case:<24} {b if b else float('nan'):>9.2f} {t:>9.2f} "
                  f"{(b / t) if b else float('nan'):>8.2f}")
        for case, gb in r["peak_gb"]["this"].items():
            print(f"{r['N']:>8} {r['Hkv']:>3} peak GB {case:<16} {r['peak_gb']['base'][case]:>9.2f} {gb:>9.2f}")


if __name__ == "__main__":
    main()
