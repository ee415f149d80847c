"""The index top-k and index-KL Triton kernels against ``msa/reference.py``.

CPU: the interpreter (``TRITON_INTERPRET=1``, set by conftest) on small fp32 shapes. GPU (marked):
real sizes in bf16. The top-k checks the selected set by its reference scores, so that near-ties
which floating point may order either way do not fail it, and demands exact equality where the
scores are well separated."""

import inspect
import math

import pytest
import torch

from kernels.index_kl import index_kl_loss
from kernels.index_topk import select_blocks
from msa import reference as ref
from tests.utils import doc_starts, fp8_key_blocks, fp8_rows, key_blocks, poison_empty, rel_rms, visible_mask

CU_ONE_TOKEN_DOCS = [0, 1, 1, 50, 51, 52, 140, 140, 200]  # 1-token and empty documents


def _cu(cu):
    return None if cu is None else torch.tensor(cu, dtype=torch.int32)


def _ref_block_scores(q_idx, k_idx, block_size, cu_seqlens):
    """``[B, Hkv, Nq, n_blocks]`` float64 max-pooled scores (own block not forced), own blocks ``[1, Nq]``;
    the masks are built from ``cu_seqlens`` here (tests/utils.py), not by the reference."""
    B, Nq, Hkv, Di = q_idx.shape
    N = k_idx.shape[1]
    visible = visible_mask(N, Nq, cu_seqlens, q_idx.device)
    blk = key_blocks(N, block_size, cu_seqlens, q_idx.device)
    s = torch.einsum("bird,bjd->brij", q_idx.double(), k_idx.double()) / math.sqrt(Di)
    s = s.masked_fill(~visible, float("-inf"))
    n_blocks = math.ceil(N / block_size)
    m = torch.full((B, Hkv, Nq, n_blocks), float("-inf"), dtype=s.dtype)
    m = m.scatter_reduce(-1, blk.expand(B, Hkv, Nq, N), s, reduce="amax")
    return m, blk[None, -Nq:]


def check_selection(out, q_idx, k_idx, block_size, topk, cu_seqlens, tol):
    """Every rule of the contract, with near-ties allowed to order either way."""
    B, Nq, Hkv, _ = q_idx.shape
    assert out.dtype == torch.int32 and out.shape == (B, Hkv, Nq, topk)
    score, own = _ref_block_scores(q_idx.float(), k_idx.float(), block_size, cu_seqlens)
    out = out.long()
    assert (out[..., 0] == own[:, None, :]).all(), "own block must take slot 0"
    valid = out >= 0
    # -1 only after the valid entries, and exactly as many valid as blocks visible (capped at topk)
    assert (valid[..., 1:] <= valid[..., :-1]).all(), "-1 must only follow the valid entries"
    n_visible = torch.isfinite(score).sum(-1)
    assert (valid.sum(-1) == n_visible.clamp(max=topk)).all(), "wrong number of valid entries"
    srt = out.masked_fill(~valid, -1).sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "duplicate block"
    # the selected non-own blocks score at least the (topk-1)-th best of the others, minus tol
    others = score.scatter(-1, own[:, None, :, None].expand(B, Hkv, Nq, 1), float("-inf"))
    kth = None if topk == 1 else others.sort(-1, descending=True).values[..., min(topk - 2, others.shape[-1] - 1)]
    if kth is not None:
        got = others.gather(-1, out[..., 1:].clamp(min=0))
        ok = ~valid[..., 1:] | (got >= kth[..., None] - tol)
        assert ok.all(), f"selected a block below the k-th best: worst gap {(kth[..., None] - got)[~ok].max()}"
        # valid entries in descending reference score, up to tol
        g = got.masked_fill(~valid[..., 1:], float("-inf"))
        assert (g[..., 1:] <= g[..., :-1] + tol).all(), "entries out of score order"


