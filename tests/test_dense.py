"""Dense attention on packed rows (msa/dense.py): the per-document calls and the varlen path's arguments
against a masked softmax built from the contract, and the varlen kernel against the per-document calls on
a GPU."""

import pytest
import torch

from msa.dense import can_run_varlen, dense_attention, document_lengths, varlen_args
from tests.utils import rel_rms, visible_mask

H, HKV, D = 4, 2, 16
# documents of awkward lengths, an empty one in the middle; Nq < N is a context-parallel rank's query chunk
CASES = [(70, 70, [0, 1, 33, 33, 70]), (70, 29, [0, 1, 33, 33, 70]), (96, 48, [0, 30, 31, 77, 96])]


def _masked_attention(q, k, v, mask):
    """Softmax attention of ``q [Nq, H, D]`` over ``k, v [N, Hkv, D]`` where ``mask [Nq, N]``, in float64."""
    kk, vv = (t.double().repeat_interleave(H // HKV, dim=1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * D ** -0.5
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, vv)


def _inputs(N, Nq, cu, device="cpu", dtype=torch.float32, B=1):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, h, D, generator=g).to(device, dtype).requires_grad_()
               for n, h in ((Nq, H), (N, HKV), (N, HKV)))
    return q, k, v, None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)


def _window_mask(N, Nq, window):
    i, j = torch.arange(N - Nq, N)[:, None], torch.arange(N)[None, :]
    return (i - j < window) if window else torch.ones(Nq, N, dtype=torch.bool)


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("N,Nq,cu", CASES)
def test_per_document_calls_against_a_masked_softmax(N, Nq, cu, window):
    """Output and gradients; ``window``: a sliding window (query chunks of 256 keys: one per document
    here, several in the unpacked case of test_backward_writes_each_gradient_once)."""
    q, k, v, cu = _inputs(N, Nq, cu)
    o = dense_attention(q, k, v, cu, window=window)
    ref = _masked_attention(q[0], k[0], v[0], visible_mask(N, Nq, cu) & _window_mask(N, Nq, window))[None]
    assert rel_rms(ref, o) < 1e-6
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_rms(g_ref, g) < 1e-6, name


def _backward_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return [type(n).__name__ for n in seen]


def test_backward_writes_each_gradient_once():
    """Documents (and a sliding window's query chunks and their keys) are split off q, k, v (one backward
    concatenation each), not sliced (one zero-filled full-size gradient per document and slice, summed:
    seen as 77% of a CPU backward at 128 documents)."""
    q, k, v, cu = _inputs(*CASES[0])
    names = _backward_nodes(dense_attention(q, k, v, cu))
    assert "SliceBackward0" not in names
    assert names.count("SplitWithSizesBackward0") == 3
    N, Nq, W = 1100, 900, 100  # 4 query chunks of 256 with overlapping key spans
    q, k, v, _ = _inputs(N, Nq, None)
    o = dense_attention(q, k, v, window=W)
    assert "SliceBackward0" not in _backward_nodes(o)
    ref = _masked_attention(q[0], k[0], v[0], visible_mask(N, Nq, None) & _window_mask(N, Nq, W))[None]
    do = torch.randn_like(o)
    for name, g, g_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do),
                              torch.autograd.grad(ref, (q, k, v), do.double())):
        assert rel_rms(g_ref, g) < 1e-6, name


@pytest.mark.parametrize("packed,window", [(True, 0), (True, 20), (False, 100)])
def test_output_is_laid_out_as_the_output_projection_reads_it(packed, window):
    """The per-document calls and the sliding window's query chunks join their parts into a contiguous
    ``[B, Nq, H, D]``, so the layer's ``reshape`` to ``[B, Nq, H * D]`` is a view: joined along the heads-first
    layout it was a full copy (8 GiB for ``1b`` at 1M tokens, where that copy ran the backward's recompute of the
    window layer out of memory on an 80 GB card). The values are checked against a masked softmax above."""
    N, Nq, cu = (70, 29, [0, 1, 33, 33, 70]) if packed else (1100, 900, None)
    q, k, v, cu_t = _inputs(N, Nq, cu)
    o = dense_attention(q, k, v, cu_t, window=window)
    assert o.shape == (1, Nq, H, D) and o.is_contiguous()
    assert o.reshape(1, Nq, H * D).data_ptr() == o.data_ptr()


