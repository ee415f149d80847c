"""The reference MSA ops (``msa.reference``) on packed rows, a group of whole documents at a time.

The reference builds ``[B, Hkv, Nq, N]`` masks and scores over the whole packed sequence, while a token
sees only its own document: on the trainer's packed batches (``B x seq_len`` tokens flattened into one
row) that is ``(B * seq_len)^2`` work, almost all of it masked. Documents are independent in every MSA
quantity (blocks count from a document's start, visibility stops at its ends), so running the reference
on consecutive groups of whole documents of at most ``chunk`` tokens (a longer document alone) and joining
the results gives the same selection, output, log-normaliser and KL, at the cost of the groups' squares.
The KL, a mean over queries, is the groups' means weighted by their query counts.

``attention.impl=reference`` (and ``auto`` on a CPU) trains through these; the tests compare them with
``msa.reference`` itself, which stays the oracle. Rows that cannot be split (no ``cu_seqlens``, a batch
of several rows, fewer queries than keys as under context parallelism, or one group) go to the reference
unchanged.
"""

from __future__ import annotations

import torch

from msa import reference

CHUNK = 1024  # tokens per group of whole documents (a longer document is a group of its own)


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


def _cu(cu_seqlens: torch.Tensor, a: int, d0: int, d1: int) -> torch.Tensor:
    """The boundaries of documents ``d0`` to ``d1`` (exclusive), from their first token ``a``."""
    return cu_seqlens[d0:d1 + 1] - a


def select_blocks(q_idx, k_idx, block_size: int, topk: int, cu_seqlens=None, *, chunk: int = CHUNK):
    """``msa.reference.select_blocks``, a group of documents at a time."""
    groups = _split(q_idx.shape[0], q_idx.shape[1], k_idx.shape[1], cu_seqlens, chunk)
    if groups is None:
        return reference.select_blocks(q_idx, k_idx, block_size, topk, cu_seqlens)
    return torch.cat([reference.select_blocks(q_idx[:, a:b], k_idx[:, a:b], block_size, topk,
                                              _cu(cu_seqlens, a, d0, d1))
                      for a, b, d0, d1 in groups], dim=2)


def sparse_attention(q, k, v, block_idx, block_size: int, cu_seqlens=None, scale=None, *, chunk: int = CHUNK):
    """``msa.reference.sparse_attention``, a group of documents at a time."""
    groups = _split(q.shape[0], q.shape[1], k.shape[1], cu_seqlens, chunk)
    if groups is None:
        return reference.sparse_attention(q, k, v, block_idx, block_size, cu_seqlens, scale)
    outs = [reference.sparse_attention(q[:, a:b], k[:, a:b], v[:, a:b], block_idx[:, :, a:b], block_size,
                                       _cu(cu_seqlens, a, d0, d1), scale) for a, b, d0, d1 in groups]
    return torch.cat([o for o, _ in outs], dim=1), torch.cat([lse for _, lse in outs], dim=2)


def index_kl_loss(q, k, q_idx, k_idx, block_idx, block_size: int, cu_seqlens=None, *, lse=None,
                  chunk: int = CHUNK):
    """``msa.reference.index_kl_loss``: each group's mean KL weighted by its share of the queries."""
    N = k.shape[1]
    groups = _split(q.shape[0], q.shape[1], N, cu_seqlens, chunk)
    if groups is None:
        return reference.index_kl_loss(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse=lse)
    total = 0
    for a, b, d0, d1 in groups:
        kl = reference.index_kl_loss(q[:, a:b], k[:, a:b], q_idx[:, a:b], k_idx[:, a:b],
                                     None if block_idx is None else block_idx[:, :, a:b], block_size,
                                     _cu(cu_seqlens, a, d0, d1), lse=None if lse is None else lse[:, :, a:b])
        total = total + kl * ((b - a) / N)
    return total


__all__ = ["CHUNK", "document_groups", "select_blocks", "sparse_attention", "index_kl_loss"]
