"""CPU tests of the benchmark helpers: kernel-name buckets, the SDPA backend record, the train-step
bench's rows, step-time projection and memory accounting, the old/new summary, and the docs blocks."""

import json
import re
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.meta import compose
from bench.profile_buckets import BUCKETS, classify, host_area, host_profile, host_summary, merged_us, summarize
from bench.render_docs import render_train_step, replace_block, results_name
from bench.step_time_old_new import summarize as summarize_old_new
from bench.timing import measure, one_more_step, sdpa_backend, sdpa_backends_of, timed_steps
from bench.train_step import make_batch, packed_lengths, project_step_s, storage_bytes

ROOT = Path(__file__).resolve().parents[1]

# Names as the profiler reports them: Triton kernels by their function name, the rest demangled
# (PyTorch 2.x CUDA kernels, cuBLAS/cuBLASLt on Hopper, flash/memory-efficient/cuDNN attention, NCCL)
KERNELS = {
    "select_blocks_fwd_kernel": "msa",
    "sparse_attention_fwd_kernel": "msa",
    "sparse_attention_fwd_kv_kernel": "msa",  # the name before the renovation
    "sparse_attention_bwd_dkdv_reduce_kernel": "msa",
    "index_kl_fwd_lse_kernel": "msa",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, true, false, "
    "false, true, true, false, false>(FLASH_FWD_params)": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, "
    "2, 4, 2, false, false, cutlass::bfloat16_t>, true, false, false, false, false, true, false>"
    "(FLASH_BWD_params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
    "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off"
    "_kernel__5x_cublas": "gemm",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NTN": "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>"
    "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)": "gemm",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
    "(cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, "
    "float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)": "gemm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)":
        "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
    "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
    "unsigned int, float, 4, 4>)": "elementwise",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
    "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": "elementwise",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
    "(at::native::ADAM_MODE)1, false>, bool, float, float, float, float, float, float, double*, float*, float*>"
    "(at::native::(anonymous namespace)::TensorListMetadata<4>, ...)": "elementwise",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::"
    "OpaqueType<2u>, unsigned int, 3, 128, 1>(...)": "elementwise",
    "void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>(...)":
        "elementwise",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "void cub::CUB_200700_900_NS::DeviceRadixSortOnesweepKernel<cub::CUB_200700_900_NS::"
    "DeviceRadixSortPolicy<long, int, unsigned int>::Policy900, false, long, int, unsigned int, int, int>"
    "(...)": "other",
    "void at::native::tensor_kernel_scan_innermost_dim<long, std::plus<long> >(long*, long const*, unsigned "
    "int, unsigned int, unsigned int, long, std::plus<long>)": "other",
    "Memcpy DtoD (Device -> Device)": "other",
    "Memset (Device)": "other",
    "aten::mm": "gemm",
    "aten::addmm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::mul": "elementwise",
    "aten::sort": "other",
}


@pytest.mark.parametrize("name,bucket", list(KERNELS.items()))
def test_kernel_names_fall_in_their_bucket(name, bucket):
    assert classify(name) == bucket


def test_every_triton_kernel_of_kernels_is_an_msa_kernel():
    """The MSA kernels go to ``msa``; the fused RoPE to ``elementwise``, where the PyTorch ops it replaces were."""
    launched = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name in re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(", path.read_text()):
            launched[name] = "elementwise" if path.name == "rope.py" else "msa"
    assert len(launched) >= 11 and launched["rotary_kernel"] == "elementwise"
    assert {n: classify(n) for n in launched} == launched


def test_bucket_summary_adds_up_and_finds_idle_time():
    kernels = [("sparse_attention_fwd_kernel", 0.0, 400.0), ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 300.0, 700.0),
               ("Memset (Device)", 1000.0, 1100.0), ("an_unknown_kernel", 1100.0, 1200.0)]
    s = summarize(kernels, wall_ms=2.0)
    assert s["ms"] == {"msa": 0.4, "attention": 0.0, "gemm": 0.4, "elementwise": 0.0, "communication": 0.0,
                       "other": 0.2}
    assert s["kernel_ms"] == 1.0 and s["busy_ms"] == 0.9  # the first two overlap by 100 us
    assert s["idle_ms"] == 1.1 and s["n_kernels"] == 4
    assert abs(sum(s["share"].values()) - 1) < 1e-3 and set(s["share"]) == set(BUCKETS)
    assert sorted(k["name"] for k in s["top"]["other"]) == ["Memset (Device)", "an_unknown_kernel"]
    assert s["top"]["gemm"] == [{"name": "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "ms": 0.4, "calls": 1}]
    assert merged_us([(0, 10), (2, 3), (5, 12), (20, 21)]) == 13


def test_host_events_fall_in_their_area():
    assert host_area("aten::mm") == ("op", "aten::mm")
    assert host_area("msa::select_blocks") == ("op", "msa::select_blocks")
    assert host_area("kernels/common.py(171): build_csr") == ("python:project", "kernels/common.py(171): build_csr")
    assert host_area("/src/repo/msa/layer.py(9): forward")[0] == "python:project"
    assert host_area("triton/runtime/jit.py(700): run") == ("python:triton", "triton/runtime/jit.py(700): run")
    assert host_area("/x/site-packages/torch/nn/modules/module.py(1): _call_impl")[0] == "python:torch"
    assert host_area("enum.py(1230): __hash__")[0] == "python:other"


def test_host_summary_adds_up_by_hand():
    events = [("aten::mm", 1, 100.0), ("aten::mm", 1, 50.0), ("aten::_local_scalar_dense", 1, 300.0),
              ("kernels/common.py(171): build_csr", 1, 40.0), ("triton/runtime/jit.py(700): run", 2, 10.0),
              ("triton/runtime/jit.py(700): run", 2, 5.0)]
    h = host_summary(events, wall_ms=1.0)
    assert h["busy_ms_by_thread"] == [0.49, 0.015]
    assert h["ms_by_area"] == {"op": 0.45, "python:project": 0.04, "python:triton": 0.015}
    assert h["n_ops"] == 3 and h["device_waits"] == 1 and h["device_wait_ms"] == 0.3
    assert h["top_ops"][0] == {"name": "aten::_local_scalar_dense", "ms": 0.3, "calls": 1}
    assert h["top_ops"][1] == {"name": "aten::mm", "ms": 0.15, "calls": 2}
    assert h["top_python"][1] == {"name": "triton/runtime/jit.py(700): run", "ms": 0.015, "calls": 2}


def test_host_profile_of_a_cpu_step_sees_its_python_and_ops():
    w = torch.randn(64, 64, requires_grad=True)

    def step():
        (torch.randn(32, 64) @ w).square().sum().backward()

    h = host_profile(step, "cpu")
    assert h["n_ops"] > 0 and h["ms_by_area"]["op"] > 0
    assert any(r["name"].startswith("tests/test_bench.py(") for r in h["top_python"])
    assert "syncs" not in h  # the sync sites need CUDA


def test_sdpa_backend_names_the_op_that_ran():
    assert sdpa_backends_of(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
                             "aten::_scaled_dot_product_flash_attention_backward"]) == ["flash"]
    assert sdpa_backends_of(["aten::_scaled_dot_product_efficient_attention"]) == ["efficient"]
    assert sdpa_backends_of(["aten::_scaled_dot_product_cudnn_attention"]) == ["cudnn"]
    assert sdpa_backends_of(["aten::add"]) == []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    call = lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)  # noqa: E731
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_backend(call) == "math"
    assert sdpa_backend(call) in ("flash (cpu)", "math")  # what this CPU build dispatches to by default


def test_measure_warms_up_then_takes_three_calls():
    calls = []
    ms, how = measure(lambda: calls.append(1), device="cpu", warmup_fn=lambda: calls.append(0))
    assert calls == [0, 1, 1, 1] and how == "warm-up + median of 3 calls" and ms >= 0


