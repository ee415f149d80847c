"""Dense causal GQA attention through PyTorch SDPA, with packed documents (``cu_seqlens``) and an
optional sliding window (the layers of pretrained checkpoints that attend only to recent keys)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from msa.host import host_bounds, host_longest, to_device_async
from msa.keep import kept_aten_ops


def _lower_right(nq: int, nk: int):
    """``causal_lower_right(nq, nk)`` built outside any dispatch mode: the ``CausalBias`` tensor subclass
    cannot be created under one (selective checkpointing's, ``msa.keep.kept_aten_ops``: "Creating a new
    Tensor subclass CausalBias but the raw Tensor object is already associated to a python object", torch
    2.13); it holds no data."""
    with _disable_current_modes():
        return causal_lower_right(nq, nk)


def _window_sdpa(q, k, v, scale, gqa, window):
    """Causal SDPA where query ``i`` sees keys ``i - window < j <= i``. Queries go in chunks of about
    ``window`` so each mask is ``chunk x (chunk + window)``: memory stays linear in the length. The chunks
    are split off ``q`` and each chunk's keys are joined from pieces split off ``k, v`` at the chunks' key
    bounds, so backward writes each gradient once (a slice's backward writes a zero-filled copy of its
    whole input: one per chunk)."""
    nq, nk = q.shape[2], k.shape[2]
    first, chunk = nk - nq, min(max(window, 256), 4096)
    starts = range(0, nq, chunk)
    spans = [(max(0, first + a - window + 1), first + min(a + chunk, nq)) for a in starts]  # each chunk's keys
    cuts = sorted({0, nk, *(bound for span in spans for bound in span)})
    piece = {cut: n for n, cut in enumerate(cuts)}
    sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    k_pieces, v_pieces = k.split(sizes, dim=2), v.split(sizes, dim=2)
    parts = []
    for a, q_chunk, (lo, hi) in zip(starts, q.split(chunk, dim=2), spans):
        i = torch.arange(first + a, hi, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (j <= i) & (i - j < window)  # [chunk, hi - lo]
        k_chunk, v_chunk = (torch.cat(p[piece[lo]:piece[hi]], dim=2) for p in (k_pieces, v_pieces))
        parts.append(F.scaled_dot_product_attention(q_chunk, k_chunk, v_chunk, attn_mask=mask, scale=scale,
                                                    enable_gqa=gqa))
    return _join_heads_last(parts)


def _join_heads_last(parts):
    """``torch.cat(parts, dim=2)`` of ``[B, H, n, D]`` parts, laid out as ``[B, N, H, D]`` (a transposed view of
    it is returned): the caller transposes back, and the output projection's ``reshape`` is then a view. Joined
    along dim 2, the result's transpose is not contiguous, and the reshape copied all of it (8 GiB for ``1b`` at
    1M tokens, next to the joined tensor and the parts that SDPA keeps for backward)."""
    return torch.cat([p.transpose(1, 2) for p in parts], dim=1).transpose(1, 2)


def _causal_sdpa(q, k, v, scale, gqa, window=0):
    """Causal SDPA of ``q [B, H, nq, D]`` over ``k, v [B, Hkv, nk, D]``, queries the last ``nq`` keys."""
    nq, nk = q.shape[2], k.shape[2]
    if window and nk > window:
        return _window_sdpa(q, k, v, scale, gqa, window)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right(nq, nk), scale=scale, enable_gqa=gqa)


def document_lengths(cu_seqlens: torch.Tensor, N: int, Nq: int) -> tuple[list[int], list[int]]:
    """Per document of ``cu_seqlens`` (over ``N`` keys): its queries (of the last ``Nq`` positions) and its
    keys. One device-to-host read per ``cu_seqlens`` tensor (``host_bounds``)."""
    bounds, first = host_bounds(cu_seqlens), N - Nq
    starts, ends = bounds[:-1], bounds[1:]
    return [max(0, e - max(s, first)) for s, e in zip(starts, ends)], [e - s for s, e in zip(starts, ends)]


def longest_document(cu_seqlens: torch.Tensor | None, N: int) -> int:
    """The longest document of a row of ``N`` keys (``N`` without ``cu_seqlens``), kept with its ``host_bounds``."""
    return N if cu_seqlens is None else host_longest(cu_seqlens)


def varlen_args(q_len: list[int], k_len: list[int], device) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
    """What one varlen kernel call takes for the documents that have queries: the first key it reads (the
    documents before it have no query), ``cu_seq_q``, ``cu_seq_k`` (int32) and the longest query and key
    runs. Each document's queries are the last of its keys (bottom-right causal alignment). On a GPU the two
    offset tensors go up from pinned memory without waiting: a plain ``torch.tensor(..., device="cuda")``
    synchronises the host with the GPU, which stalls a host-bound step (the window layer's FlashAttention call
    did so twice a step)."""
    docs = [(nq, nk) for nq, nk in zip(q_len, k_len) if nq]
    k0 = sum(k_len) - sum(nk for _, nk in docs)

    def cumulative(lengths):
        return to_device_async([0, *itertools.accumulate(lengths)], device)

    return (k0, cumulative(nq for nq, _ in docs), cumulative(nk for _, nk in docs),
            max(nq for nq, _ in docs), max(nk for _, nk in docs))


def _flash_varlen(q, k, v, q_len, k_len, scale, window: int = 0):
    """One FlashAttention-2 varlen call (``aten::_flash_attention_forward``, GQA, bottom-right causal) over
    the documents of a packed row (or the one document of a row), ``B == 1`` -> ``(o, lse)``, ``lse [1, H, Nq]``
    float32 (natural log) or None where FlashAttention's layout is not one this knows. ``window``: each query
    sees its last ``window`` keys, its own included (FlashAttention's ``window_size_left = window - 1``)."""
    k0, cu_q, cu_k, max_q, max_k = varlen_args(q_len, k_len, q.device)
    o, lse = torch.ops.aten._flash_attention_forward(q[0], k[0, k0:], v[0, k0:], cu_q, cu_k, max_q, max_k, 0.0,
                                                     True, False, scale=scale, **_window_args(window))[:2]
    return o.unsqueeze(0), _varlen_lse(lse.detach(), [n for n in q_len if n], q.shape[2])


def _window_args(window: int) -> dict:
    """FlashAttention's arguments for a causal window of ``window`` keys, the query's own included (none for 0)."""
    return {"window_size_left": window - 1, "window_size_right": 0} if window else {}


def _flash_has_window() -> bool:
    """Whether this torch's ``aten::_flash_attention_forward`` takes a sliding window (and its backward, which
    autograd calls with the same arguments)."""
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return "window_size_left" in schema and "window_size_left" in str(
        torch.ops.aten._flash_attention_backward.default._schema)


FLASH_WINDOW = _flash_has_window()
# FlashAttention-2's backward accumulates dq in fp32 over the whole call (16 GiB for ``1b``'s 32 heads at 1M tokens:
# the H100 ran out of memory there, docs/scaling.md 3u); a window row whose accumulator would pass this goes in query
# chunks that each stay under it (``_WindowChunks``)
FLASH_WINDOW_ACCUM_BYTES = 1 << 30


def _flash_chunk_fwd(q, k, v, scale, window):
    """One window call on a chunk: ``q [n, H, D]`` the last ``n`` of ``k, v [m, Hkv, D]`` -> ``(o, state)``."""
    _, cu_q, cu_k, n, m = varlen_args([q.shape[0]], [k.shape[0]], q.device)
    o, lse, rng, unused = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, n, m, 0.0, True, False,
                                                                  scale=scale, **_window_args(window))[:4]
    return o, (lse, rng, unused, cu_q, cu_k)