@pytest.mark.parametrize("Nq,N,Hkv,Di,bs,topk,cu,B", [
    (63, 63, 1, 16, 16, 3, None, 2),
    (111, 111, 4, 16, 16, 20, None, 2),   # topk above the blocks available
    (200, 200, 2, 32, 16, 5, None, 1),
    (200, 200, 3, 16, 32, 4, CU_ONE_TOKEN_DOCS, 1),
    (200, 200, 2, 24, 16, 1, None, 1),    # own block only, Di padded
    (77, 200, 2, 16, 16, 4, CU_ONE_TOKEN_DOCS, 1),  # queries are the last Nq keys (context parallel)
])
def test_select_blocks_matches_reference(monkeypatch, Nq, N, Hkv, Di, bs, topk, cu, B):
    q_idx = torch.randn(B, Nq, Hkv, Di)
    k_idx = torch.randn(B, N, Di)
    cu = _cu(cu)
    expected = ref.select_blocks(q_idx, k_idx, bs, topk, cu)
    poison_empty(monkeypatch)
    out = select_blocks(q_idx, k_idx, bs, topk, cu)
    check_selection(out, q_idx, k_idx, bs, topk, cu, tol=1e-4)
    # random fp32 scores are well separated at these sizes: the order must match exactly
    assert torch.equal(out, expected), f"{(out != expected).sum()} of {out.numel()} slots differ"


def test_select_blocks_ties_go_to_lower_block():
    # every key equal: all block scores tie, so the reference order (lower id first) is forced
    N, bs = 100, 16
    q_idx = torch.randn(1, N, 2, 16)
    k_idx = torch.ones(1, N, 16).expand(1, N, 16).contiguous()
    out = select_blocks(q_idx, k_idx, bs, 4)
    assert torch.equal(out, ref.select_blocks(q_idx, k_idx, bs, 4))


