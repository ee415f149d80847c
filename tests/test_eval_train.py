"""Evals end to end on CPU: periodic evals during a training run land in metrics.jsonl and W&B with every
eval/... key, their plots are written, and `python -m train.eval` on the run's checkpoint reproduces the
last in-training eval; `train.generate` completes a prompt from the same checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.wandb_reader import find_run_files, read_run
from train import dashboard

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["data.corpus.n_text=12", "data.corpus.n_pairs=40", "data.corpus.n_interleaved=8", "data.corpus.n_shards=2",
          "data.corpus.max_doc_bytes=3000"]
MODEL = ["model.n_layers=2", "model.dim=48", "model.n_heads=4", "model.head_dim=12", "model.rope_dim=8",
         "attention.block_size=16", "attention.topk=2", "attention.index_dim=16", "data.seq_len=256",
         "data.batch_size=1", "data.image.max_patches=32", "data.num_workers=0", "recipe.warmup_steps=1"]
EVAL = {"tasks": "[bpb,passkey,image_needle]", "lengths": "[256,384]", "depths": "[0,1]", "items": "1", "rows": "1",
        "buckets": "[128]", "generate": "true"}


def expected_keys() -> set[str]:
    """Every eval/... key of EVAL's settings on a model with MSA layers, written out by hand."""
    keys = {"eval/seconds"}
    for length in ("256", "384"):
        keys |= {f"eval/bpb/{length}", f"eval/bpb/{length}/0-128", f"eval/bpb/{length}/128-{length}",
                 f"eval/index_recall/{length}", f"eval/oracle_recall/{length}",
                 f"eval/oracle_recall_2x/{length}", f"eval/tile_union/{length}",
                 # eval.doc_rows (default 2): the windows inside one held-out file
                 f"eval/bpb_doc/{length}", f"eval/bpb_doc/{length}/0-128", f"eval/bpb_doc/{length}/128-{length}",
                 f"eval/index_recall_doc/{length}", f"eval/oracle_recall_doc/{length}",
                 f"eval/oracle_recall_2x_doc/{length}"}
        for task in ("passkey", "image_needle"):
            keys |= {f"eval/{task}/{length}/{s}" for s in ("choice", "share", "nll", "exact", "choice_far",
                                                                  "share_far")}
            keys |= {f"eval/needle_recall/{task}/{length}", f"eval/needle_recall/{task}/{length}/correct"}
            keys |= {f"eval/needle_recall/{task}/{length}/{last}depth/{d}" for d in ("0.0", "1.0")
                     for last in ("", "hit/")}
            keys |= {f"eval/needle_recall/{task}/{length}/hit", f"eval/needle_recall/{task}/{length}/hit/correct"}
    return keys


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def history_value(history: list[dict], step: int, key: str):
    return next(row[key] for row in history if row["_step"] == step and key in row)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evals")
    run_dir = tmp / "run"
    proc = run(["train", *CORPUS, *MODEL, "run.steps=4", "eval.every=2", *[f"eval.{k}={v}" for k, v in EVAL.items()],
                f"run_dir={run_dir}", f"data.corpus_dir={tmp / 'corpus'}", "logging.progress=false",
                "logging.wandb.mode=offline", "logging.wandb.project=msa-tests"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_periodic_evals_reach_metrics_jsonl_wandb_and_plots(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    with_evals = {r["step"]: {k for k in r if k.startswith("eval/")} for r in rows}
    assert with_evals == {0: set(), 1: expected_keys(), 2: set(), 3: expected_keys()}
    last = rows[3]
    assert 5.0 < last["eval/bpb/256"] < 9.5  # a few steps from uniform over 261 ids (8.03 bits per byte)
    for key in expected_keys() - {"eval/seconds"}:
        if key.endswith("/correct") and last[key] is None:  # no item answered correctly: no number
            continue
        if key.endswith(("choice", "exact", "recall/256", "recall/384")) or "recall" in key:
            assert 0.0 <= last[key] <= 1.0, key
    for step in (2, 4):
        folder = trained / "eval" / f"step_{step:08d}"
        names = {p.name for p in folder.iterdir()}
        assert {"results.json", "tables.json", "retrieval_choice.png", "retrieval_exact.png", "bpb_by_position.png",
                "layer_recall.png"} <= names, names
        assert all((folder / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    tables = json.loads((trained / "eval" / "step_00000004" / "tables.json").read_text())
    assert len(tables["eval/tables/retrieval"]["rows"]) == 2 * 2 * 2  # tasks x lengths x depths
    assert {r[0] for r in tables["eval/tables/layers"]["rows"]} == {
        "index_recall", "index_recall_doc", "needle_recall/passkey", "needle_recall/image_needle"}
    (path,) = find_run_files(trained)
    history = read_run(path).history
    logged: dict[int, set] = {}
    for row in history:  # the plots and tables go in their own log call at the step
        if any(k.startswith("eval/") for k in row):
            logged.setdefault(row["_step"], set()).update(row)
    assert sorted(logged) == [1, 3]
    assert expected_keys() <= logged[3]
    media = {"eval/plots/retrieval_choice/_type": "image-file", "eval/plots/layer_recall/_type": "image-file",
             "eval/tables/retrieval/_type": "table-file"}  # W&B keeps a media entry as <key>/<field>
    assert all(history_value(history, 3, k) == v for k, v in media.items())
    regexes = [p.regex for s in dashboard.layout() for p in s.panels if p.regex]
    assert all(any(re.match(r, k) for r in regexes) for k in expected_keys() - {"eval/seconds"})


def test_eval_app_reproduces_the_last_in_training_eval(trained):
    proc = run(["train.eval", f"checkpoint={trained}", *[f"{k}={v}" for k, v in EVAL.items()]])
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = trained / "eval" / "checkpoint_00000004"
    results = json.loads((folder / "results.json").read_text())
    assert results["step"] == 4 and results["phase"] == "sparse"
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    from train.eval.runner import flatten

    again = flatten(results)
    assert set(again) == expected_keys()
    for key in expected_keys() - {"eval/seconds"}:
        assert again[key] == pytest.approx(last[key], rel=1e-4, abs=1e-6), key
    assert "eval/passkey/384/choice" in proc.stdout


def test_eval_app_defaults_leave_out_the_tasks_a_short_model_cannot_fit(trained, tmp_path):
    """The default task list on a 256-token run (as the README's): the tasks whose needles and question need
    more tokens are left out, named with what they need, and the rest run; a task named in tasks= that does
    not fit is still an error that names the fix."""
    from train.eval.tasks import fixed_tokens
    from train.generate import load_model

    loaded = load_model(str(trained), "cpu", "reference", "fp32")
    need = {t: fixed_tokens(t, loaded.tokenizer, loaded.cfg.data.image, 4) for t in
            ("passkey", "multikey", "multivalue", "vartrack", "image_needle")}
    fits = {t for t, n in need.items() if n <= 256}
    assert fits == {"passkey", "image_needle"}  # this tokenizer's needs, so the test below means something
    out = tmp_path / "eval"
    proc = run(["train.eval", f"checkpoint={trained}", "generate=false", "items=1", "rows=1", "depths=[0]",
                "buckets=[128]", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    left = ", ".join(f"{t} ({need[t]})" for t in ("multikey", "multivalue", "vartrack"))
    assert f"tasks: left out {left}:" in proc.stdout and "shortest eval length 256" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["retrieval"]) == fits and results["lengths"] == [256] and "256" in results["bpb"]
    proc = run(["train.eval", f"checkpoint={trained}", "tasks=[multikey]", f"out={tmp_path / 'named'}"])
    assert proc.returncode != 0 and "multikey needs at least" in proc.stderr + proc.stdout


def test_training_evals_with_the_default_tasks_leave_out_what_cannot_fit(tmp_path):
    """eval.every on a 256-token run with the default task list: the run says which tasks it leaves out and
    logs the others' eval/... keys (it used to stop at start-up on multikey)."""
    proc = run(["train", *CORPUS, *MODEL, "run.steps=2", "eval.every=2", "eval.generate=false", "eval.items=1",
                "eval.rows=1", "eval.depths=[0]", "eval.buckets=[128]", f"run_dir={tmp_path / 'run'}",
                f"data.corpus_dir={tmp_path / 'corpus'}", "logging.progress=false", "logging.wandb.mode=disabled"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "eval.tasks: left out multikey (" in proc.stdout and "vartrack (" in proc.stdout
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"eval/bpb/256", "eval/passkey/256/choice", "eval/image_needle/256/choice"} <= set(last)
    assert not any(k.startswith(("eval/multikey", "eval/multivalue", "eval/vartrack")) for k in last)


def test_generate_completes_a_prompt_from_the_checkpoint(trained, tmp_path):
    from train.generate import GenerateConfig, run_generate

    out = tmp_path / "out.jsonl"
    results = run_generate(GenerateConfig(checkpoint=str(trained), prompt=["def f(x):", "import"], max_new_tokens=6,
                                          temperature=0.7, top_p=0.9, seed=1, stop_at_eod=False, out=str(out)))
    assert [len(r["ids"]) for r in results] == [6, 6]
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["def f(x):", "import"]
