"""Recipe stages: resolution from config, lookup by step, errors that name the key, and a stage with
frozen main weights through the DeepSpeed engine."""

import itertools

import pytest
import torch

from train.config import TrainConfig
from train.recipe import RecipeConfig, StageConfig, build_recipe, describe, stage_at


def make_cfg(stages=(), steps=30, warmup=0):
    cfg = TrainConfig()
    cfg.recipe = RecipeConfig(stages=list(stages), warmup_steps=warmup)
    cfg.run.steps = steps
    cfg.data.seq_len, cfg.data.batch_size, cfg.model.rope_base = 512, 2, 1e4
    return cfg


def test_default_recipe_from_warmup_steps():
    warm, sparse = build_recipe(make_cfg(steps=30, warmup=10))
    assert (warm.phase, warm.start, warm.end) == ("warmup", 0, 10)
    assert (sparse.phase, sparse.start, sparse.end) == ("sparse", 10, 30)
    assert warm.data_epoch == sparse.data_epoch == 0  # same sp/cp layout: one data stream
    (only,) = build_recipe(make_cfg(steps=30, warmup=0))
    assert (only.phase, only.end) == ("sparse", 30)


def test_stages_resolve_and_inherit():
    cfg = make_cfg([StageConfig(name="warm", steps=4, phase="warmup", kl_weight=2.0),
                    StageConfig(steps=6),
                    StageConfig(name="long", steps=10, seq_len=1024, batch_size=1, rope_base=5e6, sp_size=2),
                    StageConfig(name="longer", steps=5, seq_len=2048)],
                   steps=18)
    stages = build_recipe(cfg)
    assert [(s.start, s.end) for s in stages] == [(0, 4), (4, 10), (10, 20), (20, 25)]
    assert [s.phase for s in stages] == ["warmup", "sparse", "sparse", "sparse"]
    assert [s.seq_len for s in stages] == [512, 512, 1024, 2048]
    assert [s.kl_weight for s in stages][:3] == [2.0, cfg.recipe.kl_weight, cfg.recipe.kl_weight]
    assert stages[1].name == "stage1" and stages[2].rope_base == 5e6 and stages[2].layout() == (2, 1)
    # a new sp/cp layout starts a new data stream; "longer" falls back to parallel.sp_size=1 again
    assert [s.data_epoch for s in stages] == [0, 0, 2, 3]
    assert [stage_at(stages, i).index for i in (0, 3, 4, 9, 10, 19, 25)] == [0, 0, 1, 1, 2, 2, 3]
    same_layout = build_recipe(make_cfg([StageConfig(steps=2), StageConfig(steps=2, seq_len=1024)], steps=4))
    assert [s.data_epoch for s in same_layout] == [0, 0]  # a longer sequence continues the stream
    long = stages[2]
    assert (long.seq_len, long.batch_size, long.sp_size, long.rope_base) == (1024, 1, 2, 5e6)
    # where each setting came from, for the start-up checks' messages
    assert long.key("seq_len", "data.seq_len") == "recipe.stages[2].seq_len"
    assert long.key("cp_size", "parallel.cp_size") == "parallel.cp_size"
    text = describe(stages, 18)
    assert "[2] long: steps 10-17 sparse seq_len=1024" in text


@pytest.mark.parametrize("stages, steps, message", [
    ([StageConfig(steps=0)], 5, r"recipe.stages\[0\].steps=0"),
    ([StageConfig(steps=5), StageConfig(steps=5, phase="dense")], 10, r"recipe.stages\[1\].phase='dense'"),
    ([StageConfig(steps=5), StageConfig(steps=5)], 11, r"run.steps=11 runs past the recipe's 10 steps"),
])
def test_bad_recipe_names_the_key(stages, steps, message):
    with pytest.raises(ValueError, match=message):
        build_recipe(make_cfg(stages, steps=steps))


def test_warmup_is_set_one_way():
    """recipe.warmup_steps makes the default recipe; with explicit stages the warm-up is a stage."""
    with pytest.raises(ValueError, match=r"recipe.warmup_steps applies only without recipe.stages"):
        build_recipe(make_cfg([StageConfig(steps=5)], steps=5, warmup=2))


