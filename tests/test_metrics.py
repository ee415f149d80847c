"""The numbers the run logs, checked against hand computations: FLOP counts of packed rows, MFU's GPU
peak by exact name, layer aggregation across shards, W&B settings from the environment, and the
DeepSpeed passthrough."""

import numpy as np
import pytest
import torch

from msa.layer import AttentionConfig
from msa.stats import SelectionStats
from tests.utils import check_every_stage, compose_train_config
from train import metrics as M
from train.metrics import MetricsLogger
from train.model import ModelConfig
from train.parallel import Mesh


def test_attended_pairs_by_hand():
    # documents of 5 and 3 tokens: causal pairs 15 + 6
    assert M.attended_pairs(np.array([5, 3])) == 21
    # block 2, topk 2: a query keeps its own block up to itself plus one full earlier block:
    # positions 0..4 -> 1, 2, 1+2, 2+2, 1+2 = 13; the 3-token document -> 1, 2, 1+2 = 6
    assert M.attended_pairs(np.array([5, 3]), block_size=2, topk=2) == 19
    # with topk covering every block the selection is the causal set
    assert M.attended_pairs(np.array([7]), block_size=2, topk=8) == M.attended_pairs(np.array([7]))


def test_step_flops_count_documents_not_rows():
    """A packed row of short documents costs its documents' causal pairs, not a row-long triangle; the
    index and KL work is counted apart from the model's (before, perf/mfu read ~2.5x high on packed 512K
    rows of the small model)."""
    model = ModelConfig(vocab_size=100, dim=8, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=2)
    attn = AttentionConfig(block_size=2, topk=2, index_dim=4, n_dense_layers=1)
    lengths = np.array([5, 3])
    sparse = M.step_flops(model, attn, n_params=1000, lengths=lengths, phase="sparse")
    H, D, Hkv, Di = 4, 2, 2, 4
    attn_flops = 3 * 4 * H * D * (1 * 21 + 2 * 19)  # one dense layer over causal pairs, two MSA over selected
    assert sparse["attn"] == attn_flops
    assert sparse["model"] == 6 * (1000 + 100 * 8) * 8 + attn_flops  # tied head counted as a matmul
    assert sparse["index"] == 2 * (2 * Hkv * Di * 21 + (2 * H * D + 6 * Hkv * Di) * 19)
    warm = M.step_flops(model, attn, 1000, lengths, "warmup")
    assert warm["attn"] == 3 * 4 * H * D * 3 * 21
    assert warm["index"] == 2 * (2 * Hkv * Di + 2 * H * D + 6 * Hkv * Di) * 21
    dense = M.step_flops(model, AttentionConfig(kind="dense"), 1000, lengths, "sparse")
    assert dense["index"] == 0 and dense["attn"] == 3 * 4 * H * D * 3 * 21
    # the packed row costs far less than one 8-token document
    assert sparse["attn"] < M.step_flops(model, attn, 1000, np.array([8]), "sparse")["attn"]


def test_step_flops_count_sliding_window_layers_over_their_window():
    """A sliding-window layer attends the last ``window`` keys of each query, and stays dense in an MSA
    model (before, it was counted over every causal pair, or as MSA: MFU read high)."""
    assert M.attended_pairs(np.array([6]), window=4) == 1 + 2 + 3 + 4 + 4 + 4
    assert M.attended_pairs(np.array([6, 3]), window=4) == 18 + 6
    assert M.attended_pairs(np.array([3]), window=4) == M.attended_pairs(np.array([3]))
    model = ModelConfig(vocab_size=100, dim=8, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=2, sliding_window=4,
                        sliding_layers=[0, 2])
    attn = AttentionConfig(block_size=2, topk=2, index_dim=4, n_dense_layers=1)
    assert M.layer_kinds(model, attn) == (0, 2, 1)  # layer 0 windowed, 1 MSA, 2 windowed (stays dense)
    lengths = np.array([6])
    H, D, Hkv, Di = 4, 2, 2, 4
    selected = M.attended_pairs(lengths, 2, 2)  # by hand: 1+2+3+4+3+4 = 17
    assert selected == 17
    flops = M.step_flops(model, attn, 0, lengths, "sparse")
    assert flops["attn"] == 3 * 4 * H * D * (2 * 18 + 17)
    assert flops["index"] == 2 * Hkv * Di * 21 + (2 * H * D + 6 * Hkv * Di) * 17  # one MSA layer
    dense = M.step_flops(model, AttentionConfig(kind="dense"), 0, lengths, "sparse")
    assert M.layer_kinds(model, AttentionConfig(kind="dense")) == (1, 2, 0)
    assert dense["attn"] == 3 * 4 * H * D * (21 + 2 * 18) and dense["index"] == 0


