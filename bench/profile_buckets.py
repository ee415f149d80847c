"""Where a training step's GPU time goes: kernels from ``torch.profiler`` sorted into buckets by name.

Buckets, checked in this order (the first match wins):
- ``msa``: the Triton kernels of ``kernels/`` (``select_blocks_*``, ``sparse_attention_*``, ``index_kl_*``,
  the older ``index_topk_*`` names, and the reverse-index builders ``*csr*``: Triton kernels since commit
  ``7c345b5``, before which the same work ran as torch's sorts and index ops under ``other`` and
  ``elementwise``);
- ``communication``: NCCL kernels;
- ``attention``: dense attention (PyTorch's flash and memory-efficient kernels, cuDNN SDPA, FlexAttention);
- ``other``: copies, memsets, sorts, scans and top-k (the CSR builds and selection bookkeeping that
  ``kernels/`` runs through torch), and every name no rule knows;
- ``gemm``: cuBLAS/cuBLASLt/CUTLASS matrix products (``*gemm*``, ``nvjet_*``, ``*xmma*``, ``gemv*``);
- ``elementwise``: elementwise, reduction, normalisation, softmax/cross-entropy, indexing, embedding,
  the optimizer's multi-tensor kernels, Inductor's ``triton_poi/red/per`` kernels, and the fused RoPE of
  ``kernels/rope.py`` (``rotary_kernel``: the same bucket as the PyTorch ops it replaces).
On the CPU (no kernels) the same rules sort the aten ops (``aten::mm`` is a GEMM, and so on) by self time.
"""

from __future__ import annotations

import re

BUCKETS = ("msa", "attention", "gemm", "elementwise", "communication", "other")

_RULES = [
    ("msa", re.compile(r"(^|[^a-z0-9])(select_blocks|sparse_attention|index_kl|index_topk|csr)\w*kernel")),
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|sendrecv", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention|flex_attention|_attn_", re.I)),
    ("other", re.compile(r"memcpy|memset|radix|sort|scan|topk|bincount|histogram|unique", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cublas|cutlass|s16816|s1688|wgmma|hmma|splitkreduce|"
                        r"aten::(add|b|baddb|add_?b)?mm$|aten::matmul$|aten::linear$|aten::_?addmm", re.I)),
    ("elementwise", re.compile(r"elementwise|reduce|reduction|softmax|norm|multi_tensor|triton_(poi|red|per)_|"
                               r"cunn_|nll_loss|cross_entropy|index|scatter|gather|copy|cat|fill|embedding|"
                               r"silu|sigmoid|gelu|where|pow|sum|mean|amax|max|min|arange|adam|unrolled|"
                               r"vectorized|distribution|clamp|compare|rsqrt|exp|mul|add|div|sub|neg|"
                               r"masked|tanh|abs|sqrt|cumsum|lerp|foreach|zero|ones|empty_strided|to_copy|"
                               r"rotary", re.I)),
]


def classify(name: str) -> str:
    """The bucket of a kernel (or aten op) name; ``other`` when no rule matches."""
    for bucket, pattern in _RULES:
        if pattern.search(name):
            return bucket
    return "other"


def merged_us(intervals) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals (kernels on several streams may
    overlap; the union is the time the GPU was busy)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(kernels, wall_ms: float, top: int = 5) -> dict:
    """Buckets of ``kernels`` (an iterable of ``(name, start_us, end_us)``) over one step of ``wall_ms``:
    milliseconds and share of kernel time per bucket, the top kernels of each bucket, the busy time
    (union of the kernels' intervals) and the step's idle time (wall minus busy)."""
    kernels = list(kernels)
    per_bucket = {b: 0.0 for b in BUCKETS}
    by_name: dict[str, list] = {}
    for name, s, e in kernels:
        per_bucket[classify(name)] += e - s
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += e - s
        entry[1] += 1
    total = sum(per_bucket.values())
    busy_ms = merged_us((s, e) for _, s, e in kernels) / 1e3
    tops = {b: [] for b in BUCKETS}
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        b = classify(name)
        if len(tops[b]) < top:
            tops[b].append({"name": name[:160], "ms": round(us / 1e3, 3), "calls": n})
    return {"wall_ms": round(wall_ms, 3), "kernel_ms": round(total / 1e3, 3), "busy_ms": round(busy_ms, 3),
            "idle_ms": round(max(wall_ms - busy_ms, 0.0), 3), "n_kernels": len(kernels),
            "ms": {b: round(v / 1e3, 3) for b, v in per_bucket.items()},
            "share": {b: round(v / total, 4) if total else 0.0 for b, v in per_bucket.items()}, "top": tops}


def kernels_of(prof, device_type: str) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of what ran: the GPU kernels, memcpys and memsets of a CUDA profile,
    or on the CPU every aten op's self time (placed at its start, so busy time is not meaningful there)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if device_type == "cuda":
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, e.time_range.start, e.time_range.end))
        elif e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            out.append((e.name, e.time_range.start, e.time_range.start + e.self_cpu_time_total))
    return out