@pytest.mark.parametrize("N,Nq,cu", CASES)
def test_varlen_arguments_describe_the_documents(N, Nq, cu):
    """``varlen_args`` as the varlen kernel reads them (each document's queries are the last of its keys,
    bottom-right causal), evaluated by a masked softmax, give the per-document result."""
    q, k, v, cu = _inputs(N, Nq, cu)
    k0, cu_q, cu_k, max_q, max_k = varlen_args(*document_lengths(cu, N, Nq), "cpu")
    assert k0 == N - (cu_k[-1].item()) and cu_q[-1].item() == Nq
    doc_q = torch.searchsorted(cu_q, torch.arange(Nq), right=True) - 1
    doc_k = torch.searchsorted(cu_k, torch.arange(N - k0), right=True) - 1
    # query t of document d sits at key position (its index in d) + (keys of d - queries of d)
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])
    at_q = torch.arange(Nq) - cu_q[doc_q] + shift[doc_q]
    at_k = torch.arange(N - k0) - cu_k[doc_k]
    mask = (doc_q[:, None] == doc_k[None, :]) & (at_k[None, :] <= at_q[:, None])
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    o = _masked_attention(q[0], k[0, k0:], v[0, k0:], mask)
    assert rel_rms(o, dense_attention(q, k, v, cu)[0]) < 1e-6


def test_varlen_falls_back_to_the_per_document_calls_off_gpu():
    q, k, v, cu = _inputs(*CASES[1])
    assert not can_run_varlen(q)
    assert torch.equal(dense_attention(q, k, v, cu, varlen=True), dense_attention(q, k, v, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("N,Nq,cu", CASES + [(8192, 8192, [0, 5000, 5001, 8000, 8192])])
def test_varlen_matches_the_per_document_calls_on_gpu(N, Nq, cu):
    """bf16: output and gradients of the varlen call and of the per-document SDPA calls against fp32."""
    ref_in = _inputs(N, Nq, cu, "cuda", torch.float32)
    ins = _inputs(N, Nq, cu, "cuda", torch.bfloat16)
    do = torch.randn(1, Nq, H, D, device="cuda")
    ref = dense_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in[:3], do)
    errors = {}
    for varlen in (False, True):
        o = dense_attention(*ins, varlen=varlen)
        grads = torch.autograd.grad(o, ins[:3], do.bfloat16())
        errors[varlen] = [rel_rms(ref, o)] + [rel_rms(r, g) for r, g in zip(ref_grads, grads)]
    # bf16 against fp32: PyTorch's own per-document SDPA reaches 5.2e-3 on dk here (H200, torch 2.11), so
    # the bound that matters is the relative one: varlen within 2x of the per-document calls' error
    assert all(e < 1e-2 for e in errors[True]), errors
    assert all(e <= 2 * max(e_loop, 1e-3) for e, e_loop in zip(errors[True], errors[False])), errors


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,Nq,cu,window,chunked", [
    (2, 1100, 900, None, 100, False), (1, 8192, 8192, None, 4096, False),
    (1, 8192, 8192, [0, 5000, 5001, 8000, 8192], 1000, False), (1, 96, 48, [0, 30, 31, 77, 96], 20, False),
    (1, 1100, 900, None, 100, True), (1, 8192, 8192, None, 700, True), (1, 8192, 6000, None, 4096, True)])
