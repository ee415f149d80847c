"""Helpers shared by the tests."""

from pathlib import Path

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
