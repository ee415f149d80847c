"""Apply sharding and memory savers to a plain ``Decoder`` through its hooks, never by patching it.

- ``Attention.wrap_core``: context-parallel, then Ulysses wrappers around every attention core;
- ``Block.wrap_mlp``: DeepSpeed's TiledMLP over ``parallel.mlp_tile_tokens`` tokens at a time;
- ``Decoder.set_block_runner``: DeepSpeed's per-block activation checkpointing.
"""

from __future__ import annotations

import functools
import math

import torch

from train.parallel.mesh import Mesh, ParallelConfig
from train.parallel.sequence import ContextParallelCore, UlyssesCore


def parallelize(model, mesh: Mesh, cfg: ParallelConfig):
    """Wrap ``model`` (a ``Decoder``) in place for ``mesh`` and ``cfg``; returns it."""
    for block in model.blocks():
        if mesh.cp_size > 1:
            block.attn.wrap_core(lambda core: ContextParallelCore(core, mesh.cp_group))
        if mesh.sp_size > 1:
            block.attn.wrap_core(lambda core: UlyssesCore(core, mesh.sp_group, mesh.kv_replicas, mesh.replica_group))
        if cfg.mlp_tile_tokens:
            block.wrap_mlp(lambda mlp: functools.partial(tiled_mlp, mlp, tile=cfg.mlp_tile_tokens))
    if cfg.activation_checkpointing:
        model.set_block_runner(checkpointed)
    return model


def tiled_mlp(mlp, x: torch.Tensor, tile: int) -> torch.Tensor:
    """The SwiGLU MLP over sequence tiles of ``tile`` tokens, recomputed tile by tile in backward, so
    its ``[tokens, ffn]`` intermediates exist for one tile at a time (DeepSpeed's TiledMLP)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    n_tiles = max(1, math.ceil(x.shape[-2] / tile))
    return TiledMLP.apply(type(mlp).forward, mlp, x, n_tiles, list(mlp.parameters()))


def checkpointed(block, x, *args):
    """One block under DeepSpeed activation checkpointing (inputs kept on CPU if configured)."""
    import deepspeed

    if not torch.is_grad_enabled():
        return block(x, *args)
    return deepspeed.checkpointing.checkpoint(block, x, *args)


__all__ = ["parallelize", "tiled_mlp", "checkpointed"]
