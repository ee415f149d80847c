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


def git_commit() -> str:
    """``MSA_GIT_COMMIT`` where the caller sets it (a tree copied to a GPU machine, whose .git may be absent
    or stale), else the checkout's HEAD, else ``unknown``."""
    if os.environ.get("MSA_GIT_COMMIT"):
        return os.environ["MSA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out if len(out) == 40 else "unknown"


def run_meta() -> dict:
    """GPU, versions, commit, command line and UTC time of this run."""
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "command": " ".join(["python3"] + sys.argv),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
