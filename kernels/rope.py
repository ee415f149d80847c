"""Rotary position embedding in one Triton kernel per direction (``msa.rope.Rotary.apply``'s fused path).

The PyTorch path casts the rotated dims to fp32, splits them, runs four products, a difference, a sum, two
concatenations and a cast: about nine kernels and as many fp32 temporaries for each of the four tensors an
MSA layer rotates (``q``, ``k``, ``q_idx``, ``k_idx``), and as many again in the backward and in the
checkpoint's recompute. Here one program loads a tile of tokens of one head, rotates the first ``R`` dims
in fp32 with the same tables (``cos``/``sin`` ``[B, N, 1, R/2]`` fp32, halves convention), copies the
rest and writes the input's dtype: one read and one write of ``x``. The backward is the rotation by the
opposite angle (the same kernel with ``sin`` negated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary_apply"]


@triton.jit
def rotary_kernel(x, cos, sin, y, T, HX: tl.constexpr, D: tl.constexpr, R: tl.constexpr, SIGN: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``y[t, h, :] = rotate(x[t, h, :])`` for ``BLOCK_T`` tokens ``t`` (rows of ``[T, HX, D]``) of head
    ``h``: ``y_d = x_d cos_j - x_{d+R/2} sin_j`` for ``d < R/2`` (``j = d``), ``y_d = x_d cos_j +
    x_{d-R/2} sin_j`` for ``R/2 <= d < R`` (``j = d - R/2``), ``y_d = x_d`` beyond; ``SIGN = -1`` rotates
    back (the backward)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = R // 2
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_t = o_t < T
    m = m_t[:, None] & (o_d < D)[None, :]
    rot = o_d < R
    first = o_d < HALF
    partner = tl.where(first, o_d + HALF, o_d - HALF)
    j = tl.where(first, o_d, o_d - HALF)
    row = (o_t.to(tl.int64) * HX + i_h) * D
    b_x = tl.load(x + row[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    m_r = m_t[:, None] & rot[None, :]
    b_p = tl.load(x + row[:, None] + partner[None, :], mask=m_r, other=0.0).to(tl.float32)
    o_cs = o_t.to(tl.int64)[:, None] * HALF + j[None, :]
    b_c = tl.load(cos + o_cs, mask=m_r, other=1.0)
    b_s = tl.load(sin + o_cs, mask=m_r, other=0.0)
    sign = tl.where(first, -1.0, 1.0) * SIGN
    b_y = tl.where(rot[None, :], b_x * b_c + (sign[None, :] * b_p) * b_s, b_x)
    tl.store(y + row[:, None] + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int, sign: int) -> torch.Tensor:
    x = x.contiguous()
    B, N, HX, D = x.shape
    y = torch.empty_like(x)
    T = B * N
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(64, 4096 // block_d))
    rotary_kernel[(triton.cdiv(T, block_t), HX)](x, cos, sin, y, T, HX=HX, D=D, R=rot_dim, SIGN=sign,
                                                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, rot_dim):
        ctx.save_for_backward(cos, sin)
        ctx.rot_dim = rot_dim
        return _launch(x, cos, sin, rot_dim, 1)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, ctx.rot_dim, -1), None, None, None


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Rotate the first ``rot_dim`` dims of ``x [B, N, heads, dim]`` by the fp32 tables ``cos``/``sin``
    (``[B or 1, N, 1, rot_dim / 2]``, as ``msa.rope.Rotary`` builds them); differentiable in ``x``."""
    B, N, _, D = x.shape
    if rot_dim % 2 or not 0 < rot_dim <= D:
        raise ValueError(f"rot_dim must be even and in (0, {D}], got {rot_dim}")
    shape = (B, N, 1, rot_dim // 2)
    if tuple(cos.shape) != shape:
        if cos.shape[1:] != shape[1:] or cos.shape[0] not in (1, B):
            raise ValueError(f"cos/sin tables must be [{B} or 1, {N}, 1, {rot_dim // 2}], got {tuple(cos.shape)}")
        cos, sin = cos.expand(shape), sin.expand(shape)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return RotaryFunction.apply(x, cos, sin, rot_dim)
