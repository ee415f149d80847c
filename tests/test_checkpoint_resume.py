"""Run management end to end on CPU with a small model: recipe stages, exact resume after SIGKILL,
SIGTERM saves and exits, non-finite losses, a dead rank, and what W&B offline/disabled write."""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.utils import compose_train_config
from tests.wandb_reader import find_run_files, read_run
from train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layers=3", "model.dim=64", "data.seq_len=256", "data.batch_size=1", "attention.block_size=16",
         "attention.topk=2", "data.image.max_patches=64", "logging.progress=false", "logging.stats_every=2"]
# dense warm-up with the main weights frozen, sparse, then a longer sequence: the stage changes happen inside
# the run
RECIPE = ["recipe.stages=[{name:warm,steps:2,phase:warmup,freeze_main:true},{name:sparse,steps:2},"
          "{name:long,steps:3,seq_len:512}]",
          "recipe.warmup_steps=0", "run.steps=7"]
STEPS = 7


pytestmark = pytest.mark.usefixtures("restore_dist_env")


def command(run_dir, corpus_dir, *extra):
    return [sys.executable, "-m", "train", *SMALL, *RECIPE, f"run_dir={run_dir}", f"data.corpus_dir={corpus_dir}",
            "checkpoint.every=1", "checkpoint.keep_last=2", *extra]


def clean_env(**extra):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the writer is mid-line
            pass
    return out


