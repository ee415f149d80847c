"""kernels/rope.py: the fused rotary kernel against the PyTorch path of ``msa.rope.Rotary.apply``, forward and
gradient, on awkward shapes (odd token counts, head dims that are not powers of two, partial and full
rotation, per-token tables of ``dynamic`` scaling, the ``yarn`` cos/sin scale). On CPU the kernel runs in the
Triton interpreter (fp32); the ``gpu`` cases compile it (bf16 and fp32)."""

import pytest
import torch

from msa.rope import RopeScaling, Rotary

CASES = [  # B, N, heads, head dim, rotated dims, scaling
    (1, 37, 3, 24, 8, None),
    (2, 19, 1, 16, 16, None),
    (2, 33, 2, 40, 24, RopeScaling(type="yarn", factor=4.0, original_max_len=16)),
    (1, 50, 2, 32, 16, RopeScaling(type="dynamic", factor=2.0, original_max_len=8)),
]


def positions(B, N, device):
    """Two packed documents per row (positions restart), so tables differ from token to token."""
    pos = torch.arange(N, device=device)
    pos = torch.where(pos < N // 3, pos, pos - N // 3)
    return pos.expand(B, N).contiguous()


def both(B, N, HX, D, R, scaling, device, dtype):
    x = torch.randn(B, N, HX, D, device=device, dtype=dtype)
    dy = torch.randn(B, N, HX, D, device=device, dtype=dtype)
    out = []
    for impl in ("torch", "triton"):
        xi = x.clone().requires_grad_(True)
        y = Rotary(positions(B, N, device), 1000.0, scaling, impl).apply(xi, R)
        y.backward(dy)
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("B,N,HX,D,R,scaling", CASES)
def test_fused_rotary_equals_the_torch_path(B, N, HX, D, R, scaling):
    (y_t, g_t), (y_f, g_f) = both(B, N, HX, D, R, scaling, "cpu", torch.float32)
    torch.testing.assert_close(y_f, y_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_f, g_t, rtol=1e-6, atol=1e-6)
    assert torch.equal(y_f[..., R:], y_t[..., R:])  # the dims past rot_dim are copied as they are


def test_fused_rotary_backward_rotates_back():
    """The gradient of a rotation is the rotation by the opposite angle: backward of forward is identity."""
    from kernels.rope import rotary_apply

    rot = Rotary(positions(1, 21, "cpu"), 500.0, None, "triton")
    cos, sin = rot._table(12)
    x = torch.randn(1, 21, 2, 20)
    xi = x.clone().requires_grad_(True)
    y = rotary_apply(xi, cos, sin, 12)
    (back,) = torch.autograd.grad(y, xi, y)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_rotary_impl_choice_and_errors():
    from kernels.rope import rotary_apply

    pos = positions(1, 8, "cpu")
    assert not Rotary(pos, 1e4, None, "auto").fused(torch.zeros(1))  # auto: PyTorch for CPU tensors
    assert Rotary(pos, 1e4, None, "triton").fused(torch.zeros(1))
    assert not Rotary(pos, 1e4, None, "torch").fused(torch.zeros(1))
    with pytest.raises(ValueError, match="model.rope_impl"):
        Rotary(pos, 1e4, None, "cuda")
    cos, sin = Rotary(pos, 1e4)._table(4)
    with pytest.raises(ValueError, match="rot_dim must be even"):
        rotary_apply(torch.zeros(1, 8, 1, 8), cos, sin, 5)
    with pytest.raises(ValueError, match="tables must be"):
        rotary_apply(torch.zeros(1, 8, 1, 8), cos, sin, 8)


def test_model_rope_impl_is_checked_and_gives_the_same_loss():
    """``model.rope_impl=triton`` (interpreted here) and ``torch`` give a tiny MSA model (reference attention:
    its index branch rotates too) the same loss, KL and gradients; a bad value is refused with the key."""
    from msa.layer import AttentionConfig
    from train.model import ModelConfig, build_model

    attn = AttentionConfig(impl="reference", block_size=8, topk=2, index_dim=8)

    def model(impl):
        torch.manual_seed(0)
        return build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                                       rope_dim=8, rope_impl=impl), attn)

    with pytest.raises(ValueError, match="model.rope_impl"):
        model("fused")
    ids = torch.randint(0, 60, (1, 40))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": positions(1, 40, "cpu")}
    out = []
    for impl in ("torch", "triton"):
        m = model(impl)
        res = m(batch)
        loss = res["lm_sum"] + res["kl"]
        loss.backward()
        out.append((res["lm_sum"].detach(), res["kl"].detach(), [p.grad for p in m.parameters()]))
    (lm_t, kl_t, g_t), (lm_f, kl_f, g_f) = out
    assert kl_t > 0
    torch.testing.assert_close(lm_f, lm_t, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_f, g_t):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bench_rope_runs_and_records_both_paths(tmp_path):
    """bench/rope.py on CPU (the interpreter): both paths timed, host time per call, the meta a result needs."""
    import json

    from bench.rope import main

    out = main(["--device", "cpu", "--seq-len", "24", "--calls", "2", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == out
    (row,) = out["points"]
    assert row["seq_len"] == 24 and row["tensors"] == 4
    for impl in ("torch", "triton"):
        assert row[impl]["device_ms"] > 0 and row[impl]["host_us"] > 0 and row[impl]["kernels"] is None
    assert row["device_speedup"] == row["torch"]["device_ms"] / row["triton"]["device_ms"]
    assert {"gpu", "torch", "triton", "commit", "command", "date_utc"} <= set(out["meta"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,N,HX,D,R,scaling", CASES + [(1, 4099, 8, 128, 64, None), (1, 4099, 2, 64, 64, None)])
def test_fused_rotary_equals_the_torch_path_gpu(B, N, HX, D, R, scaling, dtype):
    (y_t, g_t), (y_f, g_f) = both(B, N, HX, D, R, scaling, "cuda", dtype)
    # the same fp32 arithmetic, cast once: bf16 may differ by one rounding where fp32 fused a multiply-add
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_f, y_t, **tol)
    torch.testing.assert_close(g_f, g_t, **tol)
    if dtype == torch.bfloat16:
        assert (y_f != y_t).float().mean() < 0.01
