"""What every benchmark records beside its numbers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
