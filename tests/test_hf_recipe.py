"""recipe=msa_cpt end to end on CPU: a tiny imported checkpoint, a frozen warm-up, the sparse phase,
`python -m train.convert to-hf` from the ZeRO-2 checkpoint, and transformers reloading the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_hf import load_hf, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("cpt")
    ckpt = make_checkpoint(root / "llama", "llama")
    run_dir = root / "run"
    proc = run("train", [
        "model=hf", f"model.path={ckpt}", "recipe=msa_cpt", "run.steps=6", "recipe.stages.0.steps=3",
        "recipe.stages.1.steps=3", "data.seq_len=256", "data.image.max_patches=64", "attention.block_size=32",
        "attention.topk=4", "attention.index_dim=32", "parallel.activation_checkpointing=false",
        "parallel.zero_stage=2", "checkpoint.every=3", "logging.wandb.mode=disabled", "data.num_workers=0",
        f"data.corpus_dir={corpus_dir}", f"run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, run_dir


def test_msa_cpt_warmup_sparse_export_reload(trained, tmp_path):
    from safetensors.torch import load_file

    from train.convert import consolidated_state, run_config
    from train.hf import hf_logits, hf_name, our_logits
    from train.model import Decoder

    ckpt, run_dir = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/phase_sparse"] for r in rows] == [0, 0, 0, 1, 1, 1]
    for r in rows[:3]:  # frozen warm-up: only the index branch has gradients and a learning rate
        assert r["train/lr/decay"] == 0 and r["train/lr/index_decay"] > 0
        assert r["opt/grad_norm"] == pytest.approx(r["opt/grad_norm_index"], rel=1e-5)
    assert rows[4]["opt/grad_norm"] > 1.5 * rows[4]["opt/grad_norm_index"]  # sparse: the LM loss trains all

    original = load_file(str(ckpt / "model.safetensors"))
    after_warmup = consolidated_state(run_dir / "checkpoints" / "step_00000003")
    final = consolidated_state(run_dir / "checkpoints" / "step_00000006")
    parts = {name: hf_name(name) for name in final}
    for name, (key, part) in parts.items():
        if part == "main":  # bitwise the checkpoint's after the frozen warm-up, trained after the sparse steps
            assert torch.equal(after_warmup[name], original[key]), name
    assert any(not torch.equal(final[n], original[k]) for n, (k, p) in parts.items() if p == "main")
    assert all(not torch.equal(final[n], after_warmup[n]) for n, (_, p) in parts.items() if p == "index")

    out = tmp_path / "exported"
    proc = run("train.convert", ["to-hf", f"run_dir={run_dir}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(ROOT.glob("convert.log")) and not (ROOT / ".hydra").exists()  # no Hydra droppings
    cfg, step = run_config(run_dir / "checkpoints" / "step_00000006")
    model = Decoder(cfg.model, cfg.attention).eval()
    model.load_state_dict(final)
    hf_model = load_hf(out)
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(3))
    assert (our_logits(model, ids) - hf_logits(hf_model, ids)).abs().max() <= 1e-5
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256  # trained length
    msa = json.loads((out / "msa_config.json").read_text())
    index = load_file(str(out / "msa_index.safetensors"))
    assert msa["msa_layers"] == [1, 2] and msa["layer_types"] == ["dense", "msa", "msa"]
    assert (msa["block_size"], msa["topk"], msa["index_dim"]) == (32, 4, 32)
    assert msa["image_tokens"] == {"img_start": 300, "img_end": 301, "img_patch": 302}
    for name, (key, part) in parts.items():
        if part == "index":
            assert torch.equal(index[key], final[name]), name
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<img>") == 300 and len(tokenizer) == 303


def test_unsupported_checkpoint_fails_at_start(tmp_path):
    ckpt = make_checkpoint(tmp_path / "moe", "qwen3")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_experts": 8, "num_experts_per_tok": 2}))
    proc = run("train", ["model=hf", f"model.path={ckpt}", "logging.wandb.mode=disabled",
                         f"data.corpus_dir={tmp_path / 'corpus'}", f"run_dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode != 0 and "mixture of experts (num_experts, num_experts_per_tok)" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "corpus").exists()