def test_shipped_long_context_recipe_passes_every_stage_check():
    """conf/recipe/long_context.yaml composes (recipe= , the group has a null default) and each stage
    passes the start-up checks on 64 ranks; with the tiny default model too (its CPU preset's warm-up
    steps are turned off by the recipe, whose warm-up is a stage)."""
    from tests.utils import check_every_stage, compose_train_config
    from train.config import check_config

    cfg = compose_train_config(["model=1b", "recipe=long_context"])
    stages = build_recipe(cfg)
    assert [s.seq_len for s in stages] == [8192, 8192, 32768, 131072, 524288, 1048576]
    assert stages[0].phase == "warmup" and stages[-1].end == cfg.run.steps
    check_every_stage(cfg, world_size=64)
    with pytest.raises(ValueError, match=r"recipe.stages\[5\].sp_size/recipe.stages\[5\].cp_size"):
        check_config(cfg, stages[-1], world_size=48, vocab_size=261)  # 48 ranks do not split into sp*cp=32
    assert len(build_recipe(compose_train_config(["recipe=long_context"]))) == 6


FROZEN_RECIPE = ["model=tiny", "attention.impl=reference", "data.seq_len=256", "data.batch_size=1", "run.steps=5",
                 "optim.grad_accum=2", "optim.lr=1e-2", "recipe.warmup_steps=0", "recipe.freeze_main_in_warmup=true",
                 "recipe.stages=[{name:warm,steps:3,phase:warmup},{name:sparse,steps:2}]",
                 "logging.wandb.mode=disabled"]


