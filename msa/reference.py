"""MiniMax Sparse Attention (MSA), the reference math: the oracle every kernel is tested against.

Plain PyTorch, fp32 arithmetic, dense ``N x N`` intermediates: obviously correct, not fast. The
contract, with these shapes:

- ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]``; query head ``h`` belongs to GQA group ``h // G``
  with ``G = H // Hkv``.
- ``q_idx [B, N, Hkv, Di]`` (one index-query head per group), ``k_idx [B, N, Di]`` (one index-key
  head shared by all groups).
- ``block_idx`` int32 ``[B, Hkv, N, topk]``: the key blocks each (query, group) attends to, valid
  entries first in descending index score, ``-1`` in unused slots, no duplicates.
- ``cu_seqlens`` (int32 ``[n_docs + 1]``, flash-attn convention, ``B == 1``): packed documents never
  see each other, and each document counts its blocks from its own first token, so a block id in
  ``block_idx`` is relative to the query's document: block ``b`` of a query in the document that
  starts at ``s`` covers tokens ``[s + b*Bk, s + (b+1)*Bk)`` of that document.

Queries may be the last ``Nq <= N`` positions of the key sequence (``q [B, Nq, H, D]``, bottom-right
aligned, as context parallelism needs: a rank's query chunk against the gathered keys before it);
``cu_seqlens`` then describes the key sequence. ``lse`` is returned for the index-distillation teacher
and carries no gradient (as in the kernels).
"""

from __future__ import annotations

import math

import torch

__all__ = ["select_blocks", "sparse_attention", "index_kl_loss", "index_recall", "doc_layout", "kl_rows"]


