"""Helpers shared by the tests."""

from pathlib import Path

import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64: the error measure of STYLE.md."""
    ref64, out64 = ref.double(), out.double()
    denom = ref64.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((ref64 - out64).pow(2).mean().sqrt() / denom).item()


def counting(counts, name: str, fn):
    """``fn`` that also adds one to ``counts[name]`` per call (for ``monkeypatch.setattr``)."""
    def counted(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)
    return counted


def _patch_empties(monkeypatch, after) -> None:
    """``torch.empty`` / ``torch.empty_like`` return ``after(tensor)`` while patched in."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: after(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: after(real_empty_like(*a, **k)))


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled (float) or -7-filled (int) tensors, so that an
    output element a kernel forgot to write fails the comparison."""
    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    _patch_empties(monkeypatch, fill)


class LiveEmpties:
    """Tensors made by ``torch.empty`` / ``torch.empty_like`` while patched in, and which of them are still
    referenced: ``when(shape, dtype)`` is the ``(shape, dtype)`` of every one alive when the first tensor of that
    shape and dtype was made (what an allocation order puts side by side in memory)."""

    def __init__(self, monkeypatch):
        import weakref

        self.made, self.snapshots = [], {}

        def track(t):
            key = (tuple(t.shape), t.dtype)
            if key not in self.snapshots:
                self.snapshots[key] = [(s, d) for ref, s, d in self.made if ref() is not None]
            self.made.append((weakref.ref(t), *key))
            return t

        _patch_empties(monkeypatch, track)

    def when(self, shape, dtype) -> list[tuple[tuple, torch.dtype]]:
        return self.snapshots[(tuple(shape), dtype)]


def compose_train_config(overrides: list[str]):
    """The typed TrainConfig that `python -m train <overrides>` would run with."""
    from hydra import compose, initialize_config_dir

    from train.config import check_moved_keys, register_schema, to_train_config

    check_moved_keys(overrides)
    register_schema()
    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return to_train_config(compose("train", overrides=overrides))


def check_every_stage(cfg, world_size: int, vocab_size: int = 261) -> None:
    """The start-up checks of ``python -m train`` for each stage of ``cfg``'s recipe."""
    from train.config import check_config
    from train.recipe import build_recipe

    for stage in build_recipe(cfg):
        check_config(cfg, stage, world_size, vocab_size)


# ---- masks and fp8 emulation built from the contract (DESIGN.md section 2), not from msa.reference


def doc_starts(N: int, cu_seqlens: torch.Tensor | None, device="cpu") -> torch.Tensor:
    """``[N]`` int64: the first position of each token's document (0 without ``cu_seqlens``).

    With empty documents several boundaries coincide; a token belongs to the last boundary <= it."""
    pos = torch.arange(N, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(pos)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return cu[torch.searchsorted(cu, pos, right=True) - 1]


def visible_mask(N: int, Nq: int, cu_seqlens: torch.Tensor | None, device="cpu") -> torch.Tensor:
    """``[Nq, N]`` bool: key ``j`` is visible to query ``t`` (the key position ``N - Nq + t``): same
    document and ``j <= N - Nq + t``."""
    start = doc_starts(N, cu_seqlens, device)
    i = torch.arange(N - Nq, N, device=device)
    j = torch.arange(N, device=device)
    return (start[i][:, None] == start[None, :]) & (j[None, :] <= i[:, None])


def key_blocks(N: int, block_size: int, cu_seqlens: torch.Tensor | None, device="cpu") -> torch.Tensor:
    """``[N]`` int64: each key's block id, counted from its document's first token."""
    return (torch.arange(N, device=device) - doc_starts(N, cu_seqlens, device)) // block_size


def support_mask(block_idx: torch.Tensor, N: int, block_size: int,
                 cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, Nq, N]`` bool: the visible keys whose (document-relative) block is listed in
    ``block_idx [B, Hkv, Nq, topk]`` for that query (``-1`` lists nothing)."""
    Nq = block_idx.shape[2]
    dev = block_idx.device
    blk = key_blocks(N, block_size, cu_seqlens, dev)
    chosen = torch.zeros(block_idx.shape[:3] + (N,), dtype=torch.bool, device=dev)
    for c in block_idx.long().unbind(-1):  # one slot at a time: no [.., topk, N] intermediate
        chosen |= (c[..., None] == blk) & (c[..., None] >= 0)
    return chosen & visible_mask(N, Nq, cu_seqlens, dev)


E4M3_MAX = 448.0


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to the nearest float8 e4m3fn value, ties to even, in float64 arithmetic:
    3 mantissa bits, normal exponents from -6 (subnormal step 2^-9), largest finite 448. Values past
    448 are the caller's to avoid (the quantisers scale the amax to exactly 448)."""
    x = x.double()
    _, e = torch.frexp(x.abs())  # |x| = m * 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
    step = torch.exp2((e - 1).clamp_min(-6).double() - 3)
    return torch.round(x / step) * step  # x / step is exact (a power of two); round() ties to even


def fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """float64 value of ``x`` quantised per row (last dim) to e4m3 with scale ``amax / 448``."""
    x = x.double()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return e4m3_round(x / scale) * scale


def fp8_key_blocks(k: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """float64 value of ``k [B, N, Di]`` quantised to e4m3 with one scale per document-relative key
    block (its amax / 448)."""
    k = k.double()
    B, N, _ = k.shape
    block = doc_starts(N, cu_seqlens, k.device) * N + key_blocks(N, block_size, cu_seqlens, k.device)
    out = torch.empty_like(k)
    for c in block.unique():
        m = block == c
        scale = k[:, m].abs().amax((1, 2), keepdim=True).clamp_min(1e-12) / E4M3_MAX
        out[:, m] = e4m3_round(k[:, m] / scale) * scale
    return out