def _weights(run, zero: int) -> dict:
    """Every parameter's full value (gathered under ZeRO-3)."""
    import deepspeed

    params = dict(run.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def _run_recipe(cfg, env, stages, batches, first: int = 0, before: bool = False, resume=None, save_dir=None,
                mlp_calls=None):
    """Steps ``first`` to the end of the recipe through the DeepSpeed engine (``train.loop``'s ``start``,
    ``enter_stage`` and ``train_step``), from the checkpoint ``resume`` if given. ``before``: the main
    weights keep taking gradients in the frozen stage (the former implementation). Returns the weights
    after each step (and at ``first``); saves a checkpoint after each step into ``save_dir``."""
    from train import checkpoint as ckpt
    from train import loop

    class Quiet:
        def message(self, text):
            pass

    accum = cfg.optim.grad_accum
    run = loop.start(cfg, env, stages, stage_at(stages, first), None,
                     batches=itertools.islice(itertools.cycle(batches), first * accum, None))
    if resume:
        ckpt.load_checkpoint(run.engine, resume, rank=0, world_size=1)
    zero = cfg.parallel.zero_stage
    out = [_weights(run, zero)]
    for step in range(first, cfg.run.steps):
        loop.enter_stage(run, stage_at(stages, step), step, Quiet(), {})
        if before:
            run.model.train_main(True)
        main_learns = {p.requires_grad for n, p in run.model.named_parameters() if "_idx" not in n}
        assert main_learns == {before or not run.stage.freeze_main}, (step, main_learns)
        calls = sum(mlp_calls.values()) if mlp_calls is not None else 0
        loop.train_step(run)
        if mlp_calls is not None and run.stage.freeze_main and not before:  # one forward per block, no recompute
            assert sum(mlp_calls.values()) - calls == cfg.model.n_layers * accum
        out.append(_weights(run, zero))
        if save_dir is not None:
            ckpt.save_checkpoint(run.engine, save_dir, step + 1, rank=0, world_size=1, keep_last=0)
    return out


@pytest.mark.usefixtures("restore_dist_env")
@pytest.mark.parametrize("zero,policy", [(0, "selective"), (1, "full"), (2, "selective"), (3, "full"),
                                         (3, "selective")])
def test_frozen_stage_through_deepspeed(zero, policy, tmp_path, monkeypatch):
    """A frozen warm-up (3 steps of 2 micro-batches), then a sparse stage, through DeepSpeed's engine:
    in the frozen steps the main weights take no gradients, stay bitwise as they were and each block
    runs its MLP once per micro-batch; the index branch learns as it did when the main weights kept
    taking gradients (ZeRO 1-3 bitwise; ZeRO-0's clipping norm then summed DeepSpeed's zero-filled main
    gradients too: 1e-6). The sparse stage trains every weight (ZeRO 1-3: bitwise as before, the frozen
    groups' optimizer state having stepped with zero gradients as before), and resuming from a checkpoint
    inside the frozen stage or at its end gives the uninterrupted run's weights bitwise."""
    import collections

    from bench.parallel import synthetic_batch
    from tests.utils import compose_train_config, counting, rel_rms
    from train import checkpoint as ckpt
    from train.model import SwiGLU
    from train.parallel import init_distributed

    mlp_calls = collections.Counter()
    monkeypatch.setattr(SwiGLU, "forward", counting(mlp_calls, "mlp", SwiGLU.forward))
    cfg = compose_train_config([*FROZEN_RECIPE, f"parallel.zero_stage={zero}", "parallel.activation_checkpointing=true",
                                f"parallel.checkpoint_policy={policy}"])
    env = init_distributed(cfg.parallel)
    stages = build_recipe(cfg)
    assert [s.freeze_main for s in stages] == [True, False]
    batches = [synthetic_batch(256, cfg.model.vocab_size, seed, env.device) for seed in (1, 2, 3)]
    now = _run_recipe(cfg, env, stages, batches, save_dir=tmp_path, mlp_calls=mlp_calls)
    before = _run_recipe(cfg, env, stages, batches, before=True)
    main = [n for n in now[0] if "_idx" not in n]
    index = [n for n in now[0] if "_idx" in n]
    for step in range(1, 4):  # the frozen stage
        assert all(torch.equal(now[step][n], now[0][n]) for n in main), step
        assert all(not torch.equal(now[step][n], now[step - 1][n]) for n in index), step
        for n in index:
            same = torch.equal(before[step][n], now[step][n]) if zero else rel_rms(before[step][n], now[step][n]) < 1e-6
            assert same, (step, n)
    # the sparse stage: every weight trains (the vision embedding has no image in these batches)
    assert all(not torch.equal(now[5][n], now[3][n]) for n in main if not n.startswith("vision."))
    if zero:
        assert all(torch.equal(now[5][n], before[5][n]) for n in now[5])
    for first in (1, 3):  # inside the frozen stage, and at its end
        path = ckpt.checkpoint_dir(tmp_path) / ckpt.tag_for(first)
        resumed = _run_recipe(cfg, env, stages, batches, first=first, resume=path)
        assert all(torch.equal(resumed[0][n], now[first][n]) for n in now[first]), first
        assert all(torch.equal(resumed[-1][n], now[-1][n]) for n in now[-1]), first


def test_stage_data_weights_resolve_and_are_checked():
    from train.data.config import SourceConfig

    stages = [StageConfig(name="primer", steps=2, data_weights=[0, 1]), StageConfig(name="main", steps=3)]
    cfg = make_cfg(stages, steps=5)
    with pytest.raises(ValueError, match=r"recipe.stages\[0\].data_weights needs data.sources"):
        build_recipe(cfg)
    cfg.data.sources = [SourceConfig(name="text"), SourceConfig(name="tasks", kind="synthetic", weight=0.3)]
    primer, main = build_recipe(cfg)
    assert primer.data_weights == (0.0, 1.0) and main.data_weights == ()  # (): data.sources' own weights
    assert primer.data_epoch == main.data_epoch  # one stream, new shares
    assert "[0] primer: steps 0-1 sparse seq_len=512 batch=2 sp=1 cp=1 rope_base=10000 kl_weight=1 " \
           "data_weights=[0.0, 1.0]" in describe([primer, main], 5)
    for weights, message in (([1], "has 1 weights for 2 data.sources"), ([1, -1], "finite and >= 0"),
                             ([0, 0], "at least one > 0"), ([1, float("nan")], "finite")):
        cfg.recipe.stages[0].data_weights = weights
        with pytest.raises(ValueError, match=rf"recipe.stages\[0\].data_weights=.*{message}"):
            build_recipe(cfg)
