"""Partial rotary position embedding (RoPE on the first ``rot_dim`` dims of each head), with the
frequency scalings pretrained checkpoints use (``linear``, ``dynamic``, ``yarn``, ``llama3``).

The scalings follow the formulas of the Hugging Face rope types of the same name, so a model imported
from such a checkpoint computes the same rotations; a recipe stage may also switch to one of them to
stretch a model's context (the alternative to raising the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from msa.host import to_device_async

ROPE_TYPES = ("none", "linear", "dynamic", "yarn", "llama3")
ROPE_IMPLS = ("auto", "torch", "triton")


@dataclass
class RopeScaling:
    """``model.rope_scaling.*`` (and a recipe stage's ``rope_scaling``): how the RoPE frequencies are
    stretched beyond the context a model was trained at. ``none`` keeps the plain frequencies."""

    type: str = "none"  # none | linear | dynamic | yarn | llama3
    factor: float = 1.0  # context stretch factor
    original_max_len: int = 0  # the pretrained context: yarn, llama3, dynamic (transformers' *max_position_embeddings)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations above which dims keep their frequency
    beta_slow: float = 1.0  # yarn: rotations below which dims are fully interpolated
    attention_factor: float | None = None  # yarn: cos/sin scale; None: 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's ends to whole dims


def check_rope_scaling(s: RopeScaling, key: str = "model.rope_scaling") -> None:
    if s.type not in ROPE_TYPES:
        raise ValueError(f"{key}.type={s.type!r}: use one of {', '.join(ROPE_TYPES)}")
    if s.type == "none":
        return
    if s.factor <= 0:
        raise ValueError(f"{key}.factor={s.factor} must be > 0")
    if s.type != "linear" and s.original_max_len < 1:
        raise ValueError(f"{key}.original_max_len must be set (the pretrained context length) for type {s.type}")
    if s.type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
        raise ValueError(f"{key}.high_freq_factor must exceed {key}.low_freq_factor")


def check_rope_impl(impl: str) -> None:
    if impl not in ROPE_IMPLS:
        raise ValueError(f"model.rope_impl={impl!r}: use one of {', '.join(ROPE_IMPLS)}")


def _plain(rot_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def _yarn(rot_dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN: dims that turn many times over the original context keep their frequency, dims that turn
    less than once are interpolated by ``factor``, a linear ramp in between; cos/sin are scaled."""
    def dim_of(rotations: float) -> float:  # the dim that turns ``rotations`` times over the original context
        return rot_dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    keep = 1 - ramp
    inv = (1.0 / (s.factor * powers)) * (1 - keep) + (1.0 / powers) * keep
    attention = s.attention_factor
    if attention is None:
        attention = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv, float(attention)


def _llama3(rot_dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    inv = _plain(rot_dim, base)
    ctx = s.original_max_len
    low_wavelen, high_wavelen = ctx / s.low_freq_factor, ctx / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def inv_freq(rot_dim: int, base: float, scaling: RopeScaling | None = None,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inverse frequencies [rot_dim / 2] float32, cos/sin scale)``. ``seq_len`` (the longest
    document, max position + 1) matters only to ``dynamic``, whose base grows past the original context."""
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return _plain(rot_dim, base), 1.0
    if kind == "linear":
        return _plain(rot_dim, base) / scaling.factor, 1.0
    if kind == "dynamic":
        ctx = scaling.original_max_len
        n = max(seq_len or ctx, ctx)
        grown = base * ((scaling.factor * n / ctx) - (scaling.factor - 1)) ** (rot_dim / (rot_dim - 2))
        return _plain(rot_dim, grown), 1.0
    if kind == "yarn":
        return _yarn(rot_dim, base, scaling)
    if kind == "llama3":
        return _llama3(rot_dim, base, scaling), 1.0
    raise ValueError(f"rope scaling type {kind!r}: use one of {', '.join(ROPE_TYPES)}")


class Rotary:
    """Rotary tables for one batch of positions, shared by every layer of a forward pass.

    ``positions [B, N]`` are positions inside each document (packed documents restart at 0), so a
    document's encoding does not depend on where it was packed. Tables are built once per rotary width
    (heads and the index branch may rotate different widths) in float32.
    """

    def __init__(self, positions: torch.Tensor, base: float, scaling: RopeScaling | None = None,
                 impl: str = "torch"):
        check_rope_impl(impl)
        self.positions = positions
        self.base = float(base)
        self.scaling = scaling
        self.impl = impl
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rot_dim not in self._tables:
            pos = self.positions
            if self.scaling is not None and self.scaling.type == "dynamic":
                inv, scale = self._dynamic(rot_dim)  # [B, N, rot_dim/2]: each document its own base
            else:
                inv, scale = inv_freq(rot_dim, self.base, self.scaling)
                inv = to_device_async(inv, pos.device)  # no host sync (a plain .to() waits for the GPU)
            angles = pos.float()[..., None] * inv  # [B, N, rot_dim/2]
            self._tables[rot_dim] = ((angles.cos() * scale)[:, :, None], (angles.sin() * scale)[:, :, None])
        return self._tables[rot_dim]

    def _dynamic(self, rot_dim: int) -> tuple[torch.Tensor, float]:
        """Per-token frequencies of ``dynamic`` scaling: its base depends on the length of the token's
        document (as transformers' does on the longest position of a forward over that document alone)."""
        pos = self.positions.long()
        B, N = pos.shape
        doc = (pos == 0).cumsum(-1) + torch.arange(B, device=pos.device)[:, None] * (N + 1)  # [B, N] document ids
        longest = torch.zeros(B * (N + 1), dtype=torch.long, device=pos.device)
        longest = longest.scatter_reduce(0, doc.flatten(), pos.flatten(), "amax")
        lengths = longest[doc] + 1  # [B, N]
        inv = torch.empty(B, N, rot_dim // 2, device=pos.device)
        for n in lengths.unique().tolist():
            inv[lengths == n] = inv_freq(rot_dim, self.base, self.scaling, n)[0].to(pos.device)
        return inv, 1.0

    def build(self, *rot_dims: int) -> Rotary:
        """Build the tables of ``rot_dims`` now, before the blocks run: a checkpointed block's recompute
        then finds the state its forward found (under ``torch.compile`` it would run another graph)."""
        for rot_dim in rot_dims:
            if rot_dim:
                self._table(rot_dim)
        return self

    def fused(self, x: torch.Tensor) -> bool:
        """Whether ``apply`` runs the Triton kernel (``kernels.rope``): ``triton`` always (CPU tensors only
        under ``TRITON_INTERPRET=1``), ``auto`` on CUDA tensors outside ``torch.compile`` (which fuses the
        PyTorch ops itself), ``torch`` never."""
        if self.impl == "auto":
            return x.is_cuda and not torch.compiler.is_compiling()
        return self.impl == "triton"

    def apply(self, x: torch.Tensor, rot_dim: int) -> torch.Tensor:
        """Rotate the first ``rot_dim`` dims of ``x [B, N, heads, dim]`` (halves convention)."""
        if rot_dim == 0:
            return x
        cos, sin = self._table(rot_dim)
        if self.fused(x):
            from kernels.rope import rotary_apply

            return rotary_apply(x, cos, sin, rot_dim)
        rot, rest = x[..., :rot_dim].float(), x[..., rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)
