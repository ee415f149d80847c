"""Check and time kernels.sparse_attention on a GPU; sweep its launch settings; write JSON.

Run on the GPU machine from the repository root: ``python3 bench/tune_sparse_attention.py [sweep]``
(results to ``$OUT`` or ``runs/``). Shapes: B=1, H=32, Hkv=2, D=128, Bk=128, topk=16, bf16; the
selection keeps each query's own block, block 0 (a sink: every query picks it, the hot-block case)
and random other visible blocks.

FLOPs: useful forward FLOPs = 4 * D * (sum over query heads and queries of the visible keys in the
support) (QK^T and PV); forward+backward = 3.5x that (backward: 5 matmuls, QK^T recomputed). Dense
causal SDPA counts the same way with the whole causal prefix as support, so the TFLOP/s compare.

The backward's dQ paths (the ``dq_path`` argument: kv, dkdv) are timed side by side in one process;
``DQ_PATHS=kv`` picks some (default: both). ``sweep`` tries the launch settings (``Tiles``) of each
kernel in ``SWEEP`` (``SWEEP_KERNELS=dkdv_dq,...`` limits it; the names are fields of
``kernels.sparse_attention.Launch``) at ``SWEEP_N`` tokens (default 32768) and ``SWEEP_HKV`` KV heads
(default 2), keeping the best of each for the next; ``SWEEP_ONLY=1`` writes the sweep's JSON
(``tune_sparse_attention_sweep.json``) and stops there.

``kl`` (alone: nothing else runs) times the index KL's two places side by side, at ``KL_N`` tokens (default
32768) and each of ``KL_HKVS`` (default ``8,2``): separate (``sparse_attention`` then ``index_kl_loss`` on
its lse, forward and backward) against in the attention's backward (``sparse_attention_kl``) under each
dK/dV launch setting of ``KL_SWEEP``. Each setting's KL value and index gradients are checked against the
separate path's, one step of each place is broken down by kernel, and the dK/dV kernel's registers and
spills are read from each compiled variant.
Results to ``$OUT/tune_kl_backward.json``, rewritten after every point.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import run_meta  # noqa: E402
from kernels.common import build_layout  # noqa: E402
from kernels.index_kl import index_kl_loss  # noqa: E402
from kernels.sparse_attention_bwd import sparse_attention_bwd_dkdv_kernel  # noqa: E402

# the module, not the function of that name that kernels/__init__.py exports
sa = importlib.import_module("kernels.sparse_attention")

H, HKV, D, BK, TOPK = 32, 2, 128, 128, 16
DQ_PATHS = os.environ.get("DQ_PATHS", "kv,dkdv").split(",")


def make_block_idx(N, Hkv, topk, block_size, device="cuda", chunk=8192):
    """Own block, block 0 and random visible blocks, ``-1`` where fewer are visible."""
    nb = math.ceil(N / block_size)
    out = torch.empty(1, Hkv, N, topk, dtype=torch.int32, device=device)
    blocks = torch.arange(nb, device=device)
    for i0 in range(0, N, chunk):
        i = torch.arange(i0, min(N, i0 + chunk), device=device)
        own = (i // block_size)[:, None]
        score = torch.rand(Hkv, len(i), nb, device=device)
        score = torch.where(blocks <= own, score, -1.0)
        score = torch.where(blocks == own, 3.0, score)
        score = torch.where(blocks == 0, 2.0, score)
        val, idx = score.topk(min(topk, nb), -1)
        idx = torch.where(val >= 0, idx, -1)
        if topk > nb:
            idx = torch.cat([idx, idx.new_full((Hkv, len(i), topk - nb), -1)], -1)
        out[0, :, i0:i0 + len(i)] = idx.int()
    return out


def support_pairs(block_idx, block_size):
    """Visible (query, key) pairs summed over groups and queries."""
    N = block_idx.shape[2]
    i = torch.arange(N, device=block_idx.device)[None, None, :, None]
    c = block_idx.long()
    n = (i - c * block_size + 1).clamp(0, block_size)
    return int(torch.where(c >= 0, n, 0).sum())


def inputs(N, Hkv=HKV, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def dense(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def ms(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def fwd_bwd(attn, q, k, v, do):
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), do)


def check_full_selection_equals_dense():
    """Every block selected == dense causal attention: forward and gradients with each dQ path."""
    N = 4096
    q, k, v = inputs(N)
    nb = N // BK
    block_idx = make_block_idx(N, HKV, nb, BK)
    do = torch.randn_like(q)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    o_ref = dense(qr, kr, vr)
    g_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do)
    rows = []
    for dq in DQ_PATHS:
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        o, _ = sa.sparse_attention(qs, ks, vs, block_idx, BK, dq_path=dq)
        g = torch.autograd.grad(o, (qs, ks, vs), do)
        errs = [(a.float() - b.float()).norm().item() / a.float().norm().item()
                for a, b in zip((o_ref, *g_ref), (o, *g))]
        rows.append((dq, errs))
        print(f"full selection vs dense SDPA, dQ {dq}: rel err o/dq/dk/dv = "
              + " ".join(f"{e:.2e}" for e in errs), flush=True)
    return rows


def check_determinism(N=32768):
    q, k, v = inputs(N)
    block_idx = make_block_idx(N, HKV, TOPK, BK)
    do = torch.randn_like(q)
    out = {}
    for dq in DQ_PATHS:
        attn = lambda a, b, c, dq=dq: sa.sparse_attention(a, b, c, block_idx, BK, dq_path=dq)[0]
        res = [fwd_bwd(attn, q, k, v, do)() for _ in range(2)]
        out[dq] = all(torch.equal(a, b) for a, b in zip(*res))
        print(f"backward (dQ {dq}) bitwise identical over two runs at N={N}: {out[dq]}", flush=True)
    return out


def time_sizes(sizes, Hkv=HKV):
    rows = []
    for N in sizes:
        rows.append(time_one(N, Hkv))
        torch.cuda.empty_cache()
    return rows


def time_one(N, Hkv):
    q, k, v = inputs(N, Hkv)
    do = torch.randn_like(q)
    block_idx = make_block_idx(N, Hkv, TOPK, BK)
    G = H // Hkv
    f_msa = 4 * D * G * support_pairs(block_idx, BK)
    f_dense = 4 * D * H * N * (N + 1) / 2
    r = dict(N=N, Hkv=Hkv, flop_fwd_msa=f_msa, flop_fwd_dense=f_dense)
    r["dense_fwd"] = ms(lambda: dense(q, k, v))
    r["dense_fwdbwd"] = ms(fwd_bwd(dense, q, k, v, do))
    r["msa_fwd"] = ms(lambda: sa.sparse_attention(q, k, v, block_idx, BK))
    r["msa_fwdbwd"] = ms(fwd_bwd(lambda a, b, c: sa.sparse_attention(a, b, c, block_idx, BK)[0], q, k, v, do))
    for dq in DQ_PATHS:
        attn = lambda a, b, c, dq=dq: sa.sparse_attention(a, b, c, block_idx, BK, dq_path=dq)[0]
        r[f"msa_fwdbwd_dq_{dq}"] = ms(fwd_bwd(attn, q, k, v, do))
    layout = build_layout(N, BK, None, "cuda")
    dq_auto = sa.resolve_dq_path("auto", G)
    r["csr_build"] = ms(lambda: sa.reverse_index(q, block_idx, BK, layout, dq_auto, sa.LAUNCH))
    tf = lambda f, t: f / t / 1e9
    print(f"N={N:>7} Hkv={Hkv} dense fwd {r['dense_fwd']:8.2f} ms ({tf(f_dense, r['dense_fwd']):5.0f} TF/s) "
          f"fwd+bwd {r['dense_fwdbwd']:8.2f} ({tf(3.5 * f_dense, r['dense_fwdbwd']):5.0f}) | MSA fwd "
          f"{r['msa_fwd']:7.2f} ({tf(f_msa, r['msa_fwd']):4.0f}) fwd+bwd {r['msa_fwdbwd']:7.2f} "
          f"({tf(3.5 * f_msa, r['msa_fwdbwd']):4.0f}) | csr {r['csr_build']:.2f}", flush=True)
    print("    fwd+bwd by dQ path: " + " ".join(
        f"{dq} {r[f'msa_fwdbwd_dq_{dq}']:.2f} ({tf(3.5 * f_msa, r[f'msa_fwdbwd_dq_{dq}']):.0f})"
        for dq in DQ_PATHS), flush=True)
    return r


def kernel_breakdown(fn, n=3, top=10):
    """Device ms per call of ``fn`` by kernel, the ``top`` largest (one warm-up call, then ``n`` profiled)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return {e.key[:60]: e.device_time_total / n / 1e3 for e in ev}