def test_select_blocks_rejects_bad_config():
    q_idx, k_idx = torch.randn(1, 64, 1, 16), torch.randn(1, 64, 16)
    with pytest.raises(ValueError, match="attention.block_size"):
        select_blocks(q_idx, k_idx, 24, 4)
    with pytest.raises(ValueError, match="attention.topk"):
        select_blocks(q_idx, k_idx, 16, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        select_blocks(q_idx, k_idx, 16, 4, torch.tensor([0, 30, 40], dtype=torch.int32))


def _tiles_skipped(q_idx, k_idx, block_size, topk, block_t):
    """Share of (query tile, key block) steps at which no row of the tile beats its running (k-1)-th best
    (the kernel's gated insertion skips them); whole sequence, no documents."""
    score, own = _ref_block_scores(q_idx, k_idx, block_size, None)
    score = score[0].transpose(0, 1)  # [N, Hkv, n_blocks]
    steps = skips = 0
    for j in range(1, score.shape[-1]):
        kth = score[..., :j].topk(min(topk - 1, j), -1).values[..., -1] if j >= topk - 1 else float("-inf")
        beats = (score[..., j] > kth).any(-1)  # [N]
        later = own[0] > j
        for t0 in range(0, q_idx.shape[1], block_t):
            if later[t0]:
                steps += 1
                skips += int(not beats[t0:t0 + block_t].any())
    return skips / steps


@pytest.mark.parametrize("Nq,N,Hkv,topk,cu,gate_from", [
    (480, 480, 1, 2, None, 0),                   # running max only: 18% of the steps skip
    (480, 480, 2, 4, None, 7),
    (480, 480, 2, 4, None, 2**31 - 1),            # never gated
    (480, 480, 2, 3, [0, 7, 300, 301, 480], 0),  # documents: the gate counts document-relative blocks
    (300, 480, 1, 5, [0, 7, 300, 301, 480], 3),  # queries are the last Nq keys
])
def test_select_blocks_gated_insertion(monkeypatch, Nq, N, Hkv, topk, cu, gate_from):
    # 30 blocks of 16 keys: late blocks enter no row of many 16-token tiles, so the gate skips them
    from kernels.index_topk import select_blocks_fwd

    q_idx, k_idx = torch.randn(1, Nq, Hkv, 16), torch.randn(1, N, 16)
    cu = _cu(cu)
    if cu is None and gate_from == 0:
        assert _tiles_skipped(q_idx, k_idx, 16, topk, 16) > 0.1, "the data must exercise the skip path"
    expected = ref.select_blocks(q_idx, k_idx, 16, topk, cu)
    poison_empty(monkeypatch)
    out = select_blocks_fwd(q_idx, k_idx, 16, topk, cu, gate_from=gate_from)
    assert torch.equal(out, expected), f"{(out != expected).sum()} of {out.numel()} slots differ"


@pytest.mark.parametrize("gate_from", [0, 2**31 - 1])
def test_select_blocks_gated_ties(gate_from):
    # integer scores (exact in fp32): every key of a block is level[block] * ones and the query rows are
    # small integers, so a row scores level[block] * sum(q_row) and many blocks tie exactly, in and out of
    # the running set; rows summing to 0 tie everywhere. Lower ids must win, skipped or not.
    from kernels.index_topk import select_blocks_fwd

    N, bs, Di = 400, 16, 16
    level = torch.tensor([1.0, 2.0, 4.0])[torch.randint(0, 3, (N // bs,))]
    k_idx = level.repeat_interleave(bs)[None, :, None].expand(1, N, Di).contiguous()
    q_idx = torch.randint(-2, 3, (1, N, 2, Di)).float()
    for topk in (2, 4):
        out = select_blocks_fwd(q_idx, k_idx, bs, topk, gate_from=gate_from)
        assert torch.equal(out, ref.select_blocks(q_idx, k_idx, bs, topk))


def test_fp8_block_key_scales():
    # one scale per document-relative key block (its amax / 448), e4m3 rounding only (3 mantissa bits)
    from kernels.index_topk import _keys_to_fp8_blocks

    cu = _cu([0, 5, 40, 40, 100])
    k = torch.randn(1, 100, 16) * torch.rand(1, 100, 1) * 10
    k8, scale = _keys_to_fp8_blocks(k, 16, cu)
    assert k8.dtype == torch.float8_e4m3fn and scale.shape == (1, 100)
    blk = doc_starts(100, cu) * 100 + key_blocks(100, 16, cu)  # (document, block) ids
    for b in blk.unique():
        m = blk == b
        assert (scale[0, m] == scale[0, m][0]).all()
        torch.testing.assert_close(scale[0, m][0], k[0, m].abs().max() / 448)
    err = (k8.float() * scale[..., None] - k).abs()
    assert (err <= k.abs() / 16 + 2**-9 * scale[..., None]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("N,Hkv,cu", [(8192 + 77, 2, None), (16384, 4, [0, 1, 5000, 5001, 16384])])
def test_select_blocks_gpu_bf16(N, Hkv, cu):
    Di, bs, topk = 128, 128, 16
    q_idx = torch.randn(1, N, Hkv, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, N, Di, device="cuda", dtype=torch.bfloat16)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    out = select_blocks(q_idx, k_idx, bs, topk, cu)
    # exact arithmetic but for the summation order: bf16 values are exact in fp32, so are their products,
    # and only the fp32 (tensor-core) sums of 128 of them differ from the float64 reference: at most
    # ~128 * 2^-23 * |raw score| (<= ~70 here) ~ 1e-3 raw, 1e-4 after the 1/sqrt(128); 1e-3 leaves 10x
    check_selection(out.cpu(), q_idx.float().cpu(), k_idx.float().cpu(), bs, topk,
                    None if cu is None else cu.cpu(), tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("key_scale", ["block", "token"])
def test_select_blocks_gpu_fp8(key_scale):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need sm_89+")
    N, Hkv, Di, bs, topk = 8192 + 77, 2, 128, 128, 16
    q_idx = torch.randn(1, N, Hkv, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, N, Di, device="cuda", dtype=torch.bfloat16)
    exact = select_blocks(q_idx, k_idx, bs, topk)
    out = select_blocks(q_idx, k_idx, bs, topk, fp8=True, fp8_key_scale=key_scale)
    # e4m3 operands (3 mantissa bits): a unit-variance block score is off by ~0.04 rms (up to 0.22 over
    # these 1M block scores, emulated on CPU for both key scalings), so near-ties flip; ~230K adjacent
    # pairs are compared and a swap needs two errors apart by tol: 0.5 is 9 rms of that difference
    # (0.25 failed once in a GPU run). The structure rules hold exactly
    check_selection(out.cpu(), q_idx.float().cpu(), k_idx.float().cpu(), bs, topk, None, tol=0.5)
    a, c = exact[..., 1:].long(), out[..., 1:].long()
    kept = ((a[..., :, None] == c[..., None, :]).any(-1) & (a >= 0)).sum() / (a >= 0).sum()
    assert kept > 0.8, f"fp8 keeps only {kept:.3f} of the exact selection"


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="seen on an H200 (torch 2.11, Triton 3.6, 2026-12-03): the fp8 selection "
                   "picks blocks 1.18 (block scales) and 1.56 (token scales) score units below the k-th best of the "
                   "emulated e4m3 operands, far above the ~3e-2 the fp8 accumulation was expected to cost; the "
                   "interpreter matches the emulation exactly (tests/test_oracle.py), so the GPU arithmetic is not "
                   "yet understood. strict: a pass means this bound holds and the mark must go")
@pytest.mark.parametrize("key_scale", ["block", "token"])
def test_select_blocks_gpu_fp8_packed_matches_emulation(monkeypatch, key_scale):
    """Packed documents (block scales restart at each document start; 1-token and empty documents) and
    the fp8 selection checked against the float64 emulation of its own e4m3 operands (tests/utils.py),
    so only the accumulation error is left to tolerate, not the quantisation error of the test above."""
    from kernels import index_topk

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need sm_89+")
    kwargs = {}
    if "fp8_key_scale" in inspect.signature(select_blocks).parameters:
        kwargs["fp8_key_scale"] = key_scale
    else:  # before the kernels' renovation: a module setting
        monkeypatch.setitem(index_topk.CONFIG, "fp8_key_scale", key_scale)
    N, Hkv, Di, bs, topk = 8192 + 77, 2, 128, 128, 16
    cu = torch.tensor([0, 1, 1, 3000, 3001, 3100, N], dtype=torch.int32, device="cuda")
    # rows and key blocks of different magnitudes, so that the scales matter
    q_idx = (torch.randn(1, N, Hkv, Di, device="cuda") * torch.rand(1, N, Hkv, 1, device="cuda") * 4).bfloat16()
    k_idx = (torch.randn(1, N, Di, device="cuda") * (0.1 + 10 * torch.rand(1, N, 1, device="cuda"))).bfloat16()
    out = select_blocks(q_idx, k_idx, bs, topk, cu, fp8=True, **kwargs)
    k_emu = fp8_key_blocks(k_idx, bs, cu) if key_scale == "block" else fp8_rows(k_idx)
    # e4m3 products are exact in fp32, but sm_90's fp8 wgmma accumulates with ~14-bit precision (Triton
    # keeps all of K in it there: max_num_imprecise_acc = 2^30): truncating 32 products per instruction
    # against an accumulator up to ~4 (score units), 4 instructions at Di = 128, costs up to ~3e-2; 5e-2
    # leaves margin (the test above, against the exact scores, needs 0.5)
    check_selection(out.cpu(), fp8_rows(q_idx).float().cpu(), k_emu.float().cpu(), bs, topk, cu.cpu(), tol=5e-2)


def _kl_inputs(B, Nq, N, H, Hkv, D, Di, device="cpu", dtype=torch.float32):
    q = torch.randn(B, Nq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, device=device, dtype=dtype)
    q_idx = torch.randn(B, Nq, Hkv, Di, device=device, dtype=dtype, requires_grad=True)
    k_idx = torch.randn(B, N, Di, device=device, dtype=dtype, requires_grad=True)
    return q, k, v, q_idx, k_idx


def _kl_and_grads(fn, q, k, q_idx, k_idx, *args, **kwargs):
    q_idx.grad = k_idx.grad = None
    loss = fn(q, k, q_idx, k_idx, *args, **kwargs)
    loss.backward()
    return loss.detach(), q_idx.grad.clone(), k_idx.grad.clone()


@pytest.mark.parametrize("B,Nq,N,H,Hkv,bs,topk,cu,phase", [
    (2, 63, 63, 2, 1, 16, 3, None, "sparse"),
    (2, 111, 111, 4, 2, 16, 20, None, "sparse"),          # topk above the blocks available
    (1, 200, 200, 4, 2, 16, 5, CU_ONE_TOKEN_DOCS, "sparse+lse"),
    (1, 111, 111, 4, 1, 16, 4, None, "dense"),
    (1, 100, 100, 2, 2, 16, 3, None, "sparse"),             # G = 1
    (1, 200, 200, 8, 2, 32, 4, CU_ONE_TOKEN_DOCS, "dense+lse"),
    (1, 90, 200, 4, 2, 16, 5, CU_ONE_TOKEN_DOCS, "sparse"),  # last Nq queries
])
def test_index_kl_matches_reference(monkeypatch, B, Nq, N, H, Hkv, bs, topk, cu, phase):
    q, k, v, q_idx, k_idx = _kl_inputs(B, Nq, N, H, Hkv, 16, 16)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cu = _cu(cu)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), bs, topk, cu) if "sparse" in phase else None
    lse = ref.sparse_attention(q.detach(), k, v, block_idx, bs, cu)[1] if "lse" in phase else None
    want = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu)
    poison_empty(monkeypatch)
    got = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu, lse=lse)
    assert q.grad is None and k.grad is None, "the teacher must get no gradient"
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        err = rel_rms(w, g)
        assert err < 1e-5, f"{name}: rel rms {err:.2e}, max abs {(w - g).abs().max():.2e}"


CU_120 = [0, 1, 1, 50, 51, 52, 90, 90, 120]  # 1-token and empty documents over 120 keys


@pytest.mark.parametrize("phase,path,cu,Nq,stride,offset", [
    ("sparse+lse", "kv", CU_120, 120, 3, 1),
    ("sparse+lse", "tile", CU_120, 120, 3, 2),  # the tile form: the other queries' slots emptied too
    ("sparse", "kv", None, 90, 4, 5),           # last Nq queries (positions from 30), an offset past the stride
    ("dense", "kv", CU_120, 90, 2, 0),          # the warm-up's every visible block
    ("dense+lse", "kv", None, 120, 5, 3),
])
def test_strided_index_kl_matches_reference(monkeypatch, phase, path, cu, Nq, stride, offset):
    """``query_stride``: the rows of the queries at positions ``p % stride == offset % stride`` only, times the
    stride, as ``msa.reference`` computes it; and the reference's mean over the offsets is the full loss (the
    estimate is unbiased over steps), its gradients too."""
    B, N, H, Hkv, bs, topk = 1, 120, 4, 2, 16, 5
    q, k, v, q_idx, k_idx = _kl_inputs(B, Nq, N, H, Hkv, 16, 16)
    cu = _cu(cu)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), bs, topk, cu) if "sparse" in phase else None
    lse = ref.sparse_attention(q, k, v, block_idx, bs, cu)[1] if "lse" in phase else None
    strided = dict(query_stride=stride, query_offset=offset)
    want = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu, **strided)
    poison_empty(monkeypatch)
    got = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu, lse=lse, kl_path=path, **strided)
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        err = rel_rms(w, g)
        assert err < 1e-5, f"{name}: rel rms {err:.2e}, max abs {(w - g).abs().max():.2e}"
    rows = ref.kl_rows(N, Nq, stride, offset)
    assert 0 < rows.sum() < Nq and rows.sum() >= Nq // stride
    assert not got[1][:, ~rows].any() and got[1][:, rows].abs().sum(-1).gt(0).float().mean() > 0.5, \
        "dq_idx only on the counted queries (most of them with some: a query that sees one key has none)"
    full = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu)
    each = [_kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu, query_stride=stride,
                          query_offset=o) for o in range(stride)]
    for i, name in enumerate(("loss", "dq_idx", "dk_idx")):
        err = rel_rms(full[i], sum(e[i] for e in each) / stride)
        assert err < 1e-6, f"the offsets' mean of the strided {name} is not the full one: rel rms {err:.2e}"



