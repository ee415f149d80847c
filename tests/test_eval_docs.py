"""Every `python -m train.eval` and `python -m train.generate` command in the docs composes, as written,
against its own Hydra config (conf/eval.yaml, conf/generate.yaml) into its typed config: an unknown key, a
wrong type or a missing checkpoint= fails. (tests/test_docs_commands.py checks `python -m train` commands
and only that other train.* modules exist; it finds the commands for this test.)"""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_docs_commands import FOUND, app_overrides, skip_reason

ROOT = Path(__file__).resolve().parents[1]
APPS = {"train.eval": "eval", "train.generate": "generate"}
# a bare `python -m train.eval` in prose names the app; a command gives at least its checkpoint
COMMANDS = [(c, i) for c, i in FOUND if i.kind == "module" and i.module in APPS and i.args]


def compose(module: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import train.eval.__main__  # noqa: F401  (registers eval_schema)
    from train.generate import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(APPS[module], overrides=overrides))


def test_the_docs_show_both_apps():
    assert {i.module for _, i in COMMANDS} == set(APPS)
    assert any(c.where.startswith("docs/evals.md") for c, _ in COMMANDS)


@pytest.mark.parametrize("cmd, inv", COMMANDS, ids=[f"{c.where} {i.module}" for c, i in COMMANDS])
def test_doc_command_composes(cmd, inv):
    reason = skip_reason(inv)
    if reason:
        pytest.skip(f"{cmd.where}: {reason}")
    cfg = compose(inv.module, app_overrides(inv.args))
    assert cfg.checkpoint


def test_the_check_catches_a_wrong_key():
    with pytest.raises(Exception, match="no_such_key"):
        compose("train.eval", ["checkpoint=runs/x", "no_such_key=1"])
    with pytest.raises(Exception, match="checkpoint"):
        compose("train.generate", ["prompt=hi"])
