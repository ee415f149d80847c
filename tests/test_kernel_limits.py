"""``kernels.common.LIMITS``: ``check_limits`` and the kernels' own argument checks reject what the Triton
kernels cannot run with one message per rule, naming the config key to change and the reference
alternative, before any kernel is launched."""

import os
import re

import pytest
import torch

from kernels import index_kl_loss, select_blocks, sparse_attention
from kernels.common import LIMITS, check_limits

UNSUPPORTED = [  # check_limits keyword, value, the config key its message names
    ("block_size", 256, "attention.block_size"),  # KV-outer programs hold a whole block: <= 128
    ("block_size", 8, "attention.block_size"),
    ("block_size", 48, "attention.block_size"),  # not a power of two
    ("head_dim", 96, "model.head_dim"),
    ("head_dim", 256, "model.head_dim"),
    ("index_dim", 512, "attention.index_dim"),
    ("dtype", torch.float64, "dtype"),
]


def limits_message(**setting) -> str:
    with pytest.raises(ValueError) as err:
        check_limits(**setting)
    return str(err.value)


@pytest.mark.parametrize("name,value,key", UNSUPPORTED)
def test_check_limits_names_the_key_and_the_alternative(name, value, key):
    msg = limits_message(**{name: value})
    assert key in msg and str(value) in msg, msg
    assert "attention.impl=reference" in msg, msg


def test_check_limits_accepts_every_supported_setting():
    assert LIMITS.block_sizes == (16, 32, 64, 128) and LIMITS.head_dims == (16, 32, 64, 128)
    for D in LIMITS.head_dims:
        for Bk in LIMITS.block_sizes:
            for dtype in LIMITS.dtypes:
                check_limits(head_dim=D, block_size=Bk, index_dim=LIMITS.max_index_dim, dtype=dtype)
    check_limits(index_dim=1)
    check_limits()


def _attention_inputs(D=16, dtype=torch.float32, N=512, H=2, Hkv=1):
    q = torch.randn(1, N, H, D, dtype=dtype)
    k, v = torch.randn(1, N, Hkv, D, dtype=dtype), torch.randn(1, N, Hkv, D, dtype=dtype)
    return q, k, v, torch.zeros(1, Hkv, N, 2, dtype=torch.int32)


def test_sparse_attention_raises_the_limits_messages():
    q, k, v, block_idx = _attention_inputs()
    with pytest.raises(ValueError, match=re.escape(limits_message(block_size=256))):
        sparse_attention(q, k, v, block_idx, 256)
    q, k, v, block_idx = _attention_inputs(D=96)
    with pytest.raises(ValueError, match=re.escape(limits_message(head_dim=96))):
        sparse_attention(q, k, v, block_idx, 16)
    q, k, v, block_idx = _attention_inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(limits_message(dtype=torch.float64))):
        sparse_attention(q, k, v, block_idx, 16)


def test_select_blocks_raises_the_limits_messages():
    q_idx, k_idx = torch.randn(1, 512, 1, 16), torch.randn(1, 512, 16)
    with pytest.raises(ValueError, match=re.escape(limits_message(block_size=256))):
        select_blocks(q_idx, k_idx, 256, 4)
    q_idx, k_idx = torch.randn(1, 64, 1, 512), torch.randn(1, 64, 512)
    with pytest.raises(ValueError, match=re.escape(limits_message(index_dim=512))):
        select_blocks(q_idx, k_idx, 16, 4)


def test_index_kl_loss_raises_the_limits_messages():
    def call(D=16, Di=16, block_size=16):
        q, k, _, _ = _attention_inputs(D=D, N=64)
        q_idx, k_idx = torch.randn(1, 64, 1, Di, requires_grad=True), torch.randn(1, 64, Di, requires_grad=True)
        return index_kl_loss(q, k, q_idx, k_idx, None, block_size)

    for setting, kwargs in [(dict(block_size=256), dict(block_size=256)), (dict(head_dim=96), dict(D=96)),
                            (dict(index_dim=512), dict(Di=512))]:
        with pytest.raises(ValueError, match=re.escape(limits_message(**setting))):
            call(**kwargs)


def test_selection_dependent_integers_are_not_specialized():
    """``w0`` (a query chunk's first work item) follows the selection; if Triton specialized on it, a step
    whose ``w0`` first falls on a multiple of 16 would compile a second variant of the kernel mid-run. So do
    ``p0`` (a group of query chunks' first work item, ``dkdv_groups``) and the group's chunk range ``c0, c1``.
    Checked on the compiled kernels' parameters (a subprocess without the interpreter: TRITON_INTERPRET
    makes ``triton.jit`` ignore the option)."""
    import subprocess
    import sys

    code = ("import importlib\n"
            "for mod, name in (('sparse_attention', 'sparse_attention_fwd_kernel'),"
            " ('sparse_attention_bwd', 'sparse_attention_bwd_dq_kernel'),"
            " ('sparse_attention_bwd', 'sparse_attention_bwd_dkdv_kernel'),"
            " ('sparse_attention_bwd', 'sparse_attention_bwd_dkdv_reduce_kernel')):\n"
            "    k = getattr(importlib.import_module('kernels.' + mod), name)\n"
            "    print(name, sorted(p.name for p in k.params if p.do_not_specialize))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines() == [
        "sparse_attention_fwd_kernel ['w0']", "sparse_attention_bwd_dq_kernel ['w0']",
        "sparse_attention_bwd_dkdv_kernel ['p0', 'w0']",
        "sparse_attention_bwd_dkdv_reduce_kernel ['c0', 'c1', 'p0']"], out