def doc_layout(B: int, N: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its document id and its position inside that document, both ``[B, N]`` int64."""
    arange = torch.arange(N, device=device)
    if cu_seqlens is None:
        return torch.zeros(B, N, dtype=torch.long, device=device), arange.expand(B, N)
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if cu.ndim != 1 or cu[0] != 0 or cu[-1] != N or (lengths < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {cu.tolist()}")
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return doc[None], (arange - cu[doc])[None]


def _visible(doc: torch.Tensor, pos: torch.Tensor, Nq: int) -> torch.Tensor:
    """``[B, Nq, N]`` bool: key ``j`` is visible to query ``i`` (same document, ``j <= i``); the
    queries are the last ``Nq`` positions."""
    doc_q, pos_q = doc[:, -Nq:], pos[:, -Nq:]
    same_doc = doc_q[:, :, None] == doc[:, None, :]
    causal = pos[:, None, :] <= pos_q[:, :, None]
    return same_doc & causal


def _selected_support(block_idx: torch.Tensor, blk: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``[B, Hkv, Nq, N]`` bool: key ``j``'s block is among the blocks ``block_idx`` lists for query ``i``."""
    B, Hkv, Nq, _ = block_idx.shape
    N = blk.shape[1]
    idx = block_idx.long()
    if (idx < -1).any() or (idx >= n_blocks).any():
        raise ValueError(f"block_idx entries must lie in [-1, {n_blocks}), got {idx.min()}..{idx.max()}")
    chosen = torch.zeros(B, Hkv, Nq, n_blocks + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # column n_blocks soaks up -1
    return chosen.gather(-1, blk[:, None, None, :].expand(B, Hkv, Nq, N))


def _support(B, Nq, N, Hkv, block_idx, block_size, cu_seqlens, device) -> torch.Tensor:
    """``[B, Hkv, Nq, N]`` bool: the keys each (group, query) attends to."""
    doc, pos = doc_layout(B, N, cu_seqlens, device)
    visible = _visible(doc, pos, Nq)[:, None]
    if block_idx is None:
        return visible.expand(B, Hkv, Nq, N)
    n_blocks = math.ceil(N / block_size)
    return visible & _selected_support(block_idx, pos // block_size, n_blocks)


def _masked_log_softmax(s: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of ``s`` over the ``allowed`` entries of the last dim, and its log-normaliser.

    Rows with nothing allowed get ``lse = -inf``; every output and gradient stays finite (no NaN from
    ``exp(-inf - -inf)``)."""
    masked = s.masked_fill(~allowed, float("-inf"))
    m = masked.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(masked - m).sum(-1, keepdim=True)
    nonempty = total > 0
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    logp = s - torch.where(nonempty, lse, torch.zeros_like(lse))
    return logp, lse.squeeze(-1)


def _check(q, k, v=None):
    B, Nq, H, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[1] < Nq or k.shape[-1] != D:
        raise ValueError(f"k must be [B, N >= Nq, Hkv, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must match k {tuple(k.shape)}, got {tuple(v.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={k.shape[2]}")
    return B, Nq, k.shape[1], H, k.shape[2], D


@torch.no_grad()
def select_blocks(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k key blocks per (query, group) by raw max-pooled index score.

    ``q_idx [B, N, Hkv, Di]``, ``k_idx [B, N, Di]`` -> ``block_idx`` int32 ``[B, Hkv, N, topk]``.
    Score ``S[r, i, j] = q_idx[i, r] . k_idx[j] / sqrt(Di)`` for visible ``j``; block score is the max
    over the block's visible tokens (``-inf`` when it has none). The query's own block always takes the
    first slot; the rest follow by descending score, ties to the lower block id; ``-1`` fills the slots
    left when fewer than ``topk`` blocks are visible.
    """
    B, Nq, Hkv, Di = q_idx.shape
    N = k_idx.shape[1]
    if k_idx.ndim != 3 or k_idx.shape[0] != B or N < Nq or k_idx.shape[2] != Di:
        raise ValueError(f"k_idx must be [B, N >= Nq, Di] for q_idx {tuple(q_idx.shape)}, got {tuple(k_idx.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    doc, pos = doc_layout(B, N, cu_seqlens, q_idx.device)
    visible = _visible(doc, pos, Nq)[:, None]  # [B, 1, Nq, N]
    s = torch.einsum("bird,bjd->brij", q_idx.float(), k_idx.float()) / math.sqrt(Di)
    s = s.masked_fill(~visible, float("-inf"))
    n_blocks = math.ceil(N / block_size)
    blk = pos // block_size
    m = torch.full((B, Hkv, Nq, n_blocks), float("-inf"), device=q_idx.device)
    m = m.scatter_reduce(-1, blk[:, None, None, :].expand(B, Hkv, Nq, N), s, reduce="amax")
    own = blk[:, None, -Nq:, None].expand(B, Hkv, Nq, 1)
    m = m.scatter(-1, own, float("inf"))
    score, order = torch.sort(m, dim=-1, descending=True, stable=True)
    kept = min(topk, n_blocks)
    out = torch.where(score[..., :kept] > float("-inf"), order[..., :kept], -1)
    if kept < topk:
        out = torch.cat([out, out.new_full((B, Hkv, Nq, topk - kept), -1)], dim=-1)
    return out.to(torch.int32).contiguous()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                     block_size: int, cu_seqlens: torch.Tensor | None = None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of each query over the visible tokens of its selected blocks.

    ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]``, ``block_idx`` int32 ``[B, Hkv, N, topk]`` ->
    ``o [B, N, H, D]`` (dtype of ``q``) and ``lse [B, H, N]`` float32 (natural log, no gradient).
    A query whose support is empty gets ``o = 0`` and ``lse = -inf``. ``scale`` defaults to
    ``1/sqrt(D)``.
    """
    B, Nq, N, H, Hkv, D = _check(q, k, v)
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    allowed = _support(B, Nq, N, Hkv, block_idx, block_size, cu_seqlens, q.device)
    allowed = allowed.repeat_interleave(G, dim=1)  # [B, H, Nq, N]
    kh = k.float().repeat_interleave(G, dim=2)
    vh = v.float().repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kh) * scale
    logp, lse = _masked_log_softmax(s, allowed)
    p = torch.exp(logp).masked_fill(~allowed, 0.0)
    o = torch.einsum("bhij,bjhd->bihd", p, vh)
    return o.to(q.dtype), lse.detach()


@torch.no_grad()
def _teacher(q, k, allowed, scale, lse=None):
    """``[B, Hkv, Nq, N]``: the mean over each group's heads of the main softmax on the support,
    normalised by ``lse [B, H, Nq]`` when given (the main forward's), else computed here."""
    B, Nq, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float().repeat_interleave(G, dim=2)) * scale
    logp, _ = _masked_log_softmax(s, allowed.repeat_interleave(G, dim=1))
    if lse is not None:
        logp = s - lse.float().nan_to_num(neginf=0.0)[..., None]
    p = torch.exp(logp).masked_fill(~allowed.repeat_interleave(G, dim=1), 0.0)
    return p.view(B, Hkv, G, Nq, N).mean(2)


def kl_rows(N: int, Nq: int, stride: int, offset: int, device=None) -> torch.Tensor:
    """``[Nq]`` bool: the queries (the last ``Nq`` of ``N`` positions) whose KL rows a strided index loss
    counts, those at positions ``p`` with ``p % stride == offset % stride``."""
    if stride < 1:
        raise ValueError(f"the KL's query stride must be >= 1, got {stride} (attention.kl_query_stride)")
    return torch.arange(N - Nq, N, device=device) % stride == offset % stride


def index_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                  block_idx: torch.Tensor | None, block_size: int,
                  cu_seqlens: torch.Tensor | None = None, *, lse: torch.Tensor | None = None,
                  query_stride: int = 1, query_offset: int = 0) -> torch.Tensor:
    """Index distillation loss ``1/(B*N*Hkv) * sum_{b,i,r} KL(P[r,i,:] || Q[r,i,:])``.

    Support ``T``: the visible tokens of the blocks in ``block_idx`` (sparse phase) or, with
    ``block_idx=None``, every visible token (dense warm-up). Teacher ``P``: mean over the group's ``G``
    heads of ``softmax_T(q . k / sqrt(D))``, detached. Student ``Q = softmax_T(q_idx . k_idx / sqrt(Di))``.
    Gradients reach only ``q_idx`` and ``k_idx``. Returns a float32 scalar (``N``: the query count).
    ``lse [B, H, Nq]``, the main forward's log-normaliser on the same support, may stand in for the
    teacher's own (the sparse phase needs no second pass over the keys).

    ``query_stride = s > 1`` counts the rows of the queries at positions ``p % s == query_offset % s``
    only (``kl_rows``), times ``s``: ``s`` times fewer teacher products, and over the ``s`` offsets the mean
    of the losses and of their gradients is the full loss's (``attention.kl_query_stride``).
    """
    B, Nq, N, H, Hkv, D = _check(q, k)
    Di = q_idx.shape[-1]
    allowed = _support(B, Nq, N, Hkv, block_idx, block_size, cu_seqlens, q.device)
    if query_stride != 1:
        allowed = allowed & kl_rows(N, Nq, query_stride, query_offset, q.device)[:, None]
    p = _teacher(q.detach(), k.detach(), allowed, D ** -0.5, lse)
    s = torch.einsum("bird,bjd->brij", q_idx.float(), k_idx.float()) / math.sqrt(Di)
    logq, _ = _masked_log_softmax(s, allowed)
    cross = torch.where(allowed, p * logq, torch.zeros_like(logq))
    kl = torch.special.xlogy(p, p) - cross
    return kl.sum() * query_stride / (B * Nq * Hkv)


@torch.no_grad()
def index_recall(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor, block_size: int,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (batch, query, group) of the dense teacher's mass that falls in the selected blocks:
    the indexer's health metric (1.0 = the selection holds all the attention the group pays)."""
    B, Nq, N, H, Hkv, D = _check(q, k)
    dense = _support(B, Nq, N, Hkv, None, block_size, cu_seqlens, q.device)
    p = _teacher(q, k, dense, D ** -0.5)
    chosen = _support(B, Nq, N, Hkv, block_idx, block_size, cu_seqlens, q.device)
    return (p * chosen).sum(-1).mean()
