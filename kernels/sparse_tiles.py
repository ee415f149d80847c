"""What the forward and the backward of ``kernels.sparse_attention`` share: their launch settings
(``Tiles``, ``Launch``: the ``launch`` argument, re-exported by ``kernels.sparse_attention``) and the pieces
of kernel code both run (a work item's K/V tile, where a query's slot partials start).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import triton
import triton.language as tl

from kernels.common import work_keys

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV: tl.constexpr, D: tl.constexpr):
    """The K and V rows ``o_k`` (``m_k``: inside the sequence) of batch ``i_b``, KV head ``i_r``."""
    o_kv = ((i_b.to(tl.int64) * N + o_k) * HKV + i_r)[:, None] * D + tl.arange(0, D)[None, :]
    return tl.load(k + o_kv, mask=m_k[:, None], other=0.0), tl.load(v + o_kv, mask=m_k[:, None], other=0.0)


@triton.jit
def _work_item(k, v, work_bucket, work_start, work_end, vb_start, vb_end, i_w, t0, N, NV,
               HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """``work_keys`` and the item's K/V tile: ``e0, e1, i_b, i_r, o_k, m_k, b_k, b_v``."""
    e0, e1, i_b, i_r, o_k, m_k = work_keys(work_bucket, work_start, work_end, vb_start, vb_end, i_w, t0, NV,
                                            HKV, BLOCK_N)
    b_k, b_v = _load_kv(k, v, i_b, i_r, o_k, m_k, N, HKV, D)
    return e0, e1, i_b, i_r, o_k, m_k, b_k, b_v


# Integer arguments whose value depends on the selection, not the shape: ``w0``, a query chunk's first work
# item. Triton compiles a kernel once per pattern of its integer arguments (== 1, divisible by 16), so a
# data-dependent one compiles a second variant whenever it first falls on a multiple of 16, mid-run. At 128K
# tokens (two query chunks) that gave one step of 3.5-3.8 s among steps of 1.3 s in three of three H200 runs;
# with w0 unspecialized, five runs showed none (docs/scaling.md, third sweep).
DATA_DEPENDENT = ["w0"]


