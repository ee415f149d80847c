"""Selection statistics of an MSA layer: how much of the dense attention the indexer's blocks hold
(index recall) and how many visible keys they skip (sparsity).

Both are kept as sums over (query, group) pairs, so the shards of a sequence (Ulysses groups,
context-parallel chunks), the micro-batches of a step and the layers of a model combine by addition;
the ratios are taken once, at the end (``train/metrics.py``).

Index recall is measured only on queries with more than ``topk`` visible blocks: a query that sees
at most ``topk`` blocks keeps all of them, so its recall is 1 by construction and would only dilute
the number. For a sampled query ``i`` of group ``r`` the recall is the teacher's mass in the selection,
``mean_h sum_{j in selected blocks} softmax_{j visible}(q[i,h] . k[j] / sqrt(D))``, computed exactly
as ``mean_h exp(lse_selected - lse_visible)`` over key chunks (no ``N x N`` scores).

The oracle recall is the most any selection of ``topk`` blocks (the query's own block among them, as
``select_blocks`` forces it) could hold for the same queries: the own block's mass plus the ``topk - 1``
largest other block masses of the group's head-mean teacher. ``index_recall / oracle_recall`` separates
an indexer that misses the heavy blocks from a teacher whose mass is spread over more blocks than ``topk``
(then no selection reaches a high recall). ``oracle_recall_2x`` is the same for ``2 * topk`` blocks: what
twice the selection could hold, so whether raising ``attention.topk`` would lift the ceiling.

The tile union measures how local the selection is, for the kernels' design: split each group's queries
into tiles of ``tile_rows // G`` consecutive queries (``tile_rows`` gathered (query, head) rows, the forward
kernel's tile) and count the distinct blocks the tile's queries select together. ``tile_union`` is the
(query, block) pairs a kernel over each tile's union of blocks would compute (queries in the tile x blocks
in its union), per (query, block) pair selected: 1 when a tile's queries select the same blocks, up to the
tile's query count when they share none. It counts whole blocks, as a block-tiled kernel computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msa import reference

FIELDS = ("recall_mass", "recall_rows", "kept", "visible", "nontrivial", "rows", "oracle_mass", "oracle2_mass",
          "tile_work", "selected")


@dataclass
class SelectionStats:
    """``sums [8]`` float64, in ``FIELDS`` order: teacher mass in the selection summed over the sampled
    non-trivial (query, group) pairs, how many were sampled; visible (query, group, key) triples kept by
    the selection, all visible triples; (query, group) pairs with more than ``topk`` visible blocks,
    all (query, group) pairs; the teacher mass of the best ``topk`` blocks over the same sampled pairs,
    and of the best ``2 * topk`` blocks; (query, block) pairs of a kernel over each query tile's union of
    selected blocks, and (query, group, block) entries selected."""

    sums: torch.Tensor

    def __add__(self, other: SelectionStats) -> SelectionStats:
        return SelectionStats(self.sums + other.sums.to(self.sums.device))

    @staticmethod
    def pooled(stats: list[SelectionStats]) -> SelectionStats:
        """The sums over several layers (or shards): what an overall ratio is taken from."""
        return SelectionStats(torch.stack([s.sums for s in stats]).sum(0))

    def ratios(self) -> dict[str, float | None]:
        """``index_recall``, ``oracle_recall``, ``oracle_recall_2x``, ``sparsity``, ``nontrivial_share`` and
        ``tile_union`` (None where nothing was counted)."""
        s = dict(zip(FIELDS, self.sums.tolist()))
        return {
            "index_recall": s["recall_mass"] / s["recall_rows"] if s["recall_rows"] else None,
            "oracle_recall": s["oracle_mass"] / s["recall_rows"] if s["recall_rows"] else None,
            "oracle_recall_2x": s["oracle2_mass"] / s["recall_rows"] if s["recall_rows"] else None,
            "sparsity": 1.0 - s["kept"] / s["visible"] if s["visible"] else None,
            "nontrivial_share": s["nontrivial"] / s["rows"] if s["rows"] else None,
            "tile_union": s["tile_work"] / s["selected"] if s["selected"] else None,
        }


@torch.no_grad()
def selection_stats(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor, block_size: int, topk: int,
                    cu_seqlens: torch.Tensor | None = None, n_recall: int = 256,
                    key_chunk: int = 8192, tile_rows: int = 64) -> SelectionStats:
    """Stats of the selection ``block_idx [B, Hkv, Nq, topk]`` for ``q [B, Nq, H, D]`` against
    ``k [B, N, Hkv, D]`` (the queries are the last ``Nq <= N`` positions).

    Recall is measured on up to ``n_recall`` evenly spaced non-trivial queries (per batch row and
    group); sparsity and the tile union count every query."""
    B, Nq, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    doc, pos = reference.doc_layout(B, N, cu_seqlens, q.device)
    pos_q = pos[:, -Nq:]
    idx = block_idx.long()
    # visible keys of each selected block: the whole block, or up to the query for its own block
    kept = ((pos_q[:, None, :, None] - idx * block_size + 1).clamp(0, block_size) * (idx >= 0)).sum()
    visible = (pos_q + 1).sum() * Hkv
    nontrivial = pos_q // block_size + 1 > topk  # [B, Nq]
    mass = torch.zeros((), dtype=torch.float64, device=q.device)
    oracle = torch.zeros(2, dtype=torch.float64, device=q.device)  # best topk, best 2 * topk blocks
    sampled = 0
    for b in range(B):
        rows = nontrivial[b].nonzero().squeeze(1)
        if len(rows) > n_recall:
            rows = rows[torch.linspace(0, len(rows) - 1, n_recall, device=q.device).long()]
        if len(rows) == 0:
            continue
        at = N - Nq + rows
        lse_all, lse_sel = _row_lse(q[b, rows], k[b], doc[b], pos[b], at, idx[b][:, rows], block_size, key_chunk)
        # [n, H] -> mean over each group's G heads, summed over rows and groups
        mass += torch.exp(lse_sel - lse_all).view(len(rows), Hkv, G).mean(-1).sum().double()
        oracle += _row_oracle(q[b, rows], k[b], doc[b], pos[b], at, lse_all, block_size, topk, key_chunk).sum((0, 1))
        sampled += len(rows) * Hkv
    sums = torch.stack([mass, torch.tensor(float(sampled), dtype=torch.float64, device=q.device),
                        kept.double(), visible.double(), nontrivial.sum().double() * Hkv,
                        torch.tensor(float(B * Nq * Hkv), dtype=torch.float64, device=q.device), *oracle,
                        *_tile_union(block_idx, max(1, tile_rows // G))])
    return SelectionStats(sums)


def _chunks(q, k, doc, pos, at, key_chunk):
    """``(j, vis, s)`` per chunk of keys ``j``: ``vis [n, c]`` the keys each row ``q [n, H, D]`` (key
    positions ``at [n]``) may see, ``s [n, H, c]`` the scores of every head against its group's keys."""
    n, H, D = q.shape
    N, Hkv = k.shape[0], k.shape[1]
    head_group = torch.arange(H, device=q.device) // (H // Hkv)
    for j0 in range(0, N, key_chunk):
        j = torch.arange(j0, min(j0 + key_chunk, N), device=q.device)
        vis = (doc[j][None] == doc[at][:, None]) & (pos[j][None] <= pos[at][:, None]) & (j[None] <= at[:, None])
        yield j, vis, torch.einsum("nhd,chd->nhc", q.float(), k[j].float()[:, head_group]) * D ** -0.5


