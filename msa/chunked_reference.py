"""The reference MSA ops (``msa.reference``) on packed rows, a group of whole documents at a time.

The reference builds ``[B, Hkv, Nq, N]`` masks and scores over the whole packed sequence, while a token
sees only its own document: on the trainer's packed batches (``B x seq_len`` tokens flattened into one
row) that is ``(B * seq_len)^2`` work, almost all of it masked. Documents are independent in every MSA
quantity (blocks count from a document's start, visibility stops at its ends), so running the reference
on consecutive groups of whole documents of at most ``chunk`` tokens (a longer document alone) and joining
the results gives the same selection, output, log-normaliser and KL, at the cost of the groups' squares.
The KL, a mean over queries, is the groups' means weighted by their query counts.

Rows without ``cu_seqlens`` (one document each) run in query chunks when their score tensors would
pass ``max_scores`` entries: a chunk of queries sees the keys up to its last query, each query the same
keys as in the whole row, so the results are the reference's; the KL weights each chunk's mean by its
share of the queries. Held whole, an eval's 16 rows of 4K tokens on the `tiny` model took 20 GB of
host memory (fp32 ``[B, H, Nq, N]`` scores, several of them live), past this machine's 24.

``attention.impl=reference`` (and ``auto`` on a CPU) trains through these; the tests compare them with
``msa.reference`` itself, which stays the oracle. Rows that cannot be split (packed rows of a batch of
several rows, fewer queries than keys as under context parallelism, or one group; one-document rows
under ``max_scores``) go to the reference unchanged.
"""

from __future__ import annotations

import torch

from msa import reference

CHUNK = 1024  # tokens per group of whole documents (a longer document is a group of its own)
MAX_SCORES = 1 << 26  # score entries (B * heads * queries * keys) of one reference call on one-document rows


def document_groups(cu_seqlens: torch.Tensor, chunk: int = CHUNK) -> list[tuple[int, int, int, int]]:
    """Consecutive groups of whole documents of at most ``chunk`` tokens (a longer document alone):
    ``(first token, end token, first document, end document)`` each. One device-to-host read."""
    cu = cu_seqlens.tolist()
    groups, first = [], 0
    for d in range(len(cu) - 1):  # document d: tokens cu[d] to cu[d + 1]
        if d > first and cu[d + 1] - cu[first] > chunk:  # it would overflow the group: close the group before it
            groups.append((cu[first], cu[d], first, d))
            first = d
    groups.append((cu[first], cu[-1], first, len(cu) - 1))
    return [g for g in groups if g[1] > g[0]]


def _split(B: int, Nq: int, N: int, cu_seqlens, chunk: int):
    """The groups to run, or None where the reference runs the row whole."""
    if cu_seqlens is None or B != 1 or Nq != N:
        return None
    groups = document_groups(cu_seqlens, chunk)
    return groups if len(groups) > 1 else None


