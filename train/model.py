"""The decoder: token (and image-patch) embeddings, ``attention.n_dense_layers`` dense GQA blocks, then
MSA blocks, RMSNorm, SwiGLU MLPs and a chunked cross-entropy that never holds ``N x vocab`` logits.

Plain modules, no ranks. What is applied from outside (``train/parallel/parallelize.py``) goes through
three small hooks: ``Block.attn.wrap_core`` (sequence/context parallelism), ``Block.wrap_mlp`` (tiled
MLP) and ``Decoder.set_block_runner`` (activation checkpointing).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from msa.layer import PHASES, Attention, AttentionConfig, MSAAttention, MSACore, Phase, check_attention
from msa.rope import RopeScaling, Rotary, check_rope_impl, check_rope_scaling
from train.vision import VisionConfig, build_vision


@dataclass
class ModelConfig:
    """``model.*``: decoder shape. ``model=tiny|small|base|1b`` picks a preset in conf/model/;
    ``model=hf model.path=DIR`` imports a Hugging Face checkpoint (``train/hf.py`` reads the shape and
    the options below from its config.json at start)."""

    name: str = "tiny"
    path: str | None = None  # a local Hugging Face checkpoint directory (model=hf)
    vocab_size: int = 384
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 0  # 0: 8/3 * dim rounded up to a multiple of 64
    rope_dim: int = 16  # partial RoPE: rotary on the first rope_dim dims of each head
    rope_base: float = 10000.0  # a recipe stage may set its own
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # a recipe stage may set its own
    # auto (the fused Triton kernel of kernels/rope.py on CUDA outside torch.compile, else PyTorch) | torch |
    # triton; auto since it was measured on the GPU (docs/scaling.md, "Fused RoPE")
    rope_impl: str = "auto"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qk_norm: bool = True  # per-head RMS QK-norm (pretrained Llama/Mistral/Qwen2 have none)
    qkv_bias: bool = False  # biases in the q/k/v projections (Qwen2)
    out_bias: bool = False  # a bias in the output projection (Llama's attention_bias)
    sliding_window: int = 0  # > 0: sliding layers attend to the last sliding_window keys (Mistral, Qwen)
    sliding_layers: list[int] | None = None  # None: every layer, when sliding_window > 0; they stay dense
    ce_chunk_tokens: int = 8192  # cross-entropy chunk: logits exist for this many tokens at a time
    init_std: float = 0.02
    vision: VisionConfig = field(default_factory=VisionConfig)


def check_model(cfg: ModelConfig, attn: AttentionConfig) -> None:
    """Reject model shapes that cannot work, naming the key to change."""
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ce_chunk_tokens"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.rope_dim % 2 or not 0 <= cfg.rope_dim <= cfg.head_dim:
        raise ValueError(f"model.rope_dim={cfg.rope_dim} must be even and <= model.head_dim={cfg.head_dim}")
    if cfg.sliding_window < 0:
        raise ValueError(f"model.sliding_window={cfg.sliding_window} must be >= 0 (0: no sliding window)")
    bad = [i for i in cfg.sliding_layers or [] if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"model.sliding_layers={cfg.sliding_layers}: {bad} outside [0, model.n_layers={cfg.n_layers})")
    check_rope_scaling(cfg.rope_scaling)
    check_rope_impl(cfg.rope_impl)
    check_attention(attn, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers)


def sliding_layers(cfg: ModelConfig) -> set[int]:
    """The layers with a sliding window: they keep dense (windowed) attention, never MSA."""
    if cfg.sliding_window <= 0:
        return set()
    return set(range(cfg.n_layers)) if cfg.sliding_layers is None else set(cfg.sliding_layers)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, sparse: bool, window: int = 0):
        super().__init__()
        args = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim)
        opts = {"qkv_bias": cfg.qkv_bias, "out_bias": cfg.out_bias, "qk_norm": cfg.qk_norm}
        if sparse:
            self.attn = MSAAttention(*args, attn_cfg, cfg.norm_eps, **opts)
        else:
            self.attn = Attention(*args, cfg.norm_eps, **opts, window=window, varlen=attn_cfg.dense_varlen)
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        hidden = cfg.ffn_dim or 64 * math.ceil(8 * cfg.dim / 3 / 64)
        self.mlp = SwiGLU(cfg.dim, hidden)
        self._mlp_call = None

    def index_params(self) -> list[nn.Parameter]:
        """The MSA index branch's weights (none in a dense block)."""
        return self.attn.index_params() if isinstance(self.attn, MSAAttention) else []

    def main_path_learns(self, x: torch.Tensor) -> bool:
        """Whether the main path needs a backward: its input or a weight outside the index branch takes a
        gradient. It does not in a stage that trains only the index branch (``Decoder.train_main``)."""
        if x.requires_grad:
            return True
        index = {id(p) for p in self.index_params()}
        return any(p.requires_grad for p in self.parameters() if id(p) not in index)

    def wrap_mlp(self, wrap) -> None:
        """Run the MLP as ``wrap(mlp)(x)`` (the MLP module and its parameter names stay as they are)."""
        self._mlp_call = wrap(self.mlp)

    def forward(self, x, rotary: Rotary, cu_seqlens=None, phase: Phase = "sparse", stats_queries: int = 0):
        """``x [B, N, dim]`` -> ``(x, kl, stats)`` (kl and stats None in a dense block)."""
        a, kl, stats = self.attn(self.attn_norm(x), rotary, cu_seqlens, phase, stats_queries)
        x = x + a
        h = self.mlp_norm(x)
        return x + (self._mlp_call or self.mlp)(h), kl, stats


