"""What every benchmark records beside its numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    """The typed TrainConfig that ``python -m train <overrides>`` runs with (this tree's conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register_schema, to_train_config

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_train_config(hydra_compose("train", overrides=overrides))


def git_commit(root: Path | None = None) -> str:
    """``MSA_GIT_COMMIT`` where the caller sets it (a tree copied to a GPU machine, whose .git may be absent
    or stale), else the checkout's HEAD with ``-dirty`` appended where the tree differs from it (a stale
    .git under newer files reads so, instead of passing for the commit), else ``unknown``."""
    if os.environ.get("MSA_GIT_COMMIT"):
        return os.environ["MSA_GIT_COMMIT"]
    cwd = root or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10).stdout.strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out if clean else out + "-dirty") if len(out) == 40 else "unknown"


def run_meta() -> dict:
    """GPU, versions, commit, command line and UTC time of this run."""
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "command": " ".join(["python3"] + sys.argv),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":  # python -m bench.meta --commit: what the GPU scripts record when not told
    if sys.argv[1:] != ["--commit"]:
        sys.exit("usage: python -m bench.meta --commit")
    print(git_commit())