def test_packed_rows_are_deterministic_and_fill_the_row():
    a, b = packed_lengths(196608, seed=3), packed_lengths(196608, seed=3)
    assert a == b and sum(a) == 196608 and len(a) > 2
    assert all(256 <= n <= 196608 // 2 for n in a[:-1]) and a[-1] >= 1
    batch = make_batch([5, 3, 4], vocab=50, seed=0, packed=True)
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"][0, [4, 7, 11]].tolist() == [-100] * 3
    assert torch.equal(batch["labels"][0, :4], batch["input_ids"][0, 1:5])
    one = make_batch([12], vocab=50, seed=0, packed=False)
    assert "cu_seqlens" not in one and one["labels"][0, -1] == -100


def test_step_time_projection():
    assert project_step_s([], 1000, 1e6)[0] is None
    pts = [{"tokens": n, "pairs": n * (n + 1) / 2, "step_s": 2e-3 * n + 1e-7 * n * (n + 1) / 2}
           for n in (1000, 4000, 16000)]
    est, how, used = project_step_s(pts, 64000, 64000 * 64001 / 2)
    assert used == pts and how == "fit over 3 points" and est == pytest.approx(2e-3 * 64000 + 1e-7 * 64000 * 64001 / 2)
    # one point: the larger of the token and pair scalings (quadratic here: x16 for 4x the tokens)
    est, _, used = project_step_s(pts[:1], 4000, 4000 * 4001 / 2)
    assert used == pts[:1]
    assert est == pytest.approx(pts[0]["step_s"] * (4000 * 4001) / (1000 * 1001))


def test_extrapolated_dense_names_the_points_it_used():
    """``from`` lists the points the projection used: both for a fit, the latest alone where a negative term
    sends it to the proportional scaling (it listed both there before, and the table read "from 256K, 512K")."""
    from types import SimpleNamespace

    from bench.train_step import extrapolate_dense

    result = {"points": [{"attention": "msa", "layout": "one-doc", "seq_len": 4000, "status": "ok"}]}
    cfg = SimpleNamespace(model="m", attention="a")

    def pts(*step_s):
        return [{"tokens": n, "pairs": n * n / 2, "step_s": t} for n, t in zip((1000, 2000), step_s)]

    with patch("bench.train_step.series_pairs", return_value=4000 * 4000 / 2):
        (fit,) = extrapolate_dense(result, pts(1.0, 3.0), cfg)  # a*n + b*n^2/2: a = 5e-4, b = 1e-6
        (scaled,) = extrapolate_dense(result, pts(1.0, 1.5), cfg)  # b = -5e-7: scaled instead
    assert fit["how"] == "fit over 2 points" and fit["from"] == [1000, 2000]
    assert fit["step_s"] == pytest.approx(0.5e-3 * 4000 + 1e-6 * 4000 * 4000 / 2)
    assert scaled["how"].startswith("scaled") and scaled["from"] == [2000]
    assert scaled["step_s"] == pytest.approx(1.5 * 4)  # the pairs grow 4x from 2000 to 4000 tokens


def test_a_third_timed_step_where_cheap_or_where_two_disagree():
    assert one_more_step([0.5, 0.6], cheap_s=2.0, left_s=0.0)  # cheap: always
    assert not one_more_step([3.0, 3.1], cheap_s=2.0, left_s=100.0)  # even and dear: two are enough
    # the H200 sweep's small 128K MSA point: 3.48 s then 1.32 s, a median of 2.40 s that neither step ran at
    assert one_more_step([3.48, 1.32], cheap_s=2.0, left_s=10.0)
    assert not one_more_step([3.48, 1.32], cheap_s=2.0, left_s=3.8)  # no room for 1.1 x 3.48 s
    assert not one_more_step([1.32], cheap_s=2.0, left_s=100.0)  # one step: the budget allowed no more


def test_timed_steps_run_n_then_one_more_where_uneven():
    def steps(*durations):
        it = iter(durations)
        return lambda: next(it)

    assert timed_steps(steps(3.0, 3.1, 9.9), 2, cheap_s=2.0) == [3.0, 3.1]
    assert timed_steps(steps(3.48, 1.32, 1.31), 2, cheap_s=2.0) == [3.48, 1.32, 1.31]
    assert timed_steps(steps(3.48, 1.32, 1.31), 2, cheap_s=2.0, deadline=time.perf_counter() + 3.0) == [3.48, 1.32]
    assert timed_steps(steps(0.5, 0.5, 0.5), 2, cheap_s=2.0) == [0.5, 0.5, 0.5]
    assert timed_steps(steps(3.0, 1.0), 1) == [3.0]


def test_storage_bytes_counts_views_once():
    flat = torch.zeros(100)
    views = [flat[:50], flat[50:], flat.view(10, 10)]
    total, ptrs = storage_bytes(views)
    assert total == 400 and len(ptrs) == 1
    other = torch.zeros(10, dtype=torch.float64)
    assert storage_bytes([other, flat], skip=ptrs)[0] == 80


def test_old_new_summary():
    res = {"ready": {"old": {"loss_first": 8.0, "lm_first": 6.0, "kl_first": 2.0},
                     "new": {"loss_first": 8.004, "lm_first": 6.004, "kl_first": 2.0}},
           "rounds": [{"old": {"step_s": [1.0, 1.1]}, "new": {"step_s": [1.05, 1.0]}},
                      {"old": {"step_s": [1.0, 1.0]}, "new": {"step_s": [1.0, 1.1]}}]}
    s = summarize_old_new(res)
    assert s["old"]["median_s"] == 1.0 and s["new"]["median_s"] == 1.025 and s["new_over_old"] == 1.025
    assert s["within_spread"]  # 2.5% apart, each tree's steps spread over 10%
    assert s["loss_first"]["rel_diff"] == pytest.approx(0.0005)


def test_old_new_packed_row():
    """``--doc-len``: documents of that length (the last shorter), positions restarting at each, no target across a
    document's end; the same tokens as the one-document row of the seed."""
    from bench.step_time_old_new import _batch

    one, packed = _batch(10, 50, 0), _batch(10, 50, 0, doc_len=4)
    assert "cu_seqlens" not in one and torch.equal(one["input_ids"], packed["input_ids"])
    assert packed["cu_seqlens"].tolist() == [0, 4, 8, 10] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    assert [i for i, t in enumerate(packed["labels"][0].tolist()) if t == -100] == [3, 7, 9]
    assert torch.equal(packed["labels"][0, :3], one["labels"][0, :3])


def test_docs_blocks_are_replaced_between_their_markers():
    text = "a\n<!-- begin: t -->\nold\n<!-- end: t -->\nb\n"
    new, found = replace_block(text, "t", "| x |\n")
    assert found and new == "a\n<!-- begin: t -->\n| x |\n<!-- end: t -->\nb\n"
    assert replace_block(text, "other", "y") == (text, False)


def test_train_step_tables_render_measured_points_and_reasons():
    res = {"meta": {"model": "small", "gpu": "g", "commit": "c", "overrides": []},
           "points": [{"attention": "msa", "layout": "one-doc", "seq_len": 131072, "docs": 1, "status": "ok",
                       "step_s": 1.5, "step_s_all": [1.5, 1.6], "tokens_per_s": 87381, "mfu": 0.12,
                       "model_tflops": 118.0, "memory": {"peak_gb": 13.2, "weights_gb": 0.3}},
                      {"attention": "dense", "layout": "one-doc", "seq_len": 131072, "status": "OOM: x"},
                      {"attention": "dense", "layout": "one-doc", "seq_len": 32768, "docs": 1, "status": "ok",
                       "step_s": 0.5, "step_s_all": [0.5, 0.5], "tokens_per_s": 65536, "mfu": None,
                       "model_tflops": 50.0}]}
    md = render_train_step([res])
    assert "| small | msa | one-doc | 128K | 1.500 (1.500, 1.600) | 87,381 | 12.0% | 118 | 13.2 |" in md
    assert "| small | one-doc | 128K | OOM | 87,381 |  |" in md
    assert "| small | one-doc | 32K | 65,536 | not in the run |  |" in md
    assert "- small dense one-doc 128K: OOM: x" in md
    # a run with overrides of its own is told apart from the others of the same model
    res["meta"]["overrides"] = ["parallel.activation_checkpointing=true", "parallel.checkpoint_policy=full"]
    assert "- small (checkpoint_policy=full) dense one-doc 128K: OOM: x" in render_train_step([res])


def test_runs_on_another_card_are_labelled_with_it():
    from bench.render_docs import labels

    metas = [{"model": "base", "gpu": "NVIDIA H200", "commit": "aaaaaaa1"},
             {"model": "base", "gpu": "NVIDIA H200", "commit": "bbbbbbb2"},
             {"model": "base", "gpu": "NVIDIA H100 80GB HBM3", "commit": "ccccccc3"}]
    assert labels(metas) == ["base @aaaaaaa", "base @bbbbbbb", "base on H100"]
    assert labels(metas[:1]) == ["base"]  # one card: nothing to tell apart


def test_result_files_get_their_docs_names():
    assert results_name("compare_kernels.json", "NVIDIA H200") == "compare_kernels_renovation_h200.json"
    assert results_name("train_step_base_1m.json", "NVIDIA H100 80GB HBM3") == "train_step_base_1m_h100.json"
    assert results_name("notes.json", "NVIDIA H200") is None


def test_every_train_step_json_of_the_gpu_script_is_collected():
    """A stage whose JSON ``render_docs --collect`` does not know is left out of docs/results without a word
    (the dense_1m stage's was, until its first GPU call): each fixed name the script writes has a docs name."""
    script = (Path(__file__).resolve().parents[1] / "bench" / "train_step_gpu.sh").read_text()
    names = set(re.findall(r'--json "\$OUT/(train_step_[A-Za-z0-9_]+\.json)"', script))
    assert {"train_step_small.json", "train_step_small_1m_both.json"} <= names  # the pattern still reads the script
    assert [n for n in sorted(names) if results_name(n, "NVIDIA H200") is None] == []


def test_the_1b_long_stage_runs_its_two_points_with_their_overrides(tmp_path):
    """``STAGES=1b_long`` of bench/train_step_gpu.sh rehearsed on CPU (``CPU_CHECK=1``: the tiny model, toy rows):
    both points run and record the settings they ran under, the window first layer and the full policy, the
    longer one with its MLP tiled (the block-input offload needs a GPU, so the rehearsal leaves it out: a CPU run
    of it stops at check_parallel, as the first rehearsal of this stage did)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path),
           "CPU_CHECK": "1", "STAGES": "1b_long", "MSA_GIT_COMMIT": "test",
           "LONG_1B_OVERRIDES": "attention.dq_path=tile attention.kl_path=tile",
           "LONG_1B_1M_ARGS": "--time-warmup-above 0"}
    done = subprocess.run(["bash", "bench/train_step_gpu.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name, tokens, extra in (("512k", 512, []), ("1m_offload", 1024, ["parallel.mlp_tile_tokens=256"])):
        res = json.loads((tmp_path / f"train_step_1b_{name}.json").read_text())
        assert [(p["seq_len"], p["attention"], p["status"]) for p in res["points"]] == [(tokens, "msa", "ok")]
        # LONG_1B_1M_ARGS reaches the 1M point alone: one step, timed by itself
        assert ("timed by its warm-up step alone" in res["points"][0].get("steps_note", "")) == (name != "512k")
        assert res["points"][0]["layers"] == {"dense": 0, "window": 1, "msa": 1}
        assert res["meta"]["overrides"][-5 - len(extra):] == ["parallel.checkpoint_policy=full",
                                                               "model.sliding_window=64", "model.sliding_layers=[0]",
                                                               "attention.dq_path=tile", "attention.kl_path=tile",
                                                               *extra]
    assert not (tmp_path / "train_step_1b_512k_offload.json").exists()  # only after an out-of-memory


def test_an_out_of_memory_point_is_recorded_and_frees_the_engine(monkeypatch):
    from types import SimpleNamespace

    import bench.train_step as ts

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ts, "measure_point", oom)
    destroyed = []
    series = ts.Series("msa", [])
    # built: measure_or_record goes straight to the point
    series.run = SimpleNamespace(loader=None, engine=SimpleNamespace(destroy=lambda: destroyed.append(1)))
    series.build_s = 1.0
    env = SimpleNamespace(device=torch.device("cpu"))
    row = ts.measure_or_record(series, env, [1024], "one-doc", None, 1024, 0.0, lambda partial: None)
    assert row["status"] == "OOM: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert series.run is None and row["memory_at_oom"] == {}  # no CUDA allocator to read on the CPU
    assert destroyed == [1]  # the engine itself, not only the reference to it
    # where it was raised: the innermost frames in this repository, the raising one last
    assert row["oom_where"][-1].startswith("tests/test_bench.py:") and row["oom_where"][-1].endswith(" in oom")
    assert row["oom_where"][-2].startswith("bench/train_step.py:")
    assert row["oom_where"][-2].endswith(" in measure_or_record")


def test_largest_live_blocks_of_an_allocator_snapshot():
    import bench.train_step as ts
    from train.oom import REPO

    repo = REPO
    frames = [{"filename": str(repo / "kernels/index_kl.py"), "line": 285, "name": "index_kl_fwd"},  # innermost
              {"filename": "/usr/lib/python3/site-packages/torch/autograd/function.py", "line": 1, "name": "apply"},
              {"filename": str(repo / ".site/deepspeed/checkpointing.py"), "line": 9, "name": "forward"},
              {"filename": str(repo / "msa/layer.py"), "line": 40, "name": "forward"}]
    segments = [{"blocks": [{"state": "active_allocated", "size": 3 * 2**30, "frames": frames},
                            {"state": "inactive", "size": 40 * 2**30},  # free space of a segment: not live
                            {"state": "active_allocated", "size": 2**29}]},
                {"blocks": [{"state": "active_allocated", "size": 2**31}]}]
    live = ts.largest_live_blocks(segments, n=2)
    assert live == [{"gib": 3.0, "where": ["msa/layer.py:40 in forward", "kernels/index_kl.py:285 in index_kl_fwd"]},
                    {"gib": 2.0, "where": []}]


def test_step_speed_points_do_not_keep_earlier_engines(monkeypatch):
    """Each point's engine is destroyed when it is measured: before, every earlier point's model, gradients
    and optimizer state stayed allocated and counted in the later points' peak memory."""
    import gc
    import weakref

    import bench.step_speed as ss
    from train.parallel import init_distributed
    from train.recipe import build_recipe

    built = []
    real_start = ss.start

    def start_and_watch(*args, **kwargs):
        run = real_start(*args, **kwargs)
        built.append(weakref.ref(run.model))
        return run

    monkeypatch.setattr(ss, "start", start_and_watch)
    cfg, _ = ss.point_config("tiny", "one:256", "dense", [])
    env = init_distributed(cfg.parallel)
    stage = build_recipe(cfg)[0]
    batch = ss.make_row("one:256", cfg.model.vocab_size, env.device, 0)
    for _ in range(2):
        row = ss.measure(cfg, env, stage, batch, 1, False)
        gc.collect()
        assert row["tokens_per_s"] > 0 and row["start_gb"] is None  # None: not on a GPU
    assert len(built) == 2 and all(ref() is None for ref in built)


def test_headline_comes_from_the_benchmark_run_not_a_variant():
    """Variant runs (``msa_attention_klbwd_h200.json``) sort after ``msa_attention_h200.json``; taking the last
    match rendered the README's headline from one of them (a table of empty dense columns)."""
    from bench.render_docs import headline_source

    paths = ["r/msa_attention_h200.json", "r/msa_attention_klbwd_8503373_h200.json", "r/msa_attention_klbwd_h200.json"]
    assert headline_source(paths) == "r/msa_attention_h200.json"
    assert headline_source([*paths, "r/msa_attention_headline_h200.json"]) == "r/msa_attention_headline_h200.json"


def test_headline_table_renders_from_the_benchmark_json():
    import json

    from bench.render_docs import render_headline

    res = json.loads((ROOT / "docs" / "results" / "msa_attention_h200.json").read_text())
    lines = render_headline(res).splitlines()
    assert lines[2] == "| 32K | 57.3 | 31.3 | 1.8x | 15.2 | 7.6 | 2.0x |"
    # the dense 512K cells were one cold call: they carry the mark, and no speedup is built on them
    assert lines[4] == "| 512K | 15,584 * | 606.8 | not shown * | 4,796 * | 229.1 | not shown * |"
    assert lines[5].startswith("| 1M | not run (est. 62 s) | 1,583 |")


def test_quality_plan_fits_the_runs_serial_and_in_waves():
    from argparse import Namespace

    from bench.quality import plan

    timing = {"dense": {"setup_s": 5.0, "eval_s": 10.0, "main_step_s": 0.5},
              "msa": {"setup_s": 5.0, "eval_s": 20.0, "warmup_step_s": 0.2, "main_step_s": 0.4}}
    args = Namespace(warmup_frac=0.25, final_len=0, final_frac=0.2, primer_first=0.0, batch=2, seq_len=256, save_s=5.0,
                     seeds=[0, 1, 2], jobs=1, min_steps=1, max_steps=10**6, arms=["dense", "msa"])
    # one after the other: 3 x (20 + 30) s fixed, 3 x (0.5 + 0.25 x 0.2 + 0.75 x 0.4) s per step
    steps, estimate = plan(args, timing, 400.0)
    assert steps == 98 and estimate == pytest.approx({"dense": 20 + 98 * 0.5, "msa": 30 + 98 * 0.35})
    # all 6 runs at once: one wave of 90% of the time, as long as the slowest set-up and step
    assert plan(Namespace(**{**vars(args), "jobs": 6}), timing, 400.0)[0] == 660  # (360 - 30) / 0.5
    assert plan(Namespace(**{**vars(args), "jobs": 4}), timing, 400.0)[0] == 300  # 2 waves: (360 - 60) / 1.0
    assert plan(Namespace(**{**vars(args), "min_steps": 700, "jobs": 4}), timing, 400.0)[0] == 700


def test_quality_final_stage_keeps_the_tokens_per_step_and_is_planned(tmp_path):
    """--final-len: both arms end with a stage at that length, with as many tokens per step; the MSA arm
    starts with its warm-up; the plan weighs each stage's probed step time by its share of the steps."""
    from argparse import Namespace

    from bench.meta import compose
    from bench.quality import mean_step_s, overrides
    from train.recipe import build_recipe

    args = Namespace(model="tiny", seq_len=256, batch=4, rope_base=5e5, lr=1e-3, mix=0.25, tasks=["passkey"],
                     synthetic_len=[1024, 0], primer=0.0, primer_first=0.0, warmup_frac=0.1, final_len=1024,
                     final_frac=0.2, steps=None,
                     save_every=50, overrides=[])
    for arm, names in (("dense", ["main", "final"]), ("msa", ["warmup", "main", "final"])):
        stages = build_recipe(compose(overrides(args, arm, 0, 50, tmp_path, evals=False)))
        assert [st.name for st in stages] == names and stages[-1].end == 50
        assert stages[-1].end - stages[-1].start == 10
        assert (stages[-1].seq_len, stages[-1].batch_size) == (1024, 1)
        assert all(st.seq_len * st.batch_size == 1024 for st in stages)
        assert [st.phase for st in stages][-2:] == ["sparse", "sparse"]
    timing = {"warmup_step_s": 1.0, "main_step_s": 2.0, "final_step_s": 4.0}
    assert mean_step_s(args, "msa", timing) == pytest.approx(0.1 * 1 + 0.7 * 2 + 0.2 * 4)
    no_final = Namespace(**{**vars(args), "final_len": 0})
    plain = build_recipe(compose(overrides(no_final, "msa", 0, 50, tmp_path, False)))
    assert [(st.phase, st.end, st.seq_len) for st in plain] == [("warmup", 5, 256), ("sparse", 50, 256)]
    with pytest.raises(SystemExit, match="no main stage"):
        overrides(Namespace(**{**vars(args), "final_frac": 0.95}), "msa", 0, 50, tmp_path, False)


def test_quality_worker_probe_times_the_final_stage(tmp_path):
    """The probe in its own process (--jobs, no --steps) with --final-len: it composed its config for one
    step, which leaves no main stage beside a final one, and every probe failed (seen on the GPU); now it
    times the warm-up, main and final stages."""
    import json

    from bench.quality import parse, result_path, worker

    args = parse(["--model", "tiny", "--seq-len", "128", "--batch", "2", "--tasks", "passkey", "--depths", "0",
                  "--items", "1", "--rows", "1", "--eval-s", "1", "--warmup-frac", "0.3", "--final-len", "256",
                  "--final-frac", "0.15", "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--",
                  "attention.block_size=16", "attention.topk=2", "data.image.max_patches=16"])
    worker(args, "probe:msa:0")
    timing = json.loads(result_path(tmp_path / "work", "probe:msa:0").read_text())
    assert {"warmup_step_s", "main_step_s", "final_step_s"} <= set(timing) and timing["eval_s"] == 1


def test_quality_arms_are_what_they_say(tmp_path):
    """--arms: each arm's config (no dense first layer, a sliding-window first layer), every MSA arm with the
    dense warm-up, the summary and the plan over the arms asked for, each arm once."""
    from argparse import Namespace

    from bench.quality import overrides, parse, plan, summarise
    from train.recipe import build_recipe

    args = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256", "--arms", "dense", "msa",
                  "msa_nodense", "msa_window", "msa_kl", "msa_wide", "msa_fine", "--window", "64", "--kl-weight",
                  "0.02", "--wide-topk", "6", "--fine-block", "16", "--fine-topk", "12", "--warmup-frac", "0.2",
                  "--synthetic-len", "64", "200", "--",
                  "attention.topk=3", "recipe.kl_weight=0.5"])
    cfgs = {arm: compose(overrides(args, arm, 0, 50, tmp_path, False)) for arm in args.arms}
    synthetic = [s for s in cfgs["msa"].data.sources if s.kind == "synthetic"]
    assert [(s.min_len, s.max_len) for s in synthetic] == [(64, 200)] * len(args.tasks)
    default = compose(overrides(parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256"]), "msa", 0, 50,
                                tmp_path, False))
    assert {(s.min_len, s.max_len) for s in default.data.sources if s.kind == "synthetic"} == {(256, 0)}
    # an override for every arm applies to each, but not over what makes an arm what it is
    assert [build_recipe(cfgs[a])[-1].kl_weight for a in ("msa", "msa_kl")] == [0.5, 0.02]
    assert cfgs["msa_kl"].attention == cfgs["msa"].attention and cfgs["msa_kl"].model == cfgs["msa"].model
    del cfgs["msa_kl"]
    assert (cfgs["msa"].attention.topk, cfgs["msa_wide"].attention.topk) == (3, 6)
    assert cfgs["msa_wide"].model == cfgs["msa"].model
    assert build_recipe(cfgs.pop("msa_wide"))[0].phase == "warmup"
    fine = cfgs.pop("msa_fine")  # finer blocks, more of them: the keys of msa_wide's 6 blocks of 32
    assert (fine.attention.block_size, fine.attention.topk, cfgs["msa"].attention.block_size) == (16, 12, 32)
    assert fine.model == cfgs["msa"].model and build_recipe(fine)[0].phase == "warmup"
    assert cfgs["dense"].attention.kind == "dense"
    assert [cfgs[a].attention.kind for a in ("msa", "msa_nodense", "msa_window")] == ["msa"] * 3
    assert cfgs["msa"].attention.n_dense_layers == cfgs["msa_window"].attention.n_dense_layers == 1
    assert cfgs["msa_nodense"].attention.n_dense_layers == 0
    assert (cfgs["msa_window"].model.sliding_window, cfgs["msa_window"].model.sliding_layers) == (64, [0])
    assert cfgs["msa"].model.sliding_window == cfgs["msa_nodense"].model.sliding_window == 0
    assert {a: build_recipe(c)[0].phase for a, c in cfgs.items()} == {
        "dense": "sparse", "msa": "warmup", "msa_nodense": "warmup", "msa_window": "warmup"}
    runs = [{"arm": a, "scalars": {"final_loss": x}} for a, x in
            (("dense", 1.0), ("dense", 2.0), ("msa_window", 4.0))]
    summary = summarise(runs, ["dense", "msa_window"])
    assert summary["dense"]["final_loss"]["mean"] == 1.5 and summary["msa_window"]["final_loss"]["n"] == 1
    timing = {a: {"setup_s": 5.0, "eval_s": 5.0, "warmup_step_s": 1.0, "main_step_s": 1.0} for a in args.arms}
    three = Namespace(**{**vars(args), "arms": ["dense", "msa", "msa_window"], "seeds": [0], "jobs": 1,
                         "save_s": 0.0})
    assert plan(three, timing, 130.0)[0] == 33  # (130 - 3 x 10 s set-up and evals) / 3 arms / 1 s per step
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path), "--arms", "msa", "msa"])


