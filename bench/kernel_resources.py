"""Every Triton kernel a training step launches, compiled for a Hopper GPU on a machine without one: does it
compile, and with how many registers, spilled bytes and how much shared memory (so how many of its programs
an SM holds at once).

The Triton interpreter (how CI runs the kernels) executes a kernel's Python, not its compiled code, so a
kernel can pass every CPU test and still fail to compile for the GPU, or compile to code that spills. And a
GPU is often not at hand (``docs/scaling.md``). Triton itself compiles without one: it needs only the
target, which a stand-in driver names here. Two steps, each its own process (``TRITON_INTERPRET`` is read at
import):

1. ``record``: one forward and backward of the configured model (weights in bf16, the dtype of GPU
   training), selective activation checkpointing, under the interpreter on the CPU, recording every Triton
   launch: the kernel, its arguments as Triton specialises them (a tensor's dtype and 16-byte alignment; an
   integer's class: 1, a multiple of 16, other, 64-bit), its constexprs, warps and stages.
2. ``compile``: each distinct launch compiled for ``sm_<arch>`` (default 90: H100 and H200), its registers per
   thread read from the cubin by ``cuobjdump`` (Triton's wheel carries it), its spills (bytes of spill stores
   and loads per thread) from ``ptxas -v`` on the kernel's PTX, its shared memory from Triton's metadata, and
   from those the programs one SM can hold (``occupancy``). Spilled registers live in the stack frame, which
   ``cuobjdump`` reports as ``STACK``; its ``LOCAL`` (explicit local arrays) stays 0 for a kernel that spills
   (before 2026-12-07 this script reported ``LOCAL`` as the spills and so read 0 for every kernel).

``--from`` compiles the launches of an earlier JSON again without recording, ``--only`` and ``--set`` make a
variant (other warps, stages or tile constexprs): registers and occupancy of a launch setting in seconds,
before a GPU times it.

    python -m bench.kernel_resources [--seq-len 2304] [--arch 90] [--json out.json] [-- overrides]
    python -m bench.kernel_resources --from out.json --only sparse_attention_fwd_kernel --set num_warps=8

Default model: ``model=small`` cut to 2 layers (its head counts, head dim, block size, top-k and index dim
fix every constexpr), at 2,304 tokens (18 blocks of 128, more than top-k 16, so the sparse path runs). It
takes about 5 minutes on 2 CPU cores, most of it the interpreter; ``model=tiny`` under a minute.

What it does not tell: the speed. It compiles with this machine's Triton, which may not be the GPU machine's
(the H200 runs Triton 3.6), and a register count is not a time. Occupancy bounds latency hiding; whether a
kernel is bound by latency, bandwidth or FLOPs is measured on the GPU (``bench/tune_sparse_attention.py``).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.meta import run_meta

DEFAULTS = ["model=small", "model.n_layers=2", "attention=msa", "attention.impl=triton", "model.rope_impl=triton",
            "parallel.activation_checkpointing=true", "parallel.checkpoint_policy=selective"]

# one SM of compute capability 9.0 (H100, H200): CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability"
SM90 = {"regs": 65536, "reg_unit": 256, "max_warps": 64, "max_blocks": 32, "smem": 233472, "smem_block": 232448,
        "smem_reserved": 1024, "max_regs_thread": 255}


def occupancy(regs: int, shared: int, num_warps: int, sm: dict = SM90) -> dict:
    """Programs of one kernel that one SM holds at once, and what limits them (the first of equal limits, in
    the order warps, programs, registers, shared): the warps and programs an SM schedules, ``regs`` per thread
    (allocated per warp in units of ``reg_unit``), ``shared`` bytes per program (dynamic and static; the
    runtime reserves 1 KB more per program). ``programs`` is 0 where one program does not fit."""
    per_warp = math.ceil(regs * 32 / sm["reg_unit"]) * sm["reg_unit"]
    fits = regs <= sm["max_regs_thread"] and shared <= sm["smem_block"]
    limits = {
        "warps": sm["max_warps"] // num_warps,
        "programs": sm["max_blocks"],
        "registers": (sm["regs"] // max(per_warp, sm["reg_unit"])) // num_warps if fits else 0,
        "shared": sm["smem"] // (shared + sm["smem_reserved"]) if fits else 0,
    }
    programs = min(limits.values())
    return {"programs": programs, "warps": programs * num_warps, "occupancy": programs * num_warps / sm["max_warps"],
            "limited_by": min(limits, key=limits.get), "limits": limits}


def _int_class(v: int) -> int:
    """A representative of the values Triton compiles an integer argument alike for: 1, a multiple of 16,
    anything else; beyond 32 bits, a 64-bit one."""
    rep = 1 if v == 1 else 16 if v % 16 == 0 else 3
    return rep + 2**32 if not -2**31 <= v < 2**31 else rep


def arg_spec(a):
    """A JSON-able description of one launch argument, as Triton specialises it."""
    import torch

    if torch.is_tensor(a):
        return {"tensor": str(a.dtype).removeprefix("torch."), "align16": a.data_ptr() % 16 == 0}
    if isinstance(a, bool) or a is None:
        return {"value": a}
    if isinstance(a, int):
        return {"int": _int_class(a)}
    if isinstance(a, float):
        return {"float": a}
    raise TypeError(f"bench.kernel_resources: no spec for a launch argument of type {type(a).__name__}")


def record(overrides: list[str], seq_len: int, packed: bool = False) -> list[dict]:
    """The distinct Triton launches of one training forward and backward (``bench.launch_count.
    training_step`` in bf16) under the interpreter, each with its count."""
    import torch

    from bench.launch_count import on_triton_launch, training_step

    seen: dict[str, dict] = {}

    def record_launch(executor, args, kwargs):
        fn = executor.fn
        launch = {"module": fn.__module__, "kernel": fn.__name__, "args": [arg_spec(a) for a in args],
                  "kwargs": {k: arg_spec(v) if not isinstance(v, (bool, int, float, str)) else v
                             for k, v in sorted(kwargs.items())}}
        key = json.dumps(launch, sort_keys=True)
        seen.setdefault(key, {**launch, "count": 0})["count"] += 1

    step, _ = training_step(overrides, seq_len, packed, dtype=torch.bfloat16)
    with on_triton_launch(record_launch, "bench.kernel_resources"):
        step()
    return list(seen.values())


class _TargetOnly:
    """What Triton's JIT asks of the active driver to compile, and no more: the target, a device and a stream
    number. A launch through it compiles (``warmup``) and runs nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _make_arg(spec):
    import torch

    if "tensor" in spec:
        t = torch.empty(64, dtype=getattr(torch, spec["tensor"]))
        return t if spec["align16"] else t[1:]  # one element in: not a multiple of 16 bytes
    if "int" in spec:
        return spec["int"]
    if "float" in spec:
        return spec["float"]
    return spec["value"]


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>``'s report on a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers per thread, local memory per thread (spills) and static shared memory of a cubin's one
    kernel, by ``cuobjdump --dump-resource-usage``."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return {"registers": regs, "stack": stack, "static_shared": shared, "local": local}


