"""Helpers shared by the tests."""

import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64: the error measure of STYLE.md."""
    ref64, out64 = ref.double(), out.double()
    denom = ref64.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((ref64 - out64).pow(2).mean().sqrt() / denom).item()


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled (float) or -7-filled (int) tensors, so that an
    output element a kernel forgot to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
