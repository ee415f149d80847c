"""Timing and dispatch records shared by the benchmarks: how a call is timed, which SDPA backend ran.

``measure`` always warms up first (compilation, autotuning, allocator growth) and then takes at least
3 timed calls: ``triton.testing.do_bench`` (median) on CUDA where a call takes under 50 ms, else the
median of 3 calls timed with CUDA events (``time.perf_counter`` on the CPU).
"""

from __future__ import annotations

import re
import statistics
import time

import torch

FAST_MS = 50.0  # below this a call is timed by do_bench's many repetitions
MIN_CALLS = 3


UNEVEN = 1.2  # two timed steps further apart than this ratio get a third, whose median is then robust


def one_more_step(times: list[float], cheap_s: float, left_s: float) -> bool:
    """After the planned timed steps: a third where two ran (not one: the budget had no room) and either
    both were cheap, or they disagree by more than ``UNEVEN`` (the median of two is their mean, which one
    slow step, e.g. an allocator still growing, would pull away) and one more fits in ``left_s``."""
    if len(times) < 2:
        return False
    return max(times) < cheap_s or (max(times) > UNEVEN * min(times) and 1.1 * max(times) < left_s)


def timed_steps(step, n: int, cheap_s: float = 0.0, deadline: float = float("inf")) -> list[float]:
    """``n`` calls of ``step`` (returning its own seconds), then one more where ``one_more_step`` says so
    with the time left before ``deadline`` (``time.perf_counter``)."""
    times: list[float] = []
    while len(times) < n or (len(times) == n and one_more_step(times, cheap_s, deadline - time.perf_counter())):
        times.append(step())
    return times


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """``(seconds, fn())``: one call of ``fn`` between two device synchronisations."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _timed_ms(fn, device) -> float:
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn, warm: bool = True, device="cuda", warmup_fn=None) -> tuple[float, str]:
    """Median milliseconds of ``fn`` after one warm-up call (``warmup_fn``, e.g. ``fn`` under a profiler,
    where given), and how they were taken. ``warm`` is kept for callers written before every measurement
    warmed up; the warm-up call always runs."""
    del warm
    (warmup_fn or fn)()
    times = [_timed_ms(fn, device)]
    if times[0] < FAST_MS and torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median"), "warm-up + do_bench median"
    while len(times) < MIN_CALLS:
        times.append(_timed_ms(fn, device))
    return statistics.median(times), f"warm-up + median of {len(times)} calls"


def measure_peaks() -> dict:
    """The two ceilings on this GPU: a large bf16 matmul and a device-to-device copy."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return {"bf16_matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_tb_per_s": 2 * x.numel() * 2 / ms_copy / 1e9}


# The aten op each SDPA backend dispatches to (torch 2.5-2.13 names); a backward op carries "_backward".
SDPA_OPS = [
    (re.compile(r"_scaled_dot_product_flash_attention_for_cpu"), "flash (cpu)"),
    (re.compile(r"_scaled_dot_product_flash_attention"), "flash"),
    (re.compile(r"_scaled_dot_product_efficient_attention"), "efficient"),
    (re.compile(r"_scaled_dot_product_cudnn_attention"), "cudnn"),
    (re.compile(r"_scaled_dot_product_fused_attention_overrideable"), "overrideable"),
    (re.compile(r"_scaled_dot_product_attention_math"), "math"),
]


def sdpa_backends_of(op_names) -> list[str]:
    """The SDPA backends named by profiler op names (``aten::_scaled_dot_product_flash_attention`` ->
    ``flash``), in order of first appearance, forward and backward ops alike."""
    found = []
    for name in op_names:
        for pattern, backend in SDPA_OPS:
            if pattern.search(name):
                if backend not in found:
                    found.append(backend)
                break
    return found


def sdpa_backend(fn) -> str:
    """Which SDPA backend ``fn`` (a call of ``F.scaled_dot_product_attention``, forward or
    forward+backward) dispatched to: the aten ops recorded by the profiler (CPU activity only, so the
    call runs at its normal speed on the GPU). ``unknown`` if no SDPA op was seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = sdpa_backends_of(e.name for e in prof.events())
    return "+".join(found) if found else "unknown"


__all__ = ["measure", "measure_peaks", "sync", "sdpa_backend", "sdpa_backends_of"]