def sass_calls(cubin: bytes) -> dict:
    """Instructions and subroutine calls (``CALL``) in a cubin's SASS, by ``cuobjdump -sass``. A call in a
    Triton kernel is a helper the compiler could not inline, mostly 64-bit integer division or remainder by a
    value known only at run time: about 80 instructions, with 64-bit integer-float conversions, each time. The
    MSA kernels decoded every tile row that way until 2026-12-07 (docs/kernels.md)."""
    sass = _cuobjdump(cubin, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    if not ops:
        raise RuntimeError(f"cuobjdump -sass printed no instructions:\n{sass[-2000:]}")
    return {"sass_instructions": len(ops), "calls": sum(op.startswith("CALL") for op in ops)}


SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_spills(ptxas_log: str) -> dict:
    """Stack frame and spill bytes per thread from ``ptxas -v``'s report of one kernel."""
    m = SPILLS.search(ptxas_log)
    if m is None:
        raise RuntimeError(f"ptxas -v printed no spill line:\n{ptxas_log[-2000:]}")
    frame, stores, loads = map(int, m.groups())
    return {"stack_frame": frame, "spill_stores": stores, "spill_loads": loads}


def ptxas_spills(ptx: str, arch: int) -> dict:
    """``parse_spills`` of the ptxas that Triton assembles ``sm_<arch>`` with (its wheel's), run on ``ptx``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except ImportError:  # a Triton without get_ptxas: its one bundled ptxas
        ptxas = _tool("ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{done.stderr[-2000:]}")
    return parse_spills(done.stdout + done.stderr)


def compile_launches(launches: list[dict], arch: int = 90) -> list[dict]:
    """Each launch of ``record`` compiled for ``sm_<arch>`` without a GPU: ``ok`` and the error, or the
    registers, spills, shared memory and occupancy (``occupancy``) of the compiled kernel."""
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.kernel_resources compiles with the interpreter off: TRITON_INTERPRET is 1 here")
    # the driver Triton had (None until first asked: asking on a machine without a GPU raises), and the
    # kernels whose per-device caches now hold the stand-in's target: both restored below
    before, touched = driver._active, []
    driver.set_active(_TargetOnly(arch))
    out = []
    try:
        for launch in launches:
            row = {k: launch[k] for k in ("module", "kernel", "count", "args", "kwargs")}  # the launch: --from
            row["constexprs"] = {k: v for k, v in launch["kwargs"].items() if k not in ("num_warps", "num_stages")}
            num_warps = launch["kwargs"].get("num_warps", 4)
            row["num_warps"], row["num_stages"] = num_warps, launch["kwargs"].get("num_stages")
            jit = getattr(importlib.import_module(launch["module"]), launch["kernel"])
            touched.append(jit)
            args = [_make_arg(s) for s in launch["args"]]
            kwargs = {k: _make_arg(v) if isinstance(v, dict) else v for k, v in launch["kwargs"].items()}
            try:
                kernel = jit.warmup(*args, grid=(1,), **kwargs)
                res = (cubin_resources(kernel.asm["cubin"]) | ptxas_spills(kernel.asm["ptx"], arch)
                       | sass_calls(kernel.asm["cubin"]))
            except Exception as e:  # noqa: BLE001 -- a kernel that does not compile is the finding
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
                out.append(row)
                continue
            shared = kernel.metadata.shared + res["static_shared"]
            row.update(ok=True, **res, shared=shared, **occupancy(res["registers"], shared, num_warps))
            out.append(row)
    finally:
        driver.set_active(before)
        for jit in touched:
            jit.device_caches = collections.defaultdict(jit.create_binder)
    return out


def variant(launches: list[dict], only: list[str] | None, changes: list[str]) -> list[dict]:
    """``launches`` of the kernels named in ``only`` (all where None), each with the ``KEY=INT`` ``changes``
    made to its constexprs or launch settings; a key the kernel does not take is an error that names them."""
    if only is not None:
        missing = set(only) - {x["kernel"] for x in launches}
        if missing:
            raise SystemExit(f"--only: no launch of {sorted(missing)}; recorded: "
                             f"{sorted({x['kernel'] for x in launches})}")
        launches = [x for x in launches if x["kernel"] in only]
    out = []
    for x in launches:
        kwargs = dict(x["kwargs"])
        for change in changes:
            key, _, value = change.partition("=")
            if key not in kwargs and key not in ("num_warps", "num_stages"):
                raise SystemExit(f"--set {change}: {x['kernel']} takes {sorted(kwargs)} (and num_warps, num_stages)")
            kwargs[key] = int(value)
        out.append({**x, "kwargs": kwargs})
    return out


def table(rows: list[dict]) -> str:
    """A markdown table of ``compile_launches``' rows."""
    lines = ["| kernel | constexprs | warps / stages | registers | spill stores / loads, bytes | shared KB "
             "| programs per SM (limited by) | warps per SM | SASS instructions, calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if not r["ok"]:
            lines.append(f"| `{r['kernel']}` | {cx} | {r['num_warps']} / {r['num_stages']} | does not compile: "
                         f"{r['error'].strip().splitlines()[-1][:160]} | | | | | |")
            continue
        lines.append(f"| `{r['kernel']}` | {cx} | {r['num_warps']} / {r['num_stages']} | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} | {r['programs']} "
                     f"({r['limited_by']}) | {r['warps']} | {r.get('sass_instructions', '')}, {r.get('calls', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2304)
    ap.add_argument("--packed", action="store_true", help="three documents in the row (cu_seqlens)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, H200)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="compile the launches of an earlier --json instead of recording a step")
    ap.add_argument("--only", nargs="+", default=None, metavar="KERNEL", help="compile these kernels only")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=INT",
                    help="a variant: these constexprs or num_warps/num_stages changed in every launch compiled")
    ap.add_argument("--record-only", type=Path, default=None, help=argparse.SUPPRESS)  # the recording process
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [*DEFAULTS, *args.overrides]
    if args.record_only is not None:
        args.record_only.write_text(json.dumps(record(overrides, args.seq_len, args.packed)))
        return
    if args.source is not None:
        earlier = json.loads(args.source.read_text())
        launches, meta = earlier["kernels"], {**earlier["meta"], "from": str(args.source)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rec = Path(tmp) / "launches.json"
            cmd = [sys.executable, "-m", "bench.kernel_resources", "--seq-len", str(args.seq_len), "--record-only",
                   str(rec), *(["--packed"] if args.packed else []), "--", *args.overrides]
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
            launches = json.loads(rec.read_text())
        meta = {"seq_len": args.seq_len, "packed": args.packed, "overrides": overrides}
    launches = variant(launches, args.only, args.set)
    rows = compile_launches(launches, args.arch)
    print(table(rows))
    bad = [r["kernel"] for r in rows if not r["ok"]]
    if args.json:
        meta = {**meta, **run_meta(), "arch": f"sm_{args.arch}", "only": args.only, "set": args.set}
        args.json.write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1))
    if bad:
        sys.exit(f"bench.kernel_resources: {len(bad)} launch(es) do not compile for sm_{args.arch}: {', '.join(bad)}")


if __name__ == "__main__":
    main()
