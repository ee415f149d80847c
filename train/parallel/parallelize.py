"""Apply sharding and memory savers to a plain ``Decoder`` through its hooks, never by patching it.

- ``Attention.wrap_core``: context-parallel, then Ulysses wrappers around every attention core;
- ``Block.wrap_mlp``: DeepSpeed's TiledMLP over ``parallel.mlp_tile_tokens`` tokens at a time;
- ``Decoder.set_block_runner``: per-block activation checkpointing, ``parallel.checkpoint_policy``:
  ``full`` (DeepSpeed's: the block's whole forward runs again in backward) or ``selective`` (PyTorch's
  non-reentrant checkpoint keeping the outputs of the attention ops in ``SAVED_OPS``, so block selection,
  sparse attention, the index KL and dense SDPA run once per step; the rest is recomputed; the two
  dispatch modes that do this are ours, ``SaveAttention``/``ReuseAttention``, not
  ``create_selective_checkpoint_contexts``: see there why). A block whose main path takes no gradient
  (the main weights frozen: ``Decoder.train_main``) runs unwrapped.
- ``parallel.compile_blocks``: ``torch.compile`` of each block with its sequence-wide attention core left
  eager (``EagerCore``), so the token-local work on either side of it (norms, projections with RoPE,
  residual adds, SwiGLU) becomes two fused graphs.
"""

from __future__ import annotations

import collections
import functools
import math

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint

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
        if cfg.compile_blocks:
            compile_block(block)
    if cfg.activation_checkpointing:
        model.set_block_runner(selective_checkpointed if cfg.checkpoint_policy == "selective" else checkpointed)
    return model


class EagerCore(nn.Module):
    """An attention core that ``torch.compile`` leaves alone: its work is sequence-wide (Triton kernels,
    host-side index building, collectives), the compiled graphs end before it and resume after it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @torch.compiler.disable
    def forward(self, *args):
        return self.inner(*args)


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


def checkpointed(block, x, *args):
    """One block under DeepSpeed activation checkpointing (inputs kept on CPU if configured)."""
    import deepspeed

    if not recompute_pays(block, x):
        return block(x, *args)
    return deepspeed.checkpointing.checkpoint(block, x, *args)


def recompute_pays(block, x) -> bool:
    """Whether checkpointing ``block`` (a ``Block``, or any function) saves anything: not without autograd,
    nor when a block's main path takes no gradient (a stage that trains only the index branch). Then the
    main path builds no graph, and the index branch's small one (its projections, the KL's inputs) is kept
    rather than recomputed with the whole block."""
    learns = getattr(block, "main_path_learns", None)
    return torch.is_grad_enabled() and (learns is None or learns(x))


# What selective checkpointing keeps: per token and layer a few KB (``o`` and its lse, ``block_idx``, the
# index KL's gradients) against a whole sequence-wide pass each (top-k over every earlier key, sparse
# attention, the KL's two passes, dense SDPA). Everything else (norms, projections, RoPE, MLP) is recomputed.
SAVED_OPS = frozenset({
    "msa::select_blocks", "msa::sparse_attention_fwd", "msa::index_kl_fwd",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
})


class _Kept:
    """A saved op's output, detached, with its version counter: an in-place change between the forward
    and the recompute would hand the recompute a different tensor than the forward's."""

    def __init__(self, t: torch.Tensor):
        self.t = t.detach()
        self.version = t._version

    def get(self) -> torch.Tensor:
        if self.t._version != self.version:
            raise RuntimeError("selective checkpoint: an attention output kept from the forward was modified in place")
        return self.t


class _KeptOpsMode(TorchDispatchMode):
    """A dispatch mode sharing ``kept`` (per ``SAVED_OPS`` op, its outputs in call order) with its twin."""

    def __init__(self, kept: dict):
        super().__init__()
        self.kept = kept

    @classmethod
    def ignore_compile_internals(cls):  # compiled blocks: the modes see the compiled graph's runtime only
        return True


class SaveAttention(_KeptOpsMode):
    """The forward side of ``selective``: runs every op and keeps the outputs of ``SAVED_OPS``, per op in
    call order, in ``kept``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name() in SAVED_OPS:
            self.kept.setdefault(func, collections.deque()).append(tree_map_only(torch.Tensor, _Kept, out))
        return out


class ReuseAttention(_KeptOpsMode):
    """The recompute side of ``selective``: a ``SAVED_OPS`` op returns the forward's output (in call
    order), every other op runs again, whether or not the forward ran it.

    That is the difference from ``torch.utils.checkpoint.create_selective_checkpoint_contexts``, whose
    recompute looks every op up in what the forward recorded and fails on one the forward did not run
    (or ran fewer times): "aten.empty.memory_format encountered during backward but not found in
    storage". ZeRO-3's parameter hooks fire inside the checkpointed block (each submodule's pre- and
    post-forward hooks gather and release its parameters), and what they run depends on the engine's
    state, not the block: whether its parameter trace is complete, what was prefetched, which parameters
    are resident. After a step whose module order differs from the recorded trace (the first step after
    a frozen stage, whose backward skipped the main path) the trace is invalidated during the backward,
    so the recompute releases every parameter of each submodule (``free_param``: ``torch.empty(0)``)
    while the forward, under the complete trace, released none."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() not in SAVED_OPS:
            return func(*args, **(kwargs or {}))
        queue = self.kept.get(func)
        if not queue:
            raise RuntimeError(f"selective checkpoint: {func} runs more often in the recompute than in the forward "
                               "(a second backward through the block, or a forward that depends on global state)")
        return tree_map_only(_Kept, _Kept.get, queue.popleft())


def keep_attention_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: a ``SaveAttention`` for the forward and a
    ``ReuseAttention`` for the recompute, sharing what is kept."""
    kept: dict = {}
    return SaveAttention(kept), ReuseAttention(kept)


def selective_checkpointed(block, x, *args):
    """One block under selective activation checkpointing: the outputs of ``SAVED_OPS`` are kept from the
    forward, everything else runs again in backward. The Triton path's ops are ``kernels/ops.py``'s; the
    reference's are plain torch code, so there it recomputes as ``full`` does."""
    if not recompute_pays(block, x):
        return block(x, *args)
    return checkpoint(block, x, *args, use_reentrant=False, context_fn=keep_attention_contexts)


__all__ = ["parallelize", "tiled_mlp", "checkpointed", "selective_checkpointed", "recompute_pays", "SAVED_OPS",
           "keep_attention_contexts", "SaveAttention", "ReuseAttention", "compile_block", "EagerCore"]
