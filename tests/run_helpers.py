"""Small pieces the tests that start `python -m train` as a subprocess share."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_override(n: int) -> str:
    return f"run.steps={n}"


def write_text_shards(directory: Path, n_shards: int, docs_per_shard: int = 24) -> None:
    """`directory/part-{0..n_shards-1}.tar`, plain-text webdataset shards (a few KB each)."""
    directory.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(directory / f"part-{s}.tar", "w") as tar:
            for i in range(docs_per_shard):
                data = f"shard {s} document {i}: {'the quick brown fox jumps over the lazy dog ' * 12}".encode()
                info = tarfile.TarInfo(f"doc{s}_{i:03d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