def _flash_chunk_bwd(do, q, k, v, o, state, scale, window):
    lse, rng, unused, cu_q, cu_k = state
    return torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, q.shape[0], k.shape[0], 0.0, True,
                                                    rng, unused, scale=scale, **_window_args(window))


class _WindowChunks(torch.autograd.Function):
    """A sliding window over one row, ``q [Nq, H, D]`` the last ``Nq`` of ``k, v [N, Hkv, D]``, in query chunks of
    ``chunk``, each against its own keys (the ``window - 1`` before its first query on): the output is written
    into one ``[Nq, H, D]`` tensor, which is all it keeps besides the inputs and each chunk's state (its
    log-normaliser), and backward runs the chunks one at a time, so the kernel's transient buffers (FlashAttention's
    fp32 dq accumulator) are a chunk's. dK and dV sum the chunks' shares in fp32 (a key in two chunks' spans gets
    two). ``ops``: the chunk kernel, ``(fwd, bwd)`` as ``_flash_chunk_fwd``/``_flash_chunk_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, chunk, ops):
        Nq, N = q.shape[0], k.shape[0]
        first, o, states, spans = N - Nq, torch.empty_like(q), [], []
        for a in range(0, Nq, chunk):
            b = min(a + chunk, Nq)
            lo, hi = max(0, first + a - window + 1), first + b
            oc, state = ops[0](q[a:b], k[lo:hi], v[lo:hi], scale, window)
            o[a:b] = oc
            del oc
            states.append(state)
            spans.append((a, b, lo, hi))
        ctx.save_for_backward(q, k, v, o)
        ctx.states, ctx.spans, ctx.window, ctx.scale, ctx.ops = states, spans, window, scale, ops
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        do = do.contiguous()
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
        for (a, b, lo, hi), state in zip(ctx.spans, ctx.states):
            dqc, dkc, dvc = ctx.ops[1](do[a:b], q[a:b], k[lo:hi], v[lo:hi], o[a:b], state, ctx.scale, ctx.window)
            dq[a:b] = dqc
            dk[lo:hi] += dkc
            dv[lo:hi] += dvc
            del dqc, dkc, dvc
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def window_chunk(H: int, D: int, accum_bytes: int | None = None) -> int:
    """Queries per chunk of a window row whose fp32 dq accumulator (``queries x H x D x 4`` bytes) stays under
    ``accum_bytes`` (``FLASH_WINDOW_ACCUM_BYTES``): a multiple of 256, at least 256."""
    limit = FLASH_WINDOW_ACCUM_BYTES if accum_bytes is None else accum_bytes
    return max(256, limit // (H * D * 4) // 256 * 256)


def _varlen_lse(lse: torch.Tensor, q_len: list[int], H: int) -> torch.Tensor | None:
    """FlashAttention's varlen log-normaliser as ``[1, H, Nq]``: ``[H, total_q]`` (FlashAttention 2.5 and
    later), or one padded row per document ``[n_docs, H, max_q]`` (before)."""
    total = sum(q_len)
    if lse.shape == (H, total):
        return lse.float().unsqueeze(0)
    if lse.dim() == 3 and lse.shape[:2] == (len(q_len), H) and lse.shape[2] >= max(q_len):
        return torch.cat([lse[i, :, :n] for i, n in enumerate(q_len)], dim=1).float().unsqueeze(0)
    return None


def can_run_varlen(q: torch.Tensor) -> bool:
    """FlashAttention-2's varlen kernel runs on CUDA GPUs of compute capability 8.0 and up, in fp16/bf16, for
    head dims up to 256 in multiples of 8."""
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D <= 256 and D % 8 == 0
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                    window: int = 0, varlen: bool = False, return_lse: bool = False):
    """Causal attention of ``q [B, Nq, H, D]`` over ``k, v [B, N, Hkv, D]`` -> ``o [B, Nq, H, D]``.

    The queries are the last ``Nq <= N`` key positions (bottom-right aligned, as a context-parallel
    rank's query chunk against the gathered keys before it). With ``cu_seqlens`` over the keys
    (``B == 1``) each document attends only to itself, without an ``N x N`` mask: SDPA runs once per
    document on views split off the packed tensors (so backward writes each gradient once, not one
    zero-padded copy per document), or, with ``varlen`` where ``can_run_varlen``, all documents go to one
    FlashAttention varlen call. ``window > 0``: query ``i`` sees only the keys ``i - window < j <= i``
    (transformers' sliding window: ``window`` keys including its own); with ``varlen`` where
    ``can_run_varlen`` and this torch's FlashAttention takes a window (``FLASH_WINDOW``), in one call with
    FlashAttention's window, rows without ``cu_seqlens`` included, or for a row too long for one call's fp32 dq
    accumulator (``FLASH_WINDOW_ACCUM_BYTES``) in query chunks of such calls (``_WindowChunks``); else in query
    chunks of masked SDPA.
    ``return_lse``: ``(o, lse)``, with each query's log-normaliser ``lse [B, H, Nq]`` (float32, natural
    log, no gradient) where the varlen call gives it for free, else None.
    """
    Nq, N = q.shape[1], k.shape[1]
    if Nq > N:
        raise ValueError(f"q has {Nq} positions but k only {N}: queries must be the last Nq <= N keys")
    with kept_aten_ops():  # selective checkpointing keeps SDPA's outputs for the block's recompute
        o, lse = _dense_attention(q, k, v, cu_seqlens, scale, window, varlen)
    return (o, lse) if return_lse else o


def _dense_attention(q, k, v, cu_seqlens, scale, window, varlen):
    Nq, N = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    flash_window = bool(window) and varlen and FLASH_WINDOW and can_run_varlen(q)
    chunk = window_chunk(q.shape[2], q.shape[3])  # the most queries one FlashAttention window call takes
    if cu_seqlens is None:
        B = q.shape[0]
        if flash_window and N > window:
            if B == 1 and Nq > chunk:  # a long row: query chunks
                scale = q.shape[-1] ** -0.5 if scale is None else scale
                q1, k1, v1 = (t[0].contiguous() for t in (q, k, v))
                o = _WindowChunks.apply(q1, k1, v1, window, scale, chunk, (_flash_chunk_fwd, _flash_chunk_bwd))
                return o.unsqueeze(0), None
            if B * Nq <= chunk:  # one call, the rows as documents of one packed row (more rows: SDPA below)
                o, lse = _flash_varlen(*(t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v)), [Nq] * B, [N] * B,
                                       scale, window)
                lse = None if lse is None else lse[0].unflatten(1, (B, Nq)).transpose(0, 1)
                return o.view(B, Nq, *o.shape[2:]), lse
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return _causal_sdpa(qt, kt, vt, scale, gqa, window).transpose(1, 2), None
    q_len, k_len = document_lengths(cu_seqlens, N, Nq)
    if varlen and can_run_varlen(q) and (not window or max(k_len) <= window):
        return _flash_varlen(q, k, v, q_len, k_len, scale)
    if flash_window and Nq <= chunk:
        return _flash_varlen(q, k, v, q_len, k_len, scale, window)
    qs, ks, vs = q.split(q_len, dim=1), k.split(k_len, dim=1), v.split(k_len, dim=1)
    parts = [_causal_sdpa(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2), scale, gqa, window)
             for qd, kd, vd, n in zip(qs, ks, vs, q_len) if n]
    return _join_heads_last(parts).transpose(1, 2), None
