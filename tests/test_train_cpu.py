"""The main job end to end on CPU, and the start-up checks of a config that cannot work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import check_every_stage, compose_train_config
from train.config import MOVED_KEYS

ROOT = Path(__file__).resolve().parents[1]
SECTION_7 = ["loss/lm", "loss/kl", "msa/index_recall", "msa/sparsity", "perf/tokens_per_s", "perf/mfu",
             "perf/step_s", "mem/max_allocated_gb", "train/lr", "train/seq_len", "data/skipped", "opt/grad_norm",
             "opt/grad_norm_index", "perf/attn_tflops", "perf/index_tflops"]


def run_train(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    return subprocess.run([sys.executable, "-m", "train", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_model_trains_on_cpu(tmp_path, corpus_dir):
    run_dir = tmp_path / "run"
    proc = run_train(["run.steps=30", "logging.wandb.mode=disabled", f"run_dir={run_dir}",
                      f"data.corpus_dir={corpus_dir}", "logging.stats_every=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30))
    for name in SECTION_7:
        assert all(name in r for r in rows), name
    first, last = (sum(r["loss/lm"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < first - 1.0, (first, last)
    assert rows[0]["train/phase_sparse"] == 0 and rows[-1]["train/phase_sparse"] == 1  # warm-up, then top-k
    # recall on the stats steps (every 5th): rows of 256 tokens with 32-token blocks, topk 4: most
    # queries see more than 4 blocks, so it is measured, in warm-up too (for the selection sparse would use)
    recall = [r["msa/index_recall"] for r in rows if r["msa/index_recall"] is not None]
    assert [r["step"] for r in rows if r["msa/index_recall"] is not None] == list(range(0, 30, 5))
    assert all(0 < x <= 1 for x in recall)
    assert all(0 < r["msa/nontrivial_share"] < 1 for r in rows if r["msa/index_recall"] is not None)
    assert all(r["opt/grad_norm"] > 0 and r["opt/grad_norm_index"] > 0 for r in rows)
    assert rows[0]["train/lr/decay"] == rows[0]["train/lr/no_decay"] == rows[0]["train/lr"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "deepspeed.json").exists()


def test_bad_config_fails_at_start_naming_the_key(tmp_path, corpus_dir):
    proc = run_train(["attention.topk=0", f"run_dir={tmp_path}", f"data.corpus_dir={corpus_dir}",
                      "logging.wandb.mode=disabled"], timeout=120)
    assert proc.returncode != 0
    assert "attention.topk" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,key", [
    ("attention.topk=0", "attention.topk"),
    ("attention.block_size=48", "attention.block_size"),
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("attention.topk=64", "data.seq_len"),  # k * Bk longer than the sequence
    ("parallel.sp_size=3", "parallel.sp_size"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("model.vision.patch_size=14", "data.image.patch_size"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("run.precision=fp16", "run.precision"),
])
def test_config_checks_name_the_key(override, key):
    cfg = compose_train_config([override])
    world = cfg.parallel.sp_size * cfg.parallel.cp_size
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_every_stage(cfg, world_size=world)


def test_triton_limits_are_checked_at_start():
    cfg = compose_train_config(["attention.impl=triton", "model.head_dim=96", "model.rope_dim=16"])
    with pytest.raises(ValueError, match=r"model\.head_dim"):
        check_every_stage(cfg, world_size=1)


def test_logging_intervals_and_per_stage_data_are_checked():
    with pytest.raises(ValueError, match=r"logging\.every"):
        check_every_stage(compose_train_config(["logging.stats_every=0"]), world_size=1)
    with pytest.raises(ValueError, match=r"data\.image\.max_patches"):
        check_every_stage(compose_train_config(["data.seq_len=64", "attention.topk=2"]), world_size=1)
    stage = ["recipe.warmup_steps=0", "recipe.stages=[{steps:30},{steps:30,seq_len:96}]"]
    with pytest.raises(ValueError, match=r"recipe\.stages\[1\]\.seq_len=96"):
        check_every_stage(compose_train_config(stage), world_size=1)


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_moved_keys_name_their_new_key(old):
    """Every key that moved in the renovation: the command line gets the new name, not Hydra's error."""
    value = "[0.9,0.95]" if old.endswith("betas") else "1"
    with pytest.raises(ValueError, match=MOVED_KEYS[old].split(" ")[0].replace(".", r"\.")):
        compose_train_config([f"{old}={value}"])
    proc = run_train([f"{old}={value}"], timeout=120) if old == "train.steps" else None
    if proc is not None:  # and the app itself says so before Hydra composes anything
        assert proc.returncode != 0 and "run.steps" in proc.stderr, proc.stderr[-2000:]


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="attention.top_k"):
        compose_train_config(["attention.top_k=4"])


def test_presets_compose_and_pass_checks():
    for model in ("tiny", "small", "base", "1b"):
        cfg = compose_train_config([f"model={model}", "data.seq_len=32768"] if model != "tiny" else [])
        check_every_stage(cfg, world_size=1)
    tiny, small = compose_train_config([]), compose_train_config(["model=small"])
    assert (tiny.attention.block_size, tiny.data.seq_len, tiny.recipe.warmup_steps) == (32, 256, 10)  # CPU preset
    assert (small.attention.block_size, small.data.seq_len, small.recipe.warmup_steps) == (128, 4096, 0)
    plus = compose_train_config(["model=small", "+preset=cpu"])
    assert (plus.model.dim, plus.attention.block_size) == (1024, 32)


def test_multirun_jobs_get_their_own_run_dirs(tmp_path, corpus_dir):
    """--multirun with a fixed run_dir: each job trains in run_dir/<job>, with its own config and metrics
    (before, the second job resumed the first one's checkpoint and printed "nothing to do"). A later
    sweep whose job lands on a run directory of another attention kind is refused, naming the key."""
    run_dir = tmp_path / "sweep"
    common = [f"run_dir={run_dir}", f"data.corpus_dir={corpus_dir}", "logging.wandb.mode=disabled",
              "logging.progress=false", "run.steps=2", "recipe.warmup_steps=0", "data.num_workers=0"]
    proc = run_train(["--multirun", "optim.lr=1e-3,3e-3", *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in ((0, 1e-3), (1, 3e-3)):
        rows = [json.loads(line) for line in (run_dir / str(job) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        assert f"lr: {lr}" in (run_dir / str(job) / "config.yaml").read_text()
    proc = run_train(["--multirun", "attention=msa,dense", *common])
    assert proc.returncode != 0
    assert "attention.kind: 'msa' -> 'dense'" in proc.stderr, proc.stderr[-3000:]


def test_zero_offload_trains_with_deepspeed_cpu_adam(tmp_path, corpus_dir):
    """parallel.deepspeed reaches DeepSpeed: ZeRO-2 with the optimizer offloaded to CPU, which needs
    DeepSpeed's CPU Adam (optim.name=cpu_adam; its C++ op is built on first use, about 2 minutes on 2
    cores, then cached). The loss falls over the steps, and the generated JSON carries the offload."""
    run_dir = tmp_path / "offload"
    proc = run_train(["run.steps=4", "logging.wandb.mode=disabled", f"run_dir={run_dir}", "recipe.warmup_steps=0",
                      f"data.corpus_dir={corpus_dir}", "parallel.zero_stage=2", "optim.name=cpu_adam",
                      "+parallel.deepspeed.zero_optimization.offload_optimizer.device=cpu"], timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss/lm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
