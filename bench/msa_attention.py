"""MSA attention on one GPU against dense SDPA, FlexAttention and the torch index path, in one run.

Shapes: B = 1, H = 32 query heads, Hkv in {2, 4}, D = Di = 128, Bk = 128, k = 16, bf16;
N in {8K, 32K, 128K, 512K, 1M} forward and forward+backward (a case whose estimated call time passes
``--case-limit`` is skipped and says so). Inputs are random normal; the ``random`` selection comes from
``select_blocks`` on random index projections whose block 0 carries a shared direction (every query
selects it: a sink), and is shared by every sparse case. ``--patterns`` adds the synthetic selections of
``bench/selection.py`` (``same``: every query the same 15 blocks plus its own; ``local``: its own block
and the 15 before it; ``sink_local``: block 0, its own and the 14 before it) to the cases that take a
selection; they are named ``<case>[<pattern>]``.

Cases:
- ``dense_sdpa``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``; each row records
  the SDPA backend it dispatched to (``sdpa_backend``: the aten op the profiler saw in the warm-up call).
- ``flex_msa``: FlexAttention with a ``mask_mod`` that tests each token against its group's
  ``block_idx`` row; block mask from ``block_idx`` per 128-query tile (blocks every query of the tile
  selected and sees whole are full blocks, the rest of the tile's union partial). ``mask_share``: the
  tile-blocks in the mask over the visible ones (near 1 for per-token selections: Flex then does nearly
  dense work). ``--flex-patterns`` picks the selections it runs on (default ``random``).
- ``index_torch``: the torch index path (chunked ``q_idx k_idx^T`` matmul, block max-pool, topk).
- ``index_triton``: ``kernels.select_blocks``.
- ``msa_main``: ``kernels.sparse_attention`` (its default launch settings and dQ path).
- ``index_kl``: ``kernels.index_kl_loss`` on the selected support with the main forward's ``lse``.
- ``msa_whole``: ``select_blocks`` + ``sparse_attention`` (forward); in ``fwd+bwd`` mode also
  ``index_kl_loss`` forward+backward (the training step's attention work).
- ``msa_whole_klbwd`` (``fwd+bwd``): the same work with the KL's teacher computed in the attention's
  backward (``sparse_attention_kl``, ``attention.kl_in_backward``); same useful FLOPs as ``msa_whole``.

Timing (``bench/timing.py``): one warm-up call, then ``triton.testing.do_bench`` (median) when a call
takes < 50 ms, else the median of 3 calls timed with CUDA events; every row says which (``timing``).

Useful FLOPs (no padding or masked work counted): dense causal forward ``4 B H D N(N+1)/2``; sparse
forward ``4 B D G sum_{r,i} |T_ri|`` with ``|T_ri|`` the visible tokens of query ``i``'s selected blocks
in group ``r``; backward 2.5x forward; index top-k ``2 B Hkv Di N(N+1)/2``; index KL
``B sum_{r,i} |T_ri| (2 D G + 6 Di)``. A case whose estimated call time (scaled from the same case at
the previous N by ``N^2``, or ``N`` for the sparse kernels) exceeds ``--case-limit`` seconds is recorded
as ``skipped (...)``; an out-of-memory as ``OOM``. Nothing is extrapolated into the results.

Run: ``python bench/msa_attention.py [--quick] [--json PATH]`` (writes
``docs/results/msa_attention_<gpu>.json`` by default); ``--sizes``, ``--hkv``, ``--cases``,
``--patterns`` narrow a run; ``--device cpu`` runs toy shapes (H = 4, D = Di = 32, Bk = 16, k = 4,
N = 64, 128; fp32, kernels in the Triton interpreter, eager FlexAttention) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the kernels then run in the Triton interpreter (set before importing triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import git_commit  # noqa: E402
from bench.selection import PATTERNS, flex_block_mask, pattern_blocks, support_sizes, tile_blocks  # noqa: E402
from bench.timing import measure, measure_peaks, sdpa_backend  # noqa: E402
from kernels import index_kl_loss, select_blocks, sparse_attention, sparse_attention_kl  # noqa: E402

H, D, DI, BK, TOPK = 32, 128, 128, 128, 16
# (N, forward+backward too); at 1M the estimate rule leaves fwd+bwd to the cases fast enough for it
FULL_SIZES = [(8192, True), (32768, True), (131072, True), (524288, True), (1048576, True)]
QUICK_SIZES = [(4096, True), (8192, True)]
TOY_SIZES = [(64, True), (128, True)]
CASES = ("dense_sdpa", "msa_main", "flex_msa", "index_torch", "index_triton", "msa_whole", "index_triton[fp8]",
         "msa_whole[fp8]", "index_kl", "msa_whole_klbwd")
SLOWDOWN_TARGET = 1.5  # issue 12, item 18: concentrated selections at most 1.5x the random one's time (128K)


@dataclass(frozen=True)
class Shapes:
    """Head counts and sizes of one run; ``TOY`` is the CPU check's."""

    H: int = H
    D: int = D
    DI: int = DI
    BK: int = BK
    TOPK: int = TOPK
    q_tile: int = 128  # FlexAttention's query tile
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16


