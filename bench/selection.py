"""Block selections for the attention benchmarks, and the FlexAttention block mask of a selection.

Synthetic patterns (one sequence, no ``cu_seqlens``; block ``b`` holds keys ``[b*Bk, (b+1)*Bk)``; every
query keeps its own block, as the contract's selection does, in slot 0):
- ``same``: every query picks the same blocks ``0 .. topk-2`` plus its own (the most concentrated
  selection: ``topk - 1`` hot blocks that every query of the sequence reads);
- ``local``: its own block and the ``topk - 1`` blocks before it;
- ``sink_local``: its own block, block 0 (the sink) and the ``topk - 2`` blocks before its own.
A query with fewer than ``topk`` visible blocks takes all of them (then the three agree). ``pool_selection``
draws selections of a chosen tile union (``msa/stats.py``): each tile of queries picks from one pool of
blocks. Valid entries come first without duplicates, unused slots are ``-1``: the layout of
``select_blocks``. ``random`` (the selection of ``select_blocks`` on random index inputs) is made by
``bench/msa_attention.py``.
"""

from __future__ import annotations

import torch

PATTERNS = ("same", "local", "sink_local")


def pattern_blocks(name: str, N: int, Hkv: int, block_size: int, topk: int, device="cpu") -> torch.Tensor:
    """``block_idx [1, Hkv, N, topk]`` int32 of pattern ``name`` (one of ``PATTERNS``), the same for every
    group."""
    own = torch.arange(N, device=device) // block_size  # [N]
    local = own[:, None] - torch.arange(topk, device=device)[None]  # [N, topk]: own, own-1, ...
    local = torch.where(local >= 0, local, -1)
    if name == "local":
        sel = local
    elif name == "same":
        shared = (topk - 2 - torch.arange(topk - 1, device=device))[None].expand(N, -1)  # topk-2, ..., 0
        sel = torch.where((own <= topk - 2)[:, None], local, torch.cat([own[:, None], shared], 1))
    elif name == "sink_local":
        if topk < 2:
            raise ValueError("sink_local needs topk >= 2 (own block and sink)")
        # for own >= topk the local part own-1 .. own-(topk-2) stays above block 0: no duplicate
        rest = own[:, None] - 1 - torch.arange(topk - 2, device=device)[None]
        sink_local = torch.cat([own[:, None], torch.zeros_like(own)[:, None], rest], 1)
        sel = torch.where((own <= topk - 1)[:, None], local, sink_local)
    else:
        raise ValueError(f"unknown selection pattern {name!r}: use one of {PATTERNS}")
    return sel.to(torch.int32)[None, None].expand(1, Hkv, N, topk).contiguous()


