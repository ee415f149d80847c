"""Partial rotary position embedding (RoPE on the first ``rot_dim`` dims of each head)."""

from __future__ import annotations

import torch


class Rotary:
    """Rotary tables for one batch of positions, shared by every layer of a forward pass.

    ``positions [B, N]`` are positions inside each document (packed documents restart at 0), so a
    document's encoding does not depend on where it was packed. Tables are built once per rotary width
    (heads and the index branch may rotate different widths) in float32.
    """

    def __init__(self, positions: torch.Tensor, base: float):
        self.positions = positions
        self.base = float(base)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rot_dim not in self._tables:
            inv = self.base ** (-torch.arange(0, rot_dim, 2, device=self.positions.device).float() / rot_dim)
            angles = self.positions.float()[..., None] * inv  # [B, N, rot_dim/2]
            self._tables[rot_dim] = (angles.cos()[:, :, None], angles.sin()[:, :, None])
        return self._tables[rot_dim]

    def apply(self, x: torch.Tensor, rot_dim: int) -> torch.Tensor:
        """Rotate the first ``rot_dim`` dims of ``x [B, N, heads, dim]`` (halves convention)."""
        if rot_dim == 0:
            return x
        cos, sin = self._table(rot_dim)
        rot, rest = x[..., :rot_dim].float(), x[..., rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)