def test_quality_primer_is_a_second_source_of_short_passkey_documents(tmp_path):
    """--primer: a second synthetic source (passkey only, --primer-len, its own seed) whose share comes out
    of the corpus; weights that leave no corpus are refused."""
    from bench.quality import overrides, parse

    args = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256", "--mix", "0.3",
                  "--primer", "0.1", "--primer-len", "110", "150", "--synthetic-len", "64", "200"])
    cfg = compose(overrides(args, "msa", 2, 50, tmp_path, False))
    kinds = [(s.name, s.kind, s.weight, list(s.tasks) if s.kind == "synthetic" else None) for s in cfg.data.sources]
    n = len(args.tasks)  # a source per task, named after it (loss/answer/<task>), with its share of --mix
    assert kinds == [("corpus", "shards", pytest.approx(0.6), None),
                     *[(t, "synthetic", pytest.approx(0.3 / n), [t]) for t in args.tasks],
                     ("primer", "synthetic", 0.1, ["passkey"])]
    *tasks, primer = cfg.data.sources[1:]
    assert (primer.min_len, primer.max_len) == (110, 150) and {(t.min_len, t.max_len) for t in tasks} == {(64, 200)}
    seeds = [t.seed for t in tasks] + [primer.seed]
    assert len(set(seeds)) == len(seeds)  # no source repeats another's draws
    plain = compose(overrides(parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256"]), "msa", 2, 50,
                              tmp_path, False))
    assert [s.kind for s in plain.data.sources] == ["shards"] + ["synthetic"] * n  # no primer unless asked
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path), "--mix", "0.6", "--primer", "0.4"])


def test_quality_primer_tasks_name_the_primer_documents(tmp_path):
    """--primer-tasks: the primer source holds those tasks (a source for lookup among distractors, not only
    copying); a primer too short for one of them is refused by the data check, which names the length needed.
    --primer-choices: the primer's candidates and keys per multikey document (two keys fit shorter documents)."""
    from bench.quality import overrides, parse
    from train.data.loader import check_data

    def primer(extra):
        args = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "1024", "--mix", "0.3",
                      "--primer", "0.1", *extra])
        cfg = compose(overrides(args, "dense", 0, 50, tmp_path, False))
        return cfg, next(s for s in cfg.data.sources if s.name == "primer")

    cfg, src = primer(["--primer-tasks", "passkey", "multikey", "--primer-len", "448", "640"])
    assert list(src.tasks) == ["passkey", "multikey"] and (src.min_len, src.max_len) == (448, 640)
    check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size)
    assert list(primer([])[1].tasks) == ["passkey"]  # the default, as every earlier run had it
    assert primer([])[1].choices == 4
    cfg, src = primer(["--primer-tasks", "multikey", "--primer-len", "288", "352", "--primer-choices", "2"])
    assert src.choices == 2 and all(s.choices == 4 for s in cfg.data.sources if s.name != "primer")
    check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size)  # two keys fit 288 tokens, four do not (below)
    cfg, _ = primer(["--primer-tasks", "multikey", "--primer-len", "288", "352"])
    with pytest.raises(ValueError, match=r"min_len=288"):
        check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size)
    cfg, _ = primer(["--primer-tasks", "multikey"])  # the default 128-192 tokens cannot hold a multikey question
    with pytest.raises(ValueError, match=r"data.sources\[\d\].min_len=128 must lie in \[\d+, 192\]"):
        check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size)
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path), "--primer", "0.1", "--primer-tasks", "sudoku"])
    # the training-only drill (K lookups a document) as the primer; the evals keep the eval tasks
    cfg, src = primer(["--primer-tasks", "multikey_drill", "--primer-len", "656", "896"])
    assert list(src.tasks) == ["multikey_drill"] and (src.min_len, src.max_len) == (656, 896)
    check_data(cfg.data, cfg.data.seq_len, cfg.data.batch_size)
    assert "multikey_drill" not in cfg.eval.tasks


def test_quality_primer_first_is_a_stage_of_the_primer_alone(tmp_path):
    """--primer-first: both arms start with a stage that reads only the primer source (its data_weights),
    inside the MSA arm's dense warm-up; the plan times it as a stage of its own."""
    from bench.quality import mean_step_s, overrides, parse
    from train.recipe import build_recipe

    args = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256", "--mix", "0.3", "--primer", "0.1",
                  "--primer-len", "110", "150", "--synthetic-len", "128", "256", "--primer-first", "0.1",
                  "--warmup-frac", "0.3"])
    for arm, plan_ in (("dense", [("primer", 5, "sparse"), ("main", 45, "sparse")]),
                       ("msa", [("primer", 5, "warmup"), ("warmup", 10, "warmup"), ("main", 35, "sparse")])):
        stages = build_recipe(compose(overrides(args, arm, 0, 50, tmp_path, False)))
        assert [(st.name, st.end - st.start, st.phase) for st in stages] == plan_
        alone = (0.0,) * (1 + len(args.tasks)) + (1.0,)  # the corpus and each task's source left out
        assert stages[0].data_weights == alone and all(not st.data_weights for st in stages[1:])
    timing = {"primer_step_s": 1.0, "warmup_step_s": 2.0, "main_step_s": 4.0}
    assert mean_step_s(args, "msa", timing, nominal=50) == pytest.approx((5 * 1 + 10 * 2 + 35 * 4) / 50)
    for bad in (["--primer-first", "0.1"], ["--primer", "0.1", "--primer-first", "0.4", "--warmup-frac", "0.3"],
                ["--primer", "0.1", "--primer-first", "1", "--arms", "dense"]):
        with pytest.raises(SystemExit):
            parse(["--out", str(tmp_path), *bad])
    # a dense-only run (the fork's source, docs/quality.md eighteenth run) has no warm-up for the primer to fit
    dense = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256", "--primer", "0.1", "--primer-first",
                   "0.5", "--warmup-frac", "0.3", "--arms", "dense"])
    stages = build_recipe(compose(overrides(dense, "dense", 0, 50, tmp_path, False)))
    assert [(st.name, st.end - st.start) for st in stages] == [("primer", 25), ("main", 25)]