def wait_for_step(proc, run_dir, step, timeout=240):
    """Block until metrics.jsonl holds ``step`` (the process is then working on a later one)."""
    end = time.time() + timeout
    while time.time() < end:
        if any(r["step"] >= step for r in rows(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus_dir):
    """The uninterrupted run, with W&B offline."""
    run_dir = tmp_path_factory.mktemp("reference")
    wandb = ["logging.wandb.mode=offline", "logging.wandb.name=ref", "logging.wandb.group=resume-test",
             "logging.wandb.tags=[ci,cpu]", "logging.wandb.project=msa-tests"]
    proc = subprocess.run(command(run_dir, corpus_dir, *wandb), cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_stages_change_at_their_step(reference_run):
    got = rows(reference_run)
    assert [r["step"] for r in got] == list(range(STEPS))
    assert [r["train/stage"] for r in got] == [0, 0, 1, 1, 2, 2, 2]
    assert [r["train/phase_sparse"] for r in got] == [0, 0, 1, 1, 1, 1, 1]
    assert [r["train/seq_len"] for r in got] == [256] * 4 + [512] * 3
    # per-layer index KL for the MSA layers (layer 0 is dense), recall on the stats steps
    assert {"layer_kl/01", "layer_kl/02"} <= set(got[3]) and "layer_kl/00" not in got[3]
    assert 0 < got[2]["layer_recall/01"] <= 1
    # keep_last=2 with a checkpoint every step
    assert [p.name for p in ckpt.complete_checkpoints(reference_run)] == ["step_00000006", "step_00000007"]
    assert (ckpt.checkpoint_dir(reference_run) / "latest").read_text() == "step_00000007"


def test_resume_lands_in_the_right_stage(reference_run, tmp_path, corpus_dir):
    """From the step-6 checkpoint (inside the 512-token stage), step 6 repeats the reference's."""
    import shutil

    from train import loop

    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir, ignore=shutil.ignore_patterns("wandb", "step_00000007"))
    cfg = compose_train_config([*SMALL, *RECIPE, f"run_dir={run_dir}", f"data.corpus_dir={corpus_dir}",
                                "logging.wandb.mode=disabled"])
    loop.train(cfg)
    want, got = rows(reference_run)[6], rows(run_dir)[6]
    assert (got["step"], got["train/stage"], got["train/seq_len"]) == (6, 2, 512)
    assert (got["loss/lm"], got["loss/kl"], got["train/lr"]) == (want["loss/lm"], want["loss/kl"], want["train/lr"])


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_inside_and_after_the_frozen_stage(reference_run, tmp_path, corpus_dir, monkeypatch, stop_after):
    """A stop after step 0 (inside the frozen warm-up) or step 1 (its last), then a resume: every step's
    losses and learning rate, and the last checkpoint's weights, are the uninterrupted run's. In the
    frozen steps no main weight takes a gradient, in every later one all do; the frozen steps leave the
    main weights bitwise as they were and the sparse step after them trains them."""
    from train import loop
    from train.checkpoint import consolidated_state

    real_step = loop.train_step
    seen = []

    def step_then_signal(run, *args, **kwargs):
        main = {p.requires_grad for n, p in run.model.named_parameters() if "_idx" not in n}
        seen.append((run.stage.freeze_main, main))
        out = real_step(run, *args, **kwargs)
        if len(seen) == stop_after:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    cfg = compose_train_config([*SMALL, *RECIPE, f"run_dir={tmp_path}", f"data.corpus_dir={corpus_dir}",
                                "logging.wandb.mode=disabled", "checkpoint.keep_last=0"])
    loop.train(cfg)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == [ckpt.tag_for(stop_after)]
    cfg.checkpoint.every = 1
    loop.train(cfg)
    assert [frozen for frozen, _ in seen] == [True, True, False, False, False, False, False]
    assert all(main == {not frozen} for frozen, main in seen), seen
    want, got = rows(reference_run), rows(tmp_path)
    assert [r["step"] for r in got] == list(range(STEPS))
    for a, b in zip(want, got):
        assert (a["loss/lm"], a["loss/kl"], a["train/lr"]) == (b["loss/lm"], b["loss/kl"], b["train/lr"]), b["step"]
    final = consolidated_state(ckpt.checkpoint_dir(tmp_path) / ckpt.tag_for(STEPS))
    reference = consolidated_state(ckpt.checkpoint_dir(reference_run) / ckpt.tag_for(STEPS))
    assert all(torch.equal(final[n], reference[n]) for n in reference)
    if stop_after == 1:  # checkpoints after steps 0, 1 (the frozen ones) and 2 (sparse)
        after = [consolidated_state(ckpt.checkpoint_dir(tmp_path) / ckpt.tag_for(s)) for s in (1, 2, 3)]
        main = [n for n in final if "_idx" not in n]
        assert all(torch.equal(after[0][n], after[1][n]) for n in main)
        assert all(not torch.equal(after[0][n], after[1][n]) for n in final if "_idx" in n)
        assert all(not torch.equal(after[1][n], after[2][n]) for n in main if not n.startswith("vision."))


def test_wandb_offline_files_hold_the_metrics(reference_run):
    (path,) = find_run_files(reference_run)
    run = read_run(path)
    assert (run.name, run.group, run.project, run.tags) == ("ref", "resume-test", "msa-tests", ["ci", "cpu"])
    assert run.config["model"]["dim"] == 64 and run.config["run"]["steps"] == STEPS
    logged = {r["step"]: r for r in rows(reference_run)}
    for key in ("loss/lm", "loss/kl", "train/seq_len", "perf/tokens_per_s", "layer_kl/02"):
        series = run.series(key)
        assert sorted(series) == sorted(s for s in logged if logged[s].get(key) is not None), key
        assert all(series[s] == pytest.approx(logged[s][key], rel=1e-12) for s in series), key
    assert run.exit_code == 0


def test_sigkill_at_a_random_step_then_resume_matches(reference_run, tmp_path, corpus_dir):
    seed = random.randrange(10**6)
    kill_after = random.Random(seed).randrange(1, STEPS - 2)
    run_dir = tmp_path / "killed"
    cmd = command(run_dir, corpus_dir, "logging.wandb.mode=disabled")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(proc, run_dir, kill_after)
    proc.send_signal(signal.SIGKILL)  # possibly in the middle of writing a checkpoint
    proc.wait(timeout=60)
    survivors = ckpt.complete_checkpoints(run_dir)
    assert survivors, f"seed {seed}: no complete checkpoint after step {kill_after}"

    resumed = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {survivors[-1]}" in resumed.stdout + resumed.stderr
    expected, got = rows(reference_run), rows(run_dir)
    assert [r["step"] for r in got] == list(range(STEPS)), f"seed {seed}"
    for want, have in zip(expected, got):
        for key in ("loss/lm", "loss/kl", "train/lr", "train/seq_len"):
            assert have[key] == want[key], f"seed {seed}, killed after step {kill_after}: step {want['step']} {key}"
    # W&B disabled: nothing of it in the run directory
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()


def test_sigterm_to_the_whole_process_group_saves_and_exits(tmp_path, corpus_dir):
    """As `timeout`, SLURM and most launchers send it: the trainer and its data-loader workers all get
    SIGTERM; the workers die, the trainer reports the signal once, saves after its step and exits 0."""
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(command(run_dir, corpus_dir, "logging.wandb.mode=disabled", "data.num_workers=2"),
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_step(proc, run_dir, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("SIGTERM received") == 1, err[-3000:]
    assert "race condition" not in err and "Traceback" not in err, err[-3000:]
    saved = re.search(r"SIGTERM: saved a checkpoint after step (\d+)", out)
    assert saved, out[-3000:]
    assert ckpt.complete_checkpoints(run_dir)[-1].name == f"step_{int(saved.group(1)) + 1:08d}"


def text_shards(root: Path, n: int = 4) -> str:
    """Plain-text webdataset shards (standard-library sources), as a brace pattern."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    for s in range(n):
        with tarfile.open(root / f"text-{s}.tar", "w") as tar:
            for i, src in enumerate(sources[s::n]):
                data = src.read_bytes()[:20000]
                info = tarfile.TarInfo(f"doc{s}_{i:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return f"'{root}/text-{{0..{n - 1}}}.tar'"


def test_dead_rank_makes_the_others_exit(tmp_path, corpus_dir):
    """Two ranks without a launcher (as on two nodes): SIGKILL rank 1; rank 0 must fail, not hang.
    Text-only shards: with image samples on one rank only, the ranks' gradient reductions differ."""
    run_dir = tmp_path / "two"
    cmd = command(run_dir, corpus_dir, "logging.wandb.mode=disabled", "parallel.timeout_s=60", "checkpoint.every=0",
                  f"data.shards={text_shards(tmp_path)}")
    port = str(29500 + random.randrange(1000))
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=clean_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port))
             for r in range(2)]
    try:
        wait_for_step(procs[0], run_dir, 1)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        code = procs[0].wait(timeout=120)
        assert code != 0, "rank 0 finished as if nothing happened"
        assert time.time() - t0 < 90
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def in_process_cfg(tmp_path, corpus_dir, *extra):
    return compose_train_config([*SMALL, "run.steps=4", "recipe.warmup_steps=0", f"run_dir={tmp_path}",
                                 f"data.corpus_dir={corpus_dir}", "logging.wandb.mode=disabled", *extra])


