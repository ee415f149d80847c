"""bench.kernel_resources: the kernels compiled for sm_90 on a machine without a GPU, and the arithmetic it
reports (occupancy, Triton's integer specialisation) against hand computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.kernel_resources import _int_class, arg_spec, occupancy, parse_spills, table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "model.n_heads=8", "model.n_kv_heads=2", "model.head_dim=16", "model.rope_dim=8",
        "attention.block_size=16", "attention.topk=4", "attention.index_dim=16"]


def _env() -> dict:
    """This process's environment without TRITON_INTERPRET: the compile step must see the real JIT."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}


def test_occupancy_by_hand():
    # sparse_attention_fwd_kernel for model=small, as Triton 3.9 compiles it for sm_90: 232 registers and
    # 80 KB dynamic + 1 KB static shared memory, 4 warps. Registers: 232 x 32 rounded up to 256 per warp =
    # 7,424, 65,536 // 7,424 = 8 warps = 2 programs; shared: 233,472 // (82,944 + 1,024) = 2.
    o = occupancy(232, 82944, 4)
    assert o["limits"] == {"warps": 16, "programs": 32, "registers": 2, "shared": 2}
    assert (o["programs"], o["warps"], o["occupancy"], o["limited_by"]) == (2, 8, 0.125, "registers")
    # 32 registers, no shared memory, 4 warps: 1,024 registers a warp, 64 warps by registers = 16 programs, as
    # many as the 64-warp limit allows: the first equal limit is named
    o = occupancy(32, 0, 4)
    assert (o["programs"], o["occupancy"], o["limited_by"]) == (16, 1.0, "warps")
    # 8 warps of 128 registers: 4,096 a warp, 16 warps = 2 programs; 40 KB shared: 5 programs
    assert occupancy(128, 40960, 8)["limits"]["registers"] == 2
    assert occupancy(128, 40960, 8)["limits"]["shared"] == 233472 // (40960 + 1024) == 5
    # more shared memory than one program may have, or more than 255 registers: it does not launch
    assert occupancy(64, 232449, 4)["programs"] == 0
    assert occupancy(256, 0, 4)["programs"] == 0


def test_integer_arguments_are_kept_as_triton_specialises_them():
    assert [_int_class(v) for v in (1, 0, 16, 4096, 3, 17, -5)] == [1, 16, 16, 16, 3, 3, 3]
    assert _int_class(2**31) == 2**32 + 16 and _int_class(2**31 + 1) == 2**32 + 3 and _int_class(-2**31) == 16
    t = torch.zeros(8)
    assert arg_spec(t) == {"tensor": "float32", "align16": True}
    assert arg_spec(t[1:]) == {"tensor": "float32", "align16": False}
    assert arg_spec(torch.zeros(8, dtype=torch.bfloat16)[8:]) == {"tensor": "bfloat16", "align16": True}
    assert arg_spec(None) == {"value": None} and arg_spec(True) == {"value": True} and arg_spec(0.5) == {"float": 0.5}
    with pytest.raises(TypeError, match="no spec"):
        arg_spec("a string")