TOY = Shapes(H=4, D=32, DI=32, BK=16, TOPK=4, q_tile=16, device="cpu", dtype=torch.float32)


def case_flops(N: int, Hkv: int, T: int, s: Shapes = Shapes()) -> dict:
    """Useful forward FLOPs of the cases at length ``N`` with support size ``T = sum_{r,i} |T_ri|``."""
    G = s.H // Hkv
    return {"dense": 4 * s.H * s.D * N * (N + 1) / 2, "sparse": 4 * s.D * G * T, "index": Hkv * s.DI * N * (N + 1),
            "kl": T * (2 * s.D * G + 6 * s.DI)}


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


class Bench:
    def __init__(self, case_limit_s: float, time_budget_s: float, device: str = "cuda"):
        self.case_limit_ms = case_limit_s * 1000
        self.deadline = time.perf_counter() + time_budget_s
        self.device = device
        self.rows: list[dict] = []
        self.seen: dict[tuple, tuple[int, float]] = {}

    def run(self, name, mode, N, Hkv, fn, flops=None, power=2, warmup_fn=None, **extra):
        row = {"case": name, "mode": mode, "N": N, "Hkv": Hkv, **extra}
        prev = self.seen.get((name, mode, Hkv))
        est = None if prev is None else prev[1] * (N / prev[0]) ** power
        cuda = self.device == "cuda"
        if time.perf_counter() > self.deadline:
            row["status"] = "skipped (the run's --time-budget is spent)"
        elif est is not None and est > self.case_limit_ms:
            row["status"] = (f"skipped (estimated {est / 1000:.0f} s per call from N={prev[0]} > "
                             f"{self.case_limit_ms / 1000:.0f} s limit)")
        else:
            try:
                ms, how = measure(fn, device=self.device, warmup_fn=warmup_fn)
                row.update(status="ok", ms=ms, timing=how)
                if flops:
                    row["tflops"] = flops / ms / 1e9
                self.seen[(name, mode, Hkv)] = (N, ms)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as ex:  # a baseline that cannot run here is recorded, not fatal
                row["status"] = f"skipped ({type(ex).__name__}: {str(ex).splitlines()[0][:160]})"
        if cuda:
            torch.cuda.empty_cache()
        self.rows.append(row)
        shown = f"{row['ms']:10.2f} ms" if "ms" in row else row["status"]
        print(f"  {name:22s} {mode:8s} N={N:8d} Hkv={Hkv}: {shown}", flush=True)
        return row