def _ce_sum(h, weight, labels):
    return F.cross_entropy((h @ weight.t()).float(), labels, ignore_index=-100, reduction="sum")


def _ce_tokens(h, weight, labels):
    return F.cross_entropy((h @ weight.t()).float(), labels, ignore_index=-100, reduction="none")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          groups: torch.Tensor | None = None, n_groups: int = 0):
    """Summed cross-entropy of ``h [T, dim] @ weight.T`` against ``labels [T]`` (-100 ignored).

    Each chunk's logits are recomputed in backward (checkpointed), so at most ``chunk x vocab`` logits
    exist at any time. With ``groups [T]`` (ints in ``[0, n_groups)``, -1 for none) it returns
    ``(total, group_sums)``: the total as before and, detached, each group's share of it (``[n_groups]``)."""
    total = h.new_zeros((), dtype=torch.float32)
    sums = None if groups is None else h.new_zeros(n_groups, dtype=torch.float32)
    # no step here reads a value back to the host: a chunk whose targets are all ignored adds 0 (cross-entropy's
    # sum over no target), and the groups' sums add through a mask, not by boolean indexing (a host sync each)
    for s in range(0, h.shape[0], chunk):
        lab = labels[s:s + chunk]
        if groups is None:
            total = total + checkpoint(_ce_sum, h[s:s + chunk], weight, lab, use_reentrant=False)
            continue
        tok = checkpoint(_ce_tokens, h[s:s + chunk], weight, lab, use_reentrant=False)
        total = total + tok.sum()
        g = groups[s:s + chunk]
        keep = (lab != -100) & (g >= 0)
        sums.index_add_(0, g.clamp_min(0), torch.where(keep, tok.detach(), 0.0))
    return total if groups is None else (total, sums)