def test_flash_window_matches_the_chunked_sdpa_on_gpu(B, N, Nq, cu, window, chunked, monkeypatch):
    """A sliding window through FlashAttention's own window (one call, rows without ``cu_seqlens`` and several
    rows included; ``chunked``: in query chunks of 256, ``_WindowChunks``, as a row whose fp32 dq accumulator
    passes ``FLASH_WINDOW_ACCUM_BYTES`` runs) against the query chunks of masked SDPA: bf16 output and gradients
    against the fp32 chunked path, within 2x of the bf16 chunked path's own error, and laid out as the output
    projection reads it."""
    import msa.dense
    from msa.dense import FLASH_WINDOW

    assert FLASH_WINDOW, "this torch's FlashAttention takes no window: the chunked path runs on the GPU too"
    if chunked:
        monkeypatch.setattr(msa.dense, "FLASH_WINDOW_ACCUM_BYTES", 256 * H * D * 4)
        assert msa.dense.window_chunk(H, D) == 256 < Nq
    *ref_in, cu_t = _inputs(N, Nq, cu, "cuda", torch.float32, B)
    *ins, _ = _inputs(N, Nq, cu, "cuda", torch.bfloat16, B)
    do = torch.randn(B, Nq, H, D, device="cuda")
    ref = dense_attention(*ref_in, cu_t, window=window)
    ref_grads = torch.autograd.grad(ref, ref_in, do)
    errors = {}
    for varlen in (False, True):
        o = dense_attention(*ins, cu_t, window=window, varlen=varlen)
        assert o.shape == (B, Nq, H, D) and o.is_contiguous()
        grads = torch.autograd.grad(o, ins, do.bfloat16())
        errors[varlen] = [rel_rms(ref, o)] + [rel_rms(r, gr) for r, gr in zip(ref_grads, grads)]
    assert all(e < 1e-2 for e in errors[True]), errors
    assert all(e <= 2 * max(e_loop, 1e-3) for e, e_loop in zip(errors[True], errors[False])), errors


@pytest.mark.gpu
@pytest.mark.parametrize("B,chunked", [(1, False), (2, False), (1, True)])
def test_flash_window_never_waits_for_the_gpu(B, chunked, monkeypatch):
    """A window row without ``cu_seqlens`` (one call, several rows, query chunks) runs forward and backward with
    no host-GPU synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises at one): its offsets go up
    from pinned memory (``msa.host.to_device_async``). A synchronising copy there stalled a host-bound step:
    the window layer cost a 32K step of ``small`` more than the dense layer it replaces (docs/scaling.md 3v)."""
    import msa.dense

    if chunked:
        monkeypatch.setattr(msa.dense, "FLASH_WINDOW_ACCUM_BYTES", 256 * H * D * 4)
    *ins, _ = _inputs(2048, 2048, None, "cuda", torch.bfloat16, B)
    do = torch.randn(B, 2048, H, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = dense_attention(*ins, window=300, varlen=True)
        grads = torch.autograd.grad(o, ins, do)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
def test_packed_rows_with_known_bounds_never_wait_for_the_gpu(varlen):
    """A packed row whose ``cu_seqlens`` values the caller holds (``remember_bounds``, as the training loop does
    from its host batch) runs forward and backward, per document or in one varlen call, with no host-GPU
    synchronisation: each layer read ``cu_seqlens`` back, 24 times a step of ``small`` (docs/scaling.md 3w)."""
    from msa.host import remember_bounds

    bounds = [0, 700, 701, 1500, 2048]
    *ins, cu = _inputs(2048, 2048, bounds, "cuda", torch.bfloat16)
    remember_bounds(cu, bounds)
    do = torch.randn(1, 2048, H, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = dense_attention(*ins, cu, varlen=varlen)
        grads = torch.autograd.grad(o, ins, do)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(g).all() for g in grads)


def test_offsets_reach_the_device_as_given():
    """``to_device_async``'s values and dtype (on the CPU a plain copy; the GPU's pinned path is checked for
    synchronisation by the test above and for its values by every varlen test on a GPU)."""
    from msa.host import to_device_async

    t = to_device_async([0, 3, 2**31 - 1], "cpu")
    assert t.dtype == torch.int32 and t.tolist() == [0, 3, 2**31 - 1]
    f = to_device_async(torch.tensor([0.5, 1e-6]), "cpu")  # a host tensor keeps its dtype
    assert f.dtype == torch.float32 and f.tolist() == torch.tensor([0.5, 1e-6]).tolist()


def _reference_chunk_ops():
    """A window chunk kernel in float64 (the masked softmax of ``_masked_attention``, bottom-right aligned), its
    backward by autograd: the chunk op ``_WindowChunks`` runs, where FlashAttention's cannot (the CPU)."""

    def attend(q, k, v, scale, window):
        assert scale == D ** -0.5  # _masked_attention's
        n, m = q.shape[0], k.shape[0]
        return _masked_attention(q, k, v, visible_mask(m, n, None) & _window_mask(m, n, window))

    def fwd(q, k, v, scale, window):
        return attend(q, k, v, scale, window).to(q.dtype), None

    def bwd(do, q, k, v, o, state, scale, window):
        with torch.enable_grad():
            ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
            grads = torch.autograd.grad(attend(*ins, scale, window), ins, do.double())
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    return fwd, bwd


@pytest.mark.parametrize("N,Nq,window,chunk", [(1100, 900, 100, 256), (1100, 1100, 300, 256), (600, 600, 700, 256),
                                               (700, 300, 50, 1024)])
def test_window_chunks_equal_the_whole_row(N, Nq, window, chunk):
    """``_WindowChunks``' bookkeeping (chunk bounds, each chunk's keys from ``window - 1`` before its first query,
    the output written once, dK/dV summed over chunks whose key spans overlap) with a float64 chunk kernel, against
    the chunked SDPA path (itself checked against a masked softmax above): several chunks, one chunk, a window
    longer than the row, the last Nq of N queries."""
    from msa.dense import _WindowChunks

    q, k, v, _ = _inputs(N, Nq, None)
    ref = dense_attention(q, k, v, window=window)
    o = _WindowChunks.apply(q[0], k[0], v[0], window, D ** -0.5, chunk, _reference_chunk_ops())
    assert o.shape == (Nq, H, D) and rel_rms(ref[0], o) < 1e-6
    do = torch.randn_like(o)
    for name, g, g_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do),
                              torch.autograd.grad(ref, (q, k, v), do[None])):
        assert rel_rms(g_ref, g) < 1e-6, name