def _row_lse(q, k, doc, pos, at, idx, block_size, key_chunk):
    """Log-normalisers of rows ``q [n, H, D]`` (key positions ``at [n]``) over their visible keys and
    over the visible keys of their group's selected blocks ``idx [Hkv, n, topk]``: ``[n, H]`` each."""
    n, H, _ = q.shape
    G = H // k.shape[1]
    lse_all = q.new_full((n, H), float("-inf"), dtype=torch.float32)
    lse_sel = lse_all.clone()
    head_group = torch.arange(H, device=q.device) // G
    for j, vis, s in _chunks(q, k, doc, pos, at, key_chunk):
        # [Hkv, n, c] the visible keys in the group's selected blocks
        chosen = (pos[j] // block_size == idx[..., None]).any(-2) & vis
        lse_all = torch.logaddexp(lse_all, s.masked_fill(~vis[:, None], float("-inf")).logsumexp(-1))
        sel = chosen.permute(1, 0, 2)[:, head_group]  # [n, H, c]
        lse_sel = torch.logaddexp(lse_sel, s.masked_fill(~sel, float("-inf")).logsumexp(-1))
    return lse_all, lse_sel


def _row_oracle(q, k, doc, pos, at, lse_all, block_size, topk, key_chunk):
    """``[n, Hkv, 2]``: for each row and group the most teacher mass (head mean) any ``topk`` blocks hold,
    the row's own block among them (the own block's mass plus the ``topk - 1`` largest others), and the
    same for ``2 * topk`` blocks."""
    n, H, _ = q.shape
    Hkv = k.shape[1]
    n_blocks = int(pos.max()) // block_size + 1
    block_mass = q.new_zeros((n, H, n_blocks), dtype=torch.float32)
    for j, vis, s in _chunks(q, k, doc, pos, at, key_chunk):
        p = torch.exp(s - lse_all[..., None]).masked_fill(~vis[:, None], 0.0)
        block_mass.index_add_(2, pos[j] // block_size, p)
    group = block_mass.view(n, Hkv, H // Hkv, n_blocks).mean(2)  # [n, Hkv, blocks]
    own = (pos[at] // block_size)[:, None, None].expand(n, Hkv, 1)
    # the own block first (forced), then the others by mass, largest first
    ranked = group.scatter(2, own, float("inf")).topk(min(2 * topk, n_blocks), dim=2).indices
    best = group.gather(2, ranked).double()
    return torch.stack([best[..., :topk].sum(2), best.sum(2)], dim=2)


def _tile_union(idx: torch.Tensor, T: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_work, selected)`` of ``idx [B, Hkv, Nq, topk]`` (-1: no block) in tiles of ``T`` queries:
    the sum over tiles of (queries in the tile x distinct blocks its queries select), and the selected
    entries. Takes about ``chunk`` queries at a time (a 1M-token row's selection sorted at once would
    need gigabytes)."""
    B, Hkv, Nq, topk = idx.shape
    work = torch.zeros((), dtype=torch.float64, device=idx.device)
    step = max(T, chunk // T * T)
    for q0 in range(0, Nq, step):
        part = idx[:, :, q0:q0 + step]
        n = part.shape[2]
        n_tiles = -(-n // T)
        pad = part.new_full((B, Hkv, n_tiles * T - n, topk), -1)
        tiles = torch.cat([part, pad], 2).reshape(B, Hkv, n_tiles, T * topk).sort(-1).values
        first = torch.ones_like(tiles, dtype=torch.bool)
        first[..., 1:] = tiles[..., 1:] != tiles[..., :-1]
        union = ((tiles >= 0) & first).sum(-1)  # [B, Hkv, n_tiles]
        queries = torch.full((n_tiles,), T, device=idx.device)
        queries[-1] = n - (n_tiles - 1) * T
        work += (union * queries).sum().double()
    return work, (idx >= 0).sum().double()


__all__ = ["FIELDS", "SelectionStats", "selection_stats"]