class Decoder(nn.Module):
    """Mixed text-image decoder. ``forward(batch, phase, stats_queries)`` takes the data pipeline's
    packed batch and returns ``{"lm_sum", "n_tokens", "kl", "layer_kl", "layer_stats"}``: summed LM loss
    over text targets, their count, the sum over MSA layers of the index KL (each averaged over tokens
    and groups), the per-layer KL (detached, ``[n_msa_layers]``) and per-layer selection stats (a list,
    None entries unless ``stats_queries > 0``). A batch with ``loss_groups`` (several data sources: the
    loader's ``collate``) adds ``group_lm_sum`` and ``group_n_tokens`` (``[n_loss_groups]``, detached): the
    LM sum and target count of each group."""

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig):
        super().__init__()
        check_model(cfg, attn_cfg)
        self.cfg, self.attn_cfg = cfg, attn_cfg
        self.rope_base, self.rope_scaling = cfg.rope_base, cfg.rope_scaling
        n_dense = cfg.n_layers if attn_cfg.kind == "dense" else attn_cfg.n_dense_layers
        window = sliding_layers(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.vision = build_vision(cfg.vision, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, attn_cfg, sparse=i >= n_dense and i not in window,
                  window=cfg.sliding_window if i in window else 0)
            for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._block_runner = None
        self.reset_parameters()

    def reset_parameters(self):
        """Normal weights, each matrix drawn from its own generator seeded by the run's seed
        (``torch.initial_seed()``, set by ``run.seed``) and the parameter's name: a weight's initial value
        does not depend on which other weights the model has. So a dense and an MSA model of one seed start
        from the same shared weights (the index branch's matrices do not shift the draws of the layers after
        them): the quality run's two arms of a seed are paired from the first step."""
        std, seed = self.cfg.init_std, torch.initial_seed()
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.ndim < 2:  # norm weights keep their ones; biases (qkv_bias) start at zero, as in Qwen2
                if name.endswith(".bias"):
                    nn.init.zeros_(p)
                continue
            # residual-branch outputs shrink with depth so the residual stream keeps its scale
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else 1
            digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std * scale))

    def blocks(self) -> list[Block]:
        return list(self.layers)

    def msa_layers(self) -> list[int]:
        """Indices (in ``layers``) of the MSA blocks."""
        return [i for i, b in enumerate(self.layers) if isinstance(b.attn, MSAAttention)]

    def msa_cores(self) -> list[MSACore]:
        """The MSA layers' attention cores, in ``msa_layers`` order."""
        return [m for m in self.modules() if isinstance(m, MSACore)]

    def take_backward_kl(self) -> torch.Tensor | None:
        """Per MSA layer (``msa_layers`` order, as ``layer_kl``), the index KL its backward computed since
        the last call (``attention.kl_in_backward``; 0 for a layer whose KL came from the forward), or
        None when no layer reported one. The forward's ``kl`` counts such a layer as 0: add this after
        backward for the value."""
        values = [c.take_backward_kl() for c in self.msa_cores()]
        if all(v is None for v in values):
            return None
        zero = next(v for v in values if v is not None).new_zeros(())
        return torch.stack([zero if v is None else v for v in values])

    def set_kl_offset(self, step: int) -> None:
        """The queries a strided index KL (``attention.kl_query_stride``) counts at training step ``step``."""
        for core in self.msa_cores():
            core.set_kl_offset(step)

    def train_main(self, on: bool) -> None:
        """Whether the main weights (every parameter but the MSA index branches') take gradients. Off, the
        main path runs without an autograd graph (nothing saved for a backward, nothing to recompute) and
        only the index branches and their KL build one: they read ``x.detach()`` and ``q, k`` detached, so
        their gradients are those of a step with every weight taking gradients and the LM loss detached."""
        index = {id(p) for b in self.layers for p in b.index_params()}
        for p in self.parameters():
            if id(p) not in index:
                p.requires_grad_(on)

    def set_block_runner(self, runner) -> None:
        """Run each block as ``runner(block, *args)`` instead of ``block(*args)`` (e.g. checkpointed)."""
        self._block_runner = runner

    def set_rope(self, base: float, scaling: RopeScaling) -> None:
        """A recipe stage's RoPE base and frequency scaling (set when the stage starts)."""
        self.rope_base, self.rope_scaling = float(base), scaling

    def embed_inputs(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch["input_ids"])
        patches = batch.get("image_patches")
        if patches is not None and patches.shape[0] == 0:
            # no image in this batch: still run the vision weights, at zero weight, so every
            # data-parallel rank has their gradients (ZeRO 1/2 reduce gradients parameter by parameter)
            sizes = batch.get("image_sizes")
            probe = self.vision(patches.new_zeros(1, patches.shape[1]).to(x.dtype),
                                None if sizes is None else sizes.new_ones(1, 2))
            return x + 0.0 * probe.sum()
        if patches is not None:
            flat = x.reshape(-1, x.shape[-1])
            emb = self.vision(patches.to(x.dtype), batch.get("image_sizes"))
            if batch.get("image_keep") is not None:  # a sequence shard: the patches whose slots it holds
                emb = emb[batch["image_keep"]]
            flat = flat.index_copy(0, batch["image_slots"], emb)
            x = flat.view_as(x)
        return x

    def hidden_states(self, batch: dict, phase: Phase = "sparse", stats_queries: int = 0) -> tuple:
        """The final-norm hidden states ``[B', N', dim]`` (packed rows flattened to one row when
        ``cu_seqlens`` is given), the labels in the same layout, and the per-layer MSA outputs
        ``(kl, layer_kl, layer_stats)``."""
        if phase not in PHASES:
            raise ValueError(f"attention phase must be warmup or sparse, got {phase!r}")
        cu_seqlens = batch.get("cu_seqlens")
        x = self.embed_inputs(batch)
        positions, labels = batch["position_ids"], batch["labels"]
        if cu_seqlens is not None and x.shape[0] > 1:  # packed rows: one sequence of B*N tokens
            x, positions, labels = x.reshape(1, -1, x.shape[-1]), positions.reshape(1, -1), labels.reshape(1, -1)
        widths = {w for b in self.layers for w in (b.attn.rope_dim, getattr(b.attn, "index_rope_dim", 0))}
        rotary = Rotary(positions, self.rope_base, self.rope_scaling, self.cfg.rope_impl).build(*widths)
        kl, layer_kl, layer_stats = x.new_zeros((), dtype=torch.float32), [], []
        for block in self.layers:
            args = (x, rotary, cu_seqlens, phase, stats_queries)
            x, block_kl, stats = self._block_runner(block, *args) if self._block_runner else block(*args)
            if block_kl is not None:
                kl = kl + block_kl
                layer_kl.append(block_kl.detach())
                layer_stats.append(stats)
        layer_kl = torch.stack(layer_kl) if layer_kl else kl.new_zeros(0)
        return self.norm(x), labels, (kl, layer_kl, layer_stats)

    def output_weight(self) -> torch.Tensor:
        """``[vocab, dim]``: the LM head (the token embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, batch: dict, phase: Phase = "sparse", stats_queries: int = 0) -> dict:
        h, labels, (kl, layer_kl, layer_stats) = self.hidden_states(batch, phase, stats_queries)
        labels = labels.reshape(-1)
        groups = batch.get("loss_groups")
        if groups is None:
            lm_sum = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.output_weight(), labels,
                                           self.cfg.ce_chunk_tokens)
        else:  # several data sources: each group's LM loss too (loss/lm/<name>, loss/answer/<name>)
            groups, n = groups.reshape(-1), batch["n_loss_groups"]
            lm_sum, group_sum = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.output_weight(), labels,
                                                      self.cfg.ce_chunk_tokens, groups, n)
            counted = (labels != -100) & (groups >= 0)
            extra = {"group_lm_sum": group_sum, "group_n_tokens": torch.bincount(groups[counted], minlength=n)}
        out = {"lm_sum": lm_sum, "n_tokens": (labels != -100).sum(), "kl": kl, "layer_kl": layer_kl,
               "layer_stats": layer_stats}
        return out if groups is None else {**out, **extra}

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


def build_model(cfg: ModelConfig, attn_cfg: AttentionConfig) -> Decoder:
    """A freshly initialised decoder (a run that starts from ``model.path`` loads the checkpoint's weights
    into it: ``train.loop.start``; evals and exports load their own)."""
    return Decoder(cfg, attn_cfg)
