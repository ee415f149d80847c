"""Apply sharding and memory savers to a plain ``Decoder`` through its hooks, never by patching it.

- ``Attention.wrap_core``: context-parallel, then Ulysses wrappers around every attention core;
- ``Block.wrap_mlp``: DeepSpeed's TiledMLP over ``parallel.mlp_tile_tokens`` tokens at a time;
- ``Decoder.set_block_runner``: per-block activation checkpointing, ``parallel.checkpoint_policy``:
  ``full`` (DeepSpeed's: the block's whole forward runs again in backward, but for the block selection,
  kept in host memory unless ``parallel.checkpoint_keep_selection=false``) or ``selective`` (PyTorch's
  non-reentrant checkpoint keeping what the attention marks with ``msa.keep``, so block selection with
  its reverse index, sparse attention, the index KL and dense SDPA run once per step; the rest is
  recomputed; see ``selective_checkpointed`` for why not ``create_selective_checkpoint_contexts``). A
  block whose main path takes no gradient (the main weights frozen: ``Decoder.train_main``) runs
  unwrapped.
- ``parallel.compile_blocks``: ``torch.compile`` of each block with its sequence-wide attention core left
  eager (``EagerCore``), so the token-local work on either side of it (norms, projections with RoPE,
  residual adds, SwiGLU) becomes two fused graphs.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from msa.keep import SAVED_OPS as ATEN_SAVED_OPS
from msa.keep import keep_contexts, keeping
from msa.layer import recomputed_later
from train.parallel.mesh import Mesh, ParallelConfig
from train.parallel.sequence import ContextParallelCore, UlyssesCore


def parallelize(model, mesh: Mesh, cfg: ParallelConfig):
    """Wrap ``model`` (a ``Decoder``) in place for ``mesh`` and ``cfg``; returns it."""
    for block in model.blocks():
        if mesh.kv_replicas > 1 and getattr(block.attn.core, "kl_in_backward", False):
            # a rank then holds part of a group's heads; the KL's teacher needs all of them (gathered)
            warnings.warn("attention.kl_in_backward has no effect with parallel.sp_size above model.n_kv_heads: "
                          "the index KL runs in the forward", stacklevel=2)
        if mesh.cp_size > 1:
            block.attn.wrap_core(lambda core: ContextParallelCore(core, mesh.cp_group))
        if mesh.sp_size > 1:
            block.attn.wrap_core(lambda core: UlyssesCore(core, mesh.sp_group, mesh.kv_replicas, mesh.replica_group))
        if cfg.mlp_tile_tokens:
            block.wrap_mlp(lambda mlp: functools.partial(tiled_mlp, mlp, tile=cfg.mlp_tile_tokens))
        if cfg.compile_blocks:
            compile_block(block)
    if cfg.activation_checkpointing:
        model.set_block_runner(selective_checkpointed if cfg.checkpoint_policy == "selective" else
                               functools.partial(checkpointed, keep_selection=cfg.checkpoint_keep_selection))
    return model


class EagerCore(nn.Module):
    """An attention core that ``torch.compile`` leaves alone: its work is sequence-wide (Triton kernels,
    host-side index building, collectives), the compiled graphs end before it and resume after it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def compile_block(block, backend: str = "inductor") -> None:
    """``torch.compile`` the block (``nn.Module.compile``) around an eager attention core."""
    block.attn.wrap_core(EagerCore)
    block.compile(backend=backend)


def tiled_mlp(mlp, x: torch.Tensor, tile: int) -> torch.Tensor:
    """The SwiGLU MLP over sequence tiles of ``tile`` tokens, recomputed tile by tile in backward, so
    its ``[tokens, ffn]`` intermediates exist for one tile at a time (DeepSpeed's TiledMLP)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    n_tiles = max(1, math.ceil(x.shape[-2] / tile))
    return TiledMLP.apply(type(mlp).forward, mlp, x, n_tiles, list(mlp.parameters()))


# What full checkpointing keeps from its first pass: the block selection, a top-k over every earlier key
# block (quadratic in the row: 0.94 s per layer at 1M tokens, Hkv = 4, Di = 128 on an H200, docs/kernels.md)
# stored as 64 bytes per token and KV head (``topk`` int32 ids: 256 MB per layer at 1M), which waits in
# pinned host memory, so the policy chosen for its small footprint holds no more device memory than before.
FULL_KEEPS = frozenset({"msa::select_blocks"})


def checkpointed(block, x, *args, keep_selection: bool = True):
    """One block under DeepSpeed activation checkpointing (inputs kept on CPU if configured); with
    ``keep_selection`` the recompute reuses the forward's block selection (``FULL_KEEPS``)."""
    import deepspeed

    if not recompute_pays(block, x):
        return block(x, *args)
    run = keeping(block, FULL_KEEPS) if keep_selection else block
    with recomputed_later():  # this pass runs without autograd; backward runs the block again
        return deepspeed.checkpointing.checkpoint(run, x, *args)


def recompute_pays(block, x) -> bool:
    """Whether checkpointing ``block`` (a ``Block``, or any function) saves anything: not without autograd,
    nor when a block's main path takes no gradient (a stage that trains only the index branch). Then the
    main path builds no graph, and the index branch's small one (its projections, the KL's inputs) is kept
    rather than recomputed with the whole block."""
    learns = getattr(block, "main_path_learns", None)
    return torch.is_grad_enabled() and (learns is None or learns(x))


# What selective checkpointing keeps (msa.keep): per token and layer a few KB (``o`` and its lse, ``block_idx``
# and the reverse index built from it, the index KL's gradients) against a whole sequence-wide pass each
# (top-k over every earlier key, sparse attention, the KL's two passes, dense SDPA). Everything else (norms,
# projections, RoPE, MLP) is recomputed. The kernels' forward ops (``msa::select_blocks``,
# ``msa::sparse_attention_fwd`` or ``msa::sparse_attention_tile_fwd``, ``msa::index_kl_fwd``) and these aten
# ops run once per step.
SAVED_OPS = frozenset({"msa::select_blocks", "msa::sparse_attention_fwd", "msa::sparse_attention_tile_fwd",
                       "msa::index_kl_fwd", *ATEN_SAVED_OPS})


def selective_checkpointed(block, x, *args):
    """One block under selective activation checkpointing: what the attention marks with ``msa.keep`` is
    kept from the forward, everything else runs again in backward. The Triton path marks its kernels'
    results and dense SDPA; the reference path (plain torch code) only SDPA, so there the MSA math is
    recomputed as under ``full``.

    Why not ``torch.utils.checkpoint.create_selective_checkpoint_contexts``: its recompute looks every op
    up in what the forward recorded and fails on one the forward did not run (or ran fewer times):
    "aten.empty.memory_format encountered during backward but not found in storage". ZeRO-3's parameter
    hooks fire inside the checkpointed block, and what they run depends on the engine's state (its
    parameter trace, what was prefetched, which parameters are resident), not the block. ``msa.keep``
    looks up only the calls it marked, and sees no other op (its dispatch mode is entered for SDPA
    alone), so the host pays nothing per op of the rest of the block."""
    if not recompute_pays(block, x):
        return block(x, *args)
    return checkpoint(block, x, *args, use_reentrant=False, context_fn=keep_contexts)


__all__ = ["parallelize", "tiled_mlp", "checkpointed", "FULL_KEEPS", "selective_checkpointed", "recompute_pays",
           "SAVED_OPS", "compile_block", "EagerCore"]
