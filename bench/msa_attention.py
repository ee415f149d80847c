"""MSA attention on one GPU against dense SDPA, FlexAttention and the torch index path, in one run.

Shapes: B = 1, H = 32 query heads, Hkv in {2, 4}, D = Di = 128, Bk = 128, k = 16, bf16;
N in {8K, 32K, 128K, 512K} forward and forward+backward, 1M forward (and forward+backward for the MSA
kernels where it fits). Inputs are random normal; the selection comes from ``select_blocks`` on random
index projections and is shared by every sparse case.

Cases, timed by ``triton.testing.do_bench`` (median) when a call takes < 50 ms, else by CUDA events
(median of 3, or 1 call past 3 s) after one warm-up call:
- ``dense_sdpa``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``.
- ``flex_msa``: FlexAttention with a ``mask_mod`` that tests each token against its group's
  ``block_idx`` row (per-token selection), block mask from the per-128-query-tile union of blocks.
- ``index_torch``: the torch index path (chunked ``q_idx k_idx^T`` matmul, block max-pool, topk).
- ``index_triton``: ``kernels.select_blocks``.
- ``msa_main``: ``kernels.sparse_attention`` (its default launch settings and dQ path).
- ``index_kl``: ``kernels.index_kl_loss`` on the selected support with the main forward's ``lse``.
- ``msa_whole``: ``select_blocks`` + ``sparse_attention`` (forward); in ``fwd+bwd`` mode also
  ``index_kl_loss`` forward+backward (the training step's attention work).

Useful FLOPs (no padding or masked work counted): dense causal forward ``4 B H D N(N+1)/2``; sparse
forward ``4 B D G sum_{r,i} |T_ri|`` with ``|T_ri|`` the visible tokens of query ``i``'s selected blocks
in group ``r``; backward 2.5x forward; index top-k ``2 B Hkv Di N(N+1)/2``; index KL
``B sum_{r,i} |T_ri| (2 D G + 6 Di)``. A case whose estimated call time (scaled from the same case at
the previous N by ``N^2``, or ``N`` for the sparse kernels) exceeds ``--case-limit`` seconds is recorded
as ``skipped (...)``; an out-of-memory as ``OOM``. Nothing is extrapolated into the results.

Run: ``python bench/msa_attention.py [--quick] [--json PATH]`` (writes
``docs/results/msa_attention_<gpu>.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import git_commit  # noqa: E402
from kernels import index_kl_loss, select_blocks, sparse_attention  # noqa: E402

H, D, DI, BK, TOPK = 32, 128, 128, 128, 16
# (N, forward+backward too); at 1M the estimate rule leaves fwd+bwd to the cases fast enough for it
FULL_SIZES = [(8192, True), (32768, True), (131072, True), (524288, True), (1048576, True)]
QUICK_SIZES = [(4096, True), (8192, True)]


def measure(fn, warm: bool) -> tuple[float, str]:
    """Median milliseconds of ``fn`` and how they were taken."""
    if warm:
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first < 50:
        return do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench median"
    if first > 3000:
        return first, "1 call"
    times = [first]
    for _ in range(2):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1], "median of 3 calls"


def measure_peaks() -> dict:
    """The two ceilings on this GPU: a large bf16 matmul and a device-to-device copy."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return {"bf16_matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_tb_per_s": 2 * x.numel() * 2 / ms_copy / 1e9}


