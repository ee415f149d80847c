"""kernels.index_kl_tile (the index KL, query-tile-outer) against msa.reference.index_kl_loss: the loss and both
gradients.

CPU: the Triton interpreter on small fp32 shapes, unwritten outputs NaN-poisoned, tiles of 16 queries so that
several tiles, tiles across documents and a last partial tile are exercised, on random selections (unions larger
than each query's blocks, so the membership test matters). GPU (marked): bf16 at real sizes, against the
reference and the KV-outer form's error.
"""

import pytest
import torch

from kernels.common import build_layout
from kernels.index_kl import index_kl_loss
from kernels.index_kl_tile import index_kl_tile_fwd
from kernels.sparse_tiles import Tiles
from msa import reference as ref
from tests.test_kernel_index import CU_ONE_TOKEN_DOCS, _kl_and_grads, _kl_inputs
from tests.test_kernel_sparse_attention import random_block_idx
from tests.utils import poison_empty, rel_rms


@pytest.mark.parametrize("B,Nq,N,H,Hkv,topk,cu", [
    (2, 63, 63, 2, 1, 3, None),                           # G = 2, two rows, a last partial tile
    (1, 90, 120, 6, 2, 5, [0, 1, 1, 50, 51, 52, 90, 90, 120]),  # G = 3, 1-token and empty documents, Nq < N
    (1, 200, 200, 4, 2, 4, CU_ONE_TOKEN_DOCS),           # G = 2 over two groups
    (1, 100, 100, 20, 2, 6, None),                        # G = 10
])
def test_matches_reference(monkeypatch, B, Nq, N, H, Hkv, topk, cu):
    bs = 16
    q, k, v, q_idx, k_idx = _kl_inputs(B, Nq, N, H, Hkv, 16, 16)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    block_idx = random_block_idx(B, Hkv, N, topk, bs, cu, Nq=Nq)
    lse = ref.sparse_attention(q, k, v, block_idx, bs, cu)[1]
    want = _kl_and_grads(ref.index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, cu)
    tok_start = build_layout(N, bs, cu, "cpu").tok_start
    poison_empty(monkeypatch)
    got = index_kl_tile_fwd(q, k, q_idx.detach(), k_idx.detach(), block_idx, bs, tok_start, lse, True,
                            Tiles(block_m=16, num_stages=1))
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        err = rel_rms(w, g)
        assert err < 1e-5, f"{name}: rel rms {err:.2e}, max abs {(w - g).abs().max():.2e}"
    loss, dq, dk = index_kl_tile_fwd(q, k, q_idx.detach(), k_idx.detach(), block_idx, bs, tok_start, lse, False,
                                     Tiles(block_m=16, num_stages=1))
    assert torch.equal(loss, got[0]) and dq is None and dk is None, "the loss without gradients is the same sum"


def test_through_index_kl_loss_empty_rows_and_the_selection_path(monkeypatch):
    """``index_kl_loss(kl_path="tile")`` in autograd, with rows of empty support (no slot, or a block past the
    query) and an upstream gradient; ``select_blocks``' own selection; a bad path names the key."""
    bs, N, H, Hkv = 16, 100, 4, 2
    q, k, v, q_idx, k_idx = _kl_inputs(1, N, N, H, Hkv, 16, 16)
    block_idx = ref.select_blocks(q_idx.detach(), k_idx.detach(), bs, 3)
    block_idx[:, :, 10:30] = -1
    block_idx[:, 0, 40, 0] = 5  # block 5 starts at key 80: not visible to query 40
    lse = ref.sparse_attention(q, k, v, block_idx, bs)[1]
    want = _kl_and_grads(lambda *a, **kw: 2.5 * ref.index_kl_loss(*a, **kw), q, k, q_idx, k_idx, block_idx, bs)
    poison_empty(monkeypatch)
    got = _kl_and_grads(lambda *a, **kw: 2.5 * index_kl_loss(*a, **kw), q, k, q_idx, k_idx, block_idx, bs, lse=lse,
                        kl_path="tile")
    for name, w, g in zip(("loss", "dq_idx", "dk_idx"), want, got):
        assert rel_rms(w, g) < 1e-5, name
    assert torch.equal(got[1][0, 10:30], torch.zeros_like(got[1][0, 10:30])), "no support, no gradient"
    with pytest.raises(ValueError, match="attention.kl_path"):
        index_kl_loss(q, k, q_idx, k_idx, block_idx, bs, lse=lse, kl_path="query")


@pytest.mark.gpu
@pytest.mark.parametrize("G", [4, 16])
def test_gpu_bf16_matches_reference_and_the_kv_outer_form(G):
    from kernels import select_blocks, sparse_attention

    N, Hkv, D, Di, bs, topk = 4096 + 77, 2, 128, 64, 128, 16
    q, k, v, q_idx, k_idx = _kl_inputs(1, N, N, G * Hkv, Hkv, D, Di, "cuda", torch.bfloat16)
    block_idx = select_blocks(q_idx.detach(), k_idx.detach(), bs, topk)
    with torch.no_grad():
        lse = sparse_attention(q, k, v, block_idx, bs)[1]
    want = _kl_and_grads(ref.index_kl_loss, q.float(), k.float(), q_idx, k_idx, block_idx, bs)
    kv = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, lse=lse)
    tile = _kl_and_grads(index_kl_loss, q, k, q_idx, k_idx, block_idx, bs, lse=lse, kl_path="tile")
    for i, name in enumerate(("loss", "dq_idx", "dk_idx")):
        err, err_kv = rel_rms(want[i].float(), tile[i].float()), rel_rms(want[i].float(), kv[i].float())
        assert err < {"loss": 1e-4}.get(name, 1e-2) and err <= 1.5 * err_kv + 1e-6, (name, err, err_kv)
