"""Dense causal GQA attention through PyTorch SDPA, with packed documents (``cu_seqlens``) and an
optional sliding window (the layers of pretrained checkpoints that attend only to recent keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _window_sdpa(q, k, v, scale, gqa, window):
    """Causal SDPA where query ``i`` sees keys ``i - window < j <= i``. Queries go in chunks of about
    ``window`` so each mask is ``chunk x (chunk + window)``: memory stays linear in the length."""
    nq, nk = q.shape[2], k.shape[2]
    first, chunk, parts = nk - nq, min(max(window, 256), 4096), []
    for a in range(0, nq, chunk):
        b = min(a + chunk, nq)
        lo, hi = max(0, first + a - window + 1), first + b
        i = torch.arange(first + a, hi, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (j <= i) & (i - j < window)  # [b - a, hi - lo]
        parts.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask,
                                                    scale=scale, enable_gqa=gqa))
    return torch.cat(parts, dim=2)


def _causal_sdpa(q, k, v, scale, gqa, window=0):
    """Causal SDPA of ``q [B, H, nq, D]`` over ``k, v [B, Hkv, nk, D]``, queries the last ``nq`` keys."""
    nq, nk = q.shape[2], k.shape[2]
    if window and nk > window:
        return _window_sdpa(q, k, v, scale, gqa, window)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), scale=scale,
                                          enable_gqa=gqa)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                    window: int = 0) -> torch.Tensor:
    """Causal attention of ``q [B, Nq, H, D]`` over ``k, v [B, N, Hkv, D]`` -> ``o [B, Nq, H, D]``.

    The queries are the last ``Nq <= N`` key positions (bottom-right aligned, as a context-parallel
    rank's query chunk against the gathered keys before it). With ``cu_seqlens`` over the keys
    (``B == 1``) each document attends only to itself: SDPA runs once per document, so memory stays
    linear in ``N`` (no ``N x N`` block-diagonal mask). ``window > 0``: query ``i`` sees only the keys
    ``i - window < j <= i`` (transformers' sliding window: ``window`` keys including its own).
    """
    Nq, N = q.shape[1], k.shape[1]
    if Nq > N:
        raise ValueError(f"q has {Nq} positions but k only {N}: queries must be the last Nq <= N keys")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if cu_seqlens is None:
        return _causal_sdpa(qt, kt, vt, scale, gqa, window).transpose(1, 2)
    bounds, first = cu_seqlens.tolist(), N - Nq
    parts = [
        _causal_sdpa(qt[:, :, max(s, first) - first:e - first], kt[:, :, s:e], vt[:, :, s:e], scale, gqa, window)
        for s, e in zip(bounds[:-1], bounds[1:]) if e > max(s, first)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)