def _query_chunks(B: int, H: int, Nq: int, N: int, cu_seqlens, max_scores: int):
    """Query ranges ``(a, b)`` of one-document rows whose ``[B, H, Nq, N]`` scores pass ``max_scores``
    entries, each under it (one query at least); None where the reference runs the rows whole."""
    if cu_seqlens is not None or B * H * Nq * N <= max_scores:
        return None
    step = max(1, max_scores // (B * H * N))
    return [(a, min(a + step, Nq)) for a in range(0, Nq, step)]


def _cu(cu_seqlens: torch.Tensor, a: int, d0: int, d1: int) -> torch.Tensor:
    """The boundaries of documents ``d0`` to ``d1`` (exclusive), from their first token ``a``."""
    return cu_seqlens[d0:d1 + 1] - a


def select_blocks(q_idx, k_idx, block_size: int, topk: int, cu_seqlens=None, *, chunk: int = CHUNK,
                  max_scores: int = MAX_SCORES):
    """``msa.reference.select_blocks``, a group of documents (or of queries) at a time."""
    B, Nq, Hkv, _ = q_idx.shape
    N = k_idx.shape[1]
    queries = _query_chunks(B, Hkv, Nq, N, cu_seqlens, max_scores)
    if queries is not None:  # a query sees the keys up to itself: those up to its chunk's last query
        return torch.cat([reference.select_blocks(q_idx[:, a:b], k_idx[:, :N - Nq + b], block_size, topk)
                          for a, b in queries], dim=2)
    groups = _split(B, Nq, N, cu_seqlens, chunk)
    if groups is None:
        return reference.select_blocks(q_idx, k_idx, block_size, topk, cu_seqlens)
    return torch.cat([reference.select_blocks(q_idx[:, a:b], k_idx[:, a:b], block_size, topk,
                                              _cu(cu_seqlens, a, d0, d1))
                      for a, b, d0, d1 in groups], dim=2)


def sparse_attention(q, k, v, block_idx, block_size: int, cu_seqlens=None, scale=None, *, chunk: int = CHUNK,
                     max_scores: int = MAX_SCORES):
    """``msa.reference.sparse_attention``, a group of documents (or of queries) at a time."""
    B, Nq, H, _ = q.shape
    N = k.shape[1]
    queries = _query_chunks(B, H, Nq, N, cu_seqlens, max_scores)
    if queries is not None:
        outs = [reference.sparse_attention(q[:, a:b], k[:, :N - Nq + b], v[:, :N - Nq + b], block_idx[:, :, a:b],
                                           block_size, None, scale) for a, b in queries]
        return torch.cat([o for o, _ in outs], dim=1), torch.cat([lse for _, lse in outs], dim=2)
    groups = _split(B, Nq, N, cu_seqlens, chunk)
    if groups is None:
        return reference.sparse_attention(q, k, v, block_idx, block_size, cu_seqlens, scale)
    outs = [reference.sparse_attention(q[:, a:b], k[:, a:b], v[:, a:b], block_idx[:, :, a:b], block_size,
                                       _cu(cu_seqlens, a, d0, d1), scale) for a, b, d0, d1 in groups]
    return torch.cat([o for o, _ in outs], dim=1), torch.cat([lse for _, lse in outs], dim=2)


def index_kl_loss(q, k, q_idx, k_idx, block_idx, block_size: int, cu_seqlens=None, *, lse=None,
                  query_stride: int = 1, query_offset: int = 0, chunk: int = CHUNK, max_scores: int = MAX_SCORES):
    """``msa.reference.index_kl_loss``: each group's (or query chunk's) mean KL weighted by its share of the
    queries. A strided loss keeps its queries' positions in the row: a query chunk's are the row's (its keys
    start at the row's), a document group's are shifted by the group's first token."""
    B, Nq, H, _ = q.shape
    N = k.shape[1]
    queries = _query_chunks(B, H, Nq, N, cu_seqlens, max_scores)
    if queries is not None:
        total = 0
        for a, b in queries:
            kl = reference.index_kl_loss(q[:, a:b], k[:, :N - Nq + b], q_idx[:, a:b], k_idx[:, :N - Nq + b],
                                         None if block_idx is None else block_idx[:, :, a:b], block_size,
                                         lse=None if lse is None else lse[:, :, a:b], query_stride=query_stride,
                                         query_offset=query_offset)
            total = total + kl * ((b - a) / Nq)
        return total
    groups = _split(B, Nq, N, cu_seqlens, chunk)
    if groups is None:
        return reference.index_kl_loss(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse=lse,
                                       query_stride=query_stride, query_offset=query_offset)
    total = 0
    for a, b, d0, d1 in groups:
        kl = reference.index_kl_loss(q[:, a:b], k[:, a:b], q_idx[:, a:b], k_idx[:, a:b],
                                     None if block_idx is None else block_idx[:, :, a:b], block_size,
                                     _cu(cu_seqlens, a, d0, d1), lse=None if lse is None else lse[:, :, a:b],
                                     query_stride=query_stride, query_offset=query_offset - a)
        total = total + kl * ((b - a) / N)
    return total


__all__ = ["CHUNK", "MAX_SCORES", "document_groups", "select_blocks", "sparse_attention", "index_kl_loss"]