def test_a_long_window_row_is_routed_to_the_chunks(monkeypatch):
    """``dense_attention``'s routing with FlashAttention's window available (set up here, with the float64 chunk
    kernel in its place): a row whose fp32 dq accumulator passes the bound runs ``_WindowChunks`` in chunks of
    ``window_chunk`` queries, and gives the masked-SDPA chunks' output and gradients."""
    import msa.dense

    fwd, bwd = _reference_chunk_ops()
    calls = []
    monkeypatch.setattr(msa.dense, "FLASH_WINDOW", True)
    monkeypatch.setattr(msa.dense, "can_run_varlen", lambda q: True)
    monkeypatch.setattr(msa.dense, "FLASH_WINDOW_ACCUM_BYTES", 256 * H * D * 4)
    monkeypatch.setattr(msa.dense, "_flash_chunk_fwd", lambda *a: calls.append(a[0].shape[0]) or fwd(*a))
    monkeypatch.setattr(msa.dense, "_flash_chunk_bwd", bwd)
    q, k, v, _ = _inputs(1100, 900, None)
    o = dense_attention(q, k, v, window=100, varlen=True)
    assert calls == [256, 256, 256, 132]
    monkeypatch.setattr(msa.dense, "FLASH_WINDOW", False)
    ref = dense_attention(q, k, v, window=100, varlen=True)
    assert rel_rms(ref, o) < 1e-6
    do = torch.randn_like(o)
    for name, g, g_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert rel_rms(g_ref, g) < 1e-6, name


def test_window_chunk_keeps_the_fp32_accumulator_under_its_bound():
    """Queries per chunk by hand: 1 GiB / (32 heads x 128 x 4 bytes) = 65,536 for ``1b``, 262,144 for ``small``'s 8
    heads; multiples of 256, never under 256."""
    from msa.dense import window_chunk

    assert window_chunk(32, 128) == 65536 and window_chunk(8, 128) == 262144
    assert window_chunk(32, 128, 50 * 2 ** 20) == 3072  # 3,200 queries fit, rounded down to a multiple of 256
    assert window_chunk(32, 128, 1000) == 256