def test_peak_is_matched_by_exact_gpu_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.4)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert M.peak_tflops(cuda, None)[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 SuperPCIe")
    value, note = M.peak_tflops(cuda, None)
    assert value is None and "logging.peak_tflops" in note  # no guess from a substring
    assert M.peak_tflops(cuda, 500.0)[0] == 500.0
    assert M.peak_tflops(torch.device("cpu"), None)[0] is None


def test_layer_metrics_average_micro_batches_and_pool_stats():
    mesh = Mesh()
    # two layers; stats sums (recall_mass, recall_rows, kept, visible, nontrivial, rows, oracle_mass, oracle2_mass,
    # tile_work, selected)
    a = SelectionStats(torch.tensor([3.0, 4.0, 50.0, 100.0, 4.0, 10.0, 3.5, 3.9, 30.0, 20.0], dtype=torch.float64))
    b = SelectionStats(torch.tensor([1.0, 4.0, 30.0, 100.0, 4.0, 10.0, 2.5, 3.0, 50.0, 20.0], dtype=torch.float64))
    out = M.layer_metrics([1, 2], torch.tensor([0.4, 0.8]), 2, [a, b], mesh)
    assert out["layer_kl/01"] == pytest.approx(0.2) and out["layer_kl/02"] == pytest.approx(0.4)
    assert out["layer_recall/01"] == pytest.approx(0.75) and out["layer_recall/02"] == pytest.approx(0.25)
    assert out[M.INDEX_RECALL] == pytest.approx(4 / 8)  # pooled over layers, not a mean of means
    assert out[M.ORACLE_RECALL] == pytest.approx(6 / 8)
    assert out[M.ORACLE_RECALL_2X] == pytest.approx(6.9 / 8)
    assert out[M.SPARSITY] == pytest.approx(1 - 80 / 200) and out[M.NONTRIVIAL] == pytest.approx(0.4)
    assert out[M.TILE_UNION] == pytest.approx(80 / 40)  # pooled: (30 + 50) / (20 + 20), not a mean of 1.5, 2.5
    none = M.layer_metrics([1, 2], torch.tensor([0.4, 0.8]), 1, [None, None], mesh)
    assert none[M.INDEX_RECALL] is None and none[M.ORACLE_RECALL] is None and "layer_recall/01" not in none
    assert none[M.TILE_UNION] is None


@pytest.mark.parametrize("env,mode,source", [({}, "offline", "logging.wandb.mode"),
                                             ({"WANDB_MODE": "disabled"}, "disabled", "WANDB_MODE")])
def test_wandb_environment_wins(monkeypatch, env, mode, source):
    for var in MetricsLogger.ENV.values():
        monkeypatch.delenv(var, raising=False)
    for k, v in {**env, "WANDB_PROJECT": "from-env", "WANDB_TAGS": "a,b"}.items():
        monkeypatch.setenv(k, v)
    cfg = compose_train_config(["logging.wandb.project=from-config", "logging.wandb.tags=[x]",
                                "logging.wandb.name=cfg-name"]).logging.wandb
    settings, where = MetricsLogger.wandb_settings(cfg)
    assert (settings["mode"], where) == (mode, source)
    # left to wandb, which reads WANDB_PROJECT / WANDB_TAGS itself; the unset ones come from the config
    assert settings["project"] is None and settings["tags"] is None and settings["name"] == "cfg-name"


def test_deepspeed_passthrough_is_merged_and_validated():
    from train.parallel import deepspeed_config
    from train.recipe import build_recipe

    cfg = compose_train_config(["parallel.zero_stage=2", "+parallel.deepspeed.zero_optimization.overlap_comm=true",
                                "+parallel.deepspeed.zero_optimization.reduce_bucket_size=1000000"])
    ds = deepspeed_config(cfg, build_recipe(cfg)[0], torch.device("cpu"))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000000}
    check_every_stage(cfg, world_size=1)
    typo = compose_train_config(["+parallel.deepspeed.zero_optimisation.stage=3"])
    with pytest.raises(ValueError, match=r"'zero_optimisation' \(did you mean 'zero_optimization'\?\)"):
        check_every_stage(typo, world_size=1)
    bad_field = compose_train_config(["+parallel.deepspeed.zero_optimization.overlap_comms=true"])
    with pytest.raises(ValueError, match="overlap_comms"):
        check_every_stage(bad_field, world_size=1)
    offload = ["parallel.zero_stage=2", "+parallel.deepspeed.zero_optimization.offload_optimizer.device=cpu"]
    with pytest.raises(ValueError, match="optim.name=cpu_adam"):
        check_every_stage(compose_train_config(offload), world_size=1)
    check_every_stage(compose_train_config([*offload, "optim.name=cpu_adam"]), world_size=1)