def _all_blocks(B, Hkv, Nq, N, bs):
    """Every block of the row in every slot: with documents' visibility applied by the support, the dense one."""
    n = math.ceil(N / bs)
    return torch.arange(n, dtype=torch.int32).expand(B, Hkv, Nq, n).contiguous()


@pytest.mark.parametrize("H,Hkv,topk,cu,phase", [
    (6, 2, 5, CU_120, "sparse"),      # G = 3: not a power of two
    (6, 2, 5, None, "sparse+lse"),
    (6, 2, 4, CU_120, "dense"),
    (12, 1, 4, None, "sparse+lse"),   # G = 12
    (2, 2, 5, None, "sparse"),        # G = 1
])
def test_index_kl_group_sizes(monkeypatch, H, Hkv, topk, cu, phase):
    q, k, v, q_idx, k_idx = _kl_inputs(1, 90, 120, H, Hkv, 16, 16)
    cu = _cu(cu)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, topk, cu) if "sparse" in phase else None
    lse = ref.sparse_attention(q, k, v, block_idx, 16, cu)[1] if "lse" in phase else None
    want = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, 16, cu)
    poison_empty(monkeypatch)
    got = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, 16, cu, lse=lse)
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        err = rel_rms(w, g)
        assert err < 1e-5, f"{name}: rel rms {err:.2e}, max abs {(w - g).abs().max():.2e}"


