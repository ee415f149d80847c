"""Read a W&B run file (`run-<id>.wandb`) back into Python, offline.

wandb 0.31 writes its run files from its Go core and ships no Python reader. The file is a LevelDB-style
log of `wandb.proto.wandb_internal_pb2.Record` messages:
- a 7-byte file header: the ident ":W&B", magic 0xBEE1 (uint16 LE), version 0 (uint8);
- then 32 KiB blocks (counted from the start of the file, header included); each record chunk has a
  7-byte header: crc32 (uint32 LE, of the type byte then the data), data length (uint16 LE), chunk type
  (1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk header is zero padding.
The messages are decoded with wandb's own protobuf definitions, so this reads what wandb really wrote.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B run file or is damaged."""


def iter_record_bytes(path: str | Path):
    """Yield the payload of each record in a `.wandb` file, joining chunks split across blocks."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, shorter than the W&B file header")
    ident, magic, version = HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise WandbFileError(f"{path}: header {ident!r}/{magic:#x}/{version} is not a W&B run file")
    pos, pending = HEADER.size, None
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # zero padding at the end of a block
            pos += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled tail of a preallocated block
            pos += room
            continue
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        if end > len(data):
            break  # the writer was killed mid-record: the last record is incomplete
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise WandbFileError(f"{path}: bad checksum in the chunk at byte {pos}")
        pos = end
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"{path}: continuation chunk without a first chunk at byte {pos}")
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {kind} at byte {pos}")


def iter_records(path: str | Path):
    """Yield each `Record` message of a `.wandb` file."""
    for payload in iter_record_bytes(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _item_value(item):
    kind = item.WhichOneof("value")
    if kind == "none":
        return None
    if kind in ("boolean", "integer", "number", "text"):
        return getattr(item, kind)
    return json.loads(item.json if kind == "json" else item.value_json)


@dataclass
class WandbRun:
    """What a run file holds: the run's identity, its config, history rows and summary."""

    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None

    def series(self, key: str) -> dict[int, object]:
        """{step: value} of one history key, over the rows that hold it."""
        return {row["_step"]: row[key] for row in self.history if key in row}


def _apply_config(run: WandbRun, items) -> None:
    for item in items:
        value = json.loads(item.value_json)
        # wandb stores each top-level config key as {"value": ..., "desc": ...}
        run.config[_item_key(item)] = value.get("value", value) if isinstance(value, dict) else value


def read_run(path: str | Path) -> WandbRun:
    """Parse a `.wandb` file (or the run directory that holds one) into a `WandbRun`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if len(files) != 1:
            raise WandbFileError(f"{path}: expected one .wandb file, found {len(files)}")
        path = files[0]
    run = WandbRun()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.tags = r.display_name, r.run_group, list(r.tags)
            _apply_config(run, r.config.update)
        elif kind == "config":
            _apply_config(run, record.config.update)
        elif kind == "history":
            row = {_item_key(item): _item_value(item) for item in record.history.item}
            row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_run_files(root: str | Path) -> list[Path]:
    """Every `.wandb` run file under `root` (a run_dir or a wandb/ directory), oldest first."""
    return sorted(Path(root).rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
