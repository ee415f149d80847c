"""The main job end to end on CPU, and the start-up checks of a config that cannot work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import compose_train_config
from train.config import check_config

ROOT = Path(__file__).resolve().parents[1]
SECTION_7 = ["loss/lm", "loss/kl", "msa/index_recall", "msa/sparsity", "perf/tokens_per_s", "perf/mfu",
             "perf/step_s", "mem/max_allocated_gb", "train/lr", "train/seq_len", "data/skipped"]


def run_train(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    return subprocess.run([sys.executable, "-m", "train", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_model_trains_on_cpu(tmp_path, corpus_dir):
    run_dir = tmp_path / "run"
    proc = run_train(["train.steps=30", "logging.wandb.mode=disabled", f"run_dir={run_dir}",
                      f"data.corpus_dir={corpus_dir}", "logging.stats_every=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30))
    for name in SECTION_7:
        assert all(name in r for r in rows), name
    first, last = (sum(r["loss/lm"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < first - 1.0, (first, last)
    assert rows[0]["train/phase_sparse"] == 0 and rows[-1]["train/phase_sparse"] == 1  # warm-up, then top-k
    recall = [r["msa/index_recall"] for r in rows if r["msa/index_recall"] is not None]
    assert recall and all(0 < x <= 1 for x in recall)
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
    ("parallel.sp_size=4", "parallel.sp_size"),
    ("model.vocab_size=100", "model.vocab_size"),
])
def test_config_checks_name_the_key(override, key):
    cfg = compose_train_config([override])
    world = cfg.parallel.sp_size * cfg.parallel.cp_size
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(cfg, world_size=world, vocab_size=261)


def test_triton_limits_are_checked_at_start():
    cfg = compose_train_config(["attention.backend=triton", "model.head_dim=96", "model.rope_dim=16"])
    with pytest.raises(ValueError, match=r"model\.head_dim"):
        check_config(cfg, world_size=1, vocab_size=261)


def test_logging_intervals_and_per_stage_data_are_checked():
    with pytest.raises(ValueError, match=r"logging\.every"):
        check_config(compose_train_config(["logging.stats_every=0"]), world_size=1, vocab_size=261)
    with pytest.raises(ValueError, match=r"data\.image\.max_patches"):
        check_config(compose_train_config(["data.seq_len=64", "attention.topk=2"]), world_size=1, vocab_size=261)


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="attention.top_k"):
        compose_train_config(["attention.top_k=4"])


def test_presets_compose_and_pass_checks():
    for model in ("tiny", "small", "base", "1b"):
        cfg = compose_train_config([f"model={model}", "data.seq_len=32768"] if model != "tiny" else [])
        check_config(cfg, world_size=1, vocab_size=261)
