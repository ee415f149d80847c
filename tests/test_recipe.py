"""Recipe stages: resolution from config, lookup by step, and errors that name the key."""

import pytest

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