def profile_step(fn, device_type: str) -> dict:
    """Run ``fn`` (one training step) once under ``torch.profiler`` and return ``summarize`` of it."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device_type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    return summarize(kernels_of(prof, device_type), wall_ms)


_PY_FRAME = re.compile(r"^(?P<path>.+)\((?P<line>\d+)\): (?P<func>.+)$")


def host_area(name: str, roots: tuple[str, ...] = ("kernels", "msa", "train", "bench")) -> tuple[str, str]:
    """``(area, short name)`` of one event of a CPU profile taken with ``with_stack=True``: a torch op
    (``aten::mm``, ``msa::select_blocks``, an autograd node: area ``op``), or a Python function
    (``path(line): func``) of the project (``python:project``, the path from its folder in ``roots``), of an
    installed package (``python:<package>``: triton, torch, deepspeed, ...) or of anything else
    (``python:other``)."""
    m = _PY_FRAME.match(name)
    if not m:
        return "op", name
    path = m["path"].replace("\\", "/")  # relative to its sys.path entry where the profiler could tell
    path = path.split("site-packages/", 1)[-1]
    for r in roots:
        at = path.find(f"{r}/")
        if at == 0 or path[at - 1:at] == "/":
            return "python:project", f"{path[at:]}({m['line']}): {m['func']}"
    package = path.split("/", 1)[0] if "/" in path and not path.startswith("/") else "other"
    return f"python:{package}", f"{path}({m['line']}): {m['func']}"


def host_summary(events, wall_ms: float, top: int = 25) -> dict:
    """Where a step's host (CPU) time goes, from a CPU profile's events (``(name, thread, self_us)``;
    ``with_stack=True`` adds the Python functions as events, so a thread's self times add up to its busy
    time): each thread's busy milliseconds against the step's wall time; the self time by area
    (``host_area``: torch ops, the project's Python, each package's Python, Triton's kernel launches
    among them); the ops and the Python functions with the most self time; and the time spent waiting
    for the device (``aten::_local_scalar_dense``, the op behind ``.item()``/``.tolist()``, and explicit
    synchronisations)."""
    by_thread: dict[int, float] = {}
    by_area: dict[str, float] = {}
    by_name: dict[str, dict[str, list]] = {"op": {}, "python": {}}
    wait = [0.0, 0]
    for name, thread, self_us in events:
        by_thread[thread] = by_thread.get(thread, 0.0) + self_us
        area, short = host_area(name)
        by_area[area] = by_area.get(area, 0.0) + self_us
        e = by_name["op" if area == "op" else "python"].setdefault(short, [0.0, 0])
        e[0] += self_us
        e[1] += 1
        if name in ("aten::_local_scalar_dense", "cudaDeviceSynchronize", "cudaStreamSynchronize"):
            wait[0] += self_us
            wait[1] += 1

    def ranked(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": k[:160], "ms": round(v[0] / 1e3, 3), "calls": v[1]} for k, v in rows]

    return {"wall_ms": round(wall_ms, 3),
            "busy_ms_by_thread": [round(v / 1e3, 3) for v in sorted(by_thread.values(), reverse=True)],
            "ms_by_area": {k: round(v / 1e3, 3) for k, v in sorted(by_area.items(), key=lambda kv: -kv[1])},
            "n_ops": sum(v[1] for v in by_name["op"].values()),
            "device_wait_ms": round(wait[0] / 1e3, 3), "device_waits": wait[1],
            "top_ops": ranked(by_name["op"]), "top_python": ranked(by_name["python"])}


def sync_sites(fn, top: int = 15) -> dict:
    """Run ``fn`` once under ``torch.cuda.set_sync_debug_mode("warn")``: how many operations made the host
    wait for the GPU, by the source line that asked (what keeps the host from running ahead)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{'/'.join(w.filename.rsplit('/', 2)[-2:])}:{w.lineno}" if w.filename else "?"
            sites[key] = sites.get(key, 0) + 1
    rows = sorted(sites.items(), key=lambda kv: -kv[1])[:top]
    return {"n_syncs": sum(sites.values()), "sites": [{"where": k, "count": n} for k, n in rows]}


def host_profile(fn, device_type: str) -> dict:
    """One run of ``fn`` under a CPU-only ``torch.profiler`` with Python stacks: ``host_summary`` of it
    (on CUDA also ``sync_sites`` of a second run). The Python function events came with torch 2.13 on
    the CPU; the H200 runs (torch 2.11, Python 3.12) recorded none, only the ops (``top_python`` empty,
    every self time in area ``op``), for a reason not found yet."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = [(e.name, e.thread, e.self_cpu_time_total) for e in prof.events() if e.device_type.name == "CPU"]
    out = host_summary(events, wall_ms)
    if cuda:
        out["syncs"] = sync_sites(fn)
    return out


__all__ = ["BUCKETS", "classify", "merged_us", "summarize", "kernels_of", "profile_step", "host_summary", "sync_sites",
           "host_profile"]
