"""``checkpoint.init_from``: a run that starts from another run's weights (a dense run continued with MSA)."""

import shutil

import pytest
import torch

from tests.utils import compose_train_config
from train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("restore_dist_env")

TINY = ["model.n_layers=3", "model.dim=64", "data.seq_len=256", "data.batch_size=1", "attention.block_size=16",
        "attention.topk=2", "data.image.max_patches=64", "logging.progress=false", "logging.wandb.mode=disabled",
        "recipe.warmup_steps=0", "run.precision=fp32"]


def cfg_of(run_dir, corpus_dir, *extra):
    return compose_train_config([*TINY, f"run_dir={run_dir}", f"data.corpus_dir={corpus_dir}", *extra])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, corpus_dir):
    from train import loop

    run_dir = tmp_path_factory.mktemp("dense_source")
    loop.train(cfg_of(run_dir, corpus_dir, "attention=dense", "run.steps=3", "optim.lr=3e-3"))
    return run_dir


def started(cfg):
    from train.loop import start
    from train.parallel import init_distributed
    from train.recipe import build_recipe

    env = init_distributed(cfg.parallel)
    stages = build_recipe(cfg)
    return start(cfg, env, stages, stages[0], None, batches=iter(()))


def test_msa_run_starts_from_a_dense_runs_weights(dense_run, corpus_dir, tmp_path):
    """Every main weight is the dense run's trained one; the index branch, which the source lacks, is
    what a fresh MSA model of the same seed has."""
    from train.loop import close, seed_everything
    from train.model import build_model

    cfg = cfg_of(tmp_path, corpus_dir, "attention=msa", "run.steps=2", f"checkpoint.init_from={dense_run}")
    source = ckpt.complete_checkpoints(dense_run)[-1]
    trained = ckpt.consolidated_state(source)
    seed_everything(cfg.run.seed)
    fresh = dict(build_model(cfg.model, cfg.attention).named_parameters())
    run = started(cfg)
    try:
        params = dict(run.model.named_parameters())
        index = [k for k in params if "_idx" in k]
        assert index and set(params) == set(trained) | set(index)
        for k, p in params.items():
            want = fresh[k] if k in index else trained[k]
            assert torch.equal(p.detach().float(), want.detach().float()), k
        # the source's weights are not a fresh init: the test would pass vacuously otherwise
        assert not torch.equal(fresh["layers.0.attn.wq.weight"], trained["layers.0.attn.wq.weight"])
        assert run.init_note.startswith(f"weights from {source} (step 3); {len(index)} parameters")
    finally:
        close(run)


def test_a_resumed_run_does_not_read_init_from_again(dense_run, corpus_dir, tmp_path):
    """The run's own checkpoint has its weights: resuming works after the source is gone."""
    from train import loop

    source = tmp_path / "source"
    shutil.copytree(dense_run, source)
    cfg = cfg_of(tmp_path / "run", corpus_dir, "attention=msa", "run.steps=2", f"checkpoint.init_from={source}")
    loop.train(cfg)
    shutil.rmtree(source)
    source.mkdir()  # the path still exists (the config check), but holds no checkpoint
    loop.train(cfg_of(tmp_path / "run", corpus_dir, "attention=msa", "run.steps=3", f"checkpoint.init_from={source}"))
    assert ckpt.read_meta(ckpt.complete_checkpoints(tmp_path / "run")[-1])["step"] == 3


def test_another_model_is_refused_with_the_fix(dense_run, corpus_dir, tmp_path):
    cfg = cfg_of(tmp_path, corpus_dir, "attention=msa", "model.dim=32", f"checkpoint.init_from={dense_run}")
    with pytest.raises(ValueError, match=r"does not match this model.*shapes.*Build the same model"):
        started(cfg)


def test_init_from_is_checked_at_start(dense_run, corpus_dir, tmp_path):
    from train.config import check_config
    from train.recipe import build_recipe

    def check(*extra):
        cfg = cfg_of(tmp_path, corpus_dir, *extra)
        check_config(cfg, build_recipe(cfg)[0], 1, 256)

    with pytest.raises(FileNotFoundError, match="checkpoint.init_from='/no/such/run' does not exist"):
        check("checkpoint.init_from=/no/such/run")
    with pytest.raises(ValueError, match="start from one"):
        check(f"checkpoint.init_from={dense_run}", "model.path=/models/x")