def test_sigterm_saves_and_exits(tmp_path, corpus_dir, monkeypatch, capfd):
    from train import loop

    real_step = loop.train_step
    calls = []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # a hung run's stacks, on request
            signal.raise_signal(signal.SIGUSR1)
        if len(calls) == 2:  # as SLURM would send it, then the launcher forwarding it again
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    loop.train(in_process_cfg(tmp_path, corpus_dir))
    assert len(calls) == 2  # stopped after the step that was running
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    err = capfd.readouterr().err
    assert err.count("SIGTERM received") == 1  # reported at once, once
    assert "in step_then_signal" in err  # SIGUSR1: the Python stack of every thread


def test_strided_kl_counts_each_steps_queries_across_a_resume(tmp_path, corpus_dir, monkeypatch):
    """``attention.kl_query_stride=3``: step ``s`` counts the queries at positions ``s % 3`` mod 3 in every MSA
    layer, from the step's number, so a run stopped after two steps and resumed takes the same queries as an
    uninterrupted one (the KL of each step too: its value differs from offset to offset)."""
    from train import loop

    real_step = loop.train_step
    offsets = []

    def step_and_record(run, *args, **kwargs):
        out = real_step(run, *args, **kwargs)
        offsets.append({core.kl_offset for core in run.model.msa_cores()})
        if len(offsets) == 2 and stop:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_and_record)
    extra = ["attention.kl_query_stride=3", "checkpoint.keep_last=0", "checkpoint.every=1"]
    stop = False
    loop.train(in_process_cfg(tmp_path / "whole", corpus_dir, *extra))
    assert offsets == [{0}, {1}, {2}, {0}]
    offsets.clear()
    stop = True
    loop.train(in_process_cfg(tmp_path / "resumed", corpus_dir, *extra))
    stop = False
    loop.train(in_process_cfg(tmp_path / "resumed", corpus_dir, *extra))
    assert offsets == [{0}, {1}, {2}, {0}]
    want, got = rows(tmp_path / "whole"), rows(tmp_path / "resumed")
    assert [(r["loss/lm"], r["loss/kl"]) for r in got] == [(r["loss/lm"], r["loss/kl"]) for r in want]
    assert len({r["loss/kl"] for r in want}) == 4


