"""W&B: reading offline run files back, and the dashboard built offline."""

import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

from tests.wandb_reader import BLOCK, WandbFileError, find_run_files, read_run
from train import dashboard

WRITE_RUN = textwrap.dedent("""
    import sys, wandb
    run = wandb.init(mode="offline", dir=sys.argv[1], project="msa-test", name="reader", group="g1",
                     tags=["a", "b"], config={"model": {"dim": 64}, "long": "x" * 70000},
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    for step in range(40):
        run.log({"loss/lm": 10.0 / (step + 1), "train/seq_len": 256 if step < 20 else 512,
                 "layer_kl/00": step * 0.5}, step=step)
    run.finish()
""")


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A real wandb offline run, written in a child process as the trainer would."""
    root = tmp_path_factory.mktemp("wandb")
    subprocess.run([sys.executable, "-c", WRITE_RUN, str(root)], check=True, timeout=120,
                   capture_output=True)
    (path,) = find_run_files(root)
    return path


def test_reader_gets_logged_history_back(offline_run):
    run = read_run(offline_run)
    assert (run.project, run.name, run.group, run.tags) == ("msa-test", "reader", "g1", ["a", "b"])
    assert run.config["model"] == {"dim": 64}
    # a 70 kB config value spans three 32 KiB blocks: first/middle/last chunks are joined
    assert run.config["long"] == "x" * 70000 and offline_run.stat().st_size > 2 * BLOCK
    loss = run.series("loss/lm")
    assert sorted(loss) == list(range(40))
    assert all(loss[s] == pytest.approx(10.0 / (s + 1)) for s in loss)
    assert run.series("train/seq_len")[19] == 256 and run.series("train/seq_len")[20] == 512
    assert run.series("layer_kl/00")[39] == pytest.approx(19.5)
    assert run.summary["loss/lm"] == pytest.approx(0.25)
    assert run.exit_code == 0


def test_reader_rejects_damage(offline_run, tmp_path):
    data = bytearray(offline_run.read_bytes())
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a run file")
    with pytest.raises(WandbFileError, match="header"):
        read_run(bad)
    corrupt = bytearray(data)
    corrupt[40] ^= 0xFF  # inside the first record's payload
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(WandbFileError, match="checksum"):
        read_run(bad)
    # a writer killed mid-record leaves a short tail: the complete records still read
    bad.write_bytes(bytes(data[: len(data) - 5]))
    assert len(read_run(bad).history) >= 39


def test_reader_on_handmade_chunks(tmp_path):
    """Framing written by hand (header, crc over type+payload, block padding) reads back."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for step in range(3):
        rec = pb.Record()
        rec.history.step.num = step
        item = rec.history.item.add()
        item.key, item.value_json = "loss/lm", str(step + 0.5)
        records.append(rec.SerializeToString())
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in records:
        room = BLOCK - len(out) % BLOCK
        if room < 7:
            out += b"\0" * room
        out += struct.pack("<IHB", zlib.crc32(payload, zlib.crc32(b"\x01")), len(payload), 1) + payload
    path = tmp_path / "run-hand.wandb"
    path.write_bytes(bytes(out))
    assert read_run(path).series("loss/lm") == {0: 0.5, 1: 1.5, 2: 2.5}


def test_dashboard_workspace_offline(capsys):
    ws = dashboard.build_workspace("ent", "proj", layers=3)
    model = ws._to_model()  # the payload `save()` would send, built without network
    sections = model.spec.section.panel_bank_config.sections
    metrics = {m for s in sections for p in s.panels for m in (p.config.metrics or [])}
    required = {"loss/lm", "loss/kl", "msa/index_recall", "msa/sparsity", "perf/tokens_per_s", "perf/mfu",
                "mem/max_allocated_gb", "train/seq_len", "train/stage", "layer_kl/02", "layer_recall/01",
                "opt/grad_norm", "opt/grad_norm_index", "perf/attn_tflops", "perf/index_tflops"}
    assert required <= metrics, required - metrics
    # layer 0 is dense (attention.n_dense_layers=1): it logs no index metrics, so it gets no panel
    assert not {"layer_kl/00", "layer_recall/00"} & metrics
    regexes = {p.config.metric_regex for s in sections for p in s.panels if p.config.use_metric_regex}
    assert regexes == {"^loss/lm/.+", "^loss/answer/.+", "^layer_kl/.*", "^layer_recall/.*", "^train/lr/.*",
                       "^eval/bpb(_doc)?/[^/]+$", "^eval/bpb/[^/]+/.+", "^eval/bpb_doc/[^/]+/.+",
                       "^eval/.+/choice$", "^eval/.+/(choice|share)_far$", "^eval/.+/exact$", "^eval/.+/nll$",
                       "^eval/.+/share$",
                       "^eval/(index|oracle)_recall(_2x)?(_doc)?/.*",
                       "^eval/needle_recall/.*", "^eval/tile_union/.*"}
    assert (model.entity, model.project) == ("ent", "proj")

    assert dashboard.main(["--entity", "ent", "--project", "proj", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 sections, 32 panels" in out.splitlines()[0]
    assert "[Per-layer index KL] (collapsed)" in out and "  MFU: perf/mfu" in out