def test_index_kl_grad_scales_with_upstream():
    q, k, _, q_idx, k_idx = _kl_inputs(1, 40, 40, 2, 1, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    _, dq1, dk1 = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, 16)
    q_idx.grad = k_idx.grad = None
    (3.0 * index_kl_loss(q, k, q_idx, k_idx, block_idx, 16)).backward()
    assert rel_rms(3 * dq1, q_idx.grad) < 1e-6 and rel_rms(3 * dk1, k_idx.grad) < 1e-6


# Tolerances of the bf16 kernel against the fp32 reference on the same bf16 values (rel RMS).
# loss: exact arithmetic but for fp32 rounding. Products of bf16 values are exact in fp32; the teacher,
# the student's lse and every sum stay fp32. Per row the KL is lse_S - sum P S + sum P log P, terms of
# ~5-10 cancelling to ~1, so ~1e-6 rounding becomes ~1e-5 relative at worst: 1e-4 leaves margin. The
# lse handed in (sparse_attention's) is fp32 from exact products too.
# dq_idx, dk_idx: dS is rounded to bf16 (2^-9 relative) before the dq/dk dots: 1e-2.
KL_GPU_TOL = {"loss": 1e-4, "dq_idx": 1e-2, "dk_idx": 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("phase", ["sparse", "dense"])
def test_index_kl_gpu_bf16(phase):
    B, N, H, Hkv, D, Di, bs, topk = 1, 4096 + 77, 16, 2, 128, 128, 128, 8
    q, k, v, q_idx, k_idx = _kl_inputs(B, N, N, H, Hkv, D, Di, "cuda", torch.bfloat16)
    block_idx = select_blocks(q_idx.detach(), k_idx.detach(), bs, topk) if phase == "sparse" else None
    want = _kl_and_grads(ref.index_kl_loss, q.float(), k.float(), q_idx, k_idx, block_idx, bs)
    got = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs)
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        err = rel_rms(w.float(), g.float())
        assert err < KL_GPU_TOL[name], f"{name}: rel rms {err:.2e}"
    # dk_idx sums per-program partials with fp32 atomics: reruns differ by rounding only
    again = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs)
    assert rel_rms(got[2].float(), again[2].float()) < 1e-3
    assert torch.equal(got[1], again[1]), "dq_idx has no atomics: reruns must agree exactly"
    # the training path: the teacher normaliser from the main forward on the same support
    from kernels import sparse_attention

    lse = sparse_attention(q, k, v, block_idx, bs)[1] if phase == "sparse" else None
    with_lse = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, lse=lse)
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, with_lse):
        err = rel_rms(w.float(), g.float())
        assert err < KL_GPU_TOL[name], f"{name} with the main forward's lse: rel rms {err:.2e}"