def profile_breakdown(N=32768):
    q, k, v = inputs(N)
    do = torch.randn_like(q)
    block_idx = make_block_idx(N, HKV, TOPK, BK)
    out = {}
    for dq in DQ_PATHS:
        fn = fwd_bwd(lambda a, b, c, dq=dq: sa.sparse_attention(a, b, c, block_idx, BK, dq_path=dq)[0], q, k, v, do)
        out[dq] = kernel_breakdown(fn, top=12)
        print(f"kernel breakdown (ms per fwd+bwd, N={N}, dQ path {dq}):", flush=True)
        for name, t in out[dq].items():
            print(f"   {t:8.3f}  {name}")
    return out


T = sa.Tiles
SWEEP = {  # Launch field: Tiles to try
    # at G = 4 (sm_90, bench/kernel_resources.py) every variant but the last two holds 8 warps per SM: 32 rows
    # in one stage hold 12 (162 registers, 73 KB shared), 16 rows 12 (bound by shared memory)
    "fwd": [T(block_m=64, num_warps=4, num_stages=1), T(block_m=128, num_warps=8, num_stages=1),
            T(block_m=64, num_warps=4, num_stages=2), T(block_m=32, num_warps=4, num_stages=2),
            T(block_m=32, num_warps=4, num_stages=1), T(block_m=16, num_warps=4, num_stages=1)],
    "dq": [T(block_m=64, num_warps=4, num_stages=1), T(block_m=64, num_warps=8, num_stages=1),
           T(block_m=128, num_warps=8, num_stages=1), T(block_m=64, num_warps=4, num_stages=2),
           T(block_m=32, num_warps=4, num_stages=2)],
    "dkdv": [T(block_m=64, block_n=64, num_warps=4, num_stages=1),
             T(block_m=64, block_n=64, num_warps=4, num_stages=2),
             T(block_m=128, block_n=64, num_warps=8, num_stages=1),
             T(block_m=64, block_n=32, num_warps=4, num_stages=2),
             T(block_m=32, block_n=64, num_warps=4, num_stages=2),
             T(block_m=32, block_n=128, num_warps=8, num_stages=1),
             T(block_m=64, block_n=128, num_warps=8, num_stages=1),
             # at G = 4 the only settings above 8 warps per SM: 12 (160 registers) and 16 (128 registers)
             T(block_m=32, block_n=32, num_warps=4, num_stages=1),
             T(block_m=16, block_n=32, num_warps=4, num_stages=1)],
    "dkdv_dq": [T(block_m=64, block_n=64, num_warps=4, num_stages=1),
                T(block_m=64, block_n=64, num_warps=8, num_stages=1),
                T(block_m=64, block_n=64, num_warps=4, num_stages=2),
                T(block_m=32, block_n=64, num_warps=4, num_stages=1),
                T(block_m=64, block_n=64, num_warps=8, num_stages=2),
                T(block_m=128, block_n=64, num_warps=8, num_stages=1),
                T(block_m=32, block_n=128, num_warps=8, num_stages=1)],
    # the memory-bound sum of the dK/dV partials: 255 registers and 8 warps per SM at 4 warps and 64 keys
    # (bench/kernel_resources.py, sm_90); 8 warps or 32-key tiles compile to 124 registers, 16 warps per SM
    "dkdv_reduce": [T(block_n=64, num_warps=4), T(block_n=64, num_warps=8), T(block_n=32, num_warps=4),
                    T(block_n=32, num_warps=8), T(block_n=128, num_warps=8)],
}


