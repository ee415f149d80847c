"""This tree's MSA kernels against another commit's, side by side in one process on one GPU.

Prepare the baseline's ``kernels`` package in a folder, then run from the repository root:

    mkdir -p .baseline && git archive <commit> kernels | tar -x -C .baseline
    python3 bench/compare_kernels.py --baseline .baseline --json out.json [--sizes 32768 131072]
        [--shapes 32x2 32x4 8x2] [--dq-path kv dkdv]

(``--this <folder>`` times a kernels package prepared the same way instead of this tree's.)

Shapes are ``HxHkv`` (query heads x KV heads; default 32x2, 32x4 and 8x2, the ``small`` model's G = 4),
each at every ``--sizes`` N; B=1, D=Di=128, Bk=128, k=16, bf16, inputs as in ``bench/msa_attention.py``
(random, with a sink direction in block 0). For both trees it times ``select_blocks`` (bf16 and fp8),
``sparse_attention`` forward and forward+backward, ``index_kl_loss`` forward+backward with the main
forward's ``lse``, and one attention training step (index + main fwd+bwd + KL). It checks the two trees'
outputs: ``bitwise_equal`` (``torch.equal``) of ``block_idx`` (exact and fp8), ``o``, ``lse``, ``kl`` and
every gradient (``dq``, ``dk``, ``dv``, ``dq_idx``, ``dk_idx``) on the same selection, and
``base_rerun_bitwise_equal``, the baseline against a second run of itself (``dk_idx`` is summed with
fp32 atomics, so it may differ between any two runs); ``rel_rms_this_vs_base`` gives the size of any
difference. Each ``--dq-path`` is timed and checked as well (main branch forward+backward, both trees).
It prints the CUDA kernel breakdown of this tree's training step and the peak GPU memory of the main
branch's forward and forward+backward (beyond the inputs) for both trees. Timing: ``measure`` of
``bench/msa_attention.py`` (``do_bench`` median under 50 ms a call, else the median of 3 CUDA-event
timed calls).

Trees before the launch settings became arguments read the dQ path from the environment variable
``MSA_KV_DQ_PATH`` while they run; ``Tree`` sets it for them and passes ``dq_path=`` to newer trees.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # --device cpu: the kernels run in the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import run_meta  # noqa: E402
from bench.msa_attention import make_inputs  # noqa: E402
from bench.timing import measure, measure_peaks  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    block_size: int = 128
    topk: int = 16
    head_dim: int = 128
    index_dim: int = 128
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16


# --device cpu: toy sizes in fp32 under the Triton interpreter, to check the script, not to time anything
TOY = Sizes(block_size=16, topk=4, head_dim=32, index_dim=32, device="cpu", dtype=torch.float32)
SZ = Sizes()  # main() switches it to TOY for --device cpu
GRAD_NAMES = ("o", "lse", "dq", "dk", "dv", "kl", "dq_idx", "dk_idx")


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


class Tree:
    """One tree's kernels behind one calling convention: the dQ path as an argument (trees from the
    renovation on) or as the environment variable ``MSA_KV_DQ_PATH`` (earlier trees read it in the
    forward and the backward, so ``setting`` must enclose both)."""

    def __init__(self, pkg):
        self.select_blocks, self.index_kl_loss = pkg.select_blocks, pkg.index_kl_loss
        self._attn = pkg.sparse_attention
        self.takes_args = "dq_path" in inspect.signature(pkg.sparse_attention).parameters

    def sparse_attention(self, q, k, v, block_idx, dq_path="auto"):
        if self.takes_args:
            return self._attn(q, k, v, block_idx, SZ.block_size, dq_path=dq_path)
        return self._attn(q, k, v, block_idx, SZ.block_size)

    @contextlib.contextmanager
    def setting(self, dq_path="auto"):
        if self.takes_args or dq_path == "auto":
            yield
            return
        old = os.environ.get("MSA_KV_DQ_PATH")
        os.environ["MSA_KV_DQ_PATH"] = dq_path
        try:
            yield
        finally:
            if old is None:
                del os.environ["MSA_KV_DQ_PATH"]
            else:
                os.environ["MSA_KV_DQ_PATH"] = old


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def train_step(tree, q, k, v, q_idx, k_idx, do):
    """One attention training step: selection, main forward+backward, index KL forward+backward."""
    def step():
        sel = tree.select_blocks(q_idx.detach(), k_idx.detach(), SZ.block_size, SZ.topk)
        o, lse = tree.sparse_attention(q, k, v, sel)
        o.backward(do)
        tree.index_kl_loss(q, k, q_idx, k_idx, sel, SZ.block_size, lse=lse).backward()
        for t in (q, k, v, q_idx, k_idx):
            t.grad = None
    return step


def main_fwd_bwd(tree, q, k, v, do, block_idx, dq_path="auto"):
    def step():
        o, _ = tree.sparse_attention(q, k, v, block_idx, dq_path)
        o.backward(do)
        q.grad = k.grad = v.grad = None
    return step


def grads_of(tree, q, k, v, q_idx, k_idx, do, block_idx, dq_path="auto"):
    """Outputs and gradients of the main branch (``dq_path``) and, with the default path, the index KL."""
    for t in (q, k, v, q_idx, k_idx):
        t.grad = None
    with tree.setting(dq_path):
        o, lse = tree.sparse_attention(q, k, v, block_idx, dq_path)
        o.backward(do)
    out = {"o": o.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if dq_path == "auto":
        loss = tree.index_kl_loss(q, k, q_idx, k_idx, block_idx, SZ.block_size, lse=lse)
        loss.backward()
        out.update(kl=loss.detach(), dq_idx=q_idx.grad, dk_idx=k_idx.grad)
    for t in (q, k, v, q_idx, k_idx):
        t.grad = None
    return out


def compare_outputs(ga, gb, ga2):
    """Bitwise equality and rel. RMS of this tree's outputs ``gb`` against the baseline's ``ga``, and the
    baseline's rerun ``ga2`` against ``ga``."""
    fin = {n: torch.isfinite(ga[n]) for n in ga}
    return {"bitwise_equal": {n: torch.equal(ga[n], gb[n]) for n in ga},
            "base_rerun_bitwise_equal": {n: torch.equal(ga[n], ga2[n]) for n in ga},
            "rel_rms_this_vs_base": {n: rel_rms(ga[n][fin[n]], gb[n][fin[n]]) for n in ga}}


