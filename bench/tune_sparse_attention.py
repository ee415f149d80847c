"""Check and time kernels.sparse_attention on a GPU; sweep its launch settings; write JSON.

Run on the GPU machine from the repository root: ``python3 bench/tune_sparse_attention.py [sweep]``
(results to ``$OUT`` or ``runs/``). Shapes: B=1, H=32, Hkv=2, D=128, Bk=128, topk=16, bf16; the
selection keeps each query's own block, block 0 (a sink: every query picks it, the hot-block case)
and random other visible blocks.

FLOPs: useful forward FLOPs = 4 * D * (sum over query heads and queries of the visible keys in the
support) (QK^T and PV); forward+backward = 3.5x that (backward: 5 matmuls, QK^T recomputed). Dense
causal SDPA counts the same way with the whole causal prefix as support, so the TFLOP/s compare.

The backward's dQ paths (``MSA_KV_DQ_PATH``: kv, dkdv, query) are timed side by side in one process;
``DQ_PATHS=kv,dkdv`` picks some (default: all three). ``sweep`` tries the launch settings of every kernel
in ``SWEEP`` (``SWEEP_KERNELS=bwd_dkdv_dq,...`` limits it) at ``SWEEP_N`` tokens (default 32768) and
``SWEEP_HKV`` KV heads (default 2).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.meta import env_setting, run_meta  # noqa: E402
from kernels._sparse_csr import build_layout  # noqa: E402

# the module, not the function of that name that kernels/__init__.py exports
sa = importlib.import_module("kernels.sparse_attention")

H, HKV, D, BK, TOPK = 32, 2, 128, 128, 16
DQ_PATHS = os.environ.get("DQ_PATHS", "kv,dkdv,query").split(",")


def dq_path(name):
    """The backward's dQ path ``name`` for the calls inside (the environment variable the kernels read)."""
    return env_setting("MSA_KV_DQ_PATH", name)


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
    """Every block selected == dense causal attention: forward and gradients, both forward paths (query
    with the query-outer dQ) and the KV-outer forward with each dQ path."""
    N = 4096
    q, k, v = inputs(N)
    nb = N // BK
    block_idx = make_block_idx(N, HKV, nb, BK)
    do = torch.randn_like(q)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    o_ref = dense(qr, kr, vr)
    g_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do)
    rows = []
    for path, dq in [("query", "query")] + [("kv", dq) for dq in DQ_PATHS]:
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        with dq_path(dq):
            o, _ = sa.sparse_attention(qs, ks, vs, block_idx, BK, path=path)
            g = torch.autograd.grad(o, (qs, ks, vs), do)
        errs = [(a.float() - b.float()).norm().item() / a.float().norm().item()
                for a, b in zip((o_ref, *g_ref), (o, *g))]
        rows.append((path, dq, errs))
        print(f"full selection vs dense SDPA, fwd {path}, dQ {dq}: rel err o/dq/dk/dv = "
              + " ".join(f"{e:.2e}" for e in errs), flush=True)
    return rows


def check_determinism(N=32768):
    q, k, v = inputs(N)
    block_idx = make_block_idx(N, HKV, TOPK, BK)
    do = torch.randn_like(q)
    out = {}
    for dq in DQ_PATHS:
        with dq_path(dq):
            res = [fwd_bwd(lambda a, b, c: sa.sparse_attention(a, b, c, block_idx, BK, path="kv")[0], q, k, v, do)()
                   for _ in range(2)]
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
    for path in ("query", "kv"):
        attn = lambda a, b, c, p=path: sa.sparse_attention(a, b, c, block_idx, BK, path=p)[0]
        r[f"msa_fwd_{path}"] = ms(lambda a=attn: a(q, k, v))
        r[f"msa_fwdbwd_{path}"] = ms(fwd_bwd(attn, q, k, v, do))  # the default dQ path
    attn = lambda a, b, c: sa.sparse_attention(a, b, c, block_idx, BK, path="kv")[0]
    for dq in DQ_PATHS:
        with dq_path(dq):
            r[f"msa_fwdbwd_kv_dq_{dq}"] = ms(fwd_bwd(attn, q, k, v, do))
    layout = build_layout(N, BK, None, "cuda")
    r["csr_build"] = ms(lambda: sa._reverse_index(q, block_idx, BK, layout))
    tf = lambda f, t: f / t / 1e9
    print(f"N={N:>7} Hkv={Hkv} dense fwd {r['dense_fwd']:8.2f} ms ({tf(f_dense, r['dense_fwd']):5.0f} TF/s) "
          f"fwd+bwd {r['dense_fwdbwd']:8.2f} ({tf(3.5 * f_dense, r['dense_fwdbwd']):5.0f}) | MSA fwd query "
          f"{r['msa_fwd_query']:7.2f} ({tf(f_msa, r['msa_fwd_query']):4.0f}) kv {r['msa_fwd_kv']:7.2f} "
          f"({tf(f_msa, r['msa_fwd_kv']):4.0f}) fwd+bwd query {r['msa_fwdbwd_query']:7.2f} "
          f"({tf(3.5 * f_msa, r['msa_fwdbwd_query']):4.0f}) kv {r['msa_fwdbwd_kv']:7.2f} "
          f"({tf(3.5 * f_msa, r['msa_fwdbwd_kv']):4.0f}) | csr {r['csr_build']:.2f}", flush=True)
    print("    fwd kv + bwd by dQ path: " + " ".join(
        f"{dq} {r[f'msa_fwdbwd_kv_dq_{dq}']:.2f} ({tf(3.5 * f_msa, r[f'msa_fwdbwd_kv_dq_{dq}']):.0f})"
        for dq in DQ_PATHS), flush=True)
    return r