def test_every_kernel_of_a_training_step_compiles_for_sm90(tmp_path):
    """The whole path: the tiny model's step recorded under the interpreter, every kernel compiled for sm_90
    (what CI cannot otherwise check: the interpreter runs a kernel's Python, not its compiled code)."""
    out = tmp_path / "kr.json"
    r = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--seq-len", "512", "--json", str(out),
                        "--", *TINY], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["kernels"]
    assert all(row["ok"] for row in rows)
    names = {row["kernel"] for row in rows}
    assert {"select_blocks_fwd_kernel", "_csr_key_kernel", "_csr_bucket_stats_kernel", "_csr_work_kernel",
            "sparse_attention_fwd_kernel", "sparse_attention_fwd_combine_kernel", "_kl_csr_key_kernel",
            "_kl_csr_ent_kernel", "_kl_csr_table_kernel", "index_kl_fwd_lse_kernel", "index_kl_merge_lse_kernel",
            "index_kl_fwd_kernel", "sparse_attention_bwd_dkdv_kernel", "sparse_attention_bwd_dq_kernel",
            "rotary_kernel"} <= names
    fwd = next(row for row in rows if row["kernel"] == "sparse_attention_fwd_kernel")
    assert fwd["constexprs"] == {"BK": 16, "BLOCK_M": 64, "D": 16, "G": 4, "H": 8, "HKV": 2, "TOPK": 4}
    assert fwd["registers"] > 0 and fwd["programs"] == occupancy(fwd["registers"], fwd["shared"], 4)["programs"]
    assert res["meta"]["arch"] == "sm_90" and "| `sparse_attention_fwd_kernel` |" in r.stdout
    # the tile loops decode their rows without a 64-bit division subroutine (until 2026-12-07 each called one
    # per row: 20 calls in the forward); the index KL keeps one, its program's key decoded once
    by_name = {row["kernel"]: row for row in rows}
    for name in ("sparse_attention_fwd_kernel", "sparse_attention_bwd_dq_kernel", "sparse_attention_bwd_dkdv_kernel"):
        assert by_name[name]["calls"] == 0 and by_name[name]["sass_instructions"] > 200, by_name[name]
    for name in ("index_kl_fwd_kernel", "index_kl_fwd_lse_kernel"):
        assert by_name[name]["calls"] <= 1, by_name[name]

    # a variant of the recorded launch, compiled again without recording: 8 warps, 32-row tiles (two --set
    # flags add up)
    out8 = tmp_path / "kr8.json"
    r = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--from", str(out), "--only",
                        "sparse_attention_fwd_kernel", "--set", "num_warps=8", "--set", "BLOCK_M=32", "--json",
                        str(out8)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (fwd8,) = json.loads(out8.read_text())["kernels"]
    assert fwd8["num_warps"] == 8 and fwd8["constexprs"] == {**fwd["constexprs"], "BLOCK_M": 32} and fwd8["ok"]
    assert fwd8["programs"] == occupancy(fwd8["registers"], fwd8["shared"], 8)["programs"]
    r = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--from", str(out), "--only",
                        "sparse_attention_fwd_kernel", "--set", "BLOCK_Q=8"], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "--set BLOCK_Q=8: sparse_attention_fwd_kernel takes ['BK', 'BLOCK_M'" in r.stderr