# the dQ path each backward kernel's sweep runs under
SWEEP_DQ = {"dq": "kv", "dkdv": "kv", "dkdv_dq": "dkdv"}


def sweep(N=32768, Hkv=HKV):
    """Each kernel's ``Tiles`` in turn (forward alone or the whole backward), the best kept for the next."""
    q, k, v = inputs(N, Hkv)
    do = torch.randn_like(q)
    block_idx = make_block_idx(N, Hkv, TOPK, BK)
    layout = build_layout(N, BK, None, "cuda")
    scale = D ** -0.5
    launch = sa.LAUNCH
    o, lse = sa.sparse_attention(q, k, v, block_idx, BK)
    result = {}
    only = os.environ.get("SWEEP_KERNELS")
    for name, variants in SWEEP.items():
        if only and name not in only.split(","):
            continue
        for tiles in variants:
            trial = dataclasses.replace(launch, **{name: tiles})
            dq = SWEEP_DQ.get(name, "kv")
            try:
                csr = sa.reverse_index(q, block_idx, BK, layout, dq, trial)  # its query chunks depend on the tiles
                if name == "fwd":
                    t = ms(lambda csr=csr, trial=trial: sa.sparse_attention_fwd(q, k, v, block_idx, BK, layout, scale,
                                                                                csr, trial))
                else:
                    t = ms(lambda csr=csr, dq=dq, trial=trial: sa.sparse_attention_bwd(
                        q, k, v, o, lse, do, block_idx, BK, layout, scale, csr, dq, trial))
            except Exception as e:  # a variant that does not compile (shared memory) is reported, not fatal
                t = float("nan")
                print(f"   {name} {tiles}: {type(e).__name__}: {str(e)[:120]}")
            result.setdefault(name, []).append((dataclasses.asdict(tiles), t))
            print(f"sweep N={N} Hkv={Hkv} {name:8s} {tiles} -> {t:.3f} ms", flush=True)
        timed = [(tiles, t) for tiles, (_, t) in zip(variants, result[name]) if t == t]
        if timed:
            launch = dataclasses.replace(launch, **{name: min(timed, key=lambda c: c[1])[0]})
    return result, launch