def peak_gb(fn):
    """GPU memory ``fn`` allocates at its peak beyond what was allocated before it, GB (None on the CPU)."""
    if SZ.device != "cuda":
        return None
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
    if SZ.device != "cuda":
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return {e.key[:70]: round(e.device_time_total / 1e3, 3) for e in ev}


def has_fp8() -> bool:
    return SZ.device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


def check_selection(res, trees, q_idx, k_idx):
    sel = {name: tree.select_blocks(q_idx, k_idx, SZ.block_size, SZ.topk) for name, tree in trees.items()}
    res["checks"]["selection_equal_share"] = selection_overlap(sel["base"], sel["this"])
    bits = {"block_idx": torch.equal(sel["base"], sel["this"])}
    if has_fp8():
        sel8 = {name: tree.select_blocks(q_idx, k_idx, SZ.block_size, SZ.topk, fp8=True)
                for name, tree in trees.items()}
        bits["block_idx[fp8]"] = torch.equal(sel8["base"], sel8["this"])
    res["checks"]["selection_bitwise_equal"] = bits
    return sel["this"]


def compare_shape(N, H, Hkv, trees, dq_paths, rows):
    torch.manual_seed(0)
    q, k, v, q_idx, k_idx, do = make_inputs(N, Hkv, n_heads=H, device=SZ.device, head_dim=SZ.head_dim,
                                            index_dim=SZ.index_dim, block_size=SZ.block_size, dtype=SZ.dtype)
    res = {"N": N, "H": H, "Hkv": Hkv, "times": {}, "checks": {}, "peak_gb": {}}
    block_idx = check_selection(res, trees, q_idx, k_idx)
    bk, topk = SZ.block_size, SZ.topk
    measure_ms = lambda fn: measure(fn, device=SZ.device)[0]  # noqa: E731
    for name, tree in trees.items():
        t = res["times"].setdefault(name, {})
        t["select_blocks"] = measure_ms(lambda tree=tree: tree.select_blocks(q_idx, k_idx, bk, topk))
        if has_fp8():
            t["select_blocks[fp8]"] = measure_ms(lambda tree=tree: tree.select_blocks(q_idx, k_idx, bk, topk, fp8=True))
        mem = res["peak_gb"].setdefault(name, {})
        t["main_fwd"] = measure_ms(lambda tree=tree: tree.sparse_attention(q, k, v, block_idx))
        mem["main_fwd"] = peak_gb(lambda tree=tree: tree.sparse_attention(q, k, v, block_idx))
        if N > 2**19:  # the forward-only long shapes: selection plus main forward
            continue
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(True)
        t["main_fwd_bwd"] = measure_ms(main_fwd_bwd(tree, q, k, v, do, block_idx))
        mem["main_fwd_bwd"] = peak_gb(main_fwd_bwd(tree, q, k, v, do, block_idx))
        lse = tree.sparse_attention(q, k, v, block_idx)[1]

        def kl_fb(tree=tree, lse=lse):
            tree.index_kl_loss(q, k, q_idx, k_idx, block_idx, bk, lse=lse).backward()
            q_idx.grad = k_idx.grad = None
        t["kl_fwd_bwd"] = measure_ms(kl_fb)
        t["train_step"] = measure_ms(train_step(tree, q, k, v, q_idx, k_idx, do))
        for dq in dq_paths:
            with tree.setting(dq):
                t[f"main_fwd_bwd[dq={dq}]"] = measure_ms(main_fwd_bwd(tree, q, k, v, do, block_idx, dq))
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(False)
    if N > 2**19:
        fwd = {name: tree.sparse_attention(q, k, v, block_idx) for name, tree in trees.items()}
        res["checks"]["main_fwd_bitwise_equal"] = {n: torch.equal(a, b) for n, a, b in
                                                   zip(("o", "lse"), fwd["base"], fwd["this"])}
    else:
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(True)
        for dq in ["auto", *dq_paths]:
            ga, gb, ga2 = (grads_of(trees[name], q, k, v, q_idx, k_idx, do, block_idx, dq)
                           for name in ("base", "this", "base"))
            res["checks"]["default" if dq == "auto" else f"dq={dq}"] = compare_outputs(ga, gb, ga2)
            del ga, gb, ga2
        res["breakdown_this"] = breakdown(train_step(trees["this"], q, k, v, q_idx, k_idx, do))
        for x in (q, k, v, q_idx, k_idx):
            x.requires_grad_(False)
    print(json.dumps(res, indent=1), flush=True)
    rows.append(res)


