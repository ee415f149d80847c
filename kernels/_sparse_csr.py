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
    entries: torch.Tensor  # [E] int32: flat index (((b*Hkv + r)*Nq + i)*topk + slot) into block_idx
    work_bucket: torch.Tensor  # [W] int32: bucket (b*Hkv + r)*NV + vb of each work item
    work_start: torch.Tensor  # [W] int32: its first entry
    work_end: torch.Tensor  # [W] int32: one past its last entry
    bucket_work: torch.Tensor  # [n_chunks*NB + 1] int32: chunk c's work items of bucket u are
    #                            [bw[c*NB + u], bw[c*NB + u + 1])
    chunk_work: list  # [n_chunks + 1]: the work items of query chunk c are [cw[c], cw[c+1])
    q_chunk: int  # queries per chunk


def build_layout(N: int, block_size: int, cu_seqlens: torch.Tensor | None, device) -> Layout:
    n_blocks = -(-N // block_size)
    if cu_seqlens is None:
        vb_start = torch.arange(n_blocks, device=device, dtype=torch.int32) * block_size
        return Layout(torch.zeros(N, dtype=torch.int32, device=device),
                      torch.zeros(N, dtype=torch.long, device=device),
                      vb_start, (vb_start + block_size).clamp_max(N), n_blocks)
    check_cu_seqlens(cu_seqlens, 1, N)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=N)
    doc_nvb = (lengths + block_size - 1) // block_size
    doc_vb_off = torch.cumsum(doc_nvb, 0) - doc_nvb
    NV = int(doc_nvb.sum())
    vb_doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), doc_nvb, output_size=NV)
    vb_start = cu[vb_doc] + (torch.arange(NV, device=device) - doc_vb_off[vb_doc]) * block_size
    vb_end = torch.minimum(vb_start + block_size, cu[vb_doc + 1])
    return Layout(cu[doc].to(torch.int32), doc_vb_off[doc], vb_start.to(torch.int32),
                  vb_end.to(torch.int32), n_blocks)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, N: int) -> None:
    """Clear errors for a malformed ``cu_seqlens`` (one small device->host read)."""
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-d int32 tensor [n_docs + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if bool(cu[0] != 0) or bool(cu[-1] != N) or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {cu.tolist()}")


def check_block_idx(block_idx: torch.Tensor, n_blocks: int) -> None:
    lo, hi = torch.aminmax(block_idx)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= n_blocks:
        raise ValueError(f"block_idx entries must lie in [-1, {n_blocks}), got {lo}..{hi}")


def build_csr(block_idx: torch.Tensor, layout: Layout, block_size: int, q_off: int, chunk: int,
              q_chunk: int) -> CSR:
    """Reverse CSR of ``block_idx [B, Hkv, Nq, topk]`` whose queries sit at key positions ``q_off ..``,
    for query chunks of ``q_chunk`` queries: one stable sort by (query chunk, bucket) gives each chunk
    its own bucket-sorted run of entries (the KV-outer forward works chunk by chunk; the backward
    takes all chunks at once)."""
    B, Hkv, NQ, topk = block_idx.shape
    device = block_idx.device
    NB = B * Hkv * layout.vb_start.numel()
    n_chunks = max(1, -(-NQ // q_chunk))
    if B * Hkv * NQ * topk >= 2**31:
        raise ValueError(f"B*Hkv*Nq*topk = {B * Hkv * NQ * topk} entries overflow int32 indices")
    pos = torch.arange(q_off, q_off + NQ, device=device) - layout.tok_start[q_off:q_off + NQ]
    idx = block_idx.long()
    valid = (idx >= 0) & (idx * block_size <= pos[:, None])
    br = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1) * layout.vb_start.numel()
    qc = (torch.arange(NQ, device=device) // q_chunk)[:, None] * NB
    key = torch.where(valid, qc + br + layout.tok_vb[q_off:q_off + NQ, None] + idx, n_chunks * NB).flatten()
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=n_chunks * NB + 1)[:n_chunks * NB]
    offsets = torch.cumsum(counts, 0) - counts
    splits = (counts + chunk - 1) // chunk
    split_end = torch.cumsum(splits, 0)
    bucket_work = torch.cat([split_end.new_zeros(1), split_end])
    chunk_work = bucket_work[::NB].tolist()  # the one host sync: the grid sizes
    W = chunk_work[-1]
    work_key = torch.repeat_interleave(torch.arange(n_chunks * NB, device=device), splits, output_size=W)
    k_in = torch.arange(W, device=device) - bucket_work[work_key]
    work_start = offsets[work_key] + k_in * chunk
    work_end = torch.minimum(work_start + chunk, offsets[work_key] + counts[work_key])
    i32 = torch.int32
    return CSR(order.to(i32), (work_key % NB).to(i32), work_start.to(i32), work_end.to(i32),
               bucket_work.to(i32), chunk_work, q_chunk)
