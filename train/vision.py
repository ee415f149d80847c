"""Image patch embedding: image_patches [P, C*p*p] -> [P, dim], placed at the image-patch slots.

Three kinds (`model.vision.kind`):
- "linear": one projection per patch (the Fuyu-style patch embedding);
- "mlp": Linear -> GELU -> Linear;
- "vit": a small pre-norm transformer encoder over the patches of each image, then a projection.
With `image_sizes [I, 2]` (the (rows, cols) grid of each image, in patch order, as the loader
provides) each patch also gets a learned row and column embedding, so the decoder sees the layout;
the ViT needs it (its attention stays inside one image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionConfig:
    kind: str = "linear"  # "linear" | "mlp" | "vit"
    patch_size: int = 16  # must equal data.image.patch_size
    channels: int = 3
    max_grid: int = 256  # largest number of patch rows or columns of one image
    pos_embed: bool = True  # add row/column embeddings when image_sizes is given
    vit_width: int = 256
    vit_depth: int = 2
    vit_heads: int = 4


def patch_grid_positions(sizes: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, row, col) of every patch, from the per-image grids [I, 2]; patches of an
    image are contiguous and in raster order."""
    counts = sizes[:, 0] * sizes[:, 1]
    if int(counts.sum()) != n_patches:
        raise ValueError(f"image_sizes cover {int(counts.sum())} patches, image_patches has {n_patches}")
    image = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(n_patches, device=sizes.device) - starts[image]
    cols = sizes[image, 1]
    return image, local // cols, local % cols


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        in_dim = cfg.channels * cfg.patch_size**2
        if cfg.kind == "linear":
            self.proj = nn.Linear(in_dim, dim)
        elif cfg.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        else:
            raise ValueError(f"model.vision.kind={cfg.kind!r}: expected 'linear', 'mlp' or 'vit'")
        self.row = nn.Embedding(cfg.max_grid, dim) if cfg.pos_embed else None
        self.col = nn.Embedding(cfg.max_grid, dim) if cfg.pos_embed else None

    def forward(self, patches: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(patches)
        if self.row is not None and sizes is not None and len(patches):
            _, r, c = patch_grid_positions(sizes, len(patches))
            x = x + self.row(r.clamp_max(self.cfg.max_grid - 1)) + self.col(c.clamp_max(self.cfg.max_grid - 1))
        return x


class ViT(nn.Module):
    """Patches of each image attend to each other (not across images); output projected to dim."""

    def __init__(self, cfg: VisionConfig, dim: int):
        super().__init__()
        if cfg.vit_width % cfg.vit_heads:
            raise ValueError(
                f"model.vision.vit_width={cfg.vit_width} not divisible by model.vision.vit_heads={cfg.vit_heads}"
            )
        self.cfg = cfg
        self.embed = PatchEmbed(VisionConfig(**{**cfg.__dict__, "kind": "linear", "pos_embed": True}),
                                cfg.vit_width)
        layer = nn.TransformerEncoderLayer(cfg.vit_width, cfg.vit_heads, 4 * cfg.vit_width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.vit_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.vit_width)
        self.out = nn.Linear(cfg.vit_width, dim)

    def forward(self, patches: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        if sizes is None:
            raise ValueError("model.vision.kind=vit needs the batch's image_sizes (which patches form an image)")
        if len(patches) == 0:
            return self.out(self.embed(patches))
        x = self.embed(patches, sizes)  # [P, W]
        image, _, _ = patch_grid_positions(sizes, len(patches))
        counts = sizes[:, 0] * sizes[:, 1]
        local = torch.arange(len(patches), device=patches.device) - (torch.cumsum(counts, 0) - counts)[image]
        padded = x.new_zeros(len(sizes), int(counts.max()), x.shape[-1])  # [I, Lmax, W]
        padded[image, local] = x
        pad_mask = torch.arange(padded.shape[1], device=x.device)[None, :] >= counts[:, None]
        y = self.blocks(padded, src_key_padding_mask=pad_mask)
        return self.out(self.norm(y[image, local]))


def build_vision(cfg: VisionConfig, dim: int) -> nn.Module:
    """The image embedding of a decoder of width `dim`: forward(image_patches [P, C*p*p],
    image_sizes [I, 2] | None) -> [P, dim]."""
    if cfg.kind == "vit":
        return ViT(cfg, dim)
    return PatchEmbed(cfg, dim)