@triton.jit
def _query_slots(tok_start, N, NQ, NC, q0, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr,
                 D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Where the merge of one (query, group)'s slot partials starts (combine, dQ reduce): program
    ``(query - q0, batch * Hkv + group)``, the query's position in its document and its first partial."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_q = q0 + i_c
    i_n = N - NQ + i_q
    o_g = tl.arange(0, BLOCK_G)
    pos = i_n - tl.load(tok_start + i_n)
    e0 = (i_bh.to(tl.int64) * NC + i_c) * TOPK
    return i_bh, i_bh // HKV, i_bh % HKV, i_q, o_g, o_g < G, tl.arange(0, D), pos, e0


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: rows per tile (gathered (query, head) rows; the delta kernel's queries), keys
    per tile, warps, pipeline stages. Rows are raised to 16 (tensor cores) and to the next power of
    two of G, keys clipped to the block size."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class Launch:
    """Launch settings of the sparse-attention kernels; the defaults won the H200 sweeps of
    ``bench/tune_sparse_attention.py`` (docs/kernels.md has the numbers).

    ``fwd_path``: which forward runs (``FWD_PATHS``), ``tile_fwd`` the tile forward's launch (its ``block_m``
    (query, head) rows per tile, whole queries; ``block_n`` unused: a key block is one tile).
    ``chunk``: entries per KV-outer work item (a hot block gets several). ``part_bytes``: memory for one
    query chunk's forward or dQ partials (queries go in chunks that fit). ``dkdv_bytes``: memory for the
    fp32 dK/dV partials together, one tile each per work item: the backward takes the query chunks in groups
    whose items fit (``dkdv_groups``; a chunk with more is a group alone), and work items grow past ``chunk``
    where all items would pass it (a rule from before the groups, kept: the 1M steps were measured with it)."""

    fwd: Tiles = Tiles(block_m=64)
    combine: Tiles = Tiles()
    delta: Tiles = Tiles(block_m=64)
    dq: Tiles = Tiles(block_m=64)  # the KV-outer dQ kernel (dq_path "kv")
    dq_reduce: Tiles = Tiles()
    dkdv: Tiles = Tiles(block_m=64, block_n=64, num_stages=2)  # dK/dV alone (dq_path "kv")
    dkdv_dq: Tiles = Tiles(block_m=64, block_n=64)  # dK/dV writing dQ partials too (dq_path "dkdv")
    # dK/dV with the index KL in it (sparse_attention_kl, either dQ path): the best of both H200 sweeps at
    # G = 4 and 16 (fwd+bwd at 32K: 48.8 against 78.4 ms with the plain kernel's tiles at G = 4, 51.9
    # against 69.3 ms at G = 16; docs/kernels.md)
    dkdv_kl: Tiles = Tiles(block_m=128, block_n=64, num_warps=8)
    dkdv_reduce: Tiles = Tiles()  # its block_n: keys per program, independent of the dK/dV kernel's tiles
    chunk: int = 256
    part_bytes: int = 2**32
    dkdv_bytes: int = 2**32
    # the forward: "kv" (KV-outer over the reverse index, partials, combine), "tile" (kernels/sparse_tile.py:
    # each tile of queries over the union of its blocks) or "auto" (tile where the selection is local enough to
    # pay, kernels.sparse_tile.tile_pays); the backward's dK/dV are KV-outer in every case, its dQ as dq_path says
    fwd_path: str = "kv"
    # the tile forward's (and the tile dQ's) rows, warps, stages: the best of bench/tile_fwd.py's forward sweep on
    # an H100 (docs/kernels.md)
    tile_fwd: Tiles = Tiles(block_m=64, num_warps=4, num_stages=1)


LAUNCH = Launch()
FWD_PATHS = ("kv", "tile", "auto")
DQ_PATHS = ("auto", "kv", "dkdv", "tile")  # the backward's dQ (kernels.sparse_attention.resolve_dq_path)


def check_fwd_path(fwd_path: str) -> None:
    if fwd_path not in FWD_PATHS:
        raise ValueError(f"fwd_path must be one of {FWD_PATHS}, got {fwd_path!r} (attention.fwd_path)")


def _warps(t: Tiles) -> dict:
    return dict(num_warps=t.num_warps, num_stages=t.num_stages)


def _rows(t: Tiles, G: int) -> dict:
    return dict(BLOCK_M=max(t.block_m, 16, triton.next_power_of_2(G)), **_warps(t))


def _group(t: Tiles, G: int) -> dict:
    return dict(BLOCK_G=max(16, triton.next_power_of_2(G)), **_warps(t))


def _dkdv_field(dq_path: str) -> str:
    """The ``Launch`` field of the dQ path's dK/dV kernel."""
    return "dkdv_dq" if dq_path == "dkdv" else "dkdv"


def with_kl_tiles(launch: Launch, dq_path: str) -> Launch:
    """``launch`` with the dQ path's dK/dV field set to ``dkdv_kl``: what ``sparse_attention_kl`` runs
    with, so its reverse index and its backward see the same key tiles."""
    return replace(launch, **{_dkdv_field(dq_path): launch.dkdv_kl})


def dkdv_items(launch: Launch, block_size: int, D: int) -> int:
    """Work items whose fp32 dK and dV partials (a ``[block_size, D]`` tile of each per item) fit
    ``launch.dkdv_bytes`` together."""
    return launch.dkdv_bytes // (block_size * D * 8)


def _dkdv_tiles(launch: Launch, dq_path: str, G: int, block_size: int) -> dict:
    t = getattr(launch, _dkdv_field(dq_path))
    return dict(_rows(t, G), BLOCK_N=min(t.block_n, block_size))
