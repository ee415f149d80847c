"""Dense causal GQA attention through PyTorch SDPA, with packed documents (``cu_seqlens``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``q [B, N, H, D]`` over ``k, v [B, N, Hkv, D]`` -> ``o [B, N, H, D]``.

    With ``cu_seqlens`` (``B == 1``) each document attends only to itself: SDPA runs once per
    document, so memory stays linear in ``N`` (no ``N x N`` block-diagonal mask).
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if cu_seqlens is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    bounds = cu_seqlens.tolist()
    parts = [
        F.scaled_dot_product_attention(qt[:, :, s:e], kt[:, :, s:e], vt[:, :, s:e], is_causal=True,
                                       scale=scale, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:]) if e > s
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)