@pytest.mark.parametrize("phase", ["sparse", "sparse+lse", "dense", "dense+lse"])
def test_index_kl_in_slot_chunks_matches_reference(phase):
    """Where the ``dq_idx`` partials of every slot would pass ``budget``, the support runs in slot chunks
    (here 2 slots, or 2 blocks in the dense warm-up, at a time): the log-normalisers merged across chunks,
    the loss and both gradients as in one pass."""
    from kernels.index_kl import index_kl_fwd

    B, Nq, N, H, Hkv, Di, bs, topk = 1, 90, 120, 4, 2, 16, 16, 5
    q, k, v, q_idx, k_idx = _kl_inputs(B, Nq, N, H, Hkv, 16, Di)
    cu = _cu(CU_120)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), bs, topk, cu) if "sparse" in phase else None
    lse = ref.sparse_attention(q, k, v, block_idx, bs, cu)[1] if "lse" in phase else None
    want = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu)
    budget = 2 * B * Hkv * Nq * Di * 4
    loss, dq, dk = index_kl_fwd(q, k, q_idx.detach(), k_idx.detach(), block_idx, bs, cu, lse, True, budget=budget)
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, (loss, dq, dk)):
        err = rel_rms(w, g)
        assert err < 1e-5, f"{name}: rel rms {err:.2e}, max abs {(w - g).abs().max():.2e}"
    assert torch.equal(index_kl_fwd(q, k, q_idx.detach(), k_idx.detach(), block_idx, bs, cu, lse, False,
                                    budget=budget)[0], loss), "the loss without gradients is the same sum"