def test_quality_extra_eval_lengths(tmp_path):
    """--extra-lengths: evals at those lengths too (e.g. the synthetic documents' own), in ascending order
    with the multiples, once each, in the run's config."""
    from bench.quality import eval_lengths, overrides, parse

    args = parse(["--out", str(tmp_path), "--model", "tiny", "--seq-len", "256", "--multiples", "1", "2",
                  "--extra-lengths", "512", "64"])
    assert eval_lengths(args) == [64, 256, 512]
    cfg = compose(overrides(args, "msa", 0, 50, tmp_path, evals=True))
    assert list(cfg.eval.lengths) == [64, 256, 512]


def test_quality_recall_plot_lengths_are_those_with_a_recall():
    """A length with no recall (at most topk blocks: no non-trivial row) gets no empty slot in the recall
    plot; the needle recall alone counts, and a bits-per-byte key does not."""
    from bench.quality import recall_lengths

    stats = {"eval/bpb/2K": {}, "eval/passkey/2K/choice": {}, "eval/index_recall/8K": {},
             "eval/needle_recall/passkey/16K": {}, "eval/needle_recall/passkey/16K/correct": {}}
    assert recall_lengths(stats, [2048, 8192, 16384, 32768]) == ["8K", "16K"]
    assert recall_lengths({}, [2048]) == []


def test_quality_recall_plot_waits_for_a_recall(tmp_path):
    """While only the dense runs have finished, the recall plot is not drawn (an empty figure and a
    legend warning before); once the MSA arm has a recall, it is."""
    from bench.quality import plot_recall

    report = dict(summary={"dense": {"eval/bpb/8K": {"mean": 2.0}}}, eval_lengths=[8192],
                  settings=dict(tasks=["passkey"], arms=["dense", "msa"]), runs=[])
    plot_recall(report, tmp_path / "recall.png", "msa")
    assert not (tmp_path / "recall.png").exists()
    report["summary"]["msa"] = {"eval/index_recall/8K": {"mean": 0.9, "std": 0.0},
                                "layer/index_recall/8K/1": {"mean": 0.9, "std": 0.0},
                                "eval/needle_recall/passkey/8K": {"mean": 0.8, "std": 0.1}}
    plot_recall(report, tmp_path / "recall.png", "msa")
    assert (tmp_path / "recall.png").stat().st_size > 0


def test_quality_reference_pairs_new_arms_with_an_earlier_runs_arm(tmp_path):
    """--reference: the sixth run's dense runs (docs/results) become the first arm of a report of new arms
    with that run's settings, and the new arms are paired against them; other settings are refused, naming
    the setting; the reference arm cannot also be trained."""
    import json

    from bench.quality import add_reference, paired, parse, write

    run6 = ROOT / "docs" / "results" / "quality_h200_run6.json"
    argv = ["--out", str(tmp_path), "--steps", "900", "--warmup-frac", "0.3", "--mix", "0.4", "--final-len",
            "16384", "--final-frac", "0.15", "--arms", "msa_kl", "--extra-lengths", "2048", "--reference", str(run6)]
    args = parse(argv)
    report = {"settings": {**vars(args), "out": str(tmp_path), "reference": str(run6), "choices": 4},
              "eval_lengths": [2048, 8192, 16384, 32768, 65536], "tokens_per_step": 16384, "runs": []}
    add_reference(args, report, json.loads(run6.read_text()))
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [("dense", 1), ("dense", 0), ("dense", 2)]
    assert report["settings"]["arms"] == ["dense", "msa_kl"] and report["reference"]["seeds"] == [0, 1, 2]
    # an msa_kl arm 1% below each dense run, step by step: paired at -1% on every seed and tenth
    report["runs"] += [{**r, "arm": "msa_kl", "eval": {}, "loss_curve": [[i, 0.99 * x] for i, x in r["loss_curve"]],
                        "scalars": {**r["scalars"], "final_loss": 0.99 * r["scalars"]["final_loss"]}}
                       for r in report["runs"]]
    d = paired(report["runs"], report["settings"]["arms"])["msa_kl"]
    assert d["against"] == "dense" and d["mean"] == pytest.approx(-0.01) and d["std"] == pytest.approx(0, abs=1e-12)
    assert d["by_tenth"] == pytest.approx([-0.01] * 10)
    write(report, tmp_path, plots=True)  # the 2K evals exist for no run here: the plots leave them out
    assert (tmp_path / "quality_paired.png").exists() and (tmp_path / "quality_bpb.png").exists()
    with pytest.raises(SystemExit, match=r"lr=0\.001 \(here 0\.003\)"):
        add_reference(parse(argv + ["--lr", "3e-3"]), report, json.loads(run6.read_text()))
    with pytest.raises(SystemExit, match="steps=900 \\(here 800\\)"):
        add_reference(parse(argv + ["--steps", "800"]), report, json.loads(run6.read_text()))
    with pytest.raises(SystemExit):
        parse(argv + ["--arms", "dense", "msa_kl"])


def test_quality_reference_takes_overrides_that_leave_its_arm_as_trained(tmp_path):
    """--reference with overrides after ``--`` the reference did not have: accepted where the reference arm's
    composed training config is unchanged (``msa_wide`` keeps its own 32 blocks whatever ``attention.topk``
    says, so ``msa_nodense`` and ``msa_window`` can train with 32 beside the tenth run's runs), refused where it
    changes, naming the config key."""
    import json

    from bench.quality import add_reference, parse

    run10 = ROOT / "docs" / "results" / "quality_h200_run10.json"
    ref = json.loads(run10.read_text())
    argv = ["--out", str(tmp_path), "--steps", "1200", "--save-every", "100", "--warmup-frac", "0.3", "--mix", "0.3",
            "--primer", "0.15", "--primer-first", "0.1875", "--final-len", "16384", "--final-frac", "0.15",
            "--extra-lengths", "512", "2048", "--reference", str(run10), "--reference-arm", "msa_wide",
            "--arms", "msa_nodense", "msa_window"]
    report = {"settings": {}, "runs": []}
    add_reference(parse(argv + ["--", "attention.topk=32"]), report, ref)
    assert [r["arm"] for r in report["runs"]] == ["msa_wide"] * 3
    with pytest.raises(SystemExit, match=r"attention\.block_size=128 \(here 64\)"):
        add_reference(parse(argv + ["--", "attention.block_size=64"]), {"settings": {}, "runs": []}, ref)
    with pytest.raises(SystemExit, match=r"optim\.weight_decay=0\.1 \(here 0\.0\)"):
        add_reference(parse(argv + ["--", "optim.weight_decay=0.0"]), {"settings": {}, "runs": []}, ref)
    # a setting that is not an override is still compared as a setting
    with pytest.raises(SystemExit, match=r"mix=0\.3 \(here 0\.4\)"):
        add_reference(parse(argv + ["--mix", "0.4", "--", "attention.topk=32"]), {"settings": {}, "runs": []}, ref)


def test_every_quality_args_in_the_docs_parses_and_its_reference_fits():
    """Each ``QUALITY_ARGS="..."`` the docs and GPU scripts show is accepted by ``bench.quality``'s parser, and one
    with ``--reference`` by ``add_reference`` against the report it names (settings and overrides), so a
    device call made from the docs does not stop at its first line. A placeholder word in capitals (``N``)
    marks a synopsis and is skipped."""
    import json
    import shlex

    from bench.quality import add_reference, parse

    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.sh"))]
    checked = 0
    for path in files:
        for m in re.finditer(r'QUALITY_ARGS="([^"]*)"', path.read_text()):
            words = shlex.split(m[1])
            if any(re.fullmatch(r"[A-Z]+", w) for w in words):
                continue
            args = parse(["--out", "unused", *words])
            if args.reference:
                add_reference(args, {"settings": {}, "runs": []}, json.loads((ROOT / args.reference).read_text()))
            checked += 1
    assert checked >= 10


def test_quality_probe_times_every_stage_and_the_runs_follow(tmp_path):
    """The planned path (no --steps): the probe times each arm's stages by the names the plan weighs them by
    (the default recipe's main stage is called ``sparse``; keyed by it, the plan failed), then every run
    trains the planned steps; a window-first-layer MSA arm beside dense, the report names both."""
    import json

    from bench.quality import main

    main(["--model", "tiny", "--seq-len", "128", "--batch", "1", "--seeds", "0", "--multiples", "1", "--tasks",
          "passkey", "--depths", "0", "--items", "1", "--rows", "1", "--budget-s", "150", "--min-steps", "4",
          "--max-steps", "6", "--arms", "dense", "msa_window", "--window", "32", "--out", str(tmp_path), "--",
          "attention.block_size=16", "attention.topk=2", "data.image.max_patches=16"])
    report = json.loads((tmp_path / "quality.json").read_text())
    assert set(report["probe"]) == {"dense", "msa_window"}
    assert {"main_step_s", "setup_s", "eval_s"} <= set(report["probe"]["dense"])
    assert {"warmup_step_s", "main_step_s"} <= set(report["probe"]["msa_window"])
    assert sorted(r["arm"] for r in report["runs"]) == ["dense", "msa_window"]
    assert all(len(r["loss_curve"]) == report["steps"] for r in report["runs"])
    assert set(report["summary"]) == {"dense", "msa_window"}
    # per MSA layer: whether it finds the pass key at the answer's query, and its best KV group's share
    msa = next(r for r in report["runs"] if r["arm"] == "msa_window")["scalars"]
    hit = {k: v for k, v in msa.items() if k.startswith("layer/needle_hit")}
    layers = {str(i) for i in range(1, 4)}  # tiny: a window layer 0, MSA layers 1-3
    assert {k.rsplit("/", 1)[1] for k in hit} == layers and all(0.0 <= v <= 1.0 for v in hit.values())
    for layer in layers:
        assert msa[f"layer/needle_hit_best_group/passkey/128/{layer}"] >= msa[f"layer/needle_hit/passkey/128/{layer}"]


def test_quality_runs_stopped_at_the_deadline_finish_in_the_next_call(tmp_path):
    """--steps: the deadline stops the workers (reported, not failed), the work folder keeps them, and the
    same command again runs what is left and reports every run with its whole loss curve."""
    import json

    from bench.quality import main

    argv = ["--model", "tiny", "--seq-len", "128", "--batch", "1", "--seeds", "0", "--multiples", "1",
            "--tasks", "passkey", "--depths", "0", "--items", "1", "--rows", "1", "--jobs", "2", "--steps", "4",
            "--save-every", "2", "--grace-s", "5", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--", "attention.block_size=16", "attention.topk=2", "data.image.max_patches=16"]
    main(["--budget-s", "1", *argv])  # the deadline has passed when the workers start
    first = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert first["runs"] == [] and first["failed"] == []
    assert sorted(first["stopped"]) == ["run:dense:0:4", "run:msa:0:4"]
    assert sorted(first["progress"]) == sorted(first["stopped"])  # how far each got, if anywhere
    main(["--budget-s", "600", *argv])
    second = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert second["stopped"] == second["failed"] == second["not_started"] == []
    assert sorted(r["arm"] for r in second["runs"]) == ["dense", "msa"]
    assert all([step for step, _ in r["loss_curve"]] == [0, 1, 2, 3] for r in second["runs"])
    assert (tmp_path / "work" / "run-msa-0-4.json").exists()  # a third call would only read it
    assert not (tmp_path / "work" / "msa-s0" / "checkpoints").exists()  # a finished run drops its checkpoints


def test_quality_pool_collects_a_worker_that_finishes_in_the_grace(tmp_path):
    """Past the deadline every worker gets SIGTERM; one that still exits 0 within the grace (a run in its
    evals, which then writes its result and drops its checkpoints) is reported finished, not stopped:
    reported as stopped, its result was lost with the machine (the third call of a quality run)."""
    import subprocess
    import sys
    import time
    from argparse import Namespace

    from bench.quality import STOPPED, Pool

    args = Namespace(out=tmp_path, work=None, steps=4, grace_s=20.0)
    pool = Pool(args, [])
    finishes = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)"
    saves_and_stops = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(1)); "
                       "time.sleep(60)")
    pool.running = {spec: subprocess.Popen([sys.executable, "-c", code]) for spec, code in
                    (("run:msa:0:4", finishes), ("run:dense:0:4", saves_and_stops))}
    time.sleep(2.0)  # both have set their handlers
    ended = dict(pool.wait(deadline=time.perf_counter() - 1.0))
    assert ended == {"run:msa:0:4": 0, "run:dense:0:4": STOPPED}


