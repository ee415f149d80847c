"""kernels.sparse_attention against msa.reference.sparse_attention: output, lse and every gradient.

CPU: the Triton interpreter on small fp32 shapes. GPU (marked): real sizes in bf16 with the STYLE.md
tolerance rule, a determinism rerun of the backward, and one case with N*H*D > 2^31. The backward's dQ
path (the ``dq_path`` argument) is the default (``auto``: ``dkdv`` for G >= 16, else ``kv``) unless a test
names others (``DQ_PATHS``); small launch settings (``launch``) exercise hot-block splits and query chunks.
"""

import math
from dataclasses import replace

import pytest
import torch

from kernels.sparse_attention import LAUNCH, sparse_attention
from kernels.sparse_tiles import _dkdv_field
from msa import reference as ref
from tests.utils import doc_starts, poison_empty, rel_rms, support_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_block_idx(B, Hkv, N, topk, block_size, cu_seqlens=None, drop=0.2, device="cpu", Nq=None):
    """Distinct block ids per (batch, group, query), mostly visible ones, ~``drop`` of slots -1; the
    queries are the last ``Nq`` (default ``N``) positions."""
    Nq = N if Nq is None else Nq
    pos = torch.arange(N, device=device) - doc_starts(N, cu_seqlens, device)  # position in the document
    n_blocks = math.ceil(N / block_size)
    blocks = torch.arange(n_blocks, device=device)
    visible = (blocks[None, :] * block_size <= pos[-Nq:, None]).expand(B, Nq, n_blocks)
    score = torch.rand(B, Hkv, Nq, n_blocks, device=device) + visible[:, None].float()
    order = score.argsort(-1, descending=True)[..., :topk]
    order = torch.where(torch.rand(order.shape, device=device) < drop, -1, order)
    if topk > n_blocks:
        order = torch.cat([order, order.new_full((B, Hkv, Nq, topk - n_blocks), -1)], -1)
    return order.to(torch.int32)


