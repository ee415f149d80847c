"""msa.keep: what a checkpointed block's forward stores and its recompute reuses."""

import pytest
import torch
import torch.nn.functional as F

from msa.keep import SDPA, active, keep_contexts, keeping, kept, kept_aten_ops


def test_kept_runs_plainly_outside_a_checkpoint():
    calls = []
    assert active() is None
    assert kept("x", lambda: calls.append(1) or 7) == 7 and calls == [1]
    with kept_aten_ops():  # no store: nothing kept, nothing intercepted
        assert active() is None


def test_the_recompute_gets_the_forwards_results_in_call_order_without_calling():
    forward, recompute = keep_contexts()
    calls = []

    def make(v):
        return lambda: calls.append(v) or torch.tensor([float(v)])

    with forward:
        a, b, c = kept("op", make(1)), kept("op", make(2)), kept("other", make(3))
    assert calls == [1, 2, 3] and active() is None
    with recompute:
        assert torch.equal(kept("op", make(10)), a) and torch.equal(kept("op", make(20)), b)
        assert torch.equal(kept("other", make(30)), c)
        with pytest.raises(RuntimeError, match="runs more often in the recompute"):
            kept("op", make(40))
    assert calls == [1, 2, 3]


def test_a_kept_tensor_written_in_place_is_refused():
    forward, recompute = keep_contexts()
    with forward:
        t = kept("op", lambda: torch.zeros(3))
    t.add_(1)
    with recompute, pytest.raises(RuntimeError, match="modified in place"):
        kept("op", lambda: torch.zeros(3))


def test_sdpa_outputs_are_reused_and_autograd_still_reaches_the_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, requires_grad=True) for _ in range(3))
    forward, recompute = keep_contexts()
    with forward, kept_aten_ops():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # the recompute sees other inputs, but gets the forward's output, with a graph to its own inputs
    q2, k2, v2 = (t.detach().mul(2).requires_grad_() for t in (q, k, v))
    with recompute, kept_aten_ops():
        o2 = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    assert torch.equal(o, o2) and o2.grad_fn is not None
    o2.sum().backward()
    assert q2.grad is not None and v2.grad is not None


def test_keeping_stores_only_its_names_in_the_first_call_and_reuses_them_in_the_second():
    """A reentrant checkpoint's function (DeepSpeed's, full policy) runs twice: the first call stores what
    ``kept`` marks with a kept name, the second gets it back; other names and SDPA run both times; a
    third call finds nothing left."""
    calls = []

    def block(x):
        a = kept("select", lambda: calls.append("select") or x + 1)
        b = kept("other", lambda: calls.append("other") or x + 2)
        with kept_aten_ops():
            calls.append("sdpa mode" if active() is not None and active().keeps(SDPA) else "sdpa plain")
        return a, b

    run = keeping(block, frozenset({"select"}))
    x = torch.zeros(2)
    first = run(x)
    again = run(x + 10)  # the recompute gets the first call's selection, the others from its own input
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], x + 12)
    assert calls == ["select", "other", "sdpa plain", "other", "sdpa plain"], calls
    assert active() is None
    with pytest.raises(RuntimeError, match="runs more often in the recompute"):
        run(x)
