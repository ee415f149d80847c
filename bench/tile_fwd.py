"""The MSA forward two ways on one GPU, side by side: KV-outer (``kernels.sparse_attention``: reverse index,
partials, combine) against query-tile-outer (``kernels.sparse_tile``: each tile of queries over the union of
its blocks), with dense SDPA and FlexAttention on the same selection as baselines, in one process.

Which wins depends on how local the selection is: ``tile_union`` (``msa/stats.py``), the (query, block) pairs
the tile kernel computes per pair selected. Selections:
- ``pool<r>`` (``bench/selection.py``'s ``pool_selection``): per tile of ``64 // G`` queries a pool of
  ``round(r * topk)`` blocks (the tile's own block and random visible others); every query takes its own block
  and ``topk - 1`` of the pool, so the tile union is about ``r``. Trained ``small`` measured 1.2-1.9
  (``docs/scaling.md`` 3r), an untrained index 2.7.
- ``random``: ``select_blocks`` on random index inputs with a sink (``bench/msa_attention.py``'s): the least
  local selection, the KV-outer kernel's best case.
Every case's ``tile_union`` is measured on its selection, and the tile kernel's output is compared with the
KV-outer one's (``rel_rms_vs_kv``).

With ``--backward`` (the default) also forward+backward: KV-outer as configured, the tile forward with the
default dQ path, the tile forward with the tile dQ (``dq_path="tile"``), and dense SDPA.

With ``--kl`` (the default) also the index KL with its gradients, as training runs it (the teacher's lse from the
forward, ``Di = 64``): ``kl_kv`` (``kernels.index_kl``, KV-outer) against ``kl_tile`` (``kernels/index_kl_tile.py``,
its union build included), their loss and gradients compared; ``--sweep`` tries the tile KL's launch too
(``--kl-sweep``: the KL's alone).

Timed (``bench/timing.py``: warm-up, then do_bench's median): ``kv`` = the whole KV-outer forward (reverse
index, kernel, combine) and ``kv_kernels`` = its kernel and combine given the index; ``tile`` = the union
build and the kernel, ``tile_kernel`` = the kernel alone; ``dense_sdpa`` (causal, GQA); ``flex`` =
FlexAttention with ``bench/selection.py``'s block mask (up to ``--flex-max-n``). Useful FLOPs: ``4 D G``
per visible key of the support (``bench/msa_attention.py``'s count). ``--sweep`` first tries the tile
kernel's launch settings on the first shape's ``pool`` selection and keeps the fastest.

    python3 -m bench.tile_fwd --json $OUT/tile_fwd.json            # on the GPU
    python -m bench.tile_fwd --device cpu --json /tmp/tile_fwd.json  # toy shapes in the interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.compare_kernels import rel_rms  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from bench.msa_attention import _dense, index_inputs  # noqa: E402
from bench.selection import flex_block_mask, pool_selection, support_sizes  # noqa: E402
from bench.timing import measure  # noqa: E402
from kernels import select_blocks  # noqa: E402
from kernels.common import build_layout  # noqa: E402
from kernels.index_kl import index_kl_fwd  # noqa: E402
from kernels.index_kl_tile import KL_TILE, index_kl_tile_fwd  # noqa: E402
from kernels.sparse_attention import LAUNCH, reverse_index, sparse_attention, sparse_attention_fwd  # noqa: E402
from kernels.sparse_tile import TILE_FWD, sparse_attention_tile_fwd, tile_queries, tile_union  # noqa: E402
from kernels.sparse_tiles import Tiles  # noqa: E402
from msa.stats import _tile_union  # noqa: E402


def random_selection(N: int, Hkv: int, topk: int, block_size: int, device, dtype):
    q_idx, k_idx = index_inputs(N, Hkv, device, 64, block_size, dtype)
    return select_blocks(q_idx, k_idx, block_size, topk)


def sweep(make, variants, default: Tiles, device, label: str) -> tuple[Tiles, list[dict]]:
    """Time ``make(tiles)()`` for each launch variant; ``(the fastest, one row per variant)``, ``default`` where
    none ran."""
    rows, best = [], None
    for t in variants:
        try:
            ms, _ = measure(make(t), device=device)
        except Exception as ex:  # a variant that does not compile (shared memory) is recorded
            rows.append({"tiles": vars(t), "status": f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"})
            continue
        rows.append({"tiles": vars(t), "ms": ms, "status": "ok"})
        print(f"  {label} sweep {t}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[1]:
            best = (t, ms)
    return (best[0] if best else default), rows


def sweep_fwd(q, k, v, sel, bk, layout, device, variants) -> tuple[Tiles, list[dict]]:
    """The tile forward's kernel (its union built outside the timing) at each variant."""
    def make(t):
        un = tile_union(sel, layout.tok_start, k.shape[1], bk, tile_queries(t, q.shape[2] // k.shape[2]))
        return partial(sparse_attention_tile_fwd, q, k, v, sel, bk, layout.tok_start, q.shape[-1] ** -0.5, t, un)
    return sweep(make, variants, TILE_FWD, device, "fwd")


def kl_inputs(q, k, sel, bk, di=64):
    """Index inputs for the KL (random, as the forward's ``q``), the forward's lse on ``sel``, the layout."""
    N, Hkv = k.shape[1], k.shape[2]
    q_idx = torch.randn(1, N, Hkv, di, device=q.device, dtype=q.dtype)
    k_idx = torch.randn(1, N, di, device=q.device, dtype=q.dtype)
    with torch.no_grad():
        lse = sparse_attention(q, k, k, sel, bk)[1]
    return q_idx, k_idx, lse, build_layout(N, bk, None, q.device)


def sweep_kl(q, k, sel, bk, device, variants) -> tuple[Tiles, list[dict]]:
    """The tile KL with its gradients (its union build included) at each variant."""
    q_idx, k_idx, lse, layout = kl_inputs(q, k, sel, bk)
    return sweep(lambda t: partial(index_kl_tile_fwd, q, k, q_idx, k_idx, sel, bk, layout.tok_start, lse, True, t),
                 variants, KL_TILE, device, "kl")


def bench_kl(row, q, k, sel, bk, device, kl_tiles):
    """The index KL and its gradients two ways (``kl_kv``, ``kl_tile``), timed, and how far apart they are."""
    q_idx, k_idx, lse, layout = kl_inputs(q, k, sel, bk)
    G, di = q.shape[2] // k.shape[2], q_idx.shape[-1]
    fns = {"kl_kv": partial(index_kl_fwd, q, k, q_idx, k_idx, sel, bk, None, lse, True),
           "kl_tile": partial(index_kl_tile_fwd, q, k, q_idx, k_idx, sel, bk, layout.tok_start, lse, True, kl_tiles)}
    out = {name: fn() for name, fn in fns.items()}
    for i, what in enumerate(("loss", "dq_idx", "dk_idx")):
        row[f"kl_{what}_rel_rms_tile_vs_kv"] = rel_rms(out["kl_kv"][i], out["kl_tile"][i])
    del out
    flops = row["support"] * (2 * q.shape[-1] * G + 6 * di)  # the teacher's q k^T per head; the student's 3 products
    for name, fn in fns.items():
        row[f"{name}_ms"], row[f"{name}_timing"] = measure(fn, device=device)
        row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
    row["kl_tiles"] = vars(kl_tiles)
    work, selected = _tile_union(sel, kl_tiles.block_m)
    row["kl_tile_union"] = (work / selected).item()  # at the KL's tiles (block_m queries), not the forward's
    row["kl_tile_speedup_vs_kv"] = row["kl_kv_ms"] / row["kl_tile_ms"]
    print(f"  kl (tile union {row['kl_tile_union']:.2f}): kv {row['kl_kv_ms']:.2f} tile {row['kl_tile_ms']:.2f} ms; "
          f"rel_rms loss "
          f"{row['kl_loss_rel_rms_tile_vs_kv']:.1e} dq_idx {row['kl_dq_idx_rel_rms_tile_vs_kv']:.1e} dk_idx "
          f"{row['kl_dk_idx_rel_rms_tile_vs_kv']:.1e}", flush=True)


def bench_case(res, N, H, Hkv, sel_name, sel, a, tiles, q, k, v, device, kl_tiles=KL_TILE):
    bk = a.block_size
    G = H // Hkv
    layout = build_layout(N, bk, None, q.device)
    scale = q.shape[-1] ** -0.5
    sup = support_sizes(sel, bk)
    work, selected = _tile_union(sel, max(1, 64 // G))
    T = tile_queries(tiles, G)
    work_t, _ = _tile_union(sel, T)
    flops = 4 * q.shape[-1] * G * sup
    row = {"N": N, "H": H, "Hkv": Hkv, "G": G, "selection": sel_name, "support": sup,
           "tile_union": (work / selected).item(), "tile_union_kernel_tiles": (work_t / selected).item(),
           "tile_queries": T, "tiles": vars(tiles), "useful_tflop": flops / 1e12}
    with torch.no_grad():
        o_kv, lse_kv = sparse_attention(q, k, v, sel, bk)
        o_t, lse_t = sparse_attention_tile_fwd(q, k, v, sel, bk, layout.tok_start, scale, tiles)
        fin = torch.isfinite(lse_kv)
        row["rel_rms_vs_kv"] = rel_rms(o_kv, o_t)
        row["lse_max_diff_vs_kv"] = (lse_t - lse_kv)[fin].abs().max().item()
        row["lse_empty_rows_agree"] = bool(torch.equal(fin, torch.isfinite(lse_t)))
        del o_kv, lse_kv, o_t, lse_t
        csr = reverse_index(q, sel, bk, layout, "auto", LAUNCH)
        un = tile_union(sel, layout.tok_start, N, bk, T)
        fns = {
            "kv": partial(sparse_attention, q, k, v, sel, bk),
            "kv_kernels": partial(sparse_attention_fwd, q, k, v, sel, bk, layout, scale, csr),
            "tile": partial(sparse_attention_tile_fwd, q, k, v, sel, bk, layout.tok_start, scale, tiles),
            "tile_kernel": partial(sparse_attention_tile_fwd, q, k, v, sel, bk, layout.tok_start, scale, tiles, un),
        }
        dense = res["_dense"].setdefault((N, H, Hkv), {})  # once per shape: the selection does not change it
        if "dense_sdpa_ms" not in dense:
            fns["dense_sdpa"] = partial(_dense, q, k, v)
        for name, fn in fns.items():
            ms, how = measure(fn, device=device)
            row[f"{name}_ms"] = ms
            row[f"{name}_timing"] = how
            if name != "dense_sdpa":
                row[f"{name}_tflops"] = flops / ms / 1e9
        dense.setdefault("dense_sdpa_ms", row.get("dense_sdpa_ms"))
        row["dense_sdpa_ms"] = dense["dense_sdpa_ms"]
        fns.clear()
        del csr, un
        if N <= a.flex_max_n:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                mask = flex_block_mask(sel, bk, G, 128)
                flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
                ff = lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                                  enable_gqa=True)
                row["flex_ms"], row["flex_timing"] = measure(ff, device=device)
                row["flex_tflops"] = flops / row["flex_ms"] / 1e9
                row["flex_rel_rms_vs_kv"] = rel_rms(sparse_attention(q, k, v, sel, bk)[0], ff().transpose(1, 2))
            except Exception as ex:  # a baseline that cannot run here is recorded, not fatal
                row["flex_status"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
        else:
            row["flex_status"] = f"skipped (N > --flex-max-n={a.flex_max_n})"
    if a.backward:
        bench_backward(row, q, k, v, sel, bk, device, tiles, dense)
    if a.kl:
        bench_kl(row, q, k, sel, bk, device, kl_tiles)
    row["tile_speedup_vs_kv"] = row["kv_ms"] / row["tile_ms"]
    row["tile_kernel_speedup_vs_kv_kernels"] = row["kv_kernels_ms"] / row["tile_kernel_ms"]
    row["tile_speedup_vs_dense"] = row["dense_sdpa_ms"] / row["tile_ms"]
    print(f"N={N} H={H}/{Hkv} {sel_name}: tile_union {row['tile_union']:.2f} kv {row['kv_ms']:.2f} "
          f"(kernels {row['kv_kernels_ms']:.2f}) tile {row['tile_ms']:.2f} (kernel {row['tile_kernel_ms']:.2f}) "
          f"dense {row['dense_sdpa_ms']:.2f} flex {row.get('flex_ms', float('nan')):.2f} ms; "
          f"rel_rms {row['rel_rms_vs_kv']:.1e}", flush=True)
    return row


def bench_backward(row, q, k, v, sel, bk, device, tiles, dense: dict):
    """Forward+backward of ``sparse_attention`` three ways (``kv``: KV-outer forward and the default dQ path;
    ``tile_fwd``: the tile forward, the default dQ; ``tile``: the tile forward and the tile dQ, the same
    tiles) and dense SDPA's (once per shape: ``dense`` keeps it), with the dQ of the tile path compared with the
    default one's."""
    from kernels.sparse_attention import LAUNCH, sparse_attention

    launch = replace(LAUNCH, tile_fwd=tiles)
    do = torch.randn_like(q)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def step(fn):
        def run():
            o = fn()
            o.backward(do)
            q.grad = k.grad = v.grad = None
        return run

    ways = {"kv": dict(fwd_path="kv", dq_path="auto"), "tile_fwd": dict(fwd_path="tile", dq_path="auto"),
            "tile": dict(fwd_path="tile", dq_path="tile")}
    grads = {}
    for name, kw in ways.items():
        fn = partial(lambda kw: sparse_attention(q, k, v, sel, bk, launch=launch, **kw)[0], kw)
        o = fn()
        grads[name] = torch.autograd.grad(o, (q, k, v), do)
        row[f"fb_{name}_ms"], row[f"fb_{name}_timing"] = measure(step(fn), device=device)
    if "fb_dense_sdpa_ms" not in dense:
        dense["fb_dense_sdpa_ms"], _ = measure(step(partial(_dense, q, k, v)), device=device)
    row["fb_dense_sdpa_ms"] = dense["fb_dense_sdpa_ms"]
    row["fb_tile_dq_rel_rms_vs_kv"] = rel_rms(grads["kv"][0], grads["tile"][0])
    row["fb_tile_dk_rel_rms_vs_kv"] = rel_rms(grads["kv"][1], grads["tile"][1])  # same kernel, lse rounded apart
    row["fb_tile_speedup_vs_kv"] = row["fb_kv_ms"] / row["fb_tile_ms"]
    print(f"  fwd+bwd: kv {row['fb_kv_ms']:.2f} tile_fwd {row['fb_tile_fwd_ms']:.2f} tile {row['fb_tile_ms']:.2f} "
          f"dense {row['fb_dense_sdpa_ms']:.2f} ms; dq rel_rms {row['fb_tile_dq_rel_rms_vs_kv']:.1e}", flush=True)
    q.requires_grad_(False)
    k.requires_grad_(False)
    v.requires_grad_(False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", nargs="+", default=["8:2", "32:2"], help="H:Hkv pairs (small's 8:2, 1b's 32:2)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.4, 2.7], help="pool selections' tile unions")
    ap.add_argument("--random", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sweep", action="store_true", help="try the tile kernels' launch settings first")
    ap.add_argument("--kl-sweep", action="store_true", help="try the tile KL's launch first (not the forward's)")
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                    help="forward+backward too: the KV-outer paths, the tile forward, the tile forward and dQ")
    ap.add_argument("--kl", action=argparse.BooleanOptionalAction, default=True,
                    help="the index KL with its gradients too: KV-outer against tile")
    ap.add_argument("--flex-max-n", type=int, default=32768)
    ap.add_argument("--time-budget", type=float, default=400.0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    D, a.block_size, topk = (128, 128, 16) if cuda else (32, 16, 4)
    if not cuda:
        a.lengths = [n for n in a.lengths if n <= 512] or [256]
        a.heads = ["4:1"]
    deadline = time.perf_counter() + a.time_budget
    res = {**run_meta(), "shapes": {"D": D, "block_size": a.block_size, "topk": topk, "dtype": str(dtype)},
           "rows": [], "skipped": [], "_dense": {}}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        res["gpu_sms"] = props.multi_processor_count
    tiles, kl_tiles = TILE_FWD, KL_TILE

    def save():
        out = {k: v for k, v in res.items() if k != "_dense"}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(a.json + ".tmp", a.json)

    for N in a.lengths:
        for hh in a.heads:
            H, Hkv = map(int, hh.split(":"))
            G = H // Hkv
            torch.manual_seed(0)
            q = torch.randn(1, N, H, D, device=a.device, dtype=dtype)
            k = torch.randn(1, N, Hkv, D, device=a.device, dtype=dtype)
            v = torch.randn(1, N, Hkv, D, device=a.device, dtype=dtype)
            sels = [(f"pool{r:g}", partial(pool_selection, N, Hkv, topk, a.block_size, max(1, 64 // G), r, a.device))
                    for r in a.ratios]
            if a.random:
                sels.append(("random", partial(random_selection, N, Hkv, topk, a.block_size, a.device, dtype)))
            if (a.sweep or a.kl_sweep) and "sweep_case" not in res:
                res["sweep_case"] = {"N": N, "H": H, "Hkv": Hkv, "selection": sels[0][0]}
            if a.sweep and "sweep" not in res:
                variants = [Tiles(block_m=m, num_warps=w, num_stages=s) for m in (64, 128) for w in (4, 8)
                            for s in (1, 2, 3)] if cuda else [Tiles(block_m=16, num_stages=1)]
                layout = build_layout(N, a.block_size, None, q.device)
                tiles, res["sweep"] = sweep_fwd(q, k, v, sels[0][1](), a.block_size, layout, a.device, variants)
                res["sweep_case"]["best"] = vars(tiles)
                save()
            if (a.sweep or a.kl_sweep) and a.kl and "kl_sweep" not in res:
                # 16 queries: the forward's tile at G = 4, so the KL's union as small as the forward's (1.36 against
                # 2.32 at 32 on the trained-like selection, H100 at 4ea91cc), its products 16 rows tall
                kl_variants = [Tiles(block_m=m, num_warps=w, num_stages=s) for m in (16, 32, 64, 128) for w in (4, 8)
                               for s in (1, 2)] if cuda else [Tiles(block_m=16, num_stages=1)]
                kl_tiles, res["kl_sweep"] = sweep_kl(q, k, sels[0][1](), a.block_size, a.device, kl_variants)
                res["sweep_case"]["kl_best"] = vars(kl_tiles)
                save()
            for name, make in sels:
                if time.perf_counter() > deadline:
                    res["skipped"].append({"N": N, "H": H, "Hkv": Hkv, "selection": name, "why": "time budget"})
                    continue
                try:
                    res["rows"].append(bench_case(res, N, H, Hkv, name, make(), a, tiles, q, k, v, a.device,
                                                  kl_tiles))
                except torch.cuda.OutOfMemoryError as ex:
                    res["skipped"].append({"N": N, "H": H, "Hkv": Hkv, "selection": name, "why": f"OOM: {ex}"[:200]})
                save()
                if cuda:
                    torch.cuda.empty_cache()
            del q, k, v
    save()
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