def test_train_releases_its_engine(tmp_path, corpus_dir, monkeypatch):
    """After ``train`` returns, its model (and the engine's gradients and optimizer state with it) can be
    collected: a second run in the same process (a Hydra multirun, a benchmark of several points) does not
    carry the first one's memory. Without ``engine.destroy()`` in ``loop.close`` the model stays alive."""
    import gc
    import weakref

    from train import loop

    real_build = loop.build_model
    built = []

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loop, "build_model", build_and_watch)
    loop.train(in_process_cfg(tmp_path, corpus_dir, "run.steps=2", "checkpoint.every=0"))
    gc.collect()
    assert len(built) == 1 and built[0]() is None


def test_close_warns_rather_than_hide_the_error_that_ended_the_run():
    """``close`` runs in ``train``'s ``finally``: a failing ``engine.destroy()`` must not replace the error."""
    from types import SimpleNamespace

    from train.loop import close

    def fail():
        raise RuntimeError("NCCL communicator already aborted")

    with pytest.warns(RuntimeWarning, match="releasing the DeepSpeed engine failed.*already aborted"):
        close(SimpleNamespace(loader=None, engine=SimpleNamespace(destroy=fail)))


def test_non_finite_loss_skips_the_update_then_stops(tmp_path, corpus_dir, monkeypatch):
    from train import loop

    real_build = loop.build_model
    poisoned_steps = {1, 2}
    seen = {"forward": 0}
    snapshots = []

    def build_poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def poisoned(batch, **kwargs):
            out = forward(batch, **kwargs)
            snapshots.append([p.detach().clone() for p in model.parameters()])
            step = seen["forward"]
            seen["forward"] += 1
            if step in poisoned_steps:
                out["lm_sum"] = out["lm_sum"] * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(loop, "build_model", build_poisoned)
    with pytest.raises(RuntimeError, match="run.max_bad_steps"):
        loop.train(in_process_cfg(tmp_path, corpus_dir, "run.max_bad_steps=2", "checkpoint.resume=never"))
    got = rows(tmp_path)
    assert [r["train/bad_steps"] for r in got] == [0, 1, 2]
    # the weights after the skipped step 1 are those it started with; step 0 did change them
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))


def test_data_curriculum_resumes_exactly_at_the_stage_change(tmp_path, corpus_dir, monkeypatch):
    """recipe.stages[i].data_weights through the training loop: the first stage reads the synthetic source
    alone, the next data.sources' shares; a stop at the change and a resume give the uninterrupted run's
    losses, and each stage runs with its weights."""
    from train import loop

    overrides = [*SMALL, "attention.kind=dense", "data.num_workers=0", "logging.wandb.mode=disabled",
                 "data.sources=[{kind:shards,weight:0.7},{kind:synthetic,weight:0.3,tasks:[passkey],"
                 "min_len:120,max_len:200,seed:0}]",
                 "recipe.stages=[{name:primer,steps:2,data_weights:[0,1]},{name:main,steps:2}]",
                 "recipe.warmup_steps=0", "run.steps=4",
                 f"data.corpus_dir={corpus_dir}", "checkpoint.keep_last=0"]
    real_step = loop.train_step
    seen = []

    def step_then_signal(run, *args, **kwargs):
        seen.append(list(run.loader.weights))
        out = real_step(run, *args, **kwargs)
        if len(seen) == 6:  # the second run (after the reference's 4 steps), at the stage change
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    loop.train(compose_train_config([*overrides, f"run_dir={tmp_path / 'ref'}"]))
    assert seen == [[0.0, 1.0]] * 2 + [[0.7, 0.3]] * 2
    stop = compose_train_config([*overrides, f"run_dir={tmp_path / 'stop'}"])
    loop.train(stop)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "stop")] == [ckpt.tag_for(2)]
    loop.train(stop)
    assert seen[4:] == [[0.0, 1.0]] * 2 + [[0.7, 0.3]] * 2
    want, got = rows(tmp_path / "ref"), rows(tmp_path / "stop")
    assert [r["step"] for r in got] == list(range(4))
    assert [r["loss/lm"] for r in got] == [r["loss/lm"] for r in want]
    assert want[0]["loss/lm"] != want[2]["loss/lm"]
    # the loss of each source (loss/lm/<name>), logged for the sources a step's rows hold: the primer stage
    # reads the synthetic source alone; the main stage's 256-token rows start in a long corpus document
    # (the shards come first after the stage resets the counts), so they hold the shards alone
    by_source = [{k: v for k, v in r.items() if k.startswith("loss/lm/")} for r in want]
    assert [list(b) for b in by_source] == [["loss/lm/synthetic1"]] * 2 + [["loss/lm/shards0"]] * 2
    assert all(list(b.values()) == pytest.approx([r["loss/lm"]], rel=1e-5) for b, r in zip(by_source, want))
    assert [{k: v for k, v in r.items() if k.startswith("loss/lm/")} for r in got] == by_source


