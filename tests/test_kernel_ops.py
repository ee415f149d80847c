"""kernels/ops.py: each op's schema holds (no input mutated, outputs alias nothing) and its fake
implementation gives the shapes, dtypes and devices of the real outputs."""

import pytest
import torch

from kernels.common import build_layout
from kernels.ops import index_kl_fwd_op, select_blocks_op, sparse_attention_fwd_args, sparse_attention_fwd_op
from kernels.sparse_attention import LAUNCH, reverse_index

CHECKS = ("test_schema", "test_faketensor")
N, H, HKV, D, DI, BK, TOPK = 36, 4, 2, 16, 16, 16, 2


def _inputs():
    torch.manual_seed(0)
    cu = torch.tensor([0, 34, N], dtype=torch.int32)
    q, k, v = torch.randn(1, N, H, D), torch.randn(1, N, HKV, D), torch.randn(1, N, HKV, D)
    q_idx, k_idx = torch.randn(1, N, HKV, DI), torch.randn(1, N, DI)
    return cu, q, k, v, q_idx, k_idx


def test_select_blocks_op():
    cu, _, _, _, q_idx, k_idx = _inputs()
    torch.library.opcheck(select_blocks_op, (q_idx, k_idx, BK, TOPK, cu, False, "block", 2**31 - 1), test_utils=CHECKS)


def test_sparse_attention_fwd_op():
    cu, q, k, v, q_idx, k_idx = _inputs()
    block_idx = select_blocks_op(q_idx, k_idx, BK, TOPK, cu, False, "block", 2**31 - 1)
    layout = build_layout(N, BK, cu, q.device)
    csr = reverse_index(q, block_idx, BK, layout, "kv", LAUNCH)
    args = (q, k, v, block_idx, *sparse_attention_fwd_args(layout, csr, LAUNCH), BK, D ** -0.5)
    torch.library.opcheck(sparse_attention_fwd_op, args, test_utils=CHECKS)


@pytest.mark.parametrize("grad", [True, False])
def test_index_kl_fwd_op(grad):
    cu, q, k, _, q_idx, k_idx = _inputs()
    block_idx = select_blocks_op(q_idx, k_idx, BK, TOPK, cu, False, "block", 2**31 - 1)
    torch.library.opcheck(index_kl_fwd_op, (q, k, q_idx, k_idx, block_idx, BK, cu, None, grad), test_utils=CHECKS)
