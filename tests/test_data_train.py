"""A short CPU training run (`python -m train`, model=tiny) on the embedded corpus with images: the LM
loss falls, and the batches it trains on carry image patches."""

import json
import os
import subprocess
import sys
from pathlib import Path

from train.data import CorpusConfig, DataConfig, ImageConfig, build_dataloader, build_tokenizer

CORPUS = {"n_text": 12, "n_pairs": 60, "n_interleaved": 12, "n_shards": 2, "max_doc_bytes": 4000}
ROOT = Path(__file__).resolve().parents[1]


def test_tiny_training_run_with_images_loss_falls(tmp_path):
    corpus_dir = str(tmp_path / "corpus")
    overrides = [f"data.corpus.{k}={v}" for k, v in CORPUS.items()] + [
        "model=tiny", "run.steps=8", "optim.warmup_steps=2", "data.seq_len=128",
        "data.image.max_patches=32", "data.num_workers=0", "logging.wandb.mode=disabled",
        f"run_dir={tmp_path / 'run'}", f"data.corpus_dir={corpus_dir}", "checkpoint.every=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "train", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss/lm"] for s in steps if s.get("loss/lm") is not None]
    assert len(losses) == 8, losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    assert steps[-1]["data/skipped"] == 0
    # the same data settings give batches with images (the corpus the run built is reused)
    cfg = DataConfig(corpus_dir=corpus_dir, corpus=CorpusConfig(**CORPUS), num_workers=0,
                     image=ImageConfig(max_patches=32))
    loader = build_dataloader(cfg, build_tokenizer(cfg.tokenizer), seq_len=128, batch_size=2)
    batches = iter(loader)
    assert sum(len(next(batches)["image_slots"]) for _ in range(8)) > 0