def test_a_window_falls_back_to_the_chunks_off_gpu():
    q, k, v, _ = _inputs(1100, 900, None)
    assert torch.equal(dense_attention(q, k, v, window=100, varlen=True), dense_attention(q, k, v, window=100))


def test_varlen_lse_layouts():
    """FlashAttention's varlen log-normaliser to ``[1, H, Nq]``: ``[H, total_q]`` as it is, one padded row per
    document (older FlashAttention) cut to each document's queries, anything else refused (None: the
    index KL then computes its own)."""
    from msa.dense import _varlen_lse

    q_len = [3, 1, 4]
    want = torch.arange(8 * H, dtype=torch.float32).view(H, 8)
    assert torch.equal(_varlen_lse(want, q_len, H), want[None])
    padded = torch.full((3, H, 5), -7.0)
    for i, (start, n) in enumerate(zip([0, 3, 4], q_len)):
        padded[i, :, :n] = want[:, start:start + n]
    assert torch.equal(_varlen_lse(padded, q_len, H), want[None])
    assert _varlen_lse(want[:, :7], q_len, H) is None
    assert _varlen_lse(padded[:2], q_len, H) is None


def test_lse_is_none_off_the_varlen_path():
    q, k, v, cu = _inputs(*CASES[1])
    o, lse = dense_attention(q, k, v, cu, varlen=True, return_lse=True)
    assert lse is None and torch.equal(o, dense_attention(q, k, v, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("N,Nq,cu", CASES + [(8192, 8192, [0, 5000, 5001, 8000, 8192])])
def test_varlen_lse_is_each_querys_log_normaliser_on_gpu(N, Nq, cu):
    """The varlen call's lse (what the warm-up's index KL takes instead of computing its own) against the
    float64 log-sum-exp of the visible keys' scores."""
    q, k, v, cu = _inputs(N, Nq, cu, "cuda", torch.bfloat16)
    _, lse = dense_attention(q, k, v, cu, varlen=True, return_lse=True)
    assert lse is not None and lse.shape == (1, H, Nq) and lse.dtype == torch.float32
    kk = k[0].double().repeat_interleave(H // HKV, dim=1)
    s = torch.einsum("qhd,khd->hqk", q[0].double(), kk) * D ** -0.5
    want = s.masked_fill(~visible_mask(N, Nq, cu, "cuda"), float("-inf")).logsumexp(-1)
    rows = torch.isfinite(want)
    assert torch.equal(rows, torch.isfinite(lse[0])), "rows with no visible key"
    assert (lse[0][rows] - want[rows]).abs().max() < 1e-3


def test_document_bounds_are_read_once_per_tensor_until_written_to(monkeypatch):
    """``host_bounds`` reads a ``cu_seqlens`` back once and keeps it while nothing writes to it; bounds the
    caller already holds (``remember_bounds``, the training loop's host batch) are never read; inference mode
    keeps no version counter, so nothing is kept there."""
    import msa.host
    from msa.dense import longest_document
    from msa.host import host_bounds, remember_bounds

    reads = []
    monkeypatch.setattr(msa.host, "_read_bounds", lambda cu: reads.append(1) or cu.tolist())
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    assert document_lengths(cu, 12, 4) == ([0, 0, 4], [5, 0, 7])
    assert longest_document(cu, 12) == 7 and len(reads) == 1
    cu[2] = 6  # in place: the version counter moves, so it is read again
    assert longest_document(cu, 12) == 6 and host_bounds(cu) == [0, 5, 6, 12] and len(reads) == 2
    held = remember_bounds(torch.tensor([0, 3, 12], dtype=torch.int32), [0, 3, 12])
    assert document_lengths(held, 12, 12) == ([3, 9], [3, 9]) and len(reads) == 2
    with pytest.raises(ValueError, match="3 bounds for a cu_seqlens of shape"):
        remember_bounds(torch.tensor([0, 12]), [0, 3, 12])
    with torch.inference_mode():
        t = torch.tensor([0, 4, 12])
        assert longest_document(t, 12) == longest_document(t, 12) == 8 and len(reads) == 4