def pool_selection(N: int, Hkv: int, topk: int, block_size: int, T: int, ratio: float, device, seed: int = 0):
    """``block_idx [1, Hkv, N, topk]``: per tile of ``T`` queries a pool of the own block and up to
    ``round(ratio * topk) - 1`` random visible blocks before it; each query its own block and ``topk - 1``
    random ones of the pool (all of them where the pool is smaller), ``-1`` in unused slots."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb = -(-N // block_size)
    n_t = -(-N // T)
    own_t = (torch.arange(n_t, device=device) * T) // block_size  # the tile's first query's block
    others = max(0, round(ratio * topk) - 1)
    # a pool per (group, tile): the `others` highest random scores among the visible earlier blocks
    score = torch.rand(Hkv, n_t, nb, device=device, generator=g)
    score = score.masked_fill(torch.arange(nb, device=device)[None, None] >= own_t[None, :, None], -1.0)
    pool_score, pool = score.topk(min(others, nb), -1)
    pool = torch.where(pool_score >= 0, pool, -1)  # [Hkv, n_t, P]
    pool = pool.repeat_interleave(T, 1)[:, :N]  # [Hkv, N, P]
    pick = torch.rand(pool.shape, device=device, generator=g).masked_fill(pool < 0, -1.0)
    order = pick.argsort(-1, descending=True)[..., :topk - 1]
    chosen = pool.gather(-1, order)
    own = (torch.arange(N, device=device) // block_size)[None, :, None].expand(Hkv, N, 1)
    # a query past the tile's first block (a tile across a block edge) keeps the earlier block as a pooled one
    idx = torch.cat([own, chosen], -1)
    if idx.shape[-1] < topk:
        idx = torch.cat([idx, idx.new_full((Hkv, N, topk - idx.shape[-1]), -1)], -1)
    dup = (idx[..., 1:] == idx[..., :1]) & (idx[..., 1:] >= 0)
    idx[..., 1:] = torch.where(dup, -1, idx[..., 1:])
    return idx[None].to(torch.int32).contiguous()


def support_sizes(block_idx: torch.Tensor, block_size: int) -> int:
    """``sum_{b,r,i} |T_ri|``: visible tokens of the selected blocks (no cu_seqlens)."""
    N = block_idx.shape[2]
    i = torch.arange(N, device=block_idx.device)[:, None]
    b = block_idx.long()
    own = i // block_size
    n = torch.where(b == own, i % block_size + 1, torch.where((b >= 0) & (b < own), block_size, 0))
    return int(n.sum())


def tile_blocks(block_idx: torch.Tensor, block_size: int, q_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile of ``q_tile`` queries and key block: ``(partial, full)`` bool ``[B, Hkv, n_tiles,
    n_blocks]``. ``full``: every query of the tile selected the block and sees all of its keys (no mask
    needed there); ``partial``: some query selected it, and it is not full."""
    B, Hkv, N, _ = block_idx.shape
    n_t, n_b = -(-N // q_tile), -(-N // block_size)
    dev = block_idx.device
    count = torch.zeros(B, Hkv, n_t, n_b + 1, dtype=torch.int32, device=dev)
    t_of_q = (torch.arange(N, device=dev) // q_tile)[None, None, :, None].expand_as(block_idx)
    flat = (t_of_q * (n_b + 1) + torch.where(block_idx < 0, n_b, block_idx)).reshape(B, Hkv, -1).long()
    count.view(B, Hkv, -1).scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.int32))
    count = count[..., :n_b]  # a query selects a block once, so this counts the tile's queries
    first_q = torch.arange(n_t, device=dev) * q_tile
    tile_len = (N - first_q).clamp(max=q_tile)
    last_key = (torch.arange(n_b, device=dev) + 1) * block_size - 1
    seen_by_all = last_key[None, :] <= first_q[:, None]  # [n_t, n_b]
    full = (count == tile_len[:, None]) & seen_by_all
    return (count > 0) & ~full, full


def flex_block_mask(block_idx: torch.Tensor, block_size: int, G: int, q_tile: int = 128):
    """A FlexAttention ``BlockMask`` for ``block_idx [B, Hkv, N, topk]``: per ``q_tile``-query tile the
    blocks every query selected and sees whole are full blocks (no ``mask_mod``), the other selected
    ones partial, with a ``mask_mod`` keeping key ``kv`` for query ``q`` of head ``h`` only if ``kv <= q``
    and its block is in ``block_idx[h // G, q]``. Per-token selections leave almost every tile's blocks
    partial; a tile-shared one (``local``) makes all but the diagonal block full."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, N, topk = block_idx.shape
    partial, full = tile_blocks(block_idx, block_size, q_tile)

    def kv_lists(m):
        counts = m.sum(-1, dtype=torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts.repeat_interleave(G, 1), order.repeat_interleave(G, 1)

    (pc, po), (fc, fo) = kv_lists(partial), kv_lists(full)
    idx = block_idx

    def mask_mod(b, h, q, kv):
        kb = kv // block_size
        hit = idx[b, h // G, q, 0] == kb
        for s in range(1, topk):
            hit = hit | (idx[b, h // G, q, s] == kb)
        return hit & (kv <= q)

    return BlockMask.from_kv_blocks(pc, po, fc, fo, BLOCK_SIZE=(q_tile, block_size), mask_mod=mask_mod,
                                    seq_lengths=(N, N))


__all__ = ["PATTERNS", "pattern_blocks", "pool_selection", "support_sizes", "tile_blocks", "flex_block_mask"]