# the dK/dV settings the KL in backward is timed with (the first is its default, Launch.dkdv_kl; then the
# plain dK/dV kernel's defaults, which it ran with until measured)
KL_SWEEP = [None,
            T(block_m=64, block_n=64, num_warps=4, num_stages=2),
            T(block_m=64, block_n=64, num_warps=4, num_stages=1),
            T(block_m=64, block_n=64, num_warps=8, num_stages=1),
            T(block_m=64, block_n=32, num_warps=4, num_stages=1),
            T(block_m=64, block_n=32, num_warps=8, num_stages=1),
            T(block_m=64, block_n=64, num_warps=8, num_stages=2),
            T(block_m=128, block_n=32, num_warps=8, num_stages=1),
            T(block_m=32, block_n=64, num_warps=4, num_stages=1)]


def compiled_kernels(fn) -> dict:
    """The compiled variants of the Triton kernel ``fn`` so far, by id (empty where the Triton version or the
    interpreter keeps no per-device cache)."""
    out = {}
    for cache in getattr(fn, "device_caches", {}).values():
        for k in cache[0].values():
            out[id(k)] = k
    return out


def resources(kernels) -> list[dict]:
    """Registers per thread and spilled bytes of compiled kernels (after their first launch), with their
    warps, stages and shared memory: spills in the dK/dV kernel would show here, no profiler needed."""
    out = []
    for k in kernels:
        meta = getattr(k, "metadata", None)
        out.append(dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                        num_warps=getattr(meta, "num_warps", None), num_stages=getattr(meta, "num_stages", None),
                        shared=getattr(meta, "shared", None)))
    return out


def new_variants(fn, before: dict) -> list[dict]:
    """``resources`` of the variants of ``fn`` compiled since ``compiled_kernels(fn)`` returned ``before``
    (a setting that reuses a variant compiled earlier lists none)."""
    return resources(k for i, k in compiled_kernels(fn).items() if i not in before)


def kl_sweep(res, save, N=32768, hkvs=(8, 2)):
    """The index KL separate against in the attention's backward, per dK/dV setting (module docstring)."""
    for Hkv in hkvs:
        res.setdefault("kl", []).append(kl_one(N, Hkv, save))
        torch.cuda.empty_cache()


