"""MSA's math checked against an independent float64 oracle written from DESIGN.md section 2.

The oracle below is plain Python loops over (batch, group or head, query, key) in float64, written
from the equations and not from ``msa/reference.py``: token score ``q_idx . k_idx / sqrt(Di)`` on the
visible keys (same document, ``j <= i``, queries the last ``Nq`` of ``N`` keys), block score the
**max** over a block's visible tokens, blocks counted from each document's start, own block forced
into slot 0, the rest by descending raw score with ties to the lower id, ``-1`` padding; exact
softmax attention over the support; KL with the teacher the **mean over the group's G heads** of the
main softmax, the student the softmax of the index scores, summed and divided by **B * Nq * Hkv**.
Its gradients come from torch.autograd through those float64 row operations.

Both ``msa.reference`` and the Triton kernels (interpreter on CPU, fp32) are compared with it on
awkward shapes: lengths that are not multiples of the block, packed documents with one-token ones,
G = 2 and 3, Hkv = 1 and 2, D = 16 with Di = 8, ``topk`` above the blocks available, batch 2, Nq < N.

Each check can fail. With ``msa/reference.py`` mutated by hand (and reverted), these tests failed,
while every test of tests/test_reference.py still passed:
- block score mean-pooled over the visible tokens instead of max-pooled: ``test_select_blocks`` on
  the reference for all five cases (1.5-32% of the slots differ) and the exact-ties test;
- teacher from head 0 of each group instead of the mean over its G heads: ``test_index_kl`` on the
  reference for every case and support (the KL value off by 21-49%);
- KL divided by ``B * Nq * H`` instead of ``B * Nq * Hkv``: ``test_index_kl`` on the reference for
  every case and support (the value off by the factor G).

fp8 selection (``select_blocks(..., fp8=True)``): an e4m3 emulation in float64 (``tests/utils.py``,
itself checked against torch's float8 cast), the quantisers against it, and the kernel's selection
under the interpreter against the oracle's selection of the emulated operands, packed documents
included.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from msa import reference as ref
from tests.utils import E4M3_MAX, e4m3_round, fp8_key_blocks, fp8_rows, poison_empty, rel_rms

NEG_INF = float("-inf")

# ---------------------------------------------------------------- the oracle


def doc_start_list(N: int, cu_seqlens) -> list[int]:
    """Per key position, the first position of its document (python ints)."""
    start = [0] * N
    if cu_seqlens is not None:
        bounds = [int(c) for c in cu_seqlens]
        for s, e in zip(bounds[:-1], bounds[1:]):
            for j in range(s, e):
                start[j] = s
    return start


def support_keys(i: int, start: list[int], block_size: int, blocks) -> list[int]:
    """The keys query position ``i`` attends to: its visible keys (same document, ``j <= i``), kept only
    if their document-relative block is in ``blocks`` (None: all of them, the dense support)."""
    s0 = start[i]
    keys = range(s0, i + 1)
    if blocks is None:
        return list(keys)
    chosen = {c for c in blocks if c >= 0}
    return [j for j in keys if (j - s0) // block_size in chosen]


def oracle_block_scores(q_idx, k_idx, block_size, cu_seqlens):
    """``M[b][r][t]``: list over document-relative block ids of the max score over the block's keys
    visible to query ``t`` (``-inf`` if none), and ``own[t]``; pure Python floats (float64)."""
    B, Nq, Hkv, Di = q_idx.shape
    N = k_idx.shape[1]
    qi, ki = q_idx.double().tolist(), k_idx.double().tolist()
    start = doc_start_list(N, cu_seqlens)
    n_blocks = -(-N // block_size)
    inv = 1.0 / math.sqrt(Di)
    M = [[[None] * Nq for _ in range(Hkv)] for _ in range(B)]
    for b in range(B):
        for r in range(Hkv):
            for t in range(Nq):
                i = N - Nq + t
                m = [NEG_INF] * n_blocks
                for j in range(start[i], i + 1):
                    s = sum(x * y for x, y in zip(qi[b][t][r], ki[b][j])) * inv
                    c = (j - start[i]) // block_size
                    m[c] = max(m[c], s)
                M[b][r][t] = m
    own = [(N - Nq + t - start[N - Nq + t]) // block_size for t in range(Nq)]
    return M, own


def oracle_select(q_idx, k_idx, block_size, topk, cu_seqlens=None):
    """``block_idx`` ``[B, Hkv, Nq, topk]`` (int32) and the smallest gap between two distinct candidate
    block scores of one row (the selection is unambiguous when it is well above rounding error)."""
    M, own = oracle_block_scores(q_idx, k_idx, block_size, cu_seqlens)
    B, Nq, Hkv = q_idx.shape[:3]
    out = torch.full((B, Hkv, Nq, topk), -1, dtype=torch.int32)
    gap = math.inf
    for b in range(B):
        for r in range(Hkv):
            for t in range(Nq):
                m = M[b][r][t]
                others = [c for c in range(len(m)) if c != own[t] and m[c] > NEG_INF]
                others.sort(key=lambda c: (-m[c], c))  # descending raw score, ties to the lower id
                row = [own[t], *others][:topk]
                out[b, r, t, : len(row)] = torch.tensor(row, dtype=torch.int32)
                gap = min([gap] + [m[a] - m[c] for a, c in zip(others, others[1:])])
    return out, gap


def oracle_attention(q, k, v, block_idx, block_size, cu_seqlens=None):
    """float64 ``o [B, Nq, H, D]`` and ``lse [B, H, Nq]``: for each (batch, head, query) the exact
    softmax of ``q . k / sqrt(D)`` over the support, then ``p @ v``; head ``h`` uses KV head ``h // G``.
    Differentiable in ``q, k, v`` (float64 leaves)."""
    B, Nq, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    start = doc_start_list(N, cu_seqlens)
    idx = None if block_idx is None else block_idx.tolist()
    o_rows, lse_rows = [], []
    for b in range(B):
        for t in range(Nq):
            i = N - Nq + t
            for h in range(H):
                r = h // G
                keys = support_keys(i, start, block_size, None if idx is None else idx[b][r][t])
                if not keys:
                    o_rows.append(q.new_zeros(D))
                    lse_rows.append(q.new_tensor(NEG_INF))
                    continue
                s = k[b, keys, r] @ q[b, t, h] / math.sqrt(D)
                m = s.max().detach()
                e = torch.exp(s - m)
                z = e.sum()
                o_rows.append((e / z) @ v[b, keys, r])
                lse_rows.append(m + torch.log(z))
    o = torch.stack(o_rows).view(B, Nq, H, D)
    lse = torch.stack(lse_rows).view(B, Nq, H).transpose(1, 2)
    return o, lse


def oracle_kl(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens=None):
    """float64 ``1/(B*Nq*Hkv) * sum_{b,r,t} KL(P || Q)`` over the support (``block_idx=None``: dense):
    ``P`` the mean over the group's G heads of ``softmax(q . k / sqrt(D))`` (no gradient), ``Q`` the
    softmax of ``q_idx . k_idx / sqrt(Di)``. Differentiable in ``q_idx, k_idx`` (float64 leaves)."""
    B, Nq, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    Di = q_idx.shape[-1]
    start = doc_start_list(N, cu_seqlens)
    idx = None if block_idx is None else block_idx.tolist()
    q, k = q.detach().double(), k.detach().double()
    total = q_idx.new_zeros(())
    for b in range(B):
        for r in range(Hkv):
            for t in range(Nq):
                keys = support_keys(N - Nq + t, start, block_size, None if idx is None else idx[b][r][t])
                if not keys:
                    continue
                p = 0.0
                for g in range(G):
                    s = k[b, keys, r] @ q[b, t, r * G + g] / math.sqrt(D)
                    e = torch.exp(s - s.max())
                    p = p + e / e.sum() / G
                z = k_idx[b, keys] @ q_idx[b, t, r] / math.sqrt(Di)
                m = z.max().detach()
                log_q = z - m - torch.log(torch.exp(z - m).sum())
                total = total + (p * (torch.log(p) - log_q)).sum()
    return total / (B * Nq * Hkv)


# ---------------------------------------------------------------- cases

# name: B, N, Nq, H, Hkv, block_size, topk, cu_seqlens. D = 16 and Di = 8 throughout.
# The kernels need power-of-two blocks >= 16, so the Bk = 8 cases run on the reference only.
CASES = {
    "b2-n37-bk8": (2, 37, 37, 4, 2, 8, 3, None),              # 5 blocks, the last short; G = 2
    "packed50-bk8": (1, 50, 50, 6, 2, 8, 2, [0, 13, 30, 31, 50]),  # G = 3, a 1-token document
    "b2-n37-bk16-topk5": (2, 37, 37, 2, 1, 16, 5, None),     # topk above the 3 blocks; G = 2, Hkv = 1
    "packed100-nq60": (1, 100, 60, 3, 1, 16, 3, [0, 13, 30, 31, 100]),  # Nq < N, G = 3, Hkv = 1
    "b2-n75-nq50": (2, 75, 50, 4, 2, 16, 3, None),            # batch 2, Nq < N, 5 blocks
}
D, DI = 16, 8
IMPLS = {"reference": ref, "kernels": kernels}
INTERP = {"kernels": [pytest.mark.interpreter]}  # the kernels on CPU tensors: the interpreter's cases
PARAMS = [pytest.param(impl, name, id=f"{impl}-{name}", marks=INTERP.get(impl, []))
          for impl in IMPLS for name, case in CASES.items() if impl == "reference" or case[5] >= 16]

_cache: dict = {}


def case_data(name):
    """Seeded fp32 inputs of a case, the oracle's selection and its float64 attention and KL (with
    gradients), computed once per test session."""
    if name in _cache:
        return _cache[name]
    B, N, Nq, H, Hkv, bs, topk, cu = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    x = {n: torch.randn(*shape, generator=gen) for n, shape in [
        ("q", (B, Nq, H, D)), ("k", (B, N, Hkv, D)), ("v", (B, N, Hkv, D)),
        ("q_idx", (B, Nq, Hkv, DI)), ("k_idx", (B, N, DI)), ("do", (B, Nq, H, D))]}
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    block_idx, gap = oracle_select(x["q_idx"], x["k_idx"], bs, topk, cu)
    assert gap > 1e-4, f"near-tied block scores ({gap:.1e}) make the selection ambiguous: reseed"
    assert (block_idx == -1).any(), "the case must exercise -1 padding"
    q, k, v = (x[n].double().requires_grad_() for n in ("q", "k", "v"))
    o, lse = oracle_attention(q, k, v, block_idx, bs, cu)
    attn = (o.detach(), lse.detach(), *torch.autograd.grad(o, (q, k, v), x["do"].double()))
    with torch.no_grad():
        lse_dense = oracle_attention(q, k, v, None, bs, cu)[1]
    kl = {}
    for support in ("sparse", "dense"):
        qi, ki = (x[n].double().requires_grad_() for n in ("q_idx", "k_idx"))
        loss = oracle_kl(x["q"], x["k"], qi, ki, block_idx if support == "sparse" else None, bs, cu)
        kl[support] = (loss.detach(), *torch.autograd.grad(loss, (qi, ki)))
    _cache[name] = dict(x=x, cu=cu, bs=bs, topk=topk, block_idx=block_idx, attn=attn, kl=kl,
                        lse={"sparse": lse.detach().float(), "dense": lse_dense.float()})
    return _cache[name]


def test_oracle_on_a_case_worked_by_hand():
    """The oracle itself on numbers worked out by hand: one group of two heads (D = Di = 1), documents
    [0, 3) and [3, 5), Bk = 2; only query 2 is not uniform, so only its row carries KL."""
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    # index scores S[i, j] = k_idx[j] (q_idx = 1): query 2 (own block 1) sees block 0 = keys {0, 1} with
    # max 5 (a mean would be 3); query 4 (document 1, own block 0) sees keys {3, 4} only
    k_idx = torch.tensor([5.0, 1.0, 2.0, 7.0, 3.0]).view(1, 5, 1)
    M, own = oracle_block_scores(torch.ones(1, 5, 1, 1), k_idx, 2, cu)
    assert own == [0, 0, 1, 0, 0]
    assert M[0][0][2] == [5.0, 2.0, NEG_INF] and M[0][0][4] == [7.0, NEG_INF, NEG_INF]
    block_idx, _ = oracle_select(torch.ones(1, 5, 1, 1), k_idx, 2, 2, cu)
    assert block_idx[0, 0, :, :].tolist() == [[0, -1], [0, -1], [1, 0], [0, -1], [0, -1]]
    # main scores of query 2: head 0 [0, ln 2, ln 3] (weights 1:2:3), head 1 all 0 (uniform)
    q = torch.zeros(1, 5, 2, 1, dtype=torch.float64)
    q[0, 2, 0, 0] = 1.0
    k = torch.tensor([0.0, math.log(2.0), math.log(3.0), 0.0, 0.0], dtype=torch.float64).view(1, 5, 1, 1)
    v = torch.arange(1.0, 6.0, dtype=torch.float64).view(1, 5, 1, 1)
    o, lse = oracle_attention(q, k, v, None, 2, cu)
    assert o[0, 2, :, 0].tolist() == pytest.approx([14 / 6, 2.0])
    assert lse[0, :, 2].tolist() == pytest.approx([math.log(6), math.log(3)])
    assert lse[0, :, 4].tolist() == pytest.approx([math.log(2), math.log(2)])  # document 1: keys 3, 4
    # the sparse support of query 2 with block_idx [1, -1]: key 2 alone
    o, lse = oracle_attention(q, k, v, torch.tensor([[[[0], [0], [1], [0], [0]]]]), 2, cu)
    assert o[0, 2, :, 0].tolist() == pytest.approx([3.0, 3.0]) and lse[0, 0, 2].item() == pytest.approx(math.log(3))
    # KL, student uniform (index scores 0): teacher of query 2 = mean([1, 2, 3]/6, [2, 2, 2]/6) = [3, 4, 5]/12,
    # every other row uniform (KL 0); normaliser 1/(B * Nq * Hkv) = 1/5
    zeros = torch.zeros(1, 5, 1, 1, dtype=torch.float64)
    kl = oracle_kl(q, k, zeros, zeros[..., 0], None, 2, cu)
    assert kl.item() == pytest.approx(sum(p / 12 * math.log(3 * p / 12) for p in (3, 4, 5)) / 5)


@pytest.mark.parametrize("impl,name", PARAMS)
def test_select_blocks(monkeypatch, impl, name):
    """block_idx equals the oracle's exactly (the scores are not near-tied: case_data asserts it)."""
    c = case_data(name)
    if impl == "kernels":
        poison_empty(monkeypatch)
    out = IMPLS[impl].select_blocks(c["x"]["q_idx"], c["x"]["k_idx"], c["bs"], c["topk"], c["cu"])
    want = c["block_idx"]
    assert out.dtype == torch.int32 and out.shape == want.shape
    assert torch.equal(out, want), f"{(out != want).sum()} of {out.numel()} slots differ from the oracle"


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=INTERP.get(impl, [])) for impl in IMPLS])
def test_select_blocks_exact_ties_go_to_the_lower_block(impl):
    """Integer scores (exact in fp32 and float64): many blocks tie exactly, the lower id must win."""
    N, bs, topk = 100, 16, 4
    cu = torch.tensor([0, 3, 40, 100], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    level = torch.tensor([1.0, 2.0, 4.0])[torch.randint(0, 3, (N,), generator=gen)]
    k_idx = level[None, :, None].expand(1, N, DI).contiguous()
    q_idx = torch.randint(-2, 3, (1, N, 2, DI), generator=gen).float()
    want, gap = oracle_select(q_idx, k_idx, bs, topk, cu)
    assert gap == 0.0, "the data must hold exact ties"
    assert torch.equal(IMPLS[impl].select_blocks(q_idx, k_idx, bs, topk, cu), want)


@pytest.mark.parametrize("impl,name", PARAMS)
def test_sparse_attention(monkeypatch, impl, name):
    """o, lse and dq, dk, dv under a random upstream gradient, on the oracle's (non-trivial) selection."""
    c = case_data(name)
    x = c["x"]
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    if impl == "kernels":
        poison_empty(monkeypatch)
    o, lse = IMPLS[impl].sparse_attention(q, k, v, c["block_idx"], c["bs"], c["cu"])
    grads = torch.autograd.grad(o, (q, k, v), x["do"])
    o_ref, lse_ref, *grads_ref = c["attn"]
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape and not lse.requires_grad
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "empty-support rows differ"
    # fp32 against float64: rounding only (observed errors ~1e-7)
    err = (lse.double() - lse_ref).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item()
    assert err < 1e-5, f"lse: max abs err {err:.2e}"
    for n, want, got in zip(("o", "dq", "dk", "dv"), (o_ref, *grads_ref), (o, *grads)):
        e = rel_rms(want, got)
        assert e < 1e-5, f"{n}: rel RMS {e:.2e}, max abs {(want - got.double()).abs().max():.2e}"


@pytest.mark.parametrize("support", ["sparse", "dense", "sparse+lse", "dense+lse"])
@pytest.mark.parametrize("impl,name", PARAMS)
def test_index_kl(monkeypatch, impl, name, support):
    """Value and both gradients; ``+lse``: the teacher normalised by a given main-forward ``lse`` on the
    same support (the oracle's, in fp32; test_sparse_attention holds each implementation's to it)."""
    c = case_data(name)
    x = c["x"]
    phase = support.split("+")[0]
    block_idx = c["block_idx"] if phase == "sparse" else None
    lse = c["lse"][phase] if support.endswith("+lse") else None
    q_idx, k_idx = (x[n].clone().requires_grad_() for n in ("q_idx", "k_idx"))
    if impl == "kernels":
        poison_empty(monkeypatch)
    loss = IMPLS[impl].index_kl_loss(x["q"], x["k"], q_idx, k_idx, block_idx, c["bs"], c["cu"], lse=lse)
    grads = torch.autograd.grad(loss, (q_idx, k_idx))
    want = c["kl"][phase]
    err = abs(loss.item() / want[0].item() - 1)
    assert err < 1e-5, f"KL {loss.item():.8f}, oracle {want[0].item():.8f} (rel err {err:.2e})"
    for n, w, g in zip(("dq_idx", "dk_idx"), want[1:], grads):
        e = rel_rms(w, g)
        assert e < 1e-5, f"{n}: rel RMS {e:.2e}, max abs {(w - g.double()).abs().max():.2e}"


# ---------------------------------------------------------------- fp8 selection


def test_e4m3_emulation_matches_torch_float8():
    """The float64 e4m3 rounding of tests/utils.py equals torch's float8_e4m3fn cast: on every finite
    code, every midpoint between neighbouring codes (ties to even) and random values over 8 decades."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    codes = codes[torch.isfinite(codes)].unique()
    x = torch.cat([codes, (codes[1:] + codes[:-1]) / 2,
                   torch.randn(60000, dtype=torch.float64) * torch.logspace(-4, 2, 60000, dtype=torch.float64)])
    x = x.clamp(-E4M3_MAX, E4M3_MAX)
    want = x.to(torch.float8_e4m3fn).double()
    got = e4m3_round(x)
    assert torch.equal(got, want), f"{(got != want).sum()} values differ, e.g. {x[got != want][:4].tolist()}"


CU_FP8 = [0, 13, 70, 70, 71, 120]  # a short, an empty and a one-token document


def _fp8_inputs(B, N, Hkv, Di, seed):
    """Index inputs whose rows and key blocks differ in magnitude, so the per-row and per-block scales
    matter."""
    gen = torch.Generator().manual_seed(seed)
    q_idx = torch.randn(B, N, Hkv, Di, generator=gen) * torch.rand(B, N, Hkv, 1, generator=gen) * 4
    k_idx = torch.randn(B, N, Di, generator=gen) * (0.1 + 10 * torch.rand(B, N, 1, generator=gen))
    return q_idx, k_idx


def test_fp8_quantisers_match_emulation():
    """``_to_fp8`` (per-row scale) and ``_keys_to_fp8_blocks`` (one scale per document-relative key
    block) dequantise to the float64 emulation's values (a different e4m3 code would be >= 6% off)."""
    from kernels.index_topk import _keys_to_fp8_blocks as keys_to_fp8
    from kernels.index_topk import _to_fp8 as to_fp8

    q_idx, k_idx = _fp8_inputs(1, 120, 2, 16, seed=11)
    cu = torch.tensor(CU_FP8, dtype=torch.int32)
    for x, (x8, scale), want in [
        (q_idx, to_fp8(q_idx), fp8_rows(q_idx)),
        (k_idx, to_fp8(k_idx), fp8_rows(k_idx)),
        (k_idx, keys_to_fp8(k_idx, 16, cu), fp8_key_blocks(k_idx, 16, cu)),
    ]:
        assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
        got = x8.double() * scale.double()[..., None]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the scales are fp32: ~1e-7 apart
    # the block scales differ between blocks (else the per-block case proves nothing)
    assert keys_to_fp8(k_idx, 16, cu)[1].unique().numel() > 6


def fp8_select(q_idx, k_idx, block_size, topk, cu_seqlens, key_scale):
    """``kernels.select_blocks(..., fp8=True)`` on CPU tensors (the interpreter runs the fp8 kernel),
    keys scaled per ``key_scale`` ("block" or "token")."""
    return kernels.select_blocks(q_idx, k_idx, block_size, topk, cu_seqlens, fp8=True, fp8_key_scale=key_scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("key_scale", ["block", "token"])
@pytest.mark.parametrize("B,N,Nq,Hkv,topk,cu", [
    (2, 90, 90, 2, 3, None),
    (1, 120, 120, 2, 3, CU_FP8),   # packed documents: block scales restart at each document
    (1, 120, 80, 1, 3, CU_FP8),    # and the queries are the last Nq keys
])
def test_fp8_selection_matches_emulated_oracle(monkeypatch, key_scale, B, N, Nq, Hkv, topk, cu):
    """The fp8 selection is exactly the oracle's selection of the e4m3-quantised operands (emulated in
    float64: queries per row, keys per block or per token), and not the exact selection."""
    bs = 16
    q_idx, k_idx = _fp8_inputs(B, N, Hkv, 16, seed=N + Nq + Hkv)
    q_idx = q_idx[:, N - Nq:].contiguous()
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    k_emu = fp8_key_blocks(k_idx, bs, cu) if key_scale == "block" else fp8_rows(k_idx)
    want, gap = oracle_select(fp8_rows(q_idx), k_emu, bs, topk, cu)
    assert gap > 1e-4, f"near-tied emulated block scores ({gap:.1e}): reseed"
    # the data tells the three apart: exact operands, and keys scaled the other way
    exact, _ = oracle_select(q_idx, k_idx, bs, topk, cu)
    other, _ = oracle_select(fp8_rows(q_idx), fp8_rows(k_idx) if key_scale == "block" else
                             fp8_key_blocks(k_idx, bs, cu), bs, topk, cu)
    assert not torch.equal(want, exact) and not torch.equal(want, other), "the data must tell them apart"
    poison_empty(monkeypatch)
    out = fp8_select(q_idx, k_idx, bs, topk, cu, key_scale)
    assert torch.equal(out, want), f"{(out != want).sum()} of {out.numel()} slots differ from the emulation"
