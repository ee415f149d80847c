"""Index bookkeeping for the sparse-attention kernels, in plain torch on the inputs' device.

Two structures:

- the token layout: per token its document's first token (``tok_start``) and its key block inside
  the document; the *virtual blocks* ``[vb_start, vb_end)`` tile every document with ``block_size``
  keys from the document's start, so each token belongs to exactly one virtual block and the block
  id ``c`` of a query in the document starting at ``s`` names the virtual block ``vb_off(doc) + c``.
- the reverse CSR of ``block_idx``: every (batch, group, query, slot) entry whose block holds a key
  the query can see, grouped by (batch, group, virtual block) with a stable radix sort (the queries of
  a bucket stay in ascending order), and cut into work items of at most ``chunk`` entries so that a
  hot block (an attention sink that every query picks) is spread over many programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    tok_start: torch.Tensor  # [N] int32: first token of each token's document
    tok_vb: torch.Tensor  # [N] int64: virtual block id of block 0 of each token's document
    vb_start: torch.Tensor  # [NV] int32: first key of each virtual block
    vb_end: torch.Tensor  # [NV] int32: one past its last key
    n_blocks: int  # ceil(N / block_size): the valid range of block ids, as in the reference


@dataclass
class CSR:
    entries: torch.Tensor  # [E] int32: flat index ((b*Hkv + r)*NQ + i)*topk + slot, by bucket
    work_bucket: torch.Tensor  # [W] int32: bucket (b*Hkv + r)*NV + vb of each work item
    work_start: torch.Tensor  # [W] int32: its first entry
    work_end: torch.Tensor  # [W] int32: one past its last entry
    bucket_work: torch.Tensor  # [B*Hkv*NV + 1] int32: work items of bucket u are [bw[u], bw[u+1])
    n_work: int


def build_layout(N: int, block_size: int, cu_seqlens: torch.Tensor | None, device) -> Layout:
    n_blocks = -(-N // block_size)
    if cu_seqlens is None:
        vb_start = torch.arange(n_blocks, device=device, dtype=torch.int32) * block_size
        return Layout(torch.zeros(N, dtype=torch.int32, device=device),
                      torch.zeros(N, dtype=torch.long, device=device),
                      vb_start, (vb_start + block_size).clamp_max(N), n_blocks)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if cu.ndim != 1 or len(cu) < 2 or cu[0] != 0 or cu[-1] != N or (lengths < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {cu.tolist()}")
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=N)
    doc_nvb = (lengths + block_size - 1) // block_size
    doc_vb_off = torch.cumsum(doc_nvb, 0) - doc_nvb
    NV = int(doc_nvb.sum())
    vb_doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), doc_nvb, output_size=NV)
    vb_start = cu[vb_doc] + (torch.arange(NV, device=device) - doc_vb_off[vb_doc]) * block_size
    vb_end = torch.minimum(vb_start + block_size, cu[vb_doc + 1])
    return Layout(cu[doc].to(torch.int32), doc_vb_off[doc], vb_start.to(torch.int32),
                  vb_end.to(torch.int32), n_blocks)


def check_block_idx(block_idx: torch.Tensor, n_blocks: int) -> None:
    lo, hi = torch.aminmax(block_idx)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= n_blocks:
        raise ValueError(f"block_idx entries must lie in [-1, {n_blocks}), got {lo}..{hi}")


def build_csr(block_idx: torch.Tensor, layout: Layout, block_size: int, q0: int, chunk: int) -> CSR:
    """Reverse CSR of ``block_idx [B, Hkv, NQ, topk]`` whose queries sit at key positions ``q0 .. q0+NQ``;
    the entries index ``block_idx`` itself (flat, from 0)."""
    B, Hkv, NQ, topk = block_idx.shape
    device = block_idx.device
    NV = layout.vb_start.numel()
    n_buckets = B * Hkv * NV
    if B * Hkv * NQ * topk >= 2**31:
        raise ValueError(f"B*Hkv*N*topk = {B * Hkv * NQ * topk} entries overflow int32 indices")
    pos = torch.arange(q0, q0 + NQ, device=device) - layout.tok_start[q0:q0 + NQ]
    idx = block_idx.long()
    valid = (idx >= 0) & (idx * block_size <= pos[:, None])
    br = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1)
    bucket = br * NV + layout.tok_vb[q0:q0 + NQ, None] + idx
    bucket = torch.where(valid, bucket, n_buckets).flatten()
    order = torch.sort(bucket, stable=True).indices
    counts = torch.bincount(bucket, minlength=n_buckets + 1)[:n_buckets]
    offsets = torch.cumsum(counts, 0) - counts
    splits = (counts + chunk - 1) // chunk
    split_off = torch.cumsum(splits, 0)
    W = int(split_off[-1]) if n_buckets else 0
    split_off = split_off - splits
    work_bucket = torch.repeat_interleave(torch.arange(n_buckets, device=device), splits, output_size=W)
    k_in = torch.arange(W, device=device) - split_off[work_bucket]
    work_start = offsets[work_bucket] + k_in * chunk
    work_end = torch.minimum(work_start + chunk, offsets[work_bucket] + counts[work_bucket])
    bucket_work = torch.cat([split_off, split_off.new_full((1,), W)])
    i32 = torch.int32
    return CSR(order.to(i32), work_bucket.to(i32), work_start.to(i32), work_end.to(i32),
               bucket_work.to(i32), W)