def kl_one(N, Hkv, save, Di=128):
    q, k, v = inputs(N, Hkv)
    do = torch.randn_like(q)
    g = torch.Generator(device=q.device).manual_seed(1)
    q_idx = torch.randn(1, N, Hkv, Di, device=q.device, dtype=q.dtype, generator=g).requires_grad_()
    k_idx = torch.randn(1, N, Di, device=q.device, dtype=q.dtype, generator=g).requires_grad_()
    block_idx = make_block_idx(N, Hkv, TOPK, BK, device=q.device)
    params = tuple(x.requires_grad_() for x in (q, k, v)) + (q_idx, k_idx)

    def separate():
        o, lse = sa.sparse_attention(*params[:3], block_idx, BK)
        kl = index_kl_loss(q, k, q_idx, k_idx, block_idx, BK, lse=lse)
        return torch.autograd.grad((o, kl), params, (do, torch.ones_like(kl))), kl.detach()

    def fused(launch):
        sink = []
        o, _, kl = sa.sparse_attention_kl(*params, block_idx, BK, sink=sink, launch=launch)
        return torch.autograd.grad((o, kl), params, (do, torch.ones_like(kl))), sink[0]

    dkdv = sparse_attention_bwd_dkdv_kernel
    before = compiled_kernels(dkdv)
    ref, ref_kl = separate()
    G = H // Hkv
    field = "dkdv_kl"  # sparse_attention_kl runs the dQ path's dK/dV kernel with these tiles
    dq_path = sa.resolve_dq_path("auto", G)
    row = dict(N=N, Hkv=Hkv, G=G, field=field, dq_path=dq_path, separate_ms=ms(separate),
               separate_kernels=kernel_breakdown(separate), separate_dkdv_kernel=new_variants(dkdv, before), fused=[])
    print(f"KL N={N} Hkv={Hkv}: separate {row['separate_ms']:.2f} ms", flush=True)
    for tiles in KL_SWEEP:
        launch = sa.LAUNCH if tiles is None else dataclasses.replace(sa.LAUNCH, **{field: tiles})
        point = dict(tiles=dataclasses.asdict(getattr(launch, field)))
        before = compiled_kernels(dkdv)
        try:
            grads, kl = fused(launch)
            point["dkdv_kernel"] = new_variants(dkdv, before)
            point["kl_rel_err"] = abs(kl.item() - ref_kl.item()) / abs(ref_kl.item())
            point["rel_err"] = {n: (a.float() - b.float()).norm().item() / b.float().norm().item()
                                for n, a, b in zip(("dq", "dk", "dv", "dq_idx", "dk_idx"), grads, ref)}
            point["ms"] = ms(partial(fused, launch))
            if tiles is None:
                point["kernels"] = kernel_breakdown(partial(fused, launch))
        except Exception as e:  # a setting that does not compile (shared memory) is reported, not fatal
            point["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["fused"].append(point)
        print(f"   in backward {point['tiles']}: "
              f"{point.get('ms', float('nan')):.2f} ms, KL rel err "
              f"{point.get('kl_rel_err', float('nan')):.1e}, grads {point.get('rel_err', point.get('error'))}, "
              f"dK/dV kernel {point.get('dkdv_kernel')}", flush=True)
        save(row)
    for name, kern in [("separate", row["separate_kernels"]), ("in backward", row["fused"][0].get("kernels", {}))]:
        print(f"   kernels, {name} (ms per step):", flush=True)
        for key, t in kern.items():
            print(f"      {t:8.3f}  {key}")
    return row


def main():
    out_dir = os.environ.get("OUT", "runs")
    os.makedirs(out_dir, exist_ok=True)
    res = run_meta()
    print(res, flush=True)
    if sys.argv[1:] == ["kl"]:
        def save(partial_row=None):  # every point as it comes: a killed call keeps what it measured
            with open(os.path.join(out_dir, "tune_kl_backward.json"), "w") as f:
                json.dump({**res, "kl": res.get("kl", []) + ([partial_row] if partial_row else [])}, f, indent=1,
                          default=str)
        kl_sweep(res, save, int(os.environ.get("KL_N", 32768)),
                 [int(h) for h in os.environ.get("KL_HKVS", "8,2").split(",")])
        save()
        return
    res["full_selection_vs_dense"] = check_full_selection_equals_dense()
    if "sweep" in sys.argv[1:]:
        res["sweep"], best = sweep(int(os.environ.get("SWEEP_N", 32768)), int(os.environ.get("SWEEP_HKV", HKV)))
        res["launch_after_sweep"] = dataclasses.asdict(best)
        if os.environ.get("SWEEP_ONLY") == "1":  # the sweep's JSON now, without the timings that follow
            with open(os.path.join(out_dir, "tune_sparse_attention_sweep.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
            return
    res["determinism"] = check_determinism()
    res["breakdown"] = profile_breakdown(int(os.environ.get("BREAKDOWN_N", 32768)))
    sizes = [int(s) for s in os.environ.get("SIZES", "8192,32768,131072").split(",")]
    res["timings"] = [r for hkv in os.environ.get("HKVS", "2").split(",") for r in time_sizes(sizes, int(hkv))]
    with open(os.path.join(out_dir, "tune_sparse_attention.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