def torch_index_topk(q_idx, k_idx, block_size, topk):
    """The torch path: chunked score matmul, causal mask, block max-pool, own block forced, topk."""
    B, N, Hkv, _ = q_idx.shape
    chunk = max(256, min(4096, 2 ** 31 // (B * Hkv * N * 2)))  # ~2 GB of bf16 scores at a time
    out = torch.empty(B, Hkv, N, topk, dtype=torch.int32, device=q_idx.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        end = triton.cdiv(e, block_size) * block_size
        sc = torch.einsum("bird,bjd->brij", q_idx[:, s:e], k_idx[:, :e])
        i = torch.arange(s, e, device=q_idx.device)[:, None]
        sc = sc.masked_fill(torch.arange(e, device=q_idx.device)[None] > i, float("-inf"))
        sc = F.pad(sc, (0, end - e), value=float("-inf"))
        m = sc.view(B, Hkv, e - s, end // block_size, block_size).amax(-1)
        m.scatter_(-1, (i // block_size).expand(B, Hkv, e - s, 1), float("inf"))
        val, ix = m.topk(min(topk, end // block_size), dim=-1)
        out[:, :, s:e, :ix.shape[-1]] = torch.where(val > float("-inf"), ix, -1).int()
        out[:, :, s:e, ix.shape[-1]:] = -1
    return out


def support_sizes(block_idx, block_size) -> int:
    """``sum_{b,r,i} |T_ri|``: visible tokens of the selected blocks (no cu_seqlens)."""
    N = block_idx.shape[2]
    i = torch.arange(N, device=block_idx.device)[:, None]
    b = block_idx.long()
    own = i // block_size
    n = torch.where(b == own, i % block_size + 1, torch.where((b >= 0) & (b < own), block_size, 0))
    return int(n.sum())


def flex_block_mask(block_idx, block_size, G):
    """A FlexAttention BlockMask: per 128-query tile the union of its queries' blocks (all partial),
    and a mask_mod that keeps key ``kv`` for query ``q`` of head ``h`` only if ``kv <= q`` and its block
    is in ``block_idx[h // G, q]``."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, N, topk = block_idx.shape
    n_t, n_b = triton.cdiv(N, 128), triton.cdiv(N, block_size)
    tile = torch.zeros(B, Hkv, n_t, n_b + 1, dtype=torch.bool, device=block_idx.device)
    t_of_q = (torch.arange(N, device=block_idx.device) // 128)[None, None, :, None].expand_as(block_idx)
    flat = (t_of_q * (n_b + 1) + torch.where(block_idx < 0, n_b, block_idx)).reshape(B, Hkv, -1)
    tile.view(B, Hkv, -1).scatter_(-1, flat.long(), True)
    tile = tile[..., :n_b]
    counts = tile.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tile).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    counts, order = counts.repeat_interleave(G, 1), order.repeat_interleave(G, 1)
    idx = block_idx

    def mask_mod(b, h, q, kv):
        kb = kv // block_size
        hit = idx[b, h // G, q, 0] == kb
        for s in range(1, topk):
            hit = hit | (idx[b, h // G, q, s] == kb)
        return hit & (kv <= q)

    return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=(128, block_size), mask_mod=mask_mod,
                                    seq_lengths=(N, N))


class Bench:
    def __init__(self, case_limit_s: float, time_budget_s: float):
        self.case_limit_ms = case_limit_s * 1000
        self.deadline = time.perf_counter() + time_budget_s
        self.rows: list[dict] = []
        self.seen: dict[tuple, tuple[int, float]] = {}

    def run(self, name, mode, N, Hkv, fn, flops=None, power=2, always_warm=False):
        row = {"case": name, "mode": mode, "N": N, "Hkv": Hkv}
        prev = self.seen.get((name, mode, Hkv))
        est = None if prev is None else prev[1] * (N / prev[0]) ** power
        if time.perf_counter() > self.deadline:
            row["status"] = "skipped (the run's --time-budget is spent)"
        elif est is not None and est > self.case_limit_ms:
            row["status"] = (f"skipped (estimated {est / 1000:.0f} s per call from N={prev[0]} > "
                             f"{self.case_limit_ms / 1000:.0f} s limit)")
        else:
            try:
                # one warm-up call (compilation, autotuning) unless the kernels ran at a smaller N and
                # the call is long
                ms, how = measure(fn, warm=always_warm or prev is None or est < 3000)
                row.update(status="ok", ms=ms, timing=how)
                if flops:
                    row["tflops"] = flops / ms / 1e9
                self.seen[(name, mode, Hkv)] = (N, ms)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as ex:  # a baseline that cannot run here is recorded, not fatal
                row["status"] = f"skipped ({type(ex).__name__}: {str(ex).splitlines()[0][:160]})"
        torch.cuda.empty_cache()
        self.rows.append(row)
        shown = f"{row['ms']:10.2f} ms" if "ms" in row else row["status"]
        print(f"  {name:16s} {mode:8s} N={N:8d} Hkv={Hkv}: {shown}", flush=True)
        return row.get("ms")


def _dense(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def _main(q, k, v, block_idx):
    return sparse_attention(q, k, v, block_idx, BK)[0]


def index_inputs(N: int, Hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``q_idx [1, N, Hkv, DI]``, ``k_idx [1, N, DI]``: random index projections plus a shared
    direction that block 0's keys carry, so every query selects block 0 (an attention sink, as trained
    indexers show): the hot-block case of the kernels."""
    sink = torch.randn(DI, device="cuda")
    q_idx = (torch.randn(1, N, Hkv, DI, device="cuda") + 0.5 * sink).bfloat16()
    k_idx = torch.randn(1, N, DI, device="cuda")
    k_idx[:, :BK] += 0.5 * sink
    return q_idx, k_idx.bfloat16()


def make_inputs(N: int, Hkv: int, backward: bool = True, n_heads: int = H):
    """bf16 ``q [1, N, n_heads, D]``, ``k, v [1, N, Hkv, D]``, the index inputs, and ``do`` (None without
    ``backward``); every benchmark script draws its inputs here."""
    q = torch.randn(1, N, n_heads, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    q_idx, k_idx = index_inputs(N, Hkv)
    return q, k, v, q_idx, k_idx, torch.randn_like(q) if backward else None


def bench_shape(bench: Bench, N: int, Hkv: int, backward: bool, flex_limit_n: int):
    G = H // Hkv
    q, k, v, q_idx, k_idx, do = make_inputs(N, Hkv, backward)
    block_idx = select_blocks(q_idx, k_idx, BK, TOPK)
    T = support_sizes(block_idx, BK)
    fl = {"dense": 4 * H * D * N * (N + 1) / 2, "sparse": 4 * D * G * T, "index": Hkv * DI * N * (N + 1),
          "kl": T * (2 * D * G + 6 * DI)}
    modes = ["fwd", "fwd+bwd"] if backward else ["fwd"]
    grads = [q, k, v]

    def fwd_bwd(f):
        def step():
            o = f()
            o.backward(torch.ones_like(o) if o.ndim == 0 else do)
            for t in grads + [q_idx, k_idx]:
                t.grad = None
        return step

    for mode in modes:
        train = mode == "fwd+bwd"
        for t in grads:
            t.requires_grad_(train)
        mult = 3.5 if train else 1.0
        dense = partial(_dense, q, k, v)
        bench.run("dense_sdpa", mode, N, Hkv, fwd_bwd(dense) if train else dense, fl["dense"] * mult)
        main = partial(_main, q, k, v, block_idx)
        bench.run("msa_main", mode, N, Hkv, fwd_bwd(main) if train else main, fl["sparse"] * mult, power=1)
        bench_flex(bench, mode, N, Hkv, q, k, v, do, block_idx, fl["sparse"] * mult, flex_limit_n, train)
    for t in grads:
        t.requires_grad_(False)
    bench.run("index_torch", "fwd", N, Hkv, lambda: torch_index_topk(q_idx, k_idx, BK, TOPK), fl["index"])
    bench.run("index_triton", "fwd", N, Hkv, lambda: select_blocks(q_idx, k_idx, BK, TOPK), fl["index"])
    whole = lambda: sparse_attention(q, k, v, select_blocks(q_idx, k_idx, BK, TOPK), BK)[0]
    bench.run("msa_whole", "fwd", N, Hkv, whole, fl["index"] + fl["sparse"], power=1.5)
    if torch.cuda.get_device_capability() >= (8, 9):
        bench.run("index_triton[fp8]", "fwd", N, Hkv, lambda: select_blocks(q_idx, k_idx, BK, TOPK, fp8=True),
                  fl["index"])
        sel8 = select_blocks(q_idx, k_idx, BK, TOPK, fp8=True)
        a, c = block_idx[..., 1:].long(), sel8[..., 1:].long()
        kept = ((a[..., :, None] == c[..., None, :]).any(-1) & (a >= 0)).sum() / (a >= 0).sum()
        bench.rows[-1]["kept_of_exact_selection"] = kept.item()
        del sel8, a, c
        whole8 = lambda: sparse_attention(q, k, v, select_blocks(q_idx, k_idx, BK, TOPK, fp8=True), BK)[0]
        bench.run("msa_whole[fp8]", "fwd", N, Hkv, whole8, fl["index"] + fl["sparse"], power=1.5)
    if not backward:
        return
    lse = sparse_attention(q, k, v, block_idx, BK)[1]
    q_idx.requires_grad_(True)
    k_idx.requires_grad_(True)
    kl = lambda: index_kl_loss(q, k, q_idx, k_idx, block_idx, BK, lse=lse)
    bench.run("index_kl", "fwd+bwd", N, Hkv, fwd_bwd(kl), fl["kl"], power=1)
    for t in grads:
        t.requires_grad_(True)

    def train_step():
        sel = select_blocks(q_idx.detach(), k_idx.detach(), BK, TOPK)
        o, lse = sparse_attention(q, k, v, sel, BK)
        o.backward(do)
        index_kl_loss(q, k, q_idx, k_idx, sel, BK, lse=lse).backward()
        for t in grads + [q_idx, k_idx]:
            t.grad = None

    bench.run("msa_whole", "fwd+bwd", N, Hkv, train_step, fl["index"] + 3.5 * fl["sparse"] + fl["kl"],
              power=1.5)


def bench_flex(bench, mode, N, Hkv, q, k, v, do, block_idx, flops, flex_limit_n, train):
    if N > flex_limit_n:
        bench.rows.append({"case": "flex_msa", "mode": mode, "N": N, "Hkv": Hkv,
                           "status": f"skipped (N > --flex-max-n={flex_limit_n})"})
        return
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as ex:
        bench.rows.append({"case": "flex_msa", "mode": mode, "N": N, "Hkv": Hkv, "status": f"skipped ({ex})"})
        return
    key = ("flex_msa", mode, Hkv)
    prev = bench.seen.get(key)
    over = prev is not None and prev[1] * (N / prev[0]) ** 2 > bench.case_limit_ms
    if over or time.perf_counter() > bench.deadline:
        bench.run("flex_msa", mode, N, Hkv, None)  # records the skip and its reason
        return
    try:
        t0 = time.perf_counter()
        mask = flex_block_mask(block_idx, BK, H // Hkv)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        bench.rows.append({"case": "flex_msa", "mode": mode, "N": N, "Hkv": Hkv, "status": "OOM (block mask)"})
        torch.cuda.empty_cache()
        return
    flex = _compiled_flex(flex_attention)

    def fwd():
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)

    def step():
        fwd().backward(do.transpose(1, 2))
        q.grad = k.grad = v.grad = None

    bench.run("flex_msa", mode, N, Hkv, step if train else fwd, flops, always_warm=True)
    bench.rows[-1]["mask_build_s"] = build_s
    if not train and bench.rows[-1]["status"] == "ok" and N <= 8192:
        # the baseline must compute what MSA computes: compare with the kernel's output
        with torch.no_grad():
            ref, got = _main(q, k, v, block_idx).float(), fwd().transpose(1, 2).float()
        bench.rows[-1]["rel_rms_vs_msa_main"] = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def summarize(rows: list[dict]) -> list[dict]:
    """Speedups against the project's targets, from rows measured in this run."""
    ms = {(r["case"], r["mode"], r["N"], r["Hkv"]): r.get("ms") for r in rows}
    tf = {(r["case"], r["mode"], r["N"], r["Hkv"]): r.get("tflops") for r in rows}
    pairs = [("msa_whole", "dense_sdpa"), ("msa_whole[fp8]", "dense_sdpa"), ("msa_main", "dense_sdpa"),
             ("msa_main", "flex_msa"), ("index_triton", "index_torch"), ("index_triton[fp8]", "index_torch")]
    out = []
    for (N, Hkv, mode) in sorted({(r["N"], r["Hkv"], r["mode"]) for r in rows}, key=lambda x: (x[1], x[0])):
        for a, b in pairs:
            ma, mb = ms.get((a, mode, N, Hkv)), ms.get((b, mode, N, Hkv))
            if ma and mb:
                out.append({"what": f"{a} vs {b}", "mode": mode, "N": N, "Hkv": Hkv, "speedup": mb / ma})
        ta, tb = tf.get(("msa_main", mode, N, Hkv)), tf.get(("dense_sdpa", mode, N, Hkv))
        if ta and tb:
            out.append({"what": "msa_main / dense_sdpa TFLOP/s", "mode": mode, "N": N, "Hkv": Hkv,
                        "speedup": ta / tb})
    return out


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        # every (N, Hkv, mode) recompiles; past dynamo's default limit of 8 it would silently fall back
        # to the unfused implementation that materialises N x N (seen with torch 2.11)
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def metadata(args) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "git_commit": git_commit(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shapes": {"B": 1, "H": H, "D": D, "Di": DI, "block_size": BK, "topk": TOPK, "dtype": "bf16"},
            "case_limit_s": args.case_limit, "time_budget_s": args.time_budget}


def print_table(rows, speedups):
    print(f"\n{'case':18s} {'mode':8s} {'N':>8s} {'Hkv':>3s} {'ms':>10s} {'TFLOP/s':>8s}  status")
    for r in rows:
        ms = f"{r['ms']:10.2f}" if "ms" in r else f"{'-':>10s}"
        tf = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'-':>8s}"
        print(f"{r['case']:18s} {r['mode']:8s} {r['N']:8d} {r['Hkv']:3d} {ms} {tf}  {r['status']}")
    print(f"\n{'speedup':42s} {'mode':8s} {'N':>8s} {'Hkv':>3s} {'x':>7s}")
    for s in speedups:
        print(f"{s['what']:42s} {s['mode']:8s} {s['N']:8d} {s['Hkv']:3d} {s['speedup']:7.2f}")


def render_markdown(path: str) -> str:
    """The tables of ``docs/benchmarks.md`` from a results JSON."""
    with open(path) as f:
        res = json.load(f)
    m = res["meta"]
    lines = [f"GPU {m['gpu']} ({m['sms']} SMs), torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}; "
             f"commit `{m['git_commit']}`; {m['date_utc']}; command `{m['command']}`; measured peaks: bf16 "
             f"matmul {m['peaks']['bf16_matmul_tflops']:.0f} TFLOP/s, copy {m['peaks']['copy_tb_per_s']:.2f} TB/s.",
             ""]
    for Hkv in sorted({r["Hkv"] for r in res["results"]}):
        Ns = sorted({r["N"] for r in res["results"]})
        head = "| {} | mode | " + " | ".join(f"{n // 1024}K" for n in Ns) + " |"
        lines += [f"**Hkv = {Hkv}** (ms; useful TFLOP/s in brackets)", "", head.format("case"),
                  "|---|---|" + "---|" * len(Ns)]
        keys = []
        for r in res["results"]:
            if r["Hkv"] == Hkv and (r["case"], r["mode"]) not in keys and r["case"] != "inputs":
                keys.append((r["case"], r["mode"]))
        for case, mode in keys:
            cells = []
            for n in Ns:
                r = next((r for r in res["results"]
                          if (r["case"], r["mode"], r["N"], r["Hkv"]) == (case, mode, n, Hkv)), None)
                if r is None:
                    cells.append("")
                elif "ms" in r:
                    cells.append(f"{r['ms']:.2f}" + (f" ({r['tflops']:.0f})" if "tflops" in r else ""))
                else:
                    cells.append(re.sub(r"estimated (\d+ s) per call from N=\d+ > (\d+ s) limit",
                                        r"est. \1 > \2", r["status"]))
            lines.append(f"| {case} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
        sp = [s for s in res["speedups"] if s["Hkv"] == Hkv]
        lines += [head.format("speedup (same run)"), "|---|---|" + "---|" * len(Ns)]
        for what, mode in dict.fromkeys((s["what"], s["mode"]) for s in sp):
            cells = [next((f"{s['speedup']:.2f}" for s in sp if (s["what"], s["mode"], s["N"]) == (what, mode, n)), "")
                     for n in Ns]
            lines.append(f"| {what} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (N = 4K, 8K; Hkv = 2)")
    p.add_argument("--json", default=None, help="output path (default docs/results/msa_attention_<gpu>.json)")
    p.add_argument("--case-limit", type=float, default=20.0, help="skip a case estimated above this many s")
    p.add_argument("--time-budget", type=float, default=450.0, help="stop timing new cases after this many s")
    p.add_argument("--flex-max-n", type=int, default=1 << 20, help="largest N for FlexAttention")
    p.add_argument("--hkv", type=int, nargs="*", default=None)
    p.add_argument("--render", default=None, help="print the markdown tables of a results JSON and exit")
    args = p.parse_args()
    if args.render:
        print(render_markdown(args.render))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/msa_attention.py needs a CUDA GPU")
    sizes, hkvs = (QUICK_SIZES, [2]) if args.quick else (FULL_SIZES, [2, 4])
    hkvs = args.hkv or hkvs
    meta = metadata(args)
    print(json.dumps(meta), flush=True)
    meta["peaks"] = measure_peaks()
    print(json.dumps(meta["peaks"]), flush=True)
    bench = Bench(args.case_limit, args.time_budget)
    t0 = time.perf_counter()
    for Hkv in hkvs:
        for N, backward in sizes:
            print(f"N={N} Hkv={Hkv} ({time.perf_counter() - t0:.0f} s)", flush=True)
            try:
                bench_shape(bench, N, Hkv, backward, args.flex_max_n)
            except torch.cuda.OutOfMemoryError:
                bench.rows.append({"case": "inputs", "mode": "-", "N": N, "Hkv": Hkv, "status": "OOM"})
            torch.cuda.empty_cache()
    meta["wall_s"] = time.perf_counter() - t0
    speedups = summarize(bench.rows)
    print_table(bench.rows, speedups)
    slug = meta["gpu"].lower().replace("nvidia", "").split()[0] if meta["gpu"] else "gpu"
    path = args.json or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "docs", "results", f"msa_attention_{slug}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": bench.rows, "speedups": speedups}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