def _dense(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def index_inputs(N: int, Hkv: int, device="cuda", index_dim: int = DI, block_size: int = BK,
                 dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_idx [1, N, Hkv, Di]``, ``k_idx [1, N, Di]``: random index projections plus a shared direction
    that block 0's keys carry, so every query selects block 0 (an attention sink, as trained indexers
    show): the hot-block case of the kernels."""
    sink = torch.randn(index_dim, device=device)
    q_idx = (torch.randn(1, N, Hkv, index_dim, device=device) + 0.5 * sink).to(dtype)
    k_idx = torch.randn(1, N, index_dim, device=device)
    k_idx[:, :block_size] += 0.5 * sink
    return q_idx, k_idx.to(dtype)


def make_inputs(N: int, Hkv: int, backward: bool = True, n_heads: int = H, device="cuda", head_dim: int = D,
                index_dim: int = DI, block_size: int = BK, dtype=torch.bfloat16):
    """``q [1, N, n_heads, D]``, ``k, v [1, N, Hkv, D]``, the index inputs, and ``do`` (None without
    ``backward``); every benchmark script draws its inputs here."""
    q = torch.randn(1, N, n_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, N, Hkv, head_dim, device=device, dtype=dtype)
    v = torch.randn(1, N, Hkv, head_dim, device=device, dtype=dtype)
    q_idx, k_idx = index_inputs(N, Hkv, device, index_dim, block_size, dtype)
    return q, k, v, q_idx, k_idx, torch.randn_like(q) if backward else None


def suffixed(case: str, pattern: str) -> str:
    return case if pattern == "random" else f"{case}[{pattern}]"


def bench_shape(bench: Bench, s: Shapes, N: int, Hkv: int, backward: bool, args):
    want = set(args.cases)
    q, k, v, q_idx, k_idx, do = make_inputs(N, Hkv, backward, s.H, s.device, s.D, s.DI, s.BK, s.dtype)
    random_sel = select_blocks(q_idx, k_idx, s.BK, s.TOPK)
    sels = {p: random_sel if p == "random" else pattern_blocks(p, N, Hkv, s.BK, s.TOPK, s.device)
            for p in dict.fromkeys(["random", *args.patterns, *args.flex_patterns])}
    support = {p: support_sizes(sel, s.BK) for p, sel in sels.items()}
    fl = {p: case_flops(N, Hkv, T, s) for p, T in support.items()}
    grads = [q, k, v]

    def fwd_bwd(f):
        def step():
            o = f()
            o.backward(torch.ones_like(o) if o.ndim == 0 else do)
            for t in grads + [q_idx, k_idx]:
                t.grad = None
        return step

    for mode in ["fwd", "fwd+bwd"] if backward else ["fwd"]:
        train = mode == "fwd+bwd"
        for t in grads:
            t.requires_grad_(train)
        mult = 3.5 if train else 1.0
        if "dense_sdpa" in want:
            dense = partial(_dense, q, k, v)
            fn = fwd_bwd(dense) if train else dense
            probe = {}
            row = bench.run("dense_sdpa", mode, N, Hkv, fn, fl["random"]["dense"] * mult,
                            warmup_fn=lambda fn=fn, probe=probe: probe.update(backend=sdpa_backend(fn)))
            if "backend" in probe:
                row["sdpa_backend"] = probe["backend"]
        if "msa_main" in want:
            for p in ["random", *args.patterns]:
                main = partial(lambda sel: sparse_attention(q, k, v, sel, s.BK)[0], sels[p])
                bench.run(suffixed("msa_main", p), mode, N, Hkv, fwd_bwd(main) if train else main,
                          fl[p]["sparse"] * mult, power=1, pattern=p, support=support[p])
        if "flex_msa" in want:
            for p in args.flex_patterns:
                bench_flex(bench, s, mode, N, Hkv, (q, k, v, do), sels[p], p, fl[p]["sparse"] * mult, args, train)
    for t in grads:
        t.requires_grad_(False)
    sel_fn = lambda: select_blocks(q_idx, k_idx, s.BK, s.TOPK)
    if "index_torch" in want:
        bench.run("index_torch", "fwd", N, Hkv, lambda: torch_index_topk(q_idx, k_idx, s.BK, s.TOPK),
                  fl["random"]["index"])
    if "index_triton" in want:
        bench.run("index_triton", "fwd", N, Hkv, sel_fn, fl["random"]["index"])
    if "msa_whole" in want:
        whole = lambda: sparse_attention(q, k, v, sel_fn(), s.BK)[0]
        bench.run("msa_whole", "fwd", N, Hkv, whole, fl["random"]["index"] + fl["random"]["sparse"], power=1.5)
    if s.device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        bench_fp8(bench, s, N, Hkv, (q, k, v, q_idx, k_idx), random_sel, fl["random"], want)
    if not backward:
        return
    q_idx.requires_grad_(True)
    k_idx.requires_grad_(True)
    if "index_kl" in want:
        for p in ["random", *args.patterns]:
            lse = sparse_attention(q, k, v, sels[p], s.BK)[1]
            kl = partial(lambda sel, lse: index_kl_loss(q, k, q_idx, k_idx, sel, s.BK, lse=lse), sels[p], lse)
            bench.run(suffixed("index_kl", p), "fwd+bwd", N, Hkv, fwd_bwd(kl), fl[p]["kl"], power=1, pattern=p,
                      support=support[p])
    if "msa_whole" in want:
        for t in grads:
            t.requires_grad_(True)

        def train_step():
            sel = select_blocks(q_idx.detach(), k_idx.detach(), s.BK, s.TOPK)
            o, lse = sparse_attention(q, k, v, sel, s.BK)
            o.backward(do)
            index_kl_loss(q, k, q_idx, k_idx, sel, s.BK, lse=lse).backward()
            for t in grads + [q_idx, k_idx]:
                t.grad = None

        r = fl["random"]
        bench.run("msa_whole", "fwd+bwd", N, Hkv, train_step, r["index"] + 3.5 * r["sparse"] + r["kl"], power=1.5)
    if "msa_whole_klbwd" in want:
        for t in grads:
            t.requires_grad_(True)

        def train_step_klbwd():
            sel = select_blocks(q_idx.detach(), k_idx.detach(), s.BK, s.TOPK)
            o, _, kl = sparse_attention_kl(q, k, v, q_idx, k_idx, sel, s.BK, sink=[])
            torch.autograd.backward((o, kl), (do, torch.ones_like(kl)))
            for t in grads + [q_idx, k_idx]:
                t.grad = None

        r = fl["random"]
        bench.run("msa_whole_klbwd", "fwd+bwd", N, Hkv, train_step_klbwd, r["index"] + 3.5 * r["sparse"] + r["kl"],
                  power=1.5)


def bench_fp8(bench, s, N, Hkv, tensors, random_sel, fl, want):
    q, k, v, q_idx, k_idx = tensors
    if "index_triton[fp8]" in want:
        bench.run("index_triton[fp8]", "fwd", N, Hkv, lambda: select_blocks(q_idx, k_idx, s.BK, s.TOPK, fp8=True),
                  fl["index"])
        sel8 = select_blocks(q_idx, k_idx, s.BK, s.TOPK, fp8=True)
        a, c = random_sel[..., 1:].long(), sel8[..., 1:].long()
        kept = ((a[..., :, None] == c[..., None, :]).any(-1) & (a >= 0)).sum() / (a >= 0).sum()
        bench.rows[-1]["kept_of_exact_selection"] = kept.item()
        del sel8, a, c
    if "msa_whole[fp8]" in want:
        whole8 = lambda: sparse_attention(q, k, v, select_blocks(q_idx, k_idx, s.BK, s.TOPK, fp8=True), s.BK)[0]
        bench.run("msa_whole[fp8]", "fwd", N, Hkv, whole8, fl["index"] + fl["sparse"], power=1.5)


def bench_flex(bench, s, mode, N, Hkv, tensors, sel, pattern, flops, args, train):
    q, k, v, do = tensors
    name = suffixed("flex_msa", pattern)
    base = {"case": name, "mode": mode, "N": N, "Hkv": Hkv, "pattern": pattern}
    if N > args.flex_max_n:
        bench.rows.append({**base, "status": f"skipped (N > --flex-max-n={args.flex_max_n})"})
        return
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as ex:
        bench.rows.append({**base, "status": f"skipped ({ex})"})
        return
    prev = bench.seen.get((name, mode, Hkv))
    over = prev is not None and prev[1] * (N / prev[0]) ** 2 > bench.case_limit_ms
    if over or time.perf_counter() > bench.deadline:
        bench.run(name, mode, N, Hkv, None, pattern=pattern)  # records the skip and its reason
        return
    cuda = s.device == "cuda"
    try:
        t0 = time.perf_counter()
        mask = flex_block_mask(sel, s.BK, s.H // Hkv, s.q_tile)
        if cuda:
            torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        partial_tb, full_tb = tile_blocks(sel, s.BK, s.q_tile)
        first_q = torch.arange(partial_tb.shape[2], device=sel.device) * s.q_tile
        visible = (torch.arange(partial_tb.shape[3], device=sel.device)[None] * s.BK
                   <= (first_q + s.q_tile - 1).clamp(max=N - 1)[:, None])
        stats = {"mask_share": ((partial_tb | full_tb).sum() / (visible.sum() * partial_tb.shape[1])).item(),
                 "mask_full_share": (full_tb.sum() / (partial_tb | full_tb).sum()).item()}
        del partial_tb, full_tb
    except torch.cuda.OutOfMemoryError:
        bench.rows.append({**base, "status": "OOM (block mask)"})
        torch.cuda.empty_cache()
        return
    flex = _compiled_flex(flex_attention) if cuda else flex_attention

    def fwd():
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)

    def step():
        fwd().backward(do.transpose(1, 2))
        q.grad = k.grad = v.grad = None

    row = bench.run(name, mode, N, Hkv, step if train else fwd, flops, pattern=pattern, mask_build_s=build_s, **stats)
    if not train and row["status"] == "ok" and N <= 131072:
        # the baseline must compute what MSA computes: compare with the kernel's output
        with torch.no_grad():
            ref, got = sparse_attention(q, k, v, sel, s.BK)[0].float(), fwd().transpose(1, 2).float()
        row["rel_rms_vs_msa_main"] = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Speedups against the project's targets, and the concentrated selections' slowdowns against the
    random one, from rows measured in this run."""
    ms = {(r["case"], r["mode"], r["N"], r["Hkv"]): r.get("ms") for r in rows}
    tf = {(r["case"], r["mode"], r["N"], r["Hkv"]): r.get("tflops") for r in rows}
    patterns = [p for p in PATTERNS if any(r.get("pattern") == p for r in rows)]
    pairs = [("msa_whole", "dense_sdpa"), ("msa_whole[fp8]", "dense_sdpa"), ("msa_main", "dense_sdpa"),
             ("msa_main", "flex_msa"), *[(f"msa_main[{p}]", f"flex_msa[{p}]") for p in patterns],
             ("index_triton", "index_torch"), ("index_triton[fp8]", "index_torch")]
    speedups, slowdowns = [], []
    for (N, Hkv, mode) in sorted({(r["N"], r["Hkv"], r["mode"]) for r in rows}, key=lambda x: (x[1], x[0])):
        for a, b in pairs:
            ma, mb = ms.get((a, mode, N, Hkv)), ms.get((b, mode, N, Hkv))
            if ma and mb:
                speedups.append({"what": f"{a} vs {b}", "mode": mode, "N": N, "Hkv": Hkv, "speedup": mb / ma})
        ta, tb = tf.get(("msa_main", mode, N, Hkv)), tf.get(("dense_sdpa", mode, N, Hkv))
        if ta and tb:
            speedups.append({"what": "msa_main / dense_sdpa TFLOP/s", "mode": mode, "N": N, "Hkv": Hkv,
                             "speedup": ta / tb})
        for case in ("msa_main", "index_kl"):
            for p in patterns:
                mp, mr = ms.get((f"{case}[{p}]", mode, N, Hkv)), ms.get((case, mode, N, Hkv))
                if mp and mr:
                    slowdowns.append({"what": f"{case}[{p}] / {case}", "mode": mode, "N": N, "Hkv": Hkv,
                                      "slowdown": mp / mr, "within_target": mp / mr <= SLOWDOWN_TARGET})
    return speedups, slowdowns


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


def metadata(args, s: Shapes) -> dict:
    cuda = s.device == "cuda"
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {"gpu": props.name if cuda else "cpu", "sms": props.multi_processor_count if cuda else None,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "commit": git_commit(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shapes": {"B": 1, "H": s.H, "D": s.D, "Di": s.DI, "block_size": s.BK, "topk": s.TOPK,
                       "dtype": str(s.dtype).replace("torch.", "")},
            "case_limit_s": args.case_limit, "time_budget_s": args.time_budget}


def print_table(rows, speedups, slowdowns):
    print(f"\n{'case':22s} {'mode':8s} {'N':>8s} {'Hkv':>3s} {'ms':>10s} {'TFLOP/s':>8s}  status")
    for r in rows:
        ms = f"{r['ms']:10.2f}" if "ms" in r else f"{'-':>10s}"
        tf = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'-':>8s}"
        extra = f" [{r['sdpa_backend']}]" if "sdpa_backend" in r else ""
        print(f"{r['case']:22s} {r['mode']:8s} {r['N']:8d} {r['Hkv']:3d} {ms} {tf}  {r['status']}{extra}")
    print(f"\n{'speedup':42s} {'mode':8s} {'N':>8s} {'Hkv':>3s} {'x':>7s}")
    for s in speedups:
        print(f"{s['what']:42s} {s['mode']:8s} {s['N']:8d} {s['Hkv']:3d} {s['speedup']:7.2f}")
    if slowdowns:
        print(f"\n{'slowdown against random':42s} {'mode':8s} {'N':>8s} {'Hkv':>3s} {'x':>7s}")
        for s in slowdowns:
            print(f"{s['what']:42s} {s['mode']:8s} {s['N']:8d} {s['Hkv']:3d} {s['slowdown']:7.2f}")


