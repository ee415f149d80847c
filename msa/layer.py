"""Attention modules: dense GQA attention and MiniMax Sparse Attention (MSA).

Both are plain ``nn.Module``s that know nothing of ranks. Projections, norms and RoPE are token-local;
the math that needs the whole sequence lives in a parameter-free ``core`` (``DenseCore``, ``MSACore``)
that returns a ``CoreOut(o, kl, stats)``. Sequence and context parallelism wrap the core from outside
(``Attention.wrap_core``, used by ``train/parallel/parallelize.py``); the wrappers take and return the
same things on a rank's shard.

The attention phase (``warmup``: dense main attention, index KL on every visible key; ``sparse``:
top-k selection, sparse attention, KL on the selected support) and whether to measure the selection
(``stats_queries``: how many queries to sample for the index recall; 0 = no stats) are arguments of
every forward, not module state.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from msa import chunked_reference
from msa.dense import dense_attention, longest_document
from msa.rope import Rotary
from msa.stats import SelectionStats, selection_stats

Phase = Literal["warmup", "sparse"]
PHASES = ("warmup", "sparse")


@dataclass
class AttentionConfig:
    """``attention.*``: which attention the model uses and how MSA selects."""

    kind: str = "msa"  # msa | dense (every layer ordinary GQA attention: the baseline)
    impl: str = "auto"  # auto (Triton kernels on CUDA, else the reference) | triton | reference
    block_size: int = 128  # Bk: key block length
    topk: int = 16  # k: blocks kept per (query, GQA group), own block included
    index_dim: int = 64  # Di: index query/key head dim
    n_dense_layers: int = 1  # the first layers use ordinary dense GQA attention
    # dense attention (dense layers, warm-up, MSA rows of short documents) on packed rows: one FlashAttention
    # varlen call (CUDA sm80+, bf16/fp16, head dim <= 256) instead of one SDPA call per document; elsewhere,
    # and with false, the per-document calls (msa/dense.py). On since measured (docs/scaling.md section 2)
    dense_varlen: bool = True
    # sparse phase on the Triton path: the index KL's teacher is computed inside the attention backward,
    # which already recomputes the probabilities, instead of a pass of its own over q k^T
    # (kernels.sparse_attention.sparse_attention_kl); the KL's value is then known after backward. Off:
    # exact, but measured 1.9-2.4x slower for attention plus KL and 36-41% slower per step on an H200
    # (docs/kernels.md); applies where G is a power of two and a rank holds whole GQA groups (not with
    # parallel.sp_size above model.n_kv_heads)
    kl_in_backward: bool = False
    # the sparse forward on the Triton path: kv (KV-outer: reverse index, partial outputs, combine), tile (each
    # tile of consecutive queries over the union of the blocks they selected, kernels/sparse_tile.py; pays
    # where neighbouring queries share blocks, msa/tile_union) or auto (tile where the layer's selection is
    # local enough, kernels.sparse_tile.tile_pays; one device->host read per layer); dq_path=auto follows it
    fwd_path: str = "kv"
    # the index KL on the Triton path's sparse phase: kv (KV-outer over its own reverse index, kernels/index_kl.py)
    # or tile (each tile of consecutive queries over the union of their blocks, kernels/index_kl_tile.py: no
    # dq_idx partials, no gathers; dk_idx by one atomic add per tile and union block; measured 0.08-0.79x the
    # KV-outer form's speed, docs/kernels.md: for where memory binds)
    kl_path: str = "kv"
    # the sparse backward's dQ on the Triton path: auto (tile where the tile forward ran, else dkdv at G >= 16 and
    # kv below, as measured), kv (KV-outer dQ kernel, partials and reduce), dkdv (written by the dK/dV kernel as
    # partials) or tile (each tile of queries over the union of its blocks, kernels/sparse_tile.py: no dQ partials
    # at all, the least memory)
    dq_path: str = "auto"
    # the index KL over one query in kl_query_stride (those at positions p with p % stride == the step's number %
    # stride, a new set each step), times the stride: the KL's products and its reverse index shrink by the stride,
    # and over `stride` steps every query counts once, so the loss and its gradient are the full KL's in
    # expectation. 1 (the default): every query, the paper's loss. Not with kl_in_backward
    kl_query_stride: int = 1


def check_attention(cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int, n_layers: int) -> None:
    """Reject attention settings that cannot work, naming the key to change."""
    if cfg.kind not in ("msa", "dense"):
        raise ValueError(f"attention.kind={cfg.kind!r}: use msa or dense")
    if cfg.impl not in ("auto", "triton", "reference"):
        raise ValueError(f"attention.impl={cfg.impl!r}: use auto, triton or reference")
    # the kernels' own lists (the import costs no measurable time)
    from kernels.index_kl import KL_PATHS
    from kernels.sparse_tiles import DQ_PATHS, FWD_PATHS

    if cfg.fwd_path not in FWD_PATHS:
        raise ValueError(f"attention.fwd_path={cfg.fwd_path!r}: use one of {', '.join(FWD_PATHS)}")
    if cfg.kl_path not in KL_PATHS:
        raise ValueError(f"attention.kl_path={cfg.kl_path!r}: use one of {', '.join(KL_PATHS)}")
    if cfg.dq_path not in DQ_PATHS:
        raise ValueError(f"attention.dq_path={cfg.dq_path!r}: use one of {', '.join(DQ_PATHS)}")
    if cfg.topk < 1:
        raise ValueError(f"attention.topk={cfg.topk} must be >= 1 (blocks kept per query and group)")
    if not isinstance(cfg.kl_query_stride, int) or cfg.kl_query_stride < 1:
        raise ValueError(f"attention.kl_query_stride={cfg.kl_query_stride!r} must be an integer >= 1 (1: the KL "
                         "over every query)")
    if cfg.kl_query_stride > 1 and cfg.kl_in_backward:
        raise ValueError(f"attention.kl_query_stride={cfg.kl_query_stride} needs attention.kl_in_backward=false: "
                         "the KL computed in the attention's backward counts every query")
    if cfg.block_size < 1 or cfg.block_size & (cfg.block_size - 1):
        raise ValueError(f"attention.block_size={cfg.block_size} must be a power of two (e.g. 64, 128)")
    if cfg.index_dim < 2 or cfg.index_dim % 2:
        raise ValueError(f"attention.index_dim={cfg.index_dim} must be even and >= 2")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"model.n_kv_heads={n_kv_heads} must divide model.n_heads={n_heads} (GQA groups)")
    if not 0 <= cfg.n_dense_layers <= n_layers:
        raise ValueError(f"attention.n_dense_layers={cfg.n_dense_layers} must lie in [0, model.n_layers={n_layers}]")
    if cfg.kind == "msa" and resolve_impl(cfg.impl) == "triton":
        from kernels.common import check_limits

        check_limits(head_dim=head_dim, block_size=cfg.block_size, index_dim=cfg.index_dim)


def resolve_impl(impl: str) -> str:
    """``auto`` means the Triton kernels where CUDA is present, else the reference."""
    if impl == "auto":
        return "triton" if torch.cuda.is_available() else "reference"
    return impl


def resolve_ops(impl: str, device: torch.device | None = None):
    """The module providing ``select_blocks``, ``sparse_attention`` and ``index_kl_loss``; for ``auto``
    with a ``device``, the one that runs on it (a model kept on the CPU of a CUDA machine, e.g. for an
    eval, takes the reference: compiled Triton kernels take CUDA tensors only). The reference runs a
    packed row a group of whole documents at a time (``msa.chunked_reference``: the same numbers)."""
    if impl == "auto" and device is not None and device.type != "cuda":
        return chunked_reference
    if resolve_impl(impl) == "triton":
        import kernels

        return kernels
    return chunked_reference


class CoreOut(NamedTuple):
    """What an attention core computed: ``o [B, Nq, H, D]``, the index KL (this shard's share; None
    for dense attention and when called with ``with_kl=False``) and the selection stats (None unless asked for)."""

    o: torch.Tensor
    kl: torch.Tensor | None = None
    stats: SelectionStats | None = None


class DenseCore(nn.Module):
    """Causal GQA attention over the whole (packed) sequence, or over the last ``window`` keys of each
    query (a pretrained checkpoint's sliding-window layers); no index branch. ``varlen``: see
    ``AttentionConfig.dense_varlen``."""

    def __init__(self, window: int = 0, varlen: bool = False):
        super().__init__()
        self.window, self.varlen = window, varlen

    def forward(self, q, k, v, cu_seqlens=None, index=None, phase: Phase = "sparse", stats_queries: int = 0,
                teacher=None, with_kl: bool = True):
        return CoreOut(dense_attention(q, k, v, cu_seqlens, window=self.window, varlen=self.varlen))


_RECOMPUTED_LATER = contextvars.ContextVar("msa_recomputed_later", default=False)
_KL_SCALE = contextvars.ContextVar("msa_kl_scale", default=1.0)


@contextlib.contextmanager
def kl_scaled(factor: float):
    """Cores called inside scale the KL they report from the backward by ``factor`` (times any enclosing
    one): what a sequence/context-parallel wrapper does to the KL its core returns, for the value that
    ``AttentionConfig.kl_in_backward`` reports after backward (its gradient is scaled through autograd)."""
    token = _KL_SCALE.set(_KL_SCALE.get() * factor)
    try:
        yield
    finally:
        _KL_SCALE.reset(token)


@contextlib.contextmanager
def recomputed_later():
    """Marks a forward that runs without autograd and again, with it, in backward (DeepSpeed's activation
    checkpointing): a core whose KL comes from the backward (``AttentionConfig.kl_in_backward``) skips
    the KL there, the recompute's backward computes it."""
    token = _RECOMPUTED_LATER.set(True)
    try:
        yield
    finally:
        _RECOMPUTED_LATER.reset(token)


class MSACore(nn.Module):
    """MSA's sequence-wide math: block selection, main attention, index distillation loss.

    ``index = (q_idx [B, Nq, Hkv, Di], k_idx [B, N, Di])``. ``warmup`` runs dense main attention with the
    KL on the dense support; ``sparse`` runs top-k selection and sparse attention with the KL on the
    selected support, its teacher normalised by the main forward's lse. With ``stats_queries > 0`` it
    also measures the selection (in warm-up: the one the sparse phase would use).

    A sparse row whose documents all have at most ``topk`` blocks selects every visible block of every
    query, so its sparse attention is the dense attention and its support the dense one: it runs the
    warm-up's path (dense attention, the KL on the dense support), the same numbers without the top-k and
    the sparse kernels (packed rows of short documents, and rows no longer than ``topk`` blocks).

    ``teacher(q, lse) -> (q, lse)`` supplies the teacher's heads when this core holds only some of a
    group's query heads (Ulysses beyond the KV-head count): the KL and the recall need all ``G`` heads
    of the group, the attention only its own."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.block_size, self.topk = cfg.block_size, cfg.topk
        self.dense_varlen = cfg.dense_varlen
        self.impl = cfg.impl
        self.ops = resolve_ops(cfg.impl)
        self.kl_in_backward = cfg.kl_in_backward
        # kernel choices (the forward's and the backward's dQ; the KL's): the reference (impl=reference, or auto
        # without CUDA) has one of each
        self._fwd = {} if cfg.fwd_path == "kv" else {"fwd_path": cfg.fwd_path}
        if cfg.dq_path != "auto":
            self._fwd["dq_path"] = cfg.dq_path
        self._kl = {} if cfg.kl_path == "kv" else {"kl_path": cfg.kl_path}
        self._backward_kl: list[torch.Tensor] = []  # what sparse_attention_kl's backward reported
        # attention.kl_query_stride, and the step's offset (set_kl_offset: the training step's number)
        self.kl_stride, self.kl_offset = cfg.kl_query_stride, 0

    def set_kl_offset(self, step: int) -> None:
        """A strided KL counts the queries at positions ``p % stride == step % stride`` this step."""
        self.kl_offset = step % self.kl_stride

    def take_backward_kl(self) -> torch.Tensor | None:
        """The KL the backward computed since the last call (summed), or None if none; clears it."""
        values, self._backward_kl = self._backward_kl, []
        return torch.stack(values).sum() if values else None

    @staticmethod
    def _kernels(ops) -> bool:
        """Whether ``ops`` are the Triton kernels: they take the path choices and the deferred KL, the
        reference neither."""
        return hasattr(ops, "sparse_attention_kl")

    def _defers_kl(self, ops, q, k, teacher) -> bool:
        return (self.kl_in_backward and teacher is None and self._kernels(ops)
                and ops.deferred_kl_fits(q, k))

    def ops_for(self, device: torch.device):
        """The ops for tensors on ``device`` (``attention.impl=auto`` follows the tensors)."""
        return resolve_ops(self.impl, device) if self.impl == "auto" else self.ops

    def forward(self, q, k, v, cu_seqlens=None, index=None, phase: Phase = "sparse", stats_queries: int = 0,
                teacher=None, with_kl: bool = True):
        """``with_kl=False`` (inference: generation and evals) skips the index distillation loss, ``CoreOut.kl``
        None: its teacher pass costs as much as the attention and nothing reads it there."""
        ops, Bk = self.ops_for(q.device), self.block_size
        q_idx, k_idx = index
        dense = phase == "warmup" or longest_document(cu_seqlens, k.shape[1]) <= self.topk * Bk
        block_idx = None
        if not dense or stats_queries:
            block_idx = ops.select_blocks(q_idx.detach(), k_idx.detach(), Bk, self.topk, cu_seqlens)
        kl = None
        if dense:  # the KL's teacher normaliser from FlashAttention's varlen call where it ran, else its own
            o, lse = dense_attention(q, k, v, cu_seqlens, varlen=self.dense_varlen, return_lse=True)
        elif with_kl and self._defers_kl(ops, q, k, teacher) and torch.is_grad_enabled() and q.requires_grad \
                and q_idx.requires_grad:
            # zero here; the value reaches take_backward_kl() after backward
            o, lse, kl = ops.sparse_attention_kl(q, k, v, q_idx, k_idx, block_idx, Bk, cu_seqlens,
                                                 sink=self._backward_kl, sink_scale=_KL_SCALE.get(), **self._fwd)
        else:
            o, lse = ops.sparse_attention(q, k, v, block_idx, Bk, cu_seqlens,
                                          **(self._fwd if self._kernels(ops) else {}))
            if with_kl and _RECOMPUTED_LATER.get() and self._defers_kl(ops, q, k, teacher):
                kl = q_idx.new_zeros((), dtype=torch.float32)
        q_t, lse_t = teacher(q.detach(), lse) if teacher is not None else (q.detach(), lse)
        if with_kl and kl is None:
            support = None if dense else block_idx
            kl = ops.index_kl_loss(q_t, k.detach(), q_idx, k_idx, support, Bk, cu_seqlens, lse=lse_t,
                                   query_stride=self.kl_stride, query_offset=self.kl_offset,
                                   **(self._kl if self._kernels(ops) else {}))
        stats = None
        if stats_queries:
            stats = selection_stats(q_t, k.detach(), block_idx, Bk, self.topk, cu_seqlens, stats_queries)
        return CoreOut(o, kl, stats)


class Attention(nn.Module):
    """GQA attention with per-head RMS QK-norm and partial RoPE (dense core).

    The options cover the pretrained families we import (``train/hf.py``): ``qkv_bias`` (Qwen2),
    ``out_bias`` (Llama's ``attention_bias`` biases all four projections), ``qk_norm=False`` (Llama,
    Mistral, Qwen2 have none) and a sliding ``window`` (Mistral, Qwen2/3 window layers)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_dim: int,
                 norm_eps: float = 1e-5, *, qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = True,
                 window: int = 0, varlen: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dim = n_heads, n_kv_heads, head_dim, rope_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.core: nn.Module = DenseCore(window, varlen)

    def wrap_core(self, wrap) -> None:
        """Replace the core by ``wrap(core)`` (a module with the same call and ``CoreOut`` result)."""
        self.core = wrap(self.core)

    def project(self, x: torch.Tensor, rotary: Rotary):
        B, N, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, N, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(B, N, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(B, N, self.n_kv_heads, self.head_dim)
        return rotary.apply(q, self.rope_dim), rotary.apply(k, self.rope_dim), v

    def index_inputs(self, x: torch.Tensor, rotary: Rotary):
        return None

    def forward(self, x, rotary: Rotary, cu_seqlens=None, phase: Phase = "sparse", stats_queries: int = 0):
        """``x [B, N, dim]`` -> ``(y [B, N, dim], kl, stats)``; ``kl`` and ``stats`` are None for dense
        attention."""
        q, k, v = self.project(x, rotary)
        out = self.core(q, k, v, cu_seqlens, self.index_inputs(x, rotary), phase, stats_queries)
        return self.wo(out.o.reshape(*x.shape[:2], -1)), out.kl, out.stats


class MSAAttention(Attention):
    """MSA: the GQA main branch plus a lightweight index branch that picks key blocks.

    The index branch reads ``x.detach()``: ``q_idx = W_qi x -> [B, N, Hkv, Di]`` (one index-query head
    per group) and ``k_idx = W_ki x -> [B, N, Di]`` (one index-key head for all groups), each with
    RMSNorm and RoPE. Selection is discrete and the KL sees ``q, k`` detached, so the LM loss never
    reaches the index branch and the KL reaches nothing else.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_dim: int,
                 cfg: AttentionConfig, norm_eps: float = 1e-5, *, qkv_bias: bool = False, out_bias: bool = False,
                 qk_norm: bool = True):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, rope_dim, norm_eps, qkv_bias=qkv_bias,
                         out_bias=out_bias, qk_norm=qk_norm)
        self.index_dim = cfg.index_dim
        self.index_rope_dim = min(rope_dim, cfg.index_dim)
        self.wq_idx = nn.Linear(dim, n_kv_heads * cfg.index_dim, bias=False)
        self.wk_idx = nn.Linear(dim, cfg.index_dim, bias=False)
        self.q_idx_norm = nn.RMSNorm(cfg.index_dim, eps=norm_eps)
        self.k_idx_norm = nn.RMSNorm(cfg.index_dim, eps=norm_eps)
        self.core = MSACore(cfg)

    def index_params(self) -> list[nn.Parameter]:
        return [*self.wq_idx.parameters(), *self.wk_idx.parameters(),
                *self.q_idx_norm.parameters(), *self.k_idx_norm.parameters()]

    def index_inputs(self, x: torch.Tensor, rotary: Rotary):
        """``(q_idx [B, N, Hkv, Di], k_idx [B, N, Di])`` from ``x.detach()``."""
        B, N, _ = x.shape
        xd = x.detach()
        q_idx = self.q_idx_norm(self.wq_idx(xd).view(B, N, self.n_kv_heads, self.index_dim))
        k_idx = self.k_idx_norm(self.wk_idx(xd).view(B, N, 1, self.index_dim))
        return rotary.apply(q_idx, self.index_rope_dim), rotary.apply(k_idx, self.index_rope_dim).squeeze(2)


__all__ = [
    "AttentionConfig", "check_attention", "resolve_impl", "Attention", "MSAAttention", "DenseCore", "MSACore",
    "CoreOut", "PHASES", "Phase", "recomputed_later", "kl_scaled",
]
