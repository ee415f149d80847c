"""What a training run that runs out of GPU memory says (train.oom): the row's tokens per GPU, where it ran out,
and the memory settings the run does not use yet, each with what it saves."""

from __future__ import annotations

import pytest
import torch

from tests.test_checkpoint_resume import in_process_cfg
from tests.utils import compose_train_config
from train.oom import oom_message
from train.recipe import build_recipe


def _error_from_here():
    try:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.71 GiB")
    except torch.cuda.OutOfMemoryError as e:
        return e


def test_the_message_lists_what_is_not_used_yet_with_its_size():
    cfg = compose_train_config(["model=base", "data.seq_len=1048576", "data.batch_size=1",
                                "parallel.activation_checkpointing=true"])
    stage = build_recipe(cfg)[0]
    msg = oom_message(cfg, stage, world_size=1, n_params=400_000_000, error=_error_from_here(), step=7,
                      memory={"peak_gb": 135.5, "total_gb": 150.1})
    assert msg.startswith("CUDA out of memory in step 7 (stage ")
    assert "1 row(s) of 1,048,576 tokens, 1,048,576 tokens per GPU" in msg
    assert "135.5 of 150.1 GB allocated at the peak" in msg
    assert "raised at tests/test_oom.py:" in msg and " in _error_from_here." in msg
    # checkpointing on with the default selective policy: full is next, then the offload of the block inputs,
    # 16 layers x 1536 x 2 bytes x 1,048,576 tokens = 51.5 GB (10^9)
    assert "parallel.checkpoint_policy=full" in msg and "activation_checkpointing=true:" not in msg
    assert "parallel.checkpoint_offload=true" in msg and "51.5 GB here" in msg
    assert "parallel.mlp_tile_tokens=65536" in msg
    assert "up to model.n_kv_heads=4" in msg
    # ZeRO-1 on one rank: 12 bytes x 400M parameters = 4.8 GB
    assert "optimizer state: 4.8 GB a GPU here" in msg
    assert "a smaller batch" not in msg  # one row already


def test_what_is_already_set_is_not_suggested():
    cfg = compose_train_config(["model=base", "data.seq_len=1048576", "data.batch_size=2",
                                "parallel.activation_checkpointing=true", "parallel.checkpoint_policy=full",
                                "parallel.checkpoint_offload=true", "parallel.mlp_tile_tokens=65536",
                                "parallel.zero_stage=3", "parallel.cp_size=4"])
    stage = build_recipe(cfg)[0]
    msg = oom_message(cfg, stage, world_size=4, n_params=10, error=_error_from_here(), step=0)
    for setting in ("checkpoint_policy=full", "checkpoint_offload=true", "mlp_tile_tokens=65536", "zero_stage=3",
                    "activation_checkpointing=true"):
        assert setting not in msg, setting
    assert "2 row(s) of 1,048,576 tokens, 524,288 tokens per GPU (with sp_size=1 x cp_size=4" in msg
    assert "a smaller batch (data.batch_size=2)" in msg
    assert "GB allocated" not in msg  # no device numbers given: none made up


def test_a_training_run_that_runs_out_says_so(tmp_path, corpus_dir, monkeypatch):
    """The app's loop turns the out-of-memory into that message (still an OutOfMemoryError, from the original)."""
    from train import loop

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        loop.train(in_process_cfg(tmp_path, corpus_dir, "run.steps=2", "checkpoint.every=0"))
    msg = str(info.value)
    assert msg.startswith("CUDA out of memory in step 0 (stage ") and "raised at tests/test_oom.py:" in msg
    assert "parallel.activation_checkpointing=true" in msg  # off in this run: the first thing to try
    assert "Tried to allocate 8.00 GiB" in str(info.value.__cause__)