def test_quality_run_all_collects_a_run_whose_teardown_the_deadline_killed(tmp_path, monkeypatch):
    """A worker writes its result last; the deadline's SIGTERM may still kill it in its teardown (exit -15,
    the fifth quality run's two MSA runs). Its result is collected in that call; a worker that wrote nothing
    is stopped, and a stale result from an earlier worker of the same spec does not count for it."""
    import subprocess
    import sys
    import time
    from argparse import Namespace

    from bench import quality

    args = Namespace(out=tmp_path, work=tmp_path / "work", steps=4, grace_s=5.0, jobs=2)
    args.work.mkdir()
    quality.result_path(args.work, "run:dense:0:4").write_text('{"stale": true}')
    popen = subprocess.Popen

    def fake_worker(cmd, **kw):  # the real worker trains; this one writes its result (or not), then hangs
        spec = cmd[cmd.index("--worker") + 1]
        write = (f"open({str(quality.result_path(args.work, spec))!r}, 'w').write('{{\"arm\": \"msa\"}}'); "
                 if spec.startswith("run:msa") else "")
        return popen([sys.executable, "-c", f"import time; {write}time.sleep(60)"], **kw)

    monkeypatch.setattr(quality.subprocess, "Popen", fake_worker)
    got = []
    out = quality.run_all(args, [], ["run:msa:0:4", "run:dense:0:4"], args.work, time.perf_counter() + 3.0,
                          lambda spec, result: got.append((spec, result)))
    assert got == [("run:msa:0:4", {"arm": "msa"})]
    assert out == {"failed": [], "stopped": ["run:dense:0:4"], "not_started": []}