def test_doc_tiles_are_built_once_per_cu_seqlens_and_shape():
    """Every MSA layer of a step selects over the same ``cu_seqlens``: its query tiles are built once, again
    only for another shape or after the tensor is written to; rows without one share theirs by shape."""
    from kernels.index_topk import _build_doc_tiles, doc_tiles

    cu = torch.tensor([0, 5, 40, 64], dtype=torch.int32)
    first = doc_tiles(64, 8, cu, "cpu")
    assert doc_tiles(64, 8, cu, "cpu") is first
    assert doc_tiles(64, 16, cu, "cpu") is not first and doc_tiles(70, 8, cu, "cpu") is not first
    assert all(torch.equal(a, b) for a, b in zip(first, _build_doc_tiles(64, 8, cu.clone(), "cpu")))
    assert first[0].tolist()[:4] == [0, 5, 13, 21]  # a tile starts at each document start
    cu[1] = 9  # written to: built again, from the new values
    again = doc_tiles(64, 8, cu, "cpu")
    assert again is not first and again[0].tolist()[:3] == [0, 8, 9]
    one = doc_tiles(64, 8, None, "cpu")
    assert doc_tiles(64, 8, None, "cpu") is one and one[0].tolist() == list(range(0, 64, 8))
    assert one[2].tolist() == [64] * 8 and one[1].tolist() == [0] * 8