def test_a_kernel_the_interpreter_runs_and_sm90_rejects_is_reported(tmp_path):
    """A loop-carried sum that starts as a Python int and becomes a float tensor: the interpreter runs it (this
    test checks that too), Triton's compiler refuses a loop variable that changes type. The tool names the
    kernel and the compiler's error and goes on, and the same loop with a typed start compiles."""
    (tmp_path / "loop_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def untyped_sum_kernel(x, y, n, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            acc = 0
            for i in range(n):
                acc += tl.load(x + i * BLOCK + o)
            tl.store(y + o, acc)

        @triton.jit
        def typed_sum_kernel(x, y, n, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], tl.float32)
            for i in range(n):
                acc += tl.load(x + i * BLOCK + o)
            tl.store(y + o, acc)
    '''))
    interpreted = textwrap.dedent('''
        import torch
        from loop_kernels import untyped_sum_kernel
        x, y = torch.arange(48.0), torch.empty(16)
        untyped_sum_kernel[(1,)](x, y, 3, BLOCK=16)
        assert torch.equal(y, x.view(3, 16).sum(0)), y
    ''')
    compiled = textwrap.dedent('''
        import json
        from bench.kernel_resources import compile_launches
        t = {"tensor": "float32", "align16": True}
        launches = [{"module": "loop_kernels", "kernel": k, "count": 1, "args": [t, t, {"int": 3}],
                     "kwargs": {"BLOCK": 16}} for k in ("untyped_sum_kernel", "typed_sum_kernel")]
        print(json.dumps(compile_launches(launches)))
    ''')
    env = _env() | {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    r = subprocess.run([sys.executable, "-c", interpreted], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=env | {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", compiled], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    bad, good = json.loads(r.stdout.strip().splitlines()[-1])
    assert not bad["ok"] and bad["kernel"] == "untyped_sum_kernel" and "acc" in bad["error"], bad
    assert good["ok"] and good["registers"] > 0 and good["spill_stores"] == good["spill_loads"] == 0
    rows = table([bad, good]).splitlines()[2:]  # the compiler's last line (the cause) in the table
    assert "does not compile: AssertionError(\"Loop-carried variable acc has initial type int32" in rows[0]
    assert f"| 4 / None | {good['registers']} | 0 / 0 |" in rows[1]


def test_spills_are_read_from_ptxas_and_a_kernel_that_spills_reports_them(tmp_path):
    """The spill count is ptxas's (``cuobjdump``'s ``LOCAL`` reads 0 for a kernel that spills: it reported no
    spills for the index KL's pass 2, which spills 940 bytes a thread). ``parse_spills`` against ptxas's own
    words; compiled for sm_90, a 128 x 128 fp32 product held by one warp (512 values a thread, over the 255
    registers one thread has) spills, and a 16 x 16 one does not."""
    line = "    896 bytes stack frame, 940 bytes spill stores, 1196 bytes spill loads"
    assert parse_spills(f"ptxas info    : Function properties for k\n{line}\n") == {
        "stack_frame": 896, "spill_stores": 940, "spill_loads": 1196}
    with pytest.raises(RuntimeError, match="no spill line"):
        parse_spills("ptxas info    : Used 32 registers")
    (tmp_path / "dot_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def square_kernel(x, y, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            a = tl.load(x + o[:, None] * BLOCK + o[None, :])
            tl.store(y + o[:, None] * BLOCK + o[None, :], tl.dot(a, a))
    '''))
    compiled = textwrap.dedent('''
        import json
        from bench.kernel_resources import compile_launches
        t = {"tensor": "float16", "align16": True}
        launches = [{"module": "dot_kernels", "kernel": "square_kernel", "count": 1, "args": [t, t],
                     "kwargs": {"BLOCK": b, "num_warps": 1}} for b in (128, 16)]
        print(json.dumps(compile_launches(launches)))
    ''')
    env = _env() | {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    r = subprocess.run([sys.executable, "-c", compiled], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    big, small = json.loads(r.stdout.strip().splitlines()[-1])
    assert big["ok"] and big["spill_stores"] > 0 and big["spill_loads"] > 0 and big["stack_frame"] > 0, big
    assert big["local"] == 0  # what the table reported as spills before
    assert small["ok"] and small["spill_stores"] == small["spill_loads"] == 0, small


def test_calls_count_the_subroutines_a_64_bit_division_compiles_to(tmp_path):
    """``calls`` against a hand check: ``x // n`` with ``n`` known at run time compiles for sm_90 to a call of
    the 64-bit division helper where ``x`` is int64, and to inline code (no call) where it is int32; a
    division by a constexpr is inline either way."""
    (tmp_path / "div_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def div_kernel(x, y, n, WIDE: tl.constexpr, CONST: tl.constexpr):
            o = tl.arange(0, 128)
            a = tl.load(x + o)
            if WIDE:
                a = a.to(tl.int64)
            tl.store(y + o, (a // 7 if CONST else a // n).to(tl.int32))
    '''))
    compiled = textwrap.dedent('''
        import json
        from bench.kernel_resources import compile_launches
        t = {"tensor": "int32", "align16": True}
        launches = [{"module": "div_kernels", "kernel": "div_kernel", "count": 1, "args": [t, t, {"int": 3}],
                     "kwargs": {"WIDE": w, "CONST": c, "num_warps": 4}} for w, c in ((1, 0), (0, 0), (1, 1))]
        print(json.dumps(compile_launches(launches)))
    ''')
    env = _env() | {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    r = subprocess.run([sys.executable, "-c", compiled], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wide, narrow, const = json.loads(r.stdout.strip().splitlines()[-1])
    assert wide["ok"] and wide["calls"] >= 1, wide
    assert narrow["ok"] and narrow["calls"] == 0 and const["ok"] and const["calls"] == 0, (narrow, const)
    assert 0 < narrow["sass_instructions"] < wide["sass_instructions"]