def test_quality_progress_reads_how_far_a_stopped_run_got(tmp_path):
    """The report keeps a stopped run's steps, loss curve, source loss curves and last index recall (checked
    by hand)."""
    import json

    from bench.quality import progress

    run = tmp_path / "msa-s1"
    run.mkdir()
    rows = [{"step": 0, "loss/lm": 5.0, "loss/lm/primer": 5.5, "loss/answer/primer": 2.3},
            {"step": 1, "loss/lm": 4.0, "loss/lm/corpus": 4.0, "msa/index_recall": 0.5},
            {"step": 2, "loss/lm": 3.5, "msa/index_recall": 0.75, "loss/lm/primer": 3.0, "loss/answer/primer": 0.1},
            {"step": 3, "eval/bpb/8K": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert progress(tmp_path, "run:msa:1:900") == {
        "step": 3, "loss_curve": [[0, 5.0], [1, 4.0], [2, 3.5]], "train/index_recall": 0.75,
        "source_curves": {"loss/answer/primer": [[0, 2.3], [2, 0.1]], "loss/lm/corpus": [[1, 4.0]],
                          "loss/lm/primer": [[0, 5.5], [2, 3.0]]}}
    assert progress(tmp_path, "run:dense:2:900") == {"step": None, "loss_curve": [], "source_curves": {},
                                                     "train/index_recall": None}


def test_quality_final_losses_by_source_by_hand():
    """final_loss is the mean over the last tenth of the logged steps; final_loss/<source> and
    final_answer/<source> the mean of that source's loss and answer loss over the same steps, those that
    logged it (20 steps: the last 2)."""
    from bench.quality import final_losses

    rows = [{"step": i, "loss/lm": 10.0 - i, "loss/lm/corpus": 11.0 - i} for i in range(18)]
    rows += [{"step": 18, "loss/lm": 2.0, "loss/lm/corpus": 2.5, "loss/lm/primer": 0.5, "loss/answer/primer": 0.25},
             {"step": 19, "loss/lm": 1.0, "loss/lm/corpus": 1.5}, {"step": 20, "eval/bpb/8K": 2.0}]
    assert final_losses(rows) == {"final_loss": 1.5, "final_loss/corpus": 2.0, "final_loss/primer": 0.5,
                                  "final_answer/primer": 0.25}
    assert final_losses(rows[:3]) == {"final_loss": 8.0, "final_loss/corpus": 9.0}  # one source, the last step


def test_series_pairs_count_what_the_layers_attend():
    """The step-time projection grows with the pairs the layers attend: MSA layers cap each query at its
    selected keys, so a 1M MSA row is not projected as 1M^2 from a shorter point (a lone 1M run was
    skipped at a projected 254 s per step for a step measured at 18 s)."""
    from bench.train_step import series_pairs
    from train.metrics import attended_pairs

    msa, dense = compose(["model=small", "attention=msa"]), compose(["model=small", "attention=dense"])
    n = np.array([1 << 20])
    L, d = msa.model.n_layers, msa.attention.n_dense_layers
    selected = attended_pairs(n, msa.attention.block_size, msa.attention.topk)
    assert series_pairs(msa, [1 << 20]) == d * attended_pairs(n) + (L - d) * selected
    assert series_pairs(dense, [1 << 20]) == L * attended_pairs(n)
    assert series_pairs(msa, [1 << 20]) < series_pairs(dense, [1 << 20]) / 5


def train_step_cpu(out, *args: str) -> dict:
    """``python -m bench.train_step`` on CPU with the tiny model cut to 2 layers (seconds a run), its JSON
    written to ``out``: the result."""
    import json
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "bench.train_step", "--device", "cpu", "--model", "tiny", *args, "--json",
                    str(out), "--", "model.n_layers=2"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_no_skip_runs_a_point_the_projection_would_skip(tmp_path):
    """With a budget that the first point already uses up, the second is skipped by its projection;
    ``--no-skip`` runs it (the tiny model on CPU, a few seconds a run)."""

    def points(*extra):
        res = train_step_cpu(tmp_path / f"ts{len(extra)}.json", "--lengths", "64", "128", "--packed", "--attention",
                             "msa", "--time-budget", "0.01", *extra)
        return [p["status"] for p in res["points"]]

    skipped = points()
    assert skipped[0] == "ok" and skipped[1].startswith("skipped (projected"), skipped
    assert points("--no-skip") == ["ok", "ok"]


def test_time_warmup_above_times_a_long_point_by_its_warmup_step(tmp_path):
    """``--time-warmup-above S``: a point whose warm-up step took over S seconds runs no timed step after it;
    its step time is the warm-up step's and the record says so. Below S the timed steps run as before."""
    import json

    def point(*extra):
        res = train_step_cpu(tmp_path / f"ts{len(extra)}.json", "--lengths", "128", "--packed", "--attention",
                             "dense", "--steps", "2", "--cheap-s", "0", "--no-profile", "--no-skip", *extra)
        return res["points"][0]

    once = point("--time-warmup-above", "0")
    assert once["status"] == "ok" and once["warmup_only"] is True
    assert once["step_s_all"] == [once["warmup_s"]] and once["step_s"] == once["warmup_s"]
    assert "timed by its warm-up step alone" in once["steps_note"]
    from bench.render_docs import render_train_step
    table = render_train_step([json.loads((tmp_path / "ts2.json").read_text())])
    assert f"| {once['step_s']:.3f} (the warm-up step) |" in table
    timed = point("--time-warmup-above", "1000")
    # two timed steps, or three where the two disagree by over 20% (bench.timing.one_more_step)
    assert "warmup_only" not in timed and "steps_note" not in timed and len(timed["step_s_all"]) in (2, 3)


def test_msa_overrides_change_the_msa_series_only(tmp_path):
    """``--msa-overrides`` (a window first layer, tiny model on CPU) reaches the MSA series and not the dense
    one: the MSA series builds a window layer and its first step changes, dense's does not, and the label
    says so."""

    from bench.render_docs import label

    def run(*extra):
        res = train_step_cpu(tmp_path / f"ts{len(extra)}.json", "--lengths", "256", "--packed", "--steps", "1",
                             "--no-profile", "--no-skip", *extra)
        return res["meta"], {p["attention"]: p for p in res["points"]}

    meta0, plain = run()
    meta1, window = run("--msa-overrides", "model.sliding_window=32", "model.sliding_layers=[0]")
    assert meta0["msa_overrides"] == [] and meta1["msa_overrides"] == ["model.sliding_window=32",
                                                                       "model.sliding_layers=[0]"]
    assert all(p["status"] == "ok" for p in [*plain.values(), *window.values()])
    # the layers each series built (tiny: 2 layers, the first dense unless windowed)
    assert plain["msa"]["layers"] == {"dense": 1, "window": 0, "msa": 1}
    assert window["msa"]["layers"] == {"dense": 0, "window": 1, "msa": 1}
    assert plain["dense"]["layers"] == window["dense"]["layers"] == {"dense": 2, "window": 0, "msa": 0}
    # the same first step for dense; MSA's first layer attends 32 keys instead of up to 256
    assert window["dense"]["loss_first"] == plain["dense"]["loss_first"]
    assert window["msa"]["lm_first"] != plain["msa"]["lm_first"]
    assert label(meta1).startswith("tiny (model.n_layers=2, MSA with model.sliding_window=32")


def test_quality_paired_differences_by_hand(tmp_path):
    """``paired``: per seed ``msa / dense - 1`` of the final loss, their mean and std, and the mean over
    seeds of each tenth's relative difference of the mean loss (hand-computed on two seeds, 20 steps)."""
    from bench.quality import paired

    def run(arm, seed, final, curve):
        return {"arm": arm, "seed": seed, "scalars": {"final_loss": final}, "loss_curve": curve}

    flat = [[i, 2.0] for i in range(20)]
    runs = [run("dense", 0, 2.0, flat), run("dense", 1, 4.0, [[i, 4.0] for i in range(20)]),
            run("msa", 0, 2.2, [[i, 2.0 if i < 10 else 2.2] for i in range(20)]),
            run("msa", 1, 3.6, [[i, 4.0 if i < 18 else 3.6] for i in range(20)]),
            run("msa", 2, 9.9, flat)]  # no dense run of seed 2: left out
    got = paired(runs, ["dense", "msa"])["msa"]
    assert got["seeds"] == [0, 1] and got["against"] == "dense"
    assert got["final_loss_rel"] == pytest.approx({0: 0.1, 1: -0.1})
    assert got["mean"] == pytest.approx(0.0, abs=1e-12)
    assert got["std"] == pytest.approx(np.std([0.1, -0.1], ddof=1))
    # tenths of 2 steps: seed 0 is +10% from the sixth tenth on, seed 1 -10% in the last tenth
    assert got["by_tenth"] == pytest.approx([0.0] * 5 + [0.05] * 4 + [0.0])
    assert got["by_tenth_seeds"][1] == pytest.approx([0.0] * 9 + [-0.1])
    assert paired(runs, ["dense"]) == {}
    from bench.quality import plot_paired

    plot_paired({"paired": {"msa": got}, "settings": {"arms": ["dense", "msa"]}}, tmp_path / "paired.png")
    assert (tmp_path / "paired.png").stat().st_size > 1000


def test_quality_clip_stats_by_hand():
    """``clip_stats``: the clip's scale ``min(1, clip / norm)`` per logged step, by tenth of the steps and
    overall, the share of steps clipped and the index branch's share of the squared norm, on numbers
    worked out by hand (clip 1.0, 20 steps, norms logged at 5 of them; one without an index norm)."""
    from bench.quality import clip_stats

    rows = [{"step": 0, "opt/grad_norm": 4.0, "opt/grad_norm_index": 2.0},  # scale 0.25, share 0.25
            {"step": 1, "opt/grad_norm": 2.0, "opt/grad_norm_index": 0.0},  # scale 0.5, share 0
            {"step": 5, "opt/grad_norm": 0.5},  # not clipped, no index norm
            {"step": 10, "loss/lm": 3.0},  # no norm logged: not counted
            {"step": 19, "opt/grad_norm": 1.0, "opt/grad_norm_index": 0.6},  # exactly at the clip: scale 1
            {"step": 18, "opt/grad_norm": 8.0, "opt/grad_norm_index": 4.0}]  # scale 0.125, share 0.25
    got = clip_stats(rows, 1.0, 20)
    assert got["clip_scale_by_tenth"] == [pytest.approx(0.375), None, 1.0, None, None, None, None, None, None,
                                          pytest.approx(0.5625)]
    assert got["train/clip_scale"] == pytest.approx((0.25 + 0.5 + 1.0 + 1.0 + 0.125) / 5)
    assert got["train/clipped_share"] == pytest.approx(3 / 5)
    assert got["train/index_norm_share"] == pytest.approx((0.25 + 0.0 + 0.36 + 0.25) / 4)
    off = clip_stats(rows, 0.0, 20)  # optim.grad_clip=0: no clipping
    assert off["train/clip_scale"] == 1.0 and off["train/clipped_share"] == 0.0
    assert clip_stats([], 1.0, 20)["train/clip_scale"] is None


def test_kl_sweep_lists_only_the_kernel_variants_a_setting_compiled():
    from types import SimpleNamespace

    from bench.tune_sparse_attention import compiled_kernels, new_variants

    def variant(regs, spills):
        meta = SimpleNamespace(num_warps=4, num_stages=1, shared=1024)
        return SimpleNamespace(n_regs=regs, n_spills=spills, metadata=meta)

    fn = SimpleNamespace(device_caches={0: ({"a": variant(255, 16)}, None)})
    before = compiled_kernels(fn)
    assert new_variants(fn, before) == []  # nothing compiled since: no variant, not the earlier one
    fn.device_caches[0][0]["b"] = variant(200, 0)
    assert new_variants(fn, before) == [dict(n_regs=200, n_spills=0, num_warps=4, num_stages=1, shared=1024)]


@pytest.mark.parametrize("point", ["msa_full", "msa_full_compile", "msa_full_klbwd", "msa_selective",
                                   "msa_selective_varlen", "msa_selective_compile", "msa_selective_klbwd"])
def test_step_speed_points_run_the_checkpointing_they_are_named_for(point):
    """``msa_full`` relied on the default policy, which became ``selective``: every ``full`` point since
    measured ``selective`` twice. Each point now names its policy, whatever the default."""
    from bench.step_speed import point_config

    cfg, _ = point_config("tiny", "one:512", point, [])
    assert cfg.parallel.activation_checkpointing
    assert cfg.parallel.checkpoint_policy == ("full" if "_full" in point else "selective")


def test_quality_pairs_retrieval_share_by_length_by_hand():
    """Per eval length, the mean over tasks of the answer's share, arm minus dense seed by seed: the
    issue's retrieval comparison with the seed spread, on a score that moves before accuracy does."""
    from bench.quality import paired, share_by_length

    def run(arm, seed, shares):
        scalars = {"final_loss": 1.0, "eval/bpb/2K": 2.0, "eval/passkey/2K/choice": 0.5}
        for (task, length), v in shares.items():
            scalars[f"eval/{task}/{length}/share"] = v
        return dict(arm=arm, seed=seed, scalars=scalars, loss_curve=[[0, 1.0], [1, 1.0]])

    dense0 = {("passkey", "2K"): 0.25, ("multikey", "2K"): 0.35, ("passkey", "64K"): 0.2, ("multikey", "64K"): None}
    assert share_by_length(run("dense", 0, dense0)["scalars"]) == {"2K": pytest.approx(0.3), "64K": 0.2}
    runs = [run("dense", 0, dense0),
            run("msa", 0, {("passkey", "2K"): 0.45, ("multikey", "2K"): 0.35, ("passkey", "64K"): 0.3}),
            run("dense", 1, {("passkey", "2K"): 0.3, ("passkey", "64K"): 0.25}),
            run("msa", 1, {("passkey", "2K"): 0.2, ("passkey", "64K"): 0.25})]
    out = paired(runs, ["dense", "msa"])["msa"]["retrieval_share"]
    assert list(out) == ["2K", "64K"]  # by length, not by name
    assert out["2K"]["seeds"] == {0: pytest.approx(0.1), 1: pytest.approx(-0.1)}  # 0.4 - 0.3, 0.2 - 0.3
    assert out["2K"]["mean"] == pytest.approx(0.0) and out["2K"]["std"] == pytest.approx(2 ** 0.5 / 10)
    assert out["64K"]["seeds"] == {0: pytest.approx(0.1), 1: pytest.approx(0.0)}
    assert out["64K"]["mean"] == pytest.approx(0.05)
    assert "retrieval_share_far" not in paired(runs, ["dense", "msa"])["msa"]  # no share_far: not reported
    # with the share over needles below depth 1 as well: its own differences
    for r, v in zip(runs, (0.25, 0.5, 0.3, 0.2)):
        r["scalars"]["eval/passkey/64K/share_far"] = v
    far = paired(runs, ["dense", "msa"])["msa"]["retrieval_share_far"]
    assert list(far) == ["64K"] and far["64K"]["seeds"] == {0: pytest.approx(0.25), 1: pytest.approx(-0.1)}


def test_quality_answer_curves_by_hand(tmp_path):
    """answer_curves: each run's mean answer loss per span of the steps, then mean / min / max over the arm's
    runs (10 steps in 2 spans; a span no run logged is left out); the plot is drawn only when a run logged it."""
    from bench.quality import answer_curves, plot_answer

    runs = [{"arm": "dense", "source_curves": {"loss/answer/primer": [[0, 2.0], [2, 1.0], [6, 0.5]],
                                               "loss/lm/primer": [[0, 9.0]]}},
            {"arm": "dense", "source_curves": {"loss/answer/primer": [[1, 3.0], [9, 0.25]]}},
            {"arm": "msa", "source_curves": {"loss/answer/primer": [[4, 2.5]], "loss/answer/tasks": []}}]
    got = answer_curves({"steps": 10, "runs": runs}, bins=2)
    assert got == {"primer": {"dense": {"step": [2.5, 7.5], "n": 2, "mean": [2.25, 0.375], "min": [1.5, 0.25],
                                        "max": [3.0, 0.5]},
                              "msa": {"step": [2.5], "n": 1, "mean": [2.5], "min": [2.5], "max": [2.5]}}}
    assert plot_answer({"steps": 10, "runs": runs}, tmp_path / "answer.png")
    assert (tmp_path / "answer.png").stat().st_size > 1000
    assert not plot_answer({"steps": 10, "runs": [{"arm": "dense", "loss_curve": []}]}, tmp_path / "old.png")
    assert not (tmp_path / "old.png").exists()


def test_quality_share_plot_draws_the_arms_that_have_shares(tmp_path):
    """The answer-share plot: a line per arm with shares; none for a report written before the metric."""
    from bench.quality import plot_share

    settings = dict(tasks=["passkey", "multikey"], arms=["dense", "msa"], choices=4)
    old = dict(settings=settings, eval_lengths=[8192], summary={"dense": {"eval/passkey/8K/choice": {"mean": 0.25}}})
    assert not plot_share(old, tmp_path / "old.png") and not (tmp_path / "old.png").exists()
    new = dict(settings=settings, eval_lengths=[8192, 16384],
               summary={"dense": {"eval/passkey/8K/share": {"mean": 0.3, "std": 0.02}},
                        "msa": {"eval/passkey/8K/share": {"mean": 0.4, "std": 0.05},
                                "eval/multikey/16K/share": {"mean": 0.25, "std": 0.0}}})
    assert plot_share(new, tmp_path / "share.png") and (tmp_path / "share.png").stat().st_size > 0


def test_step_speed_grouped_rows_carry_the_loaders_loss_groups():
    """The ``*_groups`` points time the per-source losses: their row holds ``loss_groups`` as ``collate``
    makes them (document d in group d % S, its last answer targets in S + d % S), which leave the loss
    unchanged and whose sums add up to it."""
    from bench.step_speed import ANSWER_TOKENS, grouped, make_row, point_config
    from train.model import Decoder

    assert grouped("msa_selective_groups") and grouped("dense_groups") and not grouped("msa_selective")
    cfg, _ = point_config("tiny", "packed:512:128", "msa_selective_groups", ["attention.impl=reference"])
    plain = make_row("packed:512:128", cfg.model.vocab_size, torch.device("cpu"))
    batch = make_row("packed:512:128", cfg.model.vocab_size, torch.device("cpu"), sources=3)
    assert batch["n_loss_groups"] == 6 and batch["loss_groups"].shape == (1, 512)
    cu = batch["cu_seqlens"].tolist()
    assert len(cu) > 4  # several documents, so every source has some
    groups = batch["loss_groups"][0]
    for d in range(len(cu) - 1):
        lo, hi = cu[d], cu[d + 1]
        answer = list(range(max(lo, hi - 1 - ANSWER_TOKENS), hi - 1))
        expected = torch.full((hi - lo,), d % 3)
        expected[[i - lo for i in answer]] += 3
        assert torch.equal(groups[lo:hi], expected), d
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.attention)
    with torch.no_grad():
        out, ref = model(batch), model(plain)
    assert torch.equal(out["lm_sum"], ref["lm_sum"])
    assert out["group_lm_sum"].sum() == pytest.approx(ref["lm_sum"].item(), rel=1e-5)
    assert out["group_n_tokens"].sum() == ref["n_tokens"]
    answers = out["group_n_tokens"][3:].sum().item()
    assert answers == sum(min(ANSWER_TOKENS, hi - lo - 1) for lo, hi in zip(cu, cu[1:]))


def test_quality_fork_picks_the_dense_run_that_retrieves_by_hand(tmp_path, capsys):
    """bench.quality_fork: the pass key's choice averaged over the eval lengths from 2K up (512 left out),
    dense runs only, the tie to the lower primer answer loss; none when the best is below --min-choice."""
    from bench.quality_fork import main, pick, retrieval_score

    def run(arm, seed, choices, primer):
        scalars = {f"eval/passkey/{k}/choice": v for k, v in choices.items()}
        scalars |= {"eval/passkey/512/choice": 1.0, "eval/multikey/8K/choice": 1.0, "final_answer/primer": primer,
                    "depth/passkey/8K/0.0/choice": 1.0}
        return {"arm": arm, "seed": seed, "scalars": scalars}

    runs = [run("dense", 0, {"2K": 0.5, "8K": 0.25, "16K": 0.0}, 1.2),  # 0.25
            run("dense", 1, {"2K": 1.0, "8K": 0.75, "16K": 0.5}, 0.4),  # 0.75
            run("dense", 2, {"2K": 0.75, "8K": 0.75, "16K": 0.75}, 0.1),  # 0.75, lower primer loss
            run("msa_wide", 3, {"2K": 1.0, "8K": 1.0, "16K": 1.0}, 0.0)]  # not a source: MSA
    assert retrieval_score(runs[0]["scalars"]) == pytest.approx(0.25)
    assert retrieval_score({"eval/passkey/512/choice": 1.0}) is None
    chosen, rows = pick({"runs": runs}, tmp_path, 0.75)
    assert chosen == tmp_path / "dense-s2" and [r["seed"] for r in rows] == [0, 1, 2]
    assert pick({"runs": runs}, tmp_path, 0.8)[0] is None
    report = tmp_path / "quality.json"
    report.write_text(json.dumps({"runs": runs}))
    assert main([str(report), "--work", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dense-s2")
    assert main([str(report), "--work", str(tmp_path), "--min-choice", "0.9"]) == 1
    assert "no source: the best pass-key choice is 0.75" in capsys.readouterr().err


def test_quality_plain_reuses_results_only_at_every_length_under_its_name(tmp_path):
    """bench.quality_plain resumes: a run's results under --name that hold every length are read, not made
    again; a missing length, or another name (other eval overrides), evaluates the run again."""
    from bench.quality_plain import collect, results_of

    run = tmp_path / "msa_wide-s2"
    (run / "eval" / "plain").mkdir(parents=True)
    cell = {"choice": 0.75, "nll": 1.5, "items": 12, "far": {"choice": 0.5}}
    (run / "eval" / "plain" / "results.json").write_text(json.dumps(
        {"step": 600, "rope": {}, "retrieval": {"passkey": {"32768": cell, "65536": cell}}}))
    assert results_of(run, [32768, 65536], "plain") is not None
    assert results_of(run, [32768, 131072], "plain") is None and results_of(run, [32768], "yarn") is None
    got = collect([run], [65536])["msa_wide-s2"]
    assert (got["arm"], got["seed"], got["choice"], got["choice_far"]) == ("msa_wide", 2, {"65536": 0.75},
                                                                          {"65536": 0.5})
    assert collect([run], [131072]) == {}


def test_quality_fork_script_forks_both_arms_from_the_picked_source(tmp_path, corpus_dir):
    """bench/quality_fork_gpu.sh end to end on CPU with toy settings (its header's dry run): the source phase
    keeps its checkpoints, the pick names a source run, and both arms of the fork start from its weights
    (the MSA arm with its index branch fresh); what the device would not return is moved out of $OUT."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    toy = ("--model tiny --seq-len 256 --batch 1 --save-every 4 --final-len 512 --multiples 1 2 --extra-lengths 128 "
           "--items 1 --rows 1 --tasks passkey --depths 0 1 --eval-s 10")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(out),
           "WORK": str(work), "BUDGET_S": "900", "MIN_CHOICE": "0", "MIN_TOKENS": "256", "SOURCE_SEEDS": "0 1",
           "SOURCE_JOBS": "2", "SOURCE_STEPS": "8", "PRIMER_STEPS": "2", "FORK_STEPS": "6", "FORK_JOBS": "2",
           "PLAIN_LENGTHS": "512 1024",
           "OVERRIDES": f"attention.block_size=16 data.corpus_dir={corpus_dir}",
           "SOURCE_ARGS": toy, "FORK_ARGS": f"{toy} --seeds 0 --wide-topk 4"}
    done = subprocess.run(["bash", "bench/quality_fork_gpu.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    source = Path((out / "pick.txt").read_text().strip())
    assert source.parent == work / "source" and any((source / "checkpoints").iterdir())
    fork = json.loads((out / "fork" / "quality.json").read_text())
    assert sorted(r["arm"] for r in fork["runs"]) == ["dense", "msa_wide"] and not fork["failed"]
    logs = {p.name: p.read_text() for p in (work / "extra" / "fork" / "logs").iterdir()}
    loaded = f"weights from {source}/checkpoints/step_00000008 (step 8)"
    assert len(logs) == 2 and all(loaded in text for text in logs.values())
    assert "parameters the source lacks keep their init" in logs["run-msa_wide-0-6.log"]
    # the plain phase: the fork's runs again through train.eval, the same items and RoPE at the training
    # length (512: the fork's own evals, to the printed digits) and the model's own RoPE beyond it
    plain = json.loads((out / "fork" / "plain.json").read_text())
    assert not plain["failed"] and sorted(plain["runs"]) == ["dense-s0", "msa_wide-s0"]
    for r in fork["runs"]:
        got = plain["runs"][f"{r['arm']}-s{r['seed']}"]
        assert got["choice"]["512"] == r["scalars"]["eval/passkey/512/choice"] and got["step"] == 6
        assert got["nll"]["512"] == pytest.approx(r["scalars"]["eval/passkey/512/nll"], rel=1e-5)
        assert got["rope"]["1024"]["scaling"]["type"] == "none" and got["items"]["1024"] == 2
    assert "| msa_wide | " in (out / "plain.log").read_text()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "fork.log", "gpus.txt", "pick.txt", "plain.json", "plain.log", "quality.json", "quality.json", "source.log"]


def test_plot_series_keep_the_first_layer_options_apart():
    """A window first layer or no dense layer is a series of its own in the scaling plot, read from the
    layers a series built or, in older JSONs, from the run's overrides; dense beside an MSA-only override
    stays plain dense."""
    from bench.plot_scaling import series

    def point(kind, tps, layers=None):
        p = {"status": "ok", "attention": kind, "layout": "one-doc", "seq_len": 1 << 20, "tokens_per_s": tps}
        return p | ({"layers": layers} if layers else {})

    new = {"meta": {"model": "small", "overrides": [], "msa_overrides": ["model.sliding_window=4096",
                                                                         "model.sliding_layers=[0]"]},
           "points": [point("msa", 9, {"dense": 0, "window": 1, "msa": 11}),
                      point("dense", 1, {"dense": 12, "window": 0, "msa": 0})]}
    old = {"meta": {"model": "small", "overrides": ["attention.n_dense_layers=0"]}, "points": [point("msa", 8)]}
    old_window = {"meta": {"model": "small", "overrides": ["model.sliding_layers=[0]"]}, "points": [point("msa", 7)]}
    plain = {"meta": {"model": "small", "overrides": []}, "points": [point("msa", 4)]}
    got = series([new, old, old_window, plain])
    assert got == {("small", "msa", "one-doc", "window first layer"): [(1 << 20, 7), (1 << 20, 9)],
                   ("small", "dense", "one-doc", ""): [(1 << 20, 1)],
                   ("small", "msa", "one-doc", "no dense layer"): [(1 << 20, 8)],
                   ("small", "msa", "one-doc", ""): [(1 << 20, 4)]}


def test_quality_table_by_hand():
    """``bench.quality_table``: two reports (a run in both is taken from the first), seed cells with mean and
    std (n - 1), the loss paired by seed against the first arm, and the far choice from the per-depth choices
    where a report predates ``choice_far`` (hand-computed)."""
    from bench.quality_table import choice_far, table

    def run(arm, seed, loss, recall=None, depth_choices=None, far=None):
        sc = {"final_loss": loss, "eval/bpb/8K": 1.5, "eval/passkey/8K/choice": 0.5}
        if recall is not None:
            sc |= {"eval/index_recall/8K": recall, "eval/needle_recall/passkey/8K/correct": recall}
        for d, v in (depth_choices or {}).items():
            sc[f"depth/passkey/8K/{d}/choice"] = v
        if far is not None:
            sc["eval/passkey/8K/choice_far"] = far
        return {"arm": arm, "seed": seed, "scalars": sc}

    later = {"settings": {"seq_len": 8192}, "runs": [
        run("msa", 0, 1.1, 0.9, {"0.0": 0.0, "0.5": 0.5, "1.0": 1.0}),
        run("msa", 1, 0.9, 0.8, {"0.0": 0.5, "0.5": 0.5, "1.0": 1.0})]}
    earlier = {"runs": [run("dense", 0, 1.0, far=0.25), run("dense", 1, 1.0, far=0.75), run("msa", 0, 9.9)]}
    assert choice_far(later["runs"][0]["scalars"], "passkey", "8K") == 0.25  # depths 0 and 0.5 only
    assert choice_far(earlier["runs"][0]["scalars"], "passkey", "8K") == 0.25  # the logged value
    lines = table([later, earlier], ["dense", "msa"]).splitlines()
    assert lines[0] == "| seeds 0 / 1 | `dense` | `msa` |"
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip().strip("|").split("|")]
                                              for r in lines[2:])}
    assert rows["final LM loss"][1] == "1.1000 / 0.9000 (1.0000 ± 0.1414)"  # seed 0 from the first report
    assert rows["final LM loss against dense, paired by seed"] == ["", "+10.00 / -10.00 (+0.00 ± 14.14)%"]
    assert rows["index recall at 8K"] == ["", "0.900 / 0.800 (0.850 ± 0.071)"]
    assert rows["passkey choice, needles below depth 1, 8K (mean over seeds)"] == ["0.50", "0.38"]
    assert rows["needle recall at 8K, passkey, items answered right"] == ["", "0.900 / 0.800 (0.850 ± 0.071)"]


def test_quality_table_hit_and_plain_rows_by_hand():
    """The ``hit`` rows (seed by seed over the lengths where some run has them: the layer mean over the items
    answered right, and the largest best-group value over the layers) and ``--plain``'s rows (the model's own
    RoPE), hand-computed."""
    from bench.quality_table import table

    def run(arm, seed, hit16, groups16):
        sc = {"final_loss": 1.0, "eval/bpb/8K": 1.5, "eval/bpb/16K": 1.4, "eval/passkey/8K/choice": 1.0,
              "eval/needle_recall/passkey/8K/hit/correct": None,
              "eval/needle_recall/passkey/16K/hit/correct": hit16}
        sc |= {f"layer/needle_hit_best_group/passkey/16K/{layer}": v for layer, v in enumerate(groups16, 1)}
        return {"arm": arm, "seed": seed, "scalars": sc}

    report = {"settings": {"seq_len": 8192}, "runs": [
        {"arm": "dense", "seed": 0, "scalars": {"final_loss": 1.0, "eval/bpb/8K": 1.5, "eval/passkey/8K/choice": 1.0}},
        run("msa", 0, 0.5, [0.25, 0.75, None]), run("msa", 1, 0.25, [1.0, 0.5])]}
    plain = {"lengths": [32768], "task": "passkey", "runs": {
        "dense-s0": {"arm": "dense", "seed": 0, "choice": {"32768": 0.5}, "choice_far": {"32768": 0.25}},
        "msa-s0": {"arm": "msa", "seed": 0, "choice": {"32768": 1.0}, "choice_far": {"32768": 1.0}},
        "msa-s1": {"arm": "msa", "seed": 1, "choice": {"32768": 0.75}, "choice_far": {"32768": 0.5}}}}
    lines = table([report], ["dense", "msa"], plain).splitlines()
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip().strip("|").split("|")]
                                              for r in lines[2:])}
    mean = "`hit`, passkey: the needle selected at the answer's query, items answered right, mean over layers"
    assert rows[f"{mean}, 16K, seed by seed"] == ["", "0.50; 0.25"]  # 8K: no run has it
    best = "`hit`, passkey: the best KV group of the best layer, all items"
    assert rows[f"{best}, 16K, seed by seed"] == ["", "0.75; 1.00"]
    own = "passkey choice at 32K with the model's own RoPE (no stretch)"
    assert rows[f"{own}, all needles"] == ["0.50 / -", "1.00 / 0.75 (0.88 ± 0.18)"]  # dense has no seed 1
    assert rows[f"{own}, needles below depth 1"] == ["0.25 / -", "1.00 / 0.50 (0.75 ± 0.35)"]
    assert not any("own RoPE" in r for r in table([report], ["dense", "msa"]).splitlines())


def test_quality_table_of_the_nineteenth_run_matches_the_docs(capsys):
    """The command ``docs/quality.md`` gives for the nineteenth run prints the numbers written there: the loss
    pairing, the ``hit`` rows and the plain eval's."""
    from bench.quality_table import main

    main(["docs/results/quality_h100_run19_fork.json", "--arms", "dense", "msa_window",
          "--plain", "docs/results/quality_h100_run19_plain.json"])
    out = capsys.readouterr().out
    doc = (ROOT / "docs" / "quality.md").read_text()
    assert "| final LM loss against dense, paired by seed |  | -0.43 / +0.03 / -0.59 (-0.33 ± 0.32)% |" in out
    assert "-0.43 / +0.03 / -0.59% (**-0.33% ± 0.32%**)" in doc
    for row in ("0.91 / 0.59 / 0.52 / 0.41; 0.91 / 0.56 / 0.49 / 0.53; 0.92 / 0.66 / 0.47 / 0.44",
                "1.00 / 1.00 / 1.00 / 1.00; 1.00 / 1.00 / 1.00 / 0.75; 1.00 / 1.00 / 1.00 / 0.83"):
        assert row in out and row in doc
    assert "| passkey choice at 32K with the model's own RoPE (no stretch), all needles | 0.50 / 0.58 / 0.33 " \
           "(0.47 ± 0.13) | 1.00 / 1.00 / 1.00 (1.00 ± 0.00) |" in out
    assert "| **at 32K, the model's own RoPE** (`plain.json`) | 0.50 / 0.58 / 0.33 (**0.47**, 17 of 36) | " \
           "1.00 / 1.00 / 1.00 (**1.00**, 36 of 36) |" in doc


def test_quality_table_of_the_sixteenth_run_matches_the_docs(capsys):
    """The command ``docs/quality.md`` gives for the sixteenth run prints the numbers written there."""
    from bench.quality_table import main

    main(["docs/results/quality_h100_run16.json", "docs/results/quality_h200_run10.json",
          "--arms", "dense", "msa_wide", "msa_window"])
    out = capsys.readouterr().out
    assert "| final LM loss against dense, paired by seed |  | -1.71 / +1.61 / +1.06 (+0.32 ± 1.78)% | " \
           "-0.50 / +3.26 / +1.26 (+1.34 ± 1.88)% |" in out
    assert ("| index recall at 16K |  | 0.851 / 0.867 / 0.852 (0.856 ± 0.009) | "
            "0.870 / 0.862 / 0.856 (0.863 ± 0.007) |") in out
    doc = (ROOT / "docs" / "quality.md").read_text()
    assert "| pass-key choice over needles below depth 1 (`choice_far`), 32K / 64K | 0.38 / 0.17 | 0.17 / 0.12 | " \
           "0.38 / 0.12 |" in doc
    far = next(r for r in out.splitlines() if r.startswith("| passkey choice, needles below depth 1"))
    assert [c.strip().split(" / ")[-2:] for c in far.strip("|").split("|")[1:]] == [
        ["0.38", "0.17"], ["0.17", "0.12"], ["0.38", "0.12"]]


def test_dense_lengths_and_extrapolated_dense_by_hand(tmp_path):
    """``--dense-lengths`` gives dense its own rows; ``--extrapolate-dense`` records dense's step at the MSA
    length it did not run, from its measured rows (``a*tokens + b*pairs`` through the two points, or the
    proportional scaling where a term comes out negative: hand-solved here), and the ratio table labels it."""

    import numpy as np

    from bench.render_docs import render_train_step
    from bench.train_step import Series, series_pairs

    res = train_step_cpu(tmp_path / "ts.json", "--lengths", "512", "--dense-lengths", "128", "256", "--packed",
                         "--attention", "msa", "dense", "--steps", "1", "--no-profile", "--no-skip",
                         "--extrapolate-dense")
    assert [(p["attention"], p["seq_len"], p["status"]) for p in res["points"]] == [
        ("msa", 512, "ok"), ("dense", 128, "ok"), ("dense", 256, "ok")]
    (e,) = res["dense_extrapolated"]
    fit = e["how"].startswith("fit")
    assert e["seq_len"] == 512 and e["from"] == ([128, 256] if fit else [256])  # the points it used
    cfg = Series("dense", ["model=tiny", "model.n_layers=2", "recipe.warmup_steps=0"]).attn_cfg
    (t1, s1), (t2, s2) = [(p["seq_len"], p["step_s"]) for p in res["points"][1:]]
    p1, p2, p3 = (series_pairs(cfg, [n]) for n in (128, 256, 512))
    a, b = np.linalg.solve([[t1, p1], [t2, p2]], [s1, s2])
    if fit:
        assert a >= 0 and b >= 0 and e["step_s"] == pytest.approx(a * 512 + b * p3, abs=1e-3)
    else:  # a negative term: the latest point scaled by the larger of the two ratios
        assert min(a, b) < 0 and e["step_s"] == pytest.approx(s2 * max(512 / 256, p3 / p2), abs=1e-3)
    msa = res["points"][0]["tokens_per_s"]
    row = next(r for r in render_train_step([res]).splitlines() if ") | one-doc | 512 |" in r)  # dense vs MSA
    assert f"{e['tokens_per_s']:,} (extrapolated from {'128, 256' if fit else '256'})" in row
    assert f"{msa / e['tokens_per_s']:.2f}x (dense extrapolated)" in row


@pytest.mark.interpreter
def test_launch_count_counts_by_hand():
    """``bench.launch_count.Launches``: an add and a mul launch one kernel each, a view and an allocation none,
    the fused RoPE one Triton kernel, and the interpreter's own copies around it nothing."""
    from bench.launch_count import Launches
    from kernels.rope import rotary_apply

    x, cos, sin = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 4), torch.randn(1, 4, 1, 4)
    with Launches() as n:
        y = (x + 1).view(-1) * 2
        torch.empty(3)
        rotary_apply(y.view(1, 4, 2, 8), cos, sin, 8)
    assert n.aten == {"aten.add": 1, "aten.mul": 1} and n.triton == {"rotary_kernel": 1} and n.total == 3
    assert n.sites == {"tests/test_bench.py:test_launch_count_counts_by_hand": 2}  # who launched them


@pytest.mark.interpreter
def test_launch_count_sees_inside_the_kernels_custom_ops():
    """``select_blocks`` runs its host code inside the custom op ``msa::select_blocks``, below where a dispatch
    mode sees ops: the count still has its launches (the document tiles of a new shape, three ops; none once
    they are built) and its kernel."""
    import sys

    from bench.launch_count import Launches
    from kernels import select_blocks

    sys.modules["kernels.index_topk"]._ONE_DOC_TILES.clear()  # a new shape, whatever ran before
    q_idx, k_idx = torch.randn(1, 37, 1, 16), torch.randn(1, 37, 16)
    with Launches() as first:
        select_blocks(q_idx, k_idx, 16, 2)
    with Launches() as again:
        select_blocks(q_idx, k_idx, 16, 2)
    assert first.aten == {"aten.arange": 1, "aten.zeros_like": 1, "aten.full_like": 1}
    assert first.sites == {"kernels/index_topk.py:_build_doc_tiles": 3}
    assert again.aten == {} and first.triton == again.triton == {"select_blocks_fwd_kernel": 1}


@pytest.mark.interpreter
def test_launch_count_of_a_dense_step():
    """Two dense layers under selective checkpointing run each layer's q and k RoPE three times (forward,
    recompute, backward): 12 Triton launches; the aten ops are the rest."""
    from bench.launch_count import DEFAULTS, count_step

    res = count_step([*DEFAULTS, "model.n_layers=2", "parallel.activation_checkpointing=true", "attention=dense"],
                     64, packed=False)
    assert res["triton_kernels"] == {"rotary_kernel": 12} and res["msa_layers"] == 0
    assert res["total"] == res["aten"] + 12 == sum(res["aten_ops"].values()) + 12
    assert res["aten_ops"]["aten.mm"] > 0 and "aten.view" not in res["aten_ops"]


@pytest.mark.interpreter
def test_an_msa_layer_launches_at_most_108_kernels_more_than_a_dense_layer():
    """The host-path budget of an MSA layer (``docs/scaling.md`` 3m): a short row's step is bound by the host's
    launches, and each one an MSA layer adds over a dense layer counts against the 16K target. At commit
    96edf29 it added 207 per training step (``docs/results/launch_count_96edf29_cpu.json``); since the reverse
    indexes became Triton kernels, 108. A change that adds launches to the MSA path fails here: make it pay
    on the GPU first (``bench/train_step_gpu.sh``, stage ``old_new``), then raise the budget."""
    from bench.launch_count import DEFAULTS, count_step

    base = [*DEFAULTS, "model.n_layers=2", "parallel.activation_checkpointing=true"]
    msa = count_step([*base, "attention=msa"], 128, packed=False)
    dense = count_step([*base, "attention=dense"], 128, packed=False)
    assert msa["msa_layers"] == 1 and msa["triton_kernels"]["sparse_attention_fwd_kernel"] == 1  # the sparse path
    assert 50 <= msa["total"] - dense["total"] <= 108, (msa["total"], dense["total"])


def test_launch_count_leaves_triton_alone_on_import(monkeypatch):
    """Importing ``bench.launch_count`` (as ``tests/test_kernel_csr.py`` does) must not switch Triton to its
    interpreter: on a GPU machine every kernel test after it would run interpreted. Only its command line sets
    ``TRITON_INTERPRET``, and counting without it is a clear error."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import os, bench.launch_count; print(os.environ.get('TRITON_INTERPRET'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.strip() == "None"
    from bench.launch_count import Launches

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with Launches():
            pass


def test_dkdv_partials_count_the_work_items_build_csr_makes():
    """bench.dkdv_partials counts the backward's work items in numpy; on a small row they are build_csr's."""
    from bench.dkdv_partials import chunk_work, synthetic_block_idx
    from kernels.common import build_csr, build_layout

    N, Hkv, topk, bs = 300, 2, 5, 16
    block_idx = synthetic_block_idx(N, Hkv, topk, bs, seed=3)
    own = np.arange(N) // bs
    assert (block_idx[:, :, 0] == own).all() and (block_idx[:, :, 1] == 0).all() and (block_idx <= own[:, None]).all()
    layout = build_layout(N, bs, None, torch.device("cpu"))
    for chunk, q_chunk in ((4, 64), (256, 300), (1, 7)):
        csr = build_csr(torch.from_numpy(block_idx)[None].int(), layout, bs, 0, chunk, q_chunk)
        assert chunk_work(block_idx, bs, chunk, q_chunk) == csr.chunk_work


def test_git_commit_marks_a_tree_that_differs_from_its_head(tmp_path, monkeypatch):
    """A GPU machine's copy can carry a .git from an older commit under newer files: the recorded commit then
    says -dirty instead of passing for the tree that ran; MSA_GIT_COMMIT, where set, wins."""
    import subprocess

    from bench.meta import git_commit

    monkeypatch.delenv("MSA_GIT_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "a"], cwd=tmp_path, check=True)
    subprocess.run(git + ["tag", "v1"], cwd=tmp_path, check=True)  # a tag does not replace the sha
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "-dirty"
    assert git_commit(tmp_path / "a.py") == "unknown"  # not a folder git runs in
    monkeypatch.setenv("MSA_GIT_COMMIT", "abc")
    assert git_commit(tmp_path) == "abc"


def test_pool_selection_has_the_tile_union_it_asks_for():
    """bench/selection.py's pool selections (bench/tile_fwd.py's): valid (own block first, visible, no repeats,
    -1 padding) and their measured tile union near the asked ratio once queries see enough blocks."""
    from bench.selection import pool_selection
    from msa.stats import _tile_union

    N, Hkv, topk, bk, T = 4096, 2, 8, 16, 16
    for ratio in (1.4, 2.5):
        idx = pool_selection(N, Hkv, topk, bk, T, ratio, "cpu")
        pos = torch.arange(N)
        assert torch.equal(idx[..., 0], (pos // bk).int().expand(1, Hkv, N))
        valid = idx >= 0
        assert (idx[valid] * bk <= pos[None, None, :, None].expand_as(idx)[valid]).all()
        s = idx.sort(-1).values
        assert not ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()
        late = idx[:, :, N // 2:]  # every query sees at least 128 blocks: the pool is full
        work, selected = _tile_union(late, T)
        assert abs((work / selected).item() - ratio) < 0.1, (ratio, (work / selected).item())


def test_fwd_path_comparison_by_hand():
    """bench/fwd_path_compare.py: the median of the sparse steps without stats after the first `skip`, and the
    loss differences split at the phase switch."""
    from bench.fwd_path_compare import compare

    def run(losses, times, sparse_from=2, stats=(4,)):
        return [{"step": i, "train/phase_sparse": int(i >= sparse_from), "loss/lm": loss, "perf/step_s": t,
                 **({"msa/tile_union": 1.5} if i in stats else {})} for i, (loss, t) in enumerate(zip(losses, times))]

    a = run([4.0, 3.0, 2.0, 2.0, 2.0, 2.0], [9, 9, 5, 1.0, 7, 2.0])
    b = run([4.0, 3.3, 2.0, 2.1, 2.0, 1.9], [9, 9, 5, 0.5, 7, 1.0])
    out = compare(a, b, skip=1)  # sparse steps 2..5; skip step 2; step 4 has stats: steps 3 and 5 timed
    assert out["a"]["step_s_median"] == 1.5 and out["b"]["step_s_median"] == 0.75
    assert out["speedup_b_over_a"] == 2.0
    assert out["loss_max_rel_diff_warmup"] == pytest.approx(0.1)  # step 1: 0.3 / 3
    assert out["loss_max_rel_diff_sparse"] == pytest.approx(0.05)  # steps 3 and 5: 0.1 / 2
    assert out["a"]["tile_union_last"] == 1.5 and out["loss_steps_compared"] == 6


def test_window_bench_counts_the_keys_by_hand_and_runs_on_cpu(tmp_path):
    """``bench.window``'s FLOP count from the visible keys (a row of 5 under a window of 2: 1 + 2 + 2 + 2 + 2), and
    one CPU row where ``flash`` falls back to the chunks (equal outputs) and dense causal runs beside them."""
    from bench.window import main
    from train.metrics import attended_pairs

    def visible_keys(N, window):
        return attended_pairs(np.array([N]), window=window)

    assert visible_keys(5, 2) == 9 and visible_keys(3, 8) == 6 and visible_keys(4, 1) == 4
    res = main(["--lengths", "300", "--heads", "4", "2", "--head-dim", "8", "--window", "64", "--flex-max-n", "0",
                "--json", str(tmp_path / "w.json")])
    row = json.loads((tmp_path / "w.json").read_text())["rows"][0]
    assert row == res["rows"][0] and res["meta"]["flash_runs"] is False
    assert row["visible_keys_per_head"] == visible_keys(300, 64)
    assert row["fwd_bwd_tflop"] == 3.5 * 4 * 8 * 4 * visible_keys(300, 64) / 1e12
    assert row["flash_rel_rms_o_vs_chunks"] == 0.0 and row["flash_rel_rms_dq_vs_chunks"] == 0.0
    assert all(row[f"{w}_ms"] > 0 for w in ("chunks", "flash", "causal")) and "flex_ms" not in row


def test_a_step_timed_by_its_warm_up_reports_the_warm_ups_peaks():
    """``step_peaks``: a point timed by its warm-up alone reports the warm-up's allocator peaks, not those of the
    one-layer measurement after it (``msa_layer_gb`` resets the peaks); a point with timed steps reports theirs.
    The numbers are the 1M ``1b`` step's on an H100 (docs/scaling.md 3v), which read 57.7 GiB for a 76.3 GiB step."""
    from bench.train_step import step_peaks

    gib = 2**30
    warm = {"allocated_bytes.all.peak": int(76.299 * gib), "reserved_bytes.all.peak": int(77.0 * gib),
            "num_alloc_retries": 35}
    after_layer = {"allocated_bytes.all.peak": int(57.663 * gib), "reserved_bytes.all.peak": int(75.777 * gib),
                   "num_alloc_retries": 35}
    assert step_peaks(warm, after_layer, warm_only=True) == {"peak_gb": 76.299, "reserved_peak_gb": 77.0,
                                                             "alloc_retries": 35}
    assert step_peaks(warm, after_layer, warm_only=False)["peak_gb"] == 57.663


