"""Atomic checkpoints on a real (single-process, CPU) DeepSpeed engine: exact round trip of model,
optimizer, scheduler and RNG; keep-last-N; half-written checkpoints are ignored."""

import json
import random

import pytest
import torch

from train import checkpoint as ckpt
from train.parallel import ParallelConfig, init_distributed

DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
             "steps_per_print": 2**31 - 1}


pytestmark = pytest.mark.usefixtures("restore_dist_env")


def make_engine(seed=0):
    import deepspeed

    init_distributed(ParallelConfig())
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=DS_CONFIG)
    return engine


def train_steps(engine, n):
    """Steps whose data comes from the global RNGs, so a resume must restore them to match."""
    losses = []
    for _ in range(n):
        x = torch.randn(4, 8)
        y = torch.full((4, 1), random.random())
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_round_trip_reproduces_the_following_steps(tmp_path):
    engine = make_engine()
    train_steps(engine, 3)
    path = ckpt.save_checkpoint(engine, tmp_path, 3, rank=0, world_size=1, keep_last=2,
                                loader_state={"pos": 42}, meta={"stage": 1})
    expected = train_steps(engine, 4)
    lr_expected = engine.lr_scheduler.get_last_lr()

    fresh = make_engine(seed=1)  # different initial weights and RNG
    torch.manual_seed(123)
    random.seed(123)
    state = ckpt.load_checkpoint(fresh, path, rank=0, world_size=1)
    assert (state["step"], state["stage"], state["loader"]) == (3, 1, {"pos": 42})
    assert train_steps(fresh, 4) == expected  # bitwise: weights, Adam moments, lr schedule, RNG
    assert fresh.lr_scheduler.get_last_lr() == lr_expected


def test_keep_last_and_latest_pointer(tmp_path):
    engine = make_engine()
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(engine, tmp_path, step, rank=0, world_size=1, keep_last=2)
    root = ckpt.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert (root / "latest").read_text() == "step_00000008"
    # saving the same step again replaces it and keeps it complete
    ckpt.save_checkpoint(engine, tmp_path, 8, rank=0, world_size=1, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    engine = make_engine()
    ckpt.save_checkpoint(engine, tmp_path, 4, rank=0, world_size=1, keep_last=3)
    root = ckpt.checkpoint_dir(tmp_path)
    # a save killed before its rename, and a step_ directory without meta.json (damaged by hand)
    (root / ".tmp-step_00000006" / "state").mkdir(parents=True)
    (root / ".tmp-step_00000006" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    (root / "step_00000009" / "state").mkdir(parents=True)
    assert ckpt.find_resume(tmp_path, "auto") == root / "step_00000004"
    assert ckpt.find_resume(tmp_path, "never") is None
    assert ckpt.find_resume(tmp_path / "elsewhere", "auto") is None
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        ckpt.find_resume(tmp_path, str(root / "step_00000009"))
    # the next save clears the leftover temporary directory
    ckpt.save_checkpoint(engine, tmp_path, 6, rank=0, world_size=1, keep_last=3)
    assert not (root / ".tmp-step_00000006").exists()
    assert json.loads((root / "step_00000006" / "meta.json").read_text())["step"] == 6


def test_world_size_change_is_refused(tmp_path):
    engine = make_engine()
    path = ckpt.save_checkpoint(engine, tmp_path, 1, rank=0, world_size=1, keep_last=1)
    with pytest.raises(ValueError, match="saved by 1 ranks, this run has 2"):
        ckpt.load_checkpoint(engine, path, rank=0, world_size=2)


def test_our_per_rank_state_cannot_execute_code(tmp_path, monkeypatch):
    """RNG states and the loader position are JSON: loading them never unpickles (a tampered checkpoint
    directory cannot run code through our files; DeepSpeed's own state/ files are pickles, see the docs)."""
    engine = make_engine()
    path = ckpt.save_checkpoint(engine, tmp_path, 1, rank=0, world_size=1, keep_last=1,
                                loader_state={"workers": {"0": {"used": 3}}, "next": 0})
    (rank_file,) = (path / "ranks").iterdir()
    assert rank_file.name == "rank_00000.json"
    state = json.loads(rank_file.read_text())  # plain JSON all the way down
    assert set(state) == {"rng", "loader", "rank"} and state["loader"]["workers"]["0"]["used"] == 3
    real_load = torch.load
    ours = []

    def watched(f, *args, **kwargs):
        ours.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", watched)
    ckpt.load_checkpoint(make_engine(seed=1), path, rank=0, world_size=1)
    assert ours and all("/state/" in f for f in ours), ours  # only DeepSpeed's files go through torch.load


def test_resume_with_another_model_or_data_config_is_refused(tmp_path):
    """A --multirun sweep over attention=msa,dense pointed at one run_dir must not load the first job's
    checkpoint into the second: the differing keys are named. Steps and lr may change on resume."""
    saved = {"model": {"dim": 64, "n_layers": 3}, "attention": {"kind": "msa"}, "data": {"seq_len": 256,
             "num_workers": 1}, "run": {"steps": 10}, "optim": {"lr": 1e-3}}
    same_but_longer = {**saved, "run": {"steps": 20}, "optim": {"lr": 3e-3},
                       "data": {**saved["data"], "num_workers": 2}}
    ckpt.check_resume_config(saved, same_but_longer, tmp_path)
    other = {**saved, "attention": {"kind": "dense"}, "model": {"dim": 128, "n_layers": 3}}
    with pytest.raises(ValueError, match=r"attention\.kind: 'msa' -> 'dense', model\.dim: 64 -> 128") as err:
        ckpt.check_resume_config(saved, other, tmp_path)
    assert "checkpoint.resume=never" in str(err.value)
