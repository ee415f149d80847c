"""The built wheel starts: it carries the config tree (conf/ ships as the package train.conf, see setup.py),
and `python -m train` from a non-editable install, run outside the repository, finds its configs, names
itself `train` and trains 2 steps on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.run_helpers import steps_override, write_text_shards

ROOT = Path(__file__).resolve().parents[1]
WHEEL_INPUTS = ["pyproject.toml", "setup.py", "README.md", "msa", "kernels", "train", "conf"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run(argv: list[str], cwd: Path, pythonpath: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(pythonpath)  # the installed copy, never the checkout
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """(wheel, target directory it is installed into with `pip install --no-deps --target`). The wheel is
    built from a copy of its inputs, so the build leaves no build/ or egg-info in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in WHEEL_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), "."],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("msa_trainer-*.whl")
    proc = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wheel, tmp / "site"


def test_wheel_carries_every_config(wheel_install):
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert "train.yaml" in configs and "model/tiny.yaml" in configs
    missing = [c for c in configs if f"train/conf/{c}" not in names]
    assert not missing, f"conf/ files missing from the wheel: {missing}"
    assert {"train/__main__.py", "msa/reference.py", "kernels/__init__.py"} <= names


def test_installed_wheel_trains_outside_the_checkout(wheel_install, tmp_path):
    _, site = wheel_install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run([sys.executable, "-c", "import train; print(train.__file__)"], elsewhere, site)
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(site), proc.stdout + proc.stderr

    proc = run([sys.executable, "-m", "train", "--help"], elsewhere, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("train is powered by Hydra."), proc.stdout[:500]
    assert "model: 1b, base, hf, small, tiny" in proc.stdout  # the config groups were found in the wheel

    write_text_shards(tmp_path / "shards", 2)
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "train", steps_override(2), "logging.wandb.mode=disabled",
                f"data.shards='{tmp_path}/shards/part-{{0..1}}.tar'", f"run_dir={run_dir}"], elsewhere, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert (run_dir / "train.log").exists()  # hydra.job.name, not the module file's name (__main__)
    assert not any(elsewhere.iterdir()), "the run wrote into the current directory"


def test_help_from_the_checkout_names_the_app():
    proc = run([sys.executable, "-m", "train", "--help"], ROOT, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("train is powered by Hydra."), proc.stdout[:500]