def profile_breakdown(N=32768):
    q, k, v = inputs(N)
    do = torch.randn_like(q)
    block_idx = make_block_idx(N, HKV, TOPK, BK)
    out = {}
    for path, dq in [("query", DQ_PATHS[0])] + [("kv", dq) for dq in DQ_PATHS]:
        fn = fwd_bwd(lambda a, b, c, p=path: sa.sparse_attention(a, b, c, block_idx, BK, path=p)[0], q, k, v, do)
        with dq_path(dq):
            fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
        ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
        out[f"{path}/{dq}"] = {e.key[:60]: e.device_time_total / 3e3 for e in ev}
        print(f"kernel breakdown (ms per fwd+bwd, N={N}, fwd path {path}, dQ path {dq}):", flush=True)
        for name, t in out[f"{path}/{dq}"].items():
            print(f"   {t:8.3f}  {name}")
    return out


SWEEP = {
    "fwd_query": [dict(BLOCK_N=64, num_warps=4, num_stages=3),
                  dict(BLOCK_N=64, num_warps=4, num_stages=4),
                  dict(BLOCK_N=128, num_warps=4, num_stages=3),
                  dict(BLOCK_N=64, num_warps=2, num_stages=3)],
    "fwd_kv": [dict(BLOCK_M=64, num_warps=4, num_stages=1), dict(BLOCK_M=128, num_warps=8, num_stages=1),
               dict(BLOCK_M=64, num_warps=4, num_stages=2), dict(BLOCK_M=32, num_warps=4, num_stages=2)],
    "bwd_dq": [dict(BLOCK_N=64, num_warps=4, num_stages=3),
               dict(BLOCK_N=64, num_warps=4, num_stages=4),
               dict(BLOCK_N=32, num_warps=4, num_stages=3)],
    "bwd_dq_kv": [dict(BLOCK_M=64, num_warps=4, num_stages=1), dict(BLOCK_M=64, num_warps=8, num_stages=1),
                  dict(BLOCK_M=128, num_warps=8, num_stages=1), dict(BLOCK_M=64, num_warps=4, num_stages=2),
                  dict(BLOCK_M=32, num_warps=4, num_stages=2)],
    "bwd_dkdv": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
                 dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                 dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1),
                 dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                 dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                 dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=1),
                 dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1)],
    "bwd_dkdv_dq": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1),
                    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=1)],
}


# the dQ path each backward kernel's sweep runs under
SWEEP_DQ = {"bwd_dq": "query", "bwd_dq_kv": "kv", "bwd_dkdv": "kv", "bwd_dkdv_dq": "dkdv"}


def sweep(N=32768, Hkv=HKV):
    q, k, v = inputs(N, Hkv)
    do = torch.randn_like(q)
    block_idx = make_block_idx(N, Hkv, TOPK, BK)
    layout = build_layout(N, BK, None, "cuda")
    scale = D ** -0.5
    o, lse = sa.sparse_attention_fwd(q, k, v, block_idx, BK, layout, scale, "query")
    result = {}
    only = os.environ.get("SWEEP_KERNELS")
    for name, variants in SWEEP.items():
        if only and name not in only.split(","):
            continue
        base = dict(sa.CONFIG[name])
        for cfg in variants:
            sa.CONFIG[name] = cfg
            try:
                if name.startswith("fwd"):
                    path = name.split("_")[1]
                    t = ms(lambda p=path: sa.sparse_attention_fwd(q, k, v, block_idx, BK, layout, scale, p))
                else:
                    with dq_path(SWEEP_DQ[name]):
                        t = ms(lambda: sa.sparse_attention_bwd(q, k, v, o, lse, do, block_idx, BK, layout, scale))
            except Exception as e:  # a variant that does not compile (shared memory) is reported, not fatal
                t = float("nan")
                print(f"   {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
            result.setdefault(name, []).append((cfg, t))
            print(f"sweep N={N} Hkv={Hkv} {name:9s} {cfg} -> {t:.3f} ms", flush=True)
        best = min((c for c in result[name] if c[1] == c[1]), key=lambda c: c[1], default=(base, 0))
        sa.CONFIG[name] = best[0]
    return result


def main():
    out_dir = os.environ.get("OUT", "runs")
    os.makedirs(out_dir, exist_ok=True)
    res = run_meta()
    print(res, flush=True)
    res["full_selection_vs_dense"] = check_full_selection_equals_dense()
    if "sweep" in sys.argv[1:]:
        res["sweep"] = sweep(int(os.environ.get("SWEEP_N", 32768)), int(os.environ.get("SWEEP_HKV", HKV)))
        res["config_after_sweep"] = {k: v for k, v in sa.CONFIG.items()}
    res["determinism"] = check_determinism()
    res["breakdown"] = profile_breakdown(int(os.environ.get("BREAKDOWN_N", 32768)))
    sizes = [int(s) for s in os.environ.get("SIZES", "8192,32768,131072").split(",")]
    res["timings"] = [r for hkv in os.environ.get("HKVS", "2").split(",") for r in time_sizes(sizes, int(hkv))]
    with open(os.path.join(out_dir, "tune_sparse_attention.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
