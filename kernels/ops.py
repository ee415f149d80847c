"""The kernels' forward launches as ``torch.library`` custom ops (``msa::select_blocks``,
``msa::sparse_attention_fwd``, ``msa::sparse_attention_tile_fwd``, ``msa::index_kl_fwd``), so that
dispatch-level tools see each as one operator: the profiler lists them by name, and the checkpointing tests
count them (``train/parallel/parallelize.py``'s ``SAVED_OPS``). What selective checkpointing keeps is marked where
they are called (``msa.keep.kept``), not by intercepting them.

Each op runs a host function of its kernel module unchanged; the module's public function or its
``torch.autograd.Function`` calls the op, so the ops need no autograd formula of their own (they run
inside that function's forward, below autograd). A fake implementation gives each op's output shapes for
tracing. The dispatcher carries tensors, numbers, strings and lists of them, so the sparse-attention
layout, reverse index and launch settings travel flattened (``sparse_attention_fwd_args``).

Annotations stay real objects here (no ``from __future__ import annotations``): ``custom_op`` reads
them to build each op's schema.
"""

import dataclasses

import torch
from torch import Tensor

__all__ = ["select_blocks_op", "sparse_attention_fwd_op", "sparse_attention_fwd_args", "sparse_attention_tile_fwd_op",
           "index_kl_fwd_op"]


@torch.library.custom_op("msa::select_blocks", mutates_args=())
def select_blocks_op(q_idx: Tensor, k_idx: Tensor, block_size: int, topk: int, cu_seqlens: Tensor | None,
                     fp8: bool, fp8_key_scale: str, gate_from: int) -> Tensor:
    """``kernels.index_topk.select_blocks_fwd`` with its default launch settings -> ``block_idx``."""
    from kernels.index_topk import select_blocks_fwd

    return select_blocks_fwd(q_idx, k_idx, block_size, topk, cu_seqlens, fp8, gate_from=gate_from,
                             fp8_key_scale=fp8_key_scale)


@select_blocks_op.register_fake
def _(q_idx, k_idx, block_size, topk, cu_seqlens, fp8, fp8_key_scale, gate_from):
    B, NQ, Hkv, _ = q_idx.shape
    return q_idx.new_empty(B, Hkv, NQ, topk, dtype=torch.int32)


@torch.library.custom_op("msa::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, index: list[Tensor],
                            sizes: list[int], tiles: list[int], block_size: int,
                            scale: float) -> tuple[Tensor, Tensor]:
    """``kernels.sparse_attention.sparse_attention_fwd`` -> ``(o, lse)``; ``index``, ``sizes`` and ``tiles``
    are its layout, reverse index and launch settings as ``sparse_attention_fwd_args`` flattens them."""
    from kernels.common import CSR, Layout
    from kernels.sparse_attention import Launch, Tiles, sparse_attention_fwd

    n_layout = len(dataclasses.fields(Layout)) - 1
    layout = Layout(*index[:n_layout], n_blocks=sizes[0])
    csr = CSR(*index[n_layout:], chunk_work=list(sizes[2:]), q_chunk=sizes[1])
    launch = Launch(fwd=Tiles(*tiles[:4]), combine=Tiles(*tiles[4:]))
    return sparse_attention_fwd(q, k, v, block_idx, block_size, layout, scale, csr, launch)


@sparse_attention_fwd_op.register_fake
def _(q, k, v, block_idx, index, sizes, tiles, block_size, scale):
    B, NQ, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, NQ, dtype=torch.float32)


def sparse_attention_fwd_args(layout, csr, launch) -> tuple[list[Tensor], list[int], list[int]]:
    """``(index, sizes, tiles)`` of ``sparse_attention_fwd_op`` for a ``Layout``, a ``CSR`` and a ``Launch``:
    the tensor fields of the layout then of the CSR, ``[n_blocks, q_chunk, *chunk_work]``, and the
    forward and combine kernels' ``Tiles``."""
    index = [getattr(layout, f.name) for f in dataclasses.fields(layout) if f.name != "n_blocks"]
    index += [getattr(csr, f.name) for f in dataclasses.fields(csr) if f.name not in ("chunk_work", "q_chunk")]
    sizes = [layout.n_blocks, csr.q_chunk, *csr.chunk_work]
    return index, sizes, [*dataclasses.astuple(launch.fwd), *dataclasses.astuple(launch.combine)]


@torch.library.custom_op("msa::sparse_attention_tile_fwd", mutates_args=())
def sparse_attention_tile_fwd_op(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, union: Tensor, count: Tensor,
                                 tiles: list[int], block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """``kernels.sparse_tile.sparse_attention_tile_fwd`` -> ``(o, lse)``, given the tiles' union
    (``kernels.sparse_tile.tile_union``); ``tiles`` its ``Tiles`` as a list."""
    from kernels.sparse_tile import sparse_attention_tile_fwd
    from kernels.sparse_tiles import Tiles

    return sparse_attention_tile_fwd(q, k, v, None, block_size, None, scale, Tiles(*tiles), (starts, union, count))


@sparse_attention_tile_fwd_op.register_fake
def _(q, k, v, starts, union, count, tiles, block_size, scale):
    B, NQ, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, NQ, dtype=torch.float32)


@torch.library.custom_op("msa::index_kl_fwd", mutates_args=())
def index_kl_fwd_op(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, block_idx: Tensor | None,
                    block_size: int, cu_seqlens: Tensor | None, lse: Tensor | None,
                    grad: bool, path: str = "kv", query_stride: int = 1,
                    query_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``kernels.index_kl.index_kl_fwd`` with its default launch settings -> ``(loss, dq_idx, dk_idx)``;
    without ``grad`` the two gradients are empty tensors. ``path``: its ``path`` (``"kv"`` or ``"tile"``);
    ``query_stride``, ``query_offset``: its strided loss."""
    from kernels.index_kl import index_kl_fwd

    loss, dq, dk = index_kl_fwd(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad, path=path,
                                query_stride=query_stride, query_offset=query_offset)
    if not grad:  # two tensors: an op's outputs may not alias each other
        dq, dk = loss.new_empty(0), loss.new_empty(0)
    return loss, dq, dk


@index_kl_fwd_op.register_fake
def _(q, k, q_idx, k_idx, block_idx, block_size, cu_seqlens, lse, grad, path="kv", query_stride=1, query_offset=0):
    loss = q.new_empty((), dtype=torch.float32)
    if not grad:
        return loss, loss.new_empty(0), loss.new_empty(0)
    return loss, q_idx.new_empty(q_idx.shape, dtype=torch.float32), k_idx.new_empty(k_idx.shape, dtype=torch.float32)