def make_inputs(B, N, H, Hkv, D, dtype=torch.float32, device="cpu", Nq=None):
    q = torch.randn(B, N if Nq is None else Nq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def run_both(q, k, v, block_idx, block_size, cu_seqlens=None, dq_path="auto", launch=LAUNCH):
    """Reference (fp32) and kernel outputs, lse and gradients under one random upstream gradient."""
    do = torch.randn_like(q)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = ref.sparse_attention(q32, k32, v32, block_idx, block_size, cu_seqlens)
    g_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    o, lse = sparse_attention(q, k, v, block_idx, block_size, cu_seqlens, dq_path=dq_path, launch=launch)
    g = torch.autograd.grad(o, (q, k, v), do)
    return (o_ref, lse_ref, *g_ref), (o, lse, *g)


def assert_close(refs, outs, tol):
    names = ("o", "lse", "dq", "dk", "dv")
    for name, r, x in zip(names, refs, outs):
        assert not torch.isnan(x).any(), f"{name}: NaN (an unwritten element?)"
        if name == "lse":
            empty = torch.isinf(r)
            assert torch.equal(empty, torch.isinf(x)), "lse: -inf (empty support) rows differ"
            r, x = r[~empty], x[~empty]
        err = rel_rms(r, x.float())
        assert err < tol, f"{name}: rel RMS {err:.2e} >= {tol:.0e}, max err {(r - x.float()).abs().max():.2e}"


def check_packed(monkeypatch, N, Nq, H, Hkv, D, block_size, topk, cu, dq_path="auto", launch=LAUNCH):
    """One packed row (``cu_seqlens`` over the keys, the last ``Nq`` positions as queries), random inputs
    and selection, empty outputs NaN-poisoned: the kernels equal the reference (fp32) in every output."""
    q, k, v = make_inputs(1, N, H, Hkv, D, Nq=Nq)
    block_idx = random_block_idx(1, Hkv, N, topk, block_size, cu, Nq=Nq)
    poison_empty(monkeypatch)
    refs, outs = run_both(q, k, v, block_idx, block_size, cu, dq_path, launch)
    assert_close(refs, outs, 1e-5)


DQ_PATHS = ["kv", "dkdv"]

CPU_CASES = [  # B, N, H, Hkv, D, block_size, topk
    (1, 63, 2, 2, 16, 16, 3),  # G = 1
    (2, 111, 4, 1, 32, 16, 4),  # G = 4, batch > 1
    (1, 200, 4, 1, 16, 32, 8),  # G = 4, topk above the 7 blocks available
    (2, 111, 6, 2, 16, 16, 4),  # G = 3 (not a power of two), batch > 1
]


@pytest.mark.parametrize("B,N,H,Hkv,D,block_size,topk", CPU_CASES)
def test_matches_reference(monkeypatch, B, N, H, Hkv, D, block_size, topk):
    # split blocks picked by > 24 queries (hot-block path), query chunks of 50
    launch = replace(LAUNCH, chunk=24, part_bytes=B * H * topk * (D + 1) * 4 * 50)
    q, k, v = make_inputs(B, N, H, Hkv, D)
    block_idx = random_block_idx(B, Hkv, N, topk, block_size)
    poison_empty(monkeypatch)
    refs, outs = run_both(q, k, v, block_idx, block_size, launch=launch)
    assert_close(refs, outs, 1e-5)


def test_cu_seqlens_with_one_token_documents(monkeypatch):
    N, H, Hkv, D, block_size, topk = 111, 4, 2, 16, 16, 4
    cu = torch.tensor([0, 1, 40, 41, 42, 90, 111], dtype=torch.int32)
    check_packed(monkeypatch, N, N, H, Hkv, D, block_size, topk, cu)


@pytest.mark.parametrize("dq", DQ_PATHS)
def test_queries_are_the_last_positions(monkeypatch, dq):
    """Context parallelism's case: Nq < N queries, bottom-right aligned, cu_seqlens over the keys."""
    launch = replace(LAUNCH, chunk=8, dkdv_bytes=1)  # dK/dV partials over budget: work items grow past 8
    N, Nq, H, Hkv, D, block_size, topk = 111, 45, 4, 2, 16, 16, 5
    cu = torch.tensor([0, 30, 70, 71, 111], dtype=torch.int32)
    check_packed(monkeypatch, N, Nq, H, Hkv, D, block_size, topk, cu, dq, launch)


def test_selection_from_reference_select_blocks(monkeypatch):
    B, N, H, Hkv, D, Di, block_size, topk = 1, 111, 16, 1, 16, 8, 16, 5  # G = 16
    q, k, v = make_inputs(B, N, H, Hkv, D)
    block_idx = ref.select_blocks(torch.randn(B, N, Hkv, Di), torch.randn(B, N, Di), block_size, topk)
    poison_empty(monkeypatch)
    refs, outs = run_both(q, k, v, block_idx, block_size)
    assert_close(refs, outs, 1e-5)


@pytest.mark.parametrize("dq", DQ_PATHS)
@pytest.mark.parametrize("H", [6, 10, 12])
def test_g_not_dividing_the_row_tile(monkeypatch, dq, H):
    """G = 3, 5, 6 (Hkv = 2): a KV-outer tile holds 21, 12, 10 whole queries (63, 60, 60 of 64 rows);
    with Nq < N, documents and several query chunks (the forward and dQ work chunk by chunk)."""
    N, Nq, Hkv, D, block_size, topk = 90, 70, 2, 16, 16, 4
    # > 21 entries per work item: several tiles each; query chunks of 30
    launch = replace(LAUNCH, chunk=40, part_bytes=H * topk * (D + 1) * 4 * 30)
    cu = torch.tensor([0, 25, 26, 90], dtype=torch.int32)
    check_packed(monkeypatch, N, Nq, H, Hkv, D, block_size, topk, cu, dq, launch)


@pytest.mark.parametrize("dq", DQ_PATHS)
@pytest.mark.parametrize("dkdv_n,reduce_n", [(16, 64), (16, 8), (16, 32), (32, 16)])
def test_key_tiles_of_the_dkdv_kernel_and_its_reduce(monkeypatch, dq, dkdv_n, reduce_n):
    """32-key blocks in key tiles of the dK/dV kernel (16: two per block, so on the ``dkdv`` dQ path two dQ
    partials per slot) and of its reduce (``Launch.dkdv_reduce.block_n``: its own, smaller or larger than the
    kernel's; 64 is clipped to the block), G = 2, Nq < N, documents, hot blocks split (a key sums several work
    items) and several query chunks."""
    N, Nq, H, Hkv, D, block_size, topk = 150, 101, 4, 2, 16, 32, 3
    field = _dkdv_field(dq)
    launch = replace(LAUNCH, chunk=12, **{field: replace(getattr(LAUNCH, field), block_n=dkdv_n)},
                     dkdv_reduce=replace(LAUNCH.dkdv_reduce, block_n=reduce_n),
                     part_bytes=H * topk * 2 * D * 4 * 40)  # query chunks of 40 (dkdv path, 16-key tiles)
    cu = torch.tensor([0, 60, 61, 150], dtype=torch.int32)
    check_packed(monkeypatch, N, Nq, H, Hkv, D, block_size, topk, cu, dq, launch)


def test_dkdv_groups_cover_every_chunk_in_order_within_the_budget():
    from kernels.sparse_attention_bwd import dkdv_groups

    assert dkdv_groups([0, 10, 20, 30], 15) == [(0, 1), (1, 2), (2, 3)]
    assert dkdv_groups([0, 10, 20, 30], 20) == [(0, 2), (2, 3)]
    assert dkdv_groups([0, 10, 20, 30], 30) == [(0, 3)]
    assert dkdv_groups([0, 40, 50, 55], 15) == [(0, 1), (1, 3)]  # a chunk over the budget is a group alone
    assert dkdv_groups([0, 0], 1) == [(0, 1)]  # no work: one group, the reduce still writes zeros


@pytest.mark.parametrize("dq", DQ_PATHS)
def test_dkdv_partials_a_group_of_query_chunks_at_a_time(monkeypatch, dq):
    """Query chunks whose fp32 dK/dV partials pass ``dkdv_bytes`` together: the backward takes them a group at
    a time, the later groups' reduces adding to fp32 sums, and equals the reference; every group's partials
    but a single chunk's stay within the budget. (All chunks at once ran `1b` at 1M out of memory.)"""
    import kernels.sparse_attention_bwd as bwd

    N, Nq, H, Hkv, D, block_size, topk = 170, 150, 4, 2, 16, 16, 3
    # query chunks of 15-20 queries on either path; dK/dV partials for 12 work items at a time
    launch = replace(LAUNCH, chunk=8, part_bytes=H * topk * 2 * D * 4 * 15, dkdv_bytes=block_size * D * 8 * 12)
    seen, real = [], bwd.dkdv_groups

    def spy(chunk_work, max_items):
        seen.append((list(chunk_work), max_items, real(chunk_work, max_items)))
        return seen[-1][2]

    monkeypatch.setattr(bwd, "dkdv_groups", spy)
    cu = torch.tensor([0, 70, 71, 170], dtype=torch.int32)
    check_packed(monkeypatch, N, Nq, H, Hkv, D, block_size, topk, cu, dq, launch)
    chunk_work, max_items, groups = seen[-1]
    assert max_items == 12 and len(chunk_work) > 4 and len(groups) >= 3, (chunk_work, groups)
    assert [c for g in groups for c in range(*g)] == list(range(len(chunk_work) - 1))
    assert all(chunk_work[c1] - chunk_work[c0] <= max_items or c1 - c0 == 1 for c0, c1 in groups)


def grouped_and_not(q, k, v, block_idx, block_size, dq_path, launch, items):
    """Gradients with the dK/dV partials in one group and in groups of ``items`` work items, the CSR the same:
    ``launch.chunk`` at least the entries per item that a small ``dkdv_bytes`` would raise it to."""
    do = torch.randn_like(q)
    grads = []
    for budget in (launch.dkdv_bytes, block_size * q.shape[-1] * 8 * items):
        o, _ = sparse_attention(q, k, v, block_idx, block_size, dq_path=dq_path,
                                launch=replace(launch, dkdv_bytes=budget))
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    return grads


@pytest.mark.parametrize("dq", DQ_PATHS)
def test_grouped_dkdv_partials_sum_in_the_same_order(dq):
    """The fp32 sums across groups add the same partials in the same order as one group: dK, dV (and dQ) are
    bitwise those of the backward that held every chunk's partials at once."""
    N, H, Hkv, D, block_size, topk = 160, 4, 2, 16, 16, 3
    q, k, v = make_inputs(1, N, H, Hkv, D)
    block_idx = random_block_idx(1, Hkv, N, topk, block_size)
    launch = replace(LAUNCH, chunk=64, part_bytes=H * topk * 2 * D * 4 * 20)  # query chunks of 20
    one, grouped = grouped_and_not(q, k, v, block_idx, block_size, dq, launch, items=10)
    for a, b in zip(one, grouped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dq", ["kv", "tile"])
def test_dq_is_made_once_the_dkdv_partials_are_freed(monkeypatch, dq):
    """On the kv and tile dQ paths the backward makes dQ after the dK/dV loop, when its fp32 partials are freed
    (the dkdv path writes dQ inside the loop): at 1M tokens and 32 heads an 8 GiB dQ beside 4 GiB of partials and
    2 GiB of sums ran `1b` out of memory on an 80 GB card (docs/scaling.md 3t). Several groups, as at 1M."""
    from tests.utils import LiveEmpties

    N, H, Hkv, D, block_size, topk = 160, 4, 2, 16, 16, 3
    q, k, v = make_inputs(1, N, H, Hkv, D)
    block_idx = random_block_idx(1, Hkv, N, topk, block_size)
    launch = replace(LAUNCH, chunk=64, part_bytes=H * topk * 2 * D * 4 * 20, dkdv_bytes=block_size * D * 8 * 10)
    o, _ = sparse_attention(q, k, v, block_idx, block_size, dq_path=dq, launch=launch)
    live = LiveEmpties(monkeypatch)  # the backward's allocations only
    torch.autograd.grad(o, (q, k, v), torch.randn_like(q))
    made = [(s, d) for _, s, d in live.made]
    part = next(s for s, d in made if len(s) == 2)  # the dK/dV partials come first, dQ's (kv) after them
    assert made.count((part, torch.float32)) == 2 and (tuple(k.shape), torch.float32) in made, made  # and sums
    # neither is alive when the other is made
    assert (part, torch.float32) not in live.when(q.shape, q.dtype), made
    assert (tuple(q.shape), q.dtype) not in live.when(part, torch.float32), made


def test_all_slots_empty_give_zero_and_minus_inf(monkeypatch):
    q, k, v = make_inputs(1, 40, 2, 1, 16)
    block_idx = torch.full((1, 1, 40, 2), -1, dtype=torch.int32)
    block_idx[0, 0, 20:, 0] = 1  # queries 20.. see block 1 ([16, 32)); 0..19 see nothing
    poison_empty(monkeypatch)
    for dq in DQ_PATHS:
        o, lse = sparse_attention(q, k, v, block_idx, 16, dq_path=dq)
        assert torch.equal(o[0, :16], torch.zeros_like(o[0, :16]))
        assert torch.isneginf(lse[0, :, :20]).all() and torch.isfinite(lse[0, :, 20:]).all()
        (dq_,) = torch.autograd.grad(o, q, torch.randn_like(o))
        assert torch.equal(dq_[0, :20], torch.zeros_like(dq_[0, :20])) and torch.isfinite(dq_).all()


def test_bad_input_names_the_problem():
    q, k, v = make_inputs(1, 32, 2, 1, 24)
    block_idx = torch.zeros(1, 1, 32, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim"):
        sparse_attention(q, k, v, block_idx, 16)
    q, k, v = make_inputs(1, 32, 2, 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention(q, k, v, block_idx, 24)
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        sparse_attention(q, k, v, block_idx + 2, 16)


# ---------------------------------------------------------------- GPU, real sizes, bf16


def _torch_low_precision_errors(q, k, v, block_idx, block_size, refs, do):
    """Errors of PyTorch's own attention in q's dtype (SDPA on the same support) against the fp32
    reference: max error of o, rel RMS of o and of each gradient."""
    B, Nq, H, D = q.shape
    G = H // k.shape[2]
    allowed = support_mask(block_idx, k.shape[1], block_size, None)  # built here, not by the reference
    allowed = allowed.repeat_interleave(G, dim=1)
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        qb.transpose(1, 2), kb.repeat_interleave(G, 2).transpose(1, 2), vb.repeat_interleave(G, 2).transpose(1, 2),
        attn_mask=allowed).transpose(1, 2)
    rows = allowed.any(-1).transpose(1, 2)[..., None]  # [B, Nq, H, 1]: SDPA gives NaN on empty rows
    o = torch.where(rows, o, 0.0)
    grads = torch.autograd.grad(o, (qb, kb, vb), do.to(q.dtype))
    errs = [rel_rms(r, x.float()) for r, x in zip((refs[0], *refs[2:]), (o, *grads))]
    return (o.float() - refs[0]).abs().max().item(), errs


@pytest.mark.gpu
@pytest.mark.parametrize("dq", DQ_PATHS)
@pytest.mark.parametrize("G,D,dtype", [(16, 128, torch.bfloat16), (2, 64, torch.bfloat16), (8, 128, torch.float16)])
def test_gpu_low_precision_matches_reference(dq, G, D, dtype):
    B, N, Hkv, block_size, topk = 1, 2000, 2, 128, 8
    q, k, v = make_inputs(B, N, G * Hkv, Hkv, D, dtype, "cuda")
    block_idx = random_block_idx(B, Hkv, N, topk, block_size, device="cuda")
    torch.manual_seed(1)
    refs, outs = run_both(q, k, v, block_idx, block_size, dq_path=dq)
    torch.manual_seed(1)
    do = torch.randn_like(q)
    max_torch, errs_torch = _torch_low_precision_errors(q, k, v, block_idx, block_size, refs, do.float())
    names = ("o", "lse", "dq", "dk", "dv")
    errs = {n: rel_rms(r[torch.isfinite(r)], x.float()[torch.isfinite(r)]) for n, r, x in zip(names, refs, outs)}
    max_err = (outs[0].float() - refs[0]).abs().max().item()
    finite = torch.isfinite(refs[1])
    assert torch.equal(finite, torch.isfinite(outs[1])), "lse: empty-support (-inf) rows differ"
    lse_err = (outs[1] - refs[1])[finite].abs().max().item()
    msg = (f"rel RMS {errs}, torch {dtype} {errs_torch}; o max err {max_err:.2e}, torch {max_torch:.2e}; "
           f"lse max err {lse_err:.2e}")
    print(msg)
    assert all(e < 5e-3 for e in errs.values()), msg
    assert max_err <= 2 * max_torch, msg
    # lse is exact arithmetic up to fp32 rounding: bf16/fp16 values and their products are exact in fp32, a
    # score is an fp32 sum of D of them (even rounding every product: D * 2^-24 * |raw| <= ~1e-3 of a raw
    # score <= ~60, ~8e-5 after 1/sqrt(D); the random-walk typical is 100x less), and lse moves no more than
    # its largest score error; max, sum, exp2, log2 are fp32 (~1e-6 on lse ~ 8). 1e-4 is that worst case
    assert lse_err < 1e-4, msg


@pytest.mark.gpu
@pytest.mark.parametrize("dq", DQ_PATHS)
def test_gpu_backward_is_deterministic(dq):
    B, N, H, Hkv, D, block_size, topk = 1, 8192, 32, 2, 128, 128, 16
    q, k, v = make_inputs(B, N, H, Hkv, D, torch.bfloat16, "cuda")
    block_idx = random_block_idx(B, Hkv, N, topk, block_size, device="cuda", drop=0.0)
    block_idx[..., -1] = torch.where(torch.arange(N, device="cuda") >= block_size, 0, -1).int()
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        o, _ = sparse_attention(q, k, v, block_idx, block_size, dq_path=dq)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dq", DQ_PATHS)
def test_gpu_grouped_dkdv_partials_equal_one_group(dq):
    """The compiled kernels, bf16, `1b`'s heads: the dK/dV partials in groups of up to 64 work items (query
    chunks of 512 on the dkdv path, 1,008 on the kv path) give bitwise the gradients of one group."""
    B, N, H, Hkv, D, block_size, topk = 1, 8192, 32, 2, 128, 128, 16
    q, k, v = make_inputs(B, N, H, Hkv, D, torch.bfloat16, "cuda")
    block_idx = random_block_idx(B, Hkv, N, topk, block_size, device="cuda", drop=0.0)
    launch = replace(LAUNCH, chunk=8192, part_bytes=H * topk * 2 * D * 2 * 512)
    one, grouped = grouped_and_not(q, k, v, block_idx, block_size, dq, launch, items=64)
    for a, b in zip(one, grouped):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N*H*D > 2^31: 2^17 tokens x 128 heads x 128 dims (a 4 GiB q); checked on the last queries."""
    B, N, H, Hkv, D, block_size, topk = 1, 2**17 + 5, 128, 8, 128, 128, 4
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    block_idx = torch.randint(0, N // block_size, (B, Hkv, N, topk), device="cuda", dtype=torch.int32)
    block_idx[..., 0] = (torch.arange(N, device="cuda") // block_size).int()
    block_idx = block_idx.sort(-1, descending=True).values
    dup = block_idx[..., 1:] == block_idx[..., :-1]
    block_idx[..., 1:][dup] = -1
    tail = slice(N - 300, N)
    o, lse = sparse_attention(q, k, v, block_idx, block_size)
    # reference on the tail only: keys restricted to the blocks the tail uses would change ids, so
    # compare against an explicit gather of each tail query's support
    qt = q[0, tail].float()
    idx = block_idx[0, :, tail].long()  # [Hkv, T, topk]
    G = H // Hkv
    pos = torch.arange(N - 300, N, device="cuda")
    keys = idx[..., None] * block_size + torch.arange(block_size, device="cuda")  # [Hkv, T, topk, Bk]
    ok = (idx[..., None] >= 0) & (keys <= pos[None, :, None, None])
    keys = keys.clamp(0, N - 1).flatten(2)
    ok = ok.flatten(2)
    kk = k[0].float().permute(1, 0, 2)[torch.arange(Hkv, device="cuda")[:, None, None], keys]
    vv = v[0].float().permute(1, 0, 2)[torch.arange(Hkv, device="cuda")[:, None, None], keys]
    s = torch.einsum("thd,htjd->htj", qt, kk.repeat_interleave(G, 0)) * D ** -0.5
    s = s.masked_fill(~ok.repeat_interleave(G, 0), float("-inf"))
    o_ref = torch.einsum("htj,htjd->thd", s.softmax(-1), vv.repeat_interleave(G, 0))
    err = rel_rms(o_ref, o[0, tail].float())
    assert err < 6e-3, f"rel RMS {err:.2e}"
    lse_err = (torch.logsumexp(s, -1) - lse[0, :, tail]).abs().max().item()
    assert lse_err < 1e-4, f"lse max err {lse_err:.2e}"