def print_summary(rows):
    print(f"{'N':>8} {'H':>3} {'Hkv':>3} {'case':<24} {'base ms':>9} {'this ms':>9} {'speed-up':>8}")
    for r in rows:
        for case, t in r["times"]["this"].items():
            b = r["times"]["base"].get(case)
            print(f"{r['N']:>8} {r['H']:>3} {r['Hkv']:>3} {case:<24} {b if b else float('nan'):>9.2f} {t:>9.2f} "
                  f"{(b / t) if b else float('nan'):>8.2f}")
        for case, gb in r["peak_gb"]["this"].items():
            if gb is None:
                continue
            print(f"{r['N']:>8} {r['H']:>3} {r['Hkv']:>3} peak GB {case:<16} {r['peak_gb']['base'][case]:>9.2f} "
                  f"{gb:>9.2f}")
    print("\nbitwise equal to the baseline (this vs base; base vs its own rerun where they differ)")
    for r in rows:
        c = r["checks"]
        items = dict(c["selection_bitwise_equal"])
        items.update(c.get("main_fwd_bitwise_equal", {}))
        for case in [k for k in c if k == "default" or k.startswith("dq=")]:
            for n, eq in c[case]["bitwise_equal"].items():
                rerun = c[case]["base_rerun_bitwise_equal"][n]
                items[f"{n}[{case}]"] = eq if eq or rerun else f"{eq} (base rerun also differs)"
        bad = {n: eq for n, eq in items.items() if eq is not True}
        print(f"{r['N']:>8} H={r['H']:<3} Hkv={r['Hkv']}: {len(items) - len(bad)}/{len(items)} equal"
              + (f"; differ: {bad}" if bad else ""))


def main():
    global SZ
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="folder holding the baseline's kernels/ package")
    ap.add_argument("--this", default=None, help="folder holding the kernels/ package to time (default: this tree's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=["32x2", "32x4", "8x2"], help="HxHkv: query heads x KV heads")
    ap.add_argument("--dq-path", nargs="*", default=[], choices=["kv", "dkdv"],
                    help="dQ paths to time and check beside the default (auto)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="start no new (N, shape) after this many seconds (the JSON keeps what was done)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: toy sizes (Bk=16, k=4, D=Di=32, fp32) in the Triton interpreter, to check the script")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        SZ = TOY
    elif not torch.cuda.is_available():
        sys.exit("bench/compare_kernels.py needs a CUDA GPU (or --device cpu)")
    trees = {"base": Tree(load_kernels(args.baseline)[0]), "this": Tree(load_kernels(args.this)[0])}
    meta = {**run_meta(), **(measure_peaks() if SZ.device == "cuda" else {}),
            "sizes": {**vars(SZ), "dtype": str(SZ.dtype)}}
    print(json.dumps(meta), flush=True)
    rows, t0 = [], time.perf_counter()
    for N in args.sizes:
        for shape in args.shapes:
            if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                meta.setdefault("not_run", []).append({"N": N, "shape": shape, "why": "--time-budget spent"})
                continue
            H, Hkv = (int(x) for x in shape.split("x"))
            compare_shape(N, H, Hkv, trees, args.dq_path, rows)
            if SZ.device == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # after every shape, so a run stopped from outside keeps what it compared
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print_summary(rows)

if __name__ == "__main__":
    main()