def test_rows_puts_several_one_document_rows_in_a_step(tmp_path):
    """``--rows 2``: each step trains two rows of the point's length (their own tokens, the same document
    layout), so tokens, documents and model FLOPs per step are twice one row's, the first loss is the mean over
    other tokens, and the label says so; packed rows with ``--rows`` above 1 are refused with the fix."""
    import subprocess
    import sys

    from bench.render_docs import label

    two = make_batch([100], vocab=50, seed=3, packed=False, rows=2)
    one = make_batch([100], vocab=50, seed=3, packed=False)
    assert two["input_ids"].shape == (2, 100) and not torch.equal(two["input_ids"][0], two["input_ids"][1])
    assert torch.equal(two["input_ids"][:1], one["input_ids"]) and (two["labels"][:, -1] == -100).all()
    assert torch.equal(two["position_ids"], torch.arange(100).expand(2, 100))

    def point(*extra):
        res = train_step_cpu(tmp_path / f"r{len(extra)}.json", "--lengths", "128", "--packed", "--attention", "msa",
                             "--steps", "1", "--no-profile", "--no-skip", *extra)
        return res["meta"], res["points"][0]

    meta1, p1 = point()
    meta2, p2 = point("--rows", "2")
    assert p1["status"] == p2["status"] == "ok"
    assert (p1["tokens"], p2["tokens"], p1["rows"], p2["rows"], p2["docs"]) == (128, 256, 1, 2, 2)
    assert p2["model_flop"] == pytest.approx(2 * p1["model_flop"], rel=1e-9)
    assert p2["lm_first"] != p1["lm_first"]
    assert label(meta2) == "tiny (model.n_layers=2, 2 rows a step)" and label(meta1) == "tiny (model.n_layers=2)"
    bad = subprocess.run([sys.executable, "-m", "bench.train_step", "--device", "cpu", "--rows", "2", "--packed",
                          "4096"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rows 2" in bad.stderr and "--packed with no length" in bad.stderr