def _cell(r) -> str:
    if r is None:
        return ""
    if "ms" in r:  # "*": one timed call (the rule before every case took a warm-up and >= 3 calls)
        return (f"{r['ms']:.2f}" + (f" ({r['tflops']:.0f})" if "tflops" in r else "")
                + (" *" if r.get("timing") == "1 call" else ""))
    return re.sub(r"estimated (\d+ s) per call from N=\d+ > (\d+ s) limit", r"est. \1 > \2", r["status"])


def _n(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def render_markdown(path: str) -> str:
    """The tables of ``docs/benchmarks.md`` from a results JSON (older JSONs without the newer fields too)."""
    with open(path) as f:
        res = json.load(f)
    m, rows = res["meta"], [r for r in res["results"] if r["case"] != "inputs"]
    peaks = m.get("peaks")
    lines = [f"GPU {m['gpu']} ({m.get('sms')} SMs), torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}; "
             f"commit `{m.get('commit') or m.get('git_commit')}`; {m['date_utc']}; command `{m['command']}`"
             + (f"; measured peaks: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy "
                f"{peaks['copy_tb_per_s']:.2f} TB/s." if peaks else "."), ""]
    speedups = res.get("speedups", [])
    slowdowns = res.get("slowdowns", [])
    for Hkv in sorted({r["Hkv"] for r in rows}):
        Ns = sorted({r["N"] for r in rows if r["Hkv"] == Hkv})
        head = "| {} | mode | " + " | ".join(_n(n) for n in Ns) + " |"
        lines += [f"**Hkv = {Hkv}** (ms; useful TFLOP/s in brackets)", "", head.format("case"),
                  "|---|---|" + "---|" * len(Ns)]
        keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows if r["Hkv"] == Hkv))
        at = {(r["case"], r["mode"], r["N"]): r for r in rows if r["Hkv"] == Hkv}
        for case, mode in keys:
            lines.append(f"| {case} | {mode} | " + " | ".join(_cell(at.get((case, mode, n))) for n in Ns) + " |")
        lines.append("")
        backends = [(mode, n, at[("dense_sdpa", mode, n)]["sdpa_backend"]) for mode in ("fwd", "fwd+bwd") for n in Ns
                    if "sdpa_backend" in at.get(("dense_sdpa", mode, n), {})]
        if backends:
            lines += ["SDPA backend that ran: " + "; ".join(f"{mode} {_n(n)}: {b}" for mode, n, b in backends), ""]
        for title, items, key in (("speedup (same run)", speedups, "speedup"),
                                  ("slowdown against random (same run)", slowdowns, "slowdown")):
            sp = [s for s in items if s["Hkv"] == Hkv]
            if not sp:
                continue
            lines += [head.format(title), "|---|---|" + "---|" * len(Ns)]
            for what, mode in dict.fromkeys((s["what"], s["mode"]) for s in sp):
                cells = [next((f"{s[key]:.2f}" for s in sp if (s["what"], s["mode"], s["N"]) == (what, mode, n)), "")
                         for n in Ns]
                lines.append(f"| {what} | {mode} | " + " | ".join(cells) + " |")
            lines.append("")
        flex = [r for r in rows if r["Hkv"] == Hkv and r["case"].startswith("flex_msa") and "mask_share" in r]
        if flex:
            lines += ["FlexAttention block masks (tile-blocks in the mask / visible ones; full share; output "
                      "rel. RMS against msa_main): " + "; ".join(
                          f"{r['case']} {r['mode']} {_n(r['N'])}: {r['mask_share']:.3f}, {r['mask_full_share']:.3f}"
                          + (f", {r['rel_rms_vs_msa_main']:.1e}" if "rel_rms_vs_msa_main" in r else "")
                          for r in flex), ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (N = 4K, 8K; Hkv = 2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: toy shapes, to check the script")
    p.add_argument("--json", default=None, help="output path (default docs/results/msa_attention_<gpu>.json)")
    p.add_argument("--case-limit", type=float, default=20.0, help="skip a case estimated above this many s")
    p.add_argument("--time-budget", type=float, default=450.0, help="stop timing new cases after this many s")
    p.add_argument("--flex-max-n", type=int, default=1 << 20, help="largest N for FlexAttention")
    p.add_argument("--hkv", type=int, nargs="*", default=None)
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="N values (forward+backward at each)")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES, help="cases to run (default all)")
    p.add_argument("--patterns", nargs="*", default=[], choices=PATTERNS,
                   help="synthetic selections to time msa_main and index_kl on, beside random")
    p.add_argument("--flex-patterns", nargs="*", default=["random"], choices=["random", *PATTERNS],
                   help="selections FlexAttention runs on")
    p.add_argument("--render", default=None, help="print the markdown tables of a results JSON and exit")
    args = p.parse_args()
    if args.render:
        print(render_markdown(args.render))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/msa_attention.py needs a CUDA GPU (or --device cpu for the toy check)")
    s = TOY if args.device == "cpu" else Shapes()
    sizes, hkvs = (QUICK_SIZES, [2]) if args.quick else (FULL_SIZES, [2, 4])
    if args.device == "cpu":
        sizes, hkvs = TOY_SIZES, [2]
    sizes = [(n, True) for n in args.sizes] if args.sizes else sizes
    hkvs = args.hkv or hkvs
    meta = metadata(args, s)
    print(json.dumps(meta), flush=True)
    if args.device == "cuda":
        meta["peaks"] = measure_peaks()
        print(json.dumps(meta["peaks"]), flush=True)
    slug = meta["gpu"].lower().replace("nvidia", "").split()[0] if meta["gpu"] else "gpu"
    path = args.json or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "docs", "results", f"msa_attention_{slug}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    bench = Bench(args.case_limit, args.time_budget, args.device)
    t0 = time.perf_counter()
    for Hkv in hkvs:
        for N, backward in sizes:
            print(f"N={N} Hkv={Hkv} ({time.perf_counter() - t0:.0f} s)", flush=True)
            try:
                bench_shape(bench, s, N, Hkv, backward, args)
            except torch.cuda.OutOfMemoryError:
                bench.rows.append({"case": "inputs", "mode": "-", "N": N, "Hkv": Hkv, "status": "OOM"})
            if args.device == "cuda":
                torch.cuda.empty_cache()
            meta["wall_s"] = time.perf_counter() - t0
            speedups, slowdowns = summarize(bench.rows)
            with open(path, "w") as f:  # after every shape, so a run stopped from outside keeps what it measured
                json.dump({"meta": meta, "results": bench.rows, "speedups": speedups, "slowdowns": slowdowns}, f,
                          indent=1)
    print_table(bench.rows, speedups, slowdowns)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
