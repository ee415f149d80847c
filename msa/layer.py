"""Attention modules: dense GQA attention and MiniMax Sparse Attention (MSA).

Both are plain ``nn.Module``s that know nothing of ranks. The math that needs the whole sequence
lives in a parameter-free ``core`` submodule (``DenseCore``, ``MSACore``) called with projected
tensors, so sequence/context parallelism can wrap or replace ``module.core`` from outside
(``train/parallel.py``) while projections, norms and RoPE stay token-local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from msa import reference
from msa.dense import dense_attention
from msa.rope import Rotary

Phase = Literal["warmup", "sparse"]


@dataclass
class AttentionConfig:
    """``attention.*``: which attention the model uses and how MSA selects."""

    backend: str = "auto"  # "auto" (triton on CUDA, else reference) | "triton" | "reference" | "dense"
    block_size: int = 128  # Bk: key block length
    topk: int = 16  # k: blocks kept per (query, GQA group), own block included
    index_dim: int = 64  # Di: index query/key head dim
    n_dense_layers: int = 1  # the first layers use ordinary dense GQA attention
    kl_weight: float = 1.0  # lambda in L = L_lm + lambda * sum_layers L_kl
    warmup_steps: int = 0  # dense main attention while the indexer learns; then top-k


def check_attention(cfg: AttentionConfig, n_heads: int, n_kv_heads: int, n_layers: int) -> None:
    """Reject attention settings that cannot work, naming the key to change."""
    if cfg.backend not in ("auto", "triton", "reference", "dense"):
        raise ValueError(f"attention.backend={cfg.backend!r}: use auto, triton, reference or dense")
    if cfg.topk < 1:
        raise ValueError(f"attention.topk={cfg.topk} must be >= 1 (blocks kept per query and group)")
    if cfg.block_size < 1 or cfg.block_size & (cfg.block_size - 1):
        raise ValueError(f"attention.block_size={cfg.block_size} must be a power of two (e.g. 64, 128)")
    if cfg.index_dim < 2 or cfg.index_dim % 2:
        raise ValueError(f"attention.index_dim={cfg.index_dim} must be even and >= 2")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"model.n_kv_heads={n_kv_heads} must divide model.n_heads={n_heads} (GQA groups)")
    if not 0 <= cfg.n_dense_layers <= n_layers:
        raise ValueError(f"attention.n_dense_layers={cfg.n_dense_layers} must lie in [0, model.n_layers={n_layers}]")


def resolve_backend(backend: str) -> str:
    """``auto`` means the Triton kernels where CUDA is present, else the reference."""
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "reference"
    return backend


def check_kernel_limits(cfg: AttentionConfig, head_dim: int) -> None:
    """What the Triton kernels support, checked at start rather than at the first forward."""
    if resolve_backend(cfg.backend) != "triton":
        return
    if cfg.block_size < 16:
        raise ValueError(f"attention.block_size={cfg.block_size}: the Triton kernels need >= 16")
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"model.head_dim={head_dim}: the Triton kernels support 16, 32, 64 and 128 "
                         "(or use attention.backend=reference)")
    if cfg.index_dim > 256:
        raise ValueError(f"attention.index_dim={cfg.index_dim}: the Triton kernels support up to 256")


def resolve_ops(backend: str):
    """The module providing ``select_blocks``, ``sparse_attention`` and ``index_kl_loss``."""
    if resolve_backend(backend) == "triton":
        import kernels

        return kernels
    return reference


class DenseCore(nn.Module):
    """Causal GQA attention over the whole (packed) sequence; no index branch."""

    def forward(self, q, k, v, cu_seqlens=None):
        return dense_attention(q, k, v, cu_seqlens)


class MSACore(nn.Module):
    """MSA's sequence-wide math: block selection, main attention, index distillation loss.

    Returns ``(o [B, N, H, D], kl)``. The phase is set by the training loop: ``warmup`` runs dense
    main attention with the KL on the dense support; ``sparse`` runs top-k selection and sparse
    attention with the KL on the selected support, its teacher normalised by the main forward's lse.
    With ``track_stats`` set, ``stats`` receives index recall and sparsity for the last call.
    """

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.block_size, self.topk = cfg.block_size, cfg.topk
        self.ops = resolve_ops(cfg.backend)
        self.phase: Phase = "sparse"
        self.track_stats = False
        self.stats: dict[str, float] = {}

    def forward(self, q, k, v, q_idx, k_idx, cu_seqlens=None):
        ops, Bk = self.ops, self.block_size
        if self.phase == "warmup":
            o = dense_attention(q, k, v, cu_seqlens)
            kl = ops.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, None, Bk, cu_seqlens)
            block_idx = None
            if self.track_stats:
                block_idx = ops.select_blocks(q_idx.detach(), k_idx.detach(), Bk, self.topk, cu_seqlens)
        else:
            block_idx = ops.select_blocks(q_idx.detach(), k_idx.detach(), Bk, self.topk, cu_seqlens)
            o, lse = ops.sparse_attention(q, k, v, block_idx, Bk, cu_seqlens)
            kl = ops.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, block_idx, Bk, cu_seqlens, lse=lse)
        if self.track_stats:
            self.stats = selection_stats(q.detach(), k.detach(), block_idx, Bk, cu_seqlens)
        return o, kl


@torch.no_grad()
def selection_stats(q, k, block_idx, block_size, cu_seqlens=None, n_queries: int = 16) -> dict[str, float]:
    """Index recall (dense teacher mass inside the selection) on ``n_queries`` evenly spaced query
    positions, and sparsity (share of visible query-key pairs the selection skips) over all queries.
    The queries ``q [B, Nq, H, D]`` may be the last ``Nq <= N`` positions of ``k [B, N, Hkv, D]``."""
    B, Nq, H, D = q.shape
    N, Hkv, G = k.shape[1], k.shape[2], q.shape[2] // k.shape[2]
    doc, pos = reference.doc_layout(B, N, cu_seqlens, q.device)
    doc_q, pos_q = doc[:, -Nq:], pos[:, -Nq:]
    idx = block_idx.long()
    start = idx * block_size  # first doc-relative position of each selected block
    kept = (pos_q[:, None, :, None] - start + 1).clamp(0, block_size) * (idx >= 0)
    sparsity = 1.0 - kept.sum().item() / ((pos_q + 1).sum().item() * Hkv)
    rows = torch.linspace(0, Nq - 1, min(n_queries, Nq), device=q.device).long()
    # [B, n, N] the keys each sampled query may see, and each key's block (the same for every group)
    visible = (doc_q[:, rows, None] == doc[:, None, :]) & (pos[:, None, :] <= pos_q[:, rows, None])
    blk = pos // block_size
    recall = 0.0
    for r in range(Hkv):
        # [B, G, n, N] scores of the sampled queries over every key, masked to what they may see
        s = torch.einsum("bqgd,bjd->bgqj", q[:, rows, r * G:(r + 1) * G].float(), k[:, :, r].float()) * D ** -0.5
        p = torch.softmax(s.masked_fill(~visible[:, None], float("-inf")), dim=-1).mean(1)  # [B, n, N]
        chosen = (blk[:, None, :, None] == idx[:, r, rows][:, :, None, :]).any(-1) & visible
        recall += (p * chosen).sum(-1).mean().item() / Hkv
    return {"index_recall": recall, "sparsity": sparsity}


class Attention(nn.Module):
    """GQA attention with per-head RMS QK-norm and partial RoPE (dense core)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_dim: int,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dim = n_heads, n_kv_heads, head_dim, rope_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.core: nn.Module = DenseCore()

    def project(self, x: torch.Tensor, rotary: Rotary):
        B, N, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, N, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(B, N, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(B, N, self.n_kv_heads, self.head_dim)
        return rotary.apply(q, self.rope_dim), rotary.apply(k, self.rope_dim), v

    def forward(self, x, rotary: Rotary, cu_seqlens=None):
        """``x [B, N, dim]`` -> ``(y [B, N, dim], kl)``; ``kl`` is 0 for dense attention."""
        q, k, v = self.project(x, rotary)
        o = self.core(q, k, v, cu_seqlens)
        return self.wo(o.reshape(*x.shape[:2], -1)), x.new_zeros((), dtype=torch.float32)


class MSAAttention(Attention):
    """MSA: the GQA main branch plus a lightweight index branch that picks key blocks.

    The index branch reads ``x.detach()``: ``q_idx = W_qi x -> [B, N, Hkv, Di]`` (one index-query head
    per group) and ``k_idx = W_ki x -> [B, N, Di]`` (one index-key head for all groups), each with
    RMSNorm and RoPE. Selection is discrete and the KL sees ``q, k`` detached, so the LM loss never
    reaches the index branch and the KL reaches nothing else.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_dim: int,
                 cfg: AttentionConfig, norm_eps: float = 1e-5):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, rope_dim, norm_eps)
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

    def forward(self, x, rotary: Rotary, cu_seqlens=None):
        B, N, _ = x.shape
        q, k, v = self.project(x, rotary)
        xd = x.detach()
        q_idx = self.q_idx_norm(self.wq_idx(xd).view(B, N, self.n_kv_heads, self.index_dim))
        k_idx = self.k_idx_norm(self.wk_idx(xd).view(B, N, 1, self.index_dim))
        q_idx = rotary.apply(q_idx, self.index_rope_dim)
        k_idx = rotary.apply(k_idx, self.index_rope_dim).squeeze(2)
        o, kl = self.core(q, k, v, q_idx, k_idx, cu_seqlens)
        return self.wo(o.reshape(B, N, -1)), kl


def attention_flops_per_token(n_heads: int, head_dim: int, context: float) -> float:
    """Forward FLOPs of ``q k^T`` and ``p v`` for one token attending to ``context`` keys."""
    return 4.0 * n_heads * head_dim * context


def mean_context(seq_len: int, cfg: AttentionConfig, sparse: bool) -> float:
    """Average keys a causal query sees in a ``seq_len`` sequence, capped at ``topk * block_size``."""
    if not sparse:
        return (seq_len + 1) / 2
    cap = cfg.topk * cfg.block_size
    if seq_len <= cap:
        return (seq_len + 1) / 2
    return (cap * (cap + 1) / 2 + (seq_len - cap) * cap) / seq_len


__all__ = [
    "AttentionConfig", "check_attention", "Attention", "MSAAttention", "DenseCore", "MSACore",
    "selection_stats", "attention_flops_per_token", "mean_context",
]