def test_loss_by_source_is_the_hand_computed_mean_over_micro_batches(tmp_path, corpus_dir, monkeypatch):
    """loss/lm/<name> of a step with two micro-batches of mixed rows: each source's cross-entropy summed over
    its targets in both micro-batches, over their count, computed here from the step's own batches and
    weights with plain F.cross_entropy; loss/answer/<name> the same over the targets that are answer tokens
    of the synthetic source's items (the pass key after the question, found here from the labels)."""
    import torch.nn.functional as F

    from train import loop
    from train.data import build_tokenizer
    from train.model import Decoder

    cfg = in_process_cfg(tmp_path, corpus_dir, "attention.kind=dense", "data.num_workers=0", "data.batch_size=2",
                         "optim.grad_accum=2", "run.steps=1", "checkpoint.keep_last=0",
                         "data.sources=[{name:keys,kind:synthetic,weight:0.4,tasks:[passkey],min_len:110,"
                         "max_len:160},{name:text,weight:0.6}]")
    real_step, taken = loop.train_step, {}

    def record(run, *args, **kwargs):
        taken["weights"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        taken["cfg"] = run.cfg  # its model settings resolved (the tokenizer's vocabulary)
        source, taken["batches"] = run.batches, []
        run.batches = (taken["batches"].append(b) or b for b in source)
        return real_step(run, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", record)
    loop.train(cfg)
    (logged,) = rows(tmp_path)
    model, tok = Decoder(taken["cfg"].model, taken["cfg"].attention), build_tokenizer(cfg.data.tokenizer)
    model.load_state_dict(taken["weights"])
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3)  # keys, text, keys' answers
    with torch.no_grad():
        for batch in taken["batches"]:
            h, labels, _ = model.hidden_states(batch, "sparse")
            labels = labels.reshape(-1)
            ce = F.cross_entropy(h.reshape(-1, h.shape[-1]) @ model.output_weight().t(), labels,
                                 ignore_index=-100, reduction="none")
            group = (batch["loss_groups"].reshape(-1) % 2).clone()  # the source (groups s and 2 + s)
            for i in (labels == tok.eod).nonzero().squeeze(1).tolist():  # a document's end: is it a pass key's?
                text = tok.decode(labels[max(0, i - 60):i].tolist())
                if group[i - 1] == 0 and "pass key is " in text:
                    key = text.rsplit("pass key is ", 1)[1]
                    group[i - len(tok.encode(key)):i] = 2  # the targets that spell the key
            keep = labels != -100
            for g in range(3):
                sums[g] += ce[keep & (group == g)].double().sum()
                counts[g] += int((keep & (group == g)).sum())
    assert len(taken["batches"]) == 2 and counts.min() > 0, counts
    assert logged["loss/lm/keys"] == pytest.approx(float((sums[0] + sums[2]) / (counts[0] + counts[2])), rel=1e-4)
    assert logged["loss/lm/text"] == pytest.approx(float(sums[1] / counts[1]), rel=1e-4)
    assert logged["loss/answer/keys"] == pytest.approx(float(sums[2] / counts[2]), rel=1e-4)
    assert "loss/answer/text" not in logged and logged["loss/answer/keys"] != logged["loss/lm/keys"]
    assert logged["loss/lm"] == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-4)
