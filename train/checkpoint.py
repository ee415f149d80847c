"""Atomic training checkpoints on top of DeepSpeed's save/load.

Layout under ``run_dir/checkpoints``::

    step_00000120/            one complete checkpoint: `step` optimizer steps done
      state/                  DeepSpeed's files (model, optimizer, scheduler; ZeRO partitions per rank)
      ranks/rank_00003.json   each rank's RNG states and data-loader position (JSON)
      meta.json               written last: step, stage, world size; its presence marks the copy complete
    latest                    name of the newest complete checkpoint (a pointer for people and tools)
    .tmp-step_00000140/       a save in progress, or one killed half-way: never read, removed later

A save writes everything into ``.tmp-<tag>``, renames it to ``<tag>`` (atomic on one file system) and
only then rewrites ``latest`` (through a rename as well), so a run killed at any moment leaves either
the old set of checkpoints or the new one. ``resume=auto`` picks the newest directory with a
``meta.json``; a half-written one is ignored. The run directory must be on a file system every rank
sees (each rank writes its own files into the same directory).

What we write ourselves (``meta.json``, ``ranks/*.json``) is plain JSON. DeepSpeed's own files under
``state/`` are pickles that ``torch.load`` reads with ``weights_only=False``: load checkpoints only
from a source you trust, as you would any pickle.
"""

from __future__ import annotations

import base64
import faulthandler
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DS_TAG = "state"
PREFIX = "step_"
TMP = ".tmp-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.name.startswith(PREFIX) and (path / "meta.json").is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``never`` -> None; ``auto`` -> the newest complete one in
    ``run_dir`` (None if there is none); anything else is a checkpoint directory that must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint (a {PREFIX}* "
                                f"directory with meta.json): use auto, never or such a directory")
    return path


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else the newest complete checkpoint of the run directory
    ``path`` (for the apps that read a trained model: eval, generate, convert)."""
    path = Path(path)
    if is_complete(path):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"checkpoint={path}: neither a complete checkpoint (a {PREFIX}* directory with "
                                "meta.json) nor a run directory holding one")
    return found[-1]


def consolidated_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint's model. ZeRO (and DeepSpeed's bf16 optimizer) keep the
    fp32 weights partitioned in ``*optim_states.pt``: DeepSpeed's own consolidation gathers them. Without
    ZeRO the module state in ``mp_rank_00_model_states.pt`` is complete. Both are pickles DeepSpeed wrote:
    read only checkpoints you trust."""
    state_dir = Path(checkpoint) / DS_TAG
    if any(state_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    else:
        state = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_run_weights(model: torch.nn.Module, path: str | Path) -> tuple[Path, list[str]]:
    """``checkpoint.init_from``: the model weights of another run's checkpoint (``path``: a checkpoint, or a
    run directory and its newest complete checkpoint) copied into ``model``; the optimizer, schedule, step
    and data position start fresh. The models must match, except for MSA's index branch: a dense source
    leaves it at its fresh init (a dense model continued with MSA), and a dense model drops a source's.
    Returns the checkpoint read and the parameters kept at their init."""
    from train.hf import hf_name

    def index(name: str) -> bool:
        try:
            return hf_name(name)[1] == "index"
        except (KeyError, ValueError):
            return False

    checkpoint = find_checkpoint(path)
    state = consolidated_state(checkpoint)
    own = dict(model.named_parameters())
    unexpected = [k for k in state if k not in own and not index(k)]
    missing = [k for k in own if k not in state and not index(k)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in own.items()
              if k in state and state[k].shape != p.shape]
    if unexpected or missing or shapes:
        raise ValueError(f"checkpoint.init_from={str(path)!r} ({checkpoint}) does not match this model: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}. Build the same model as "
                         f"the source run (its config.yaml: model=..., model.*); only attention may differ")
    with torch.no_grad():
        for k, p in own.items():
            if k in state:
                p.copy_(state[k].to(p.dtype))
    return checkpoint, sorted(k for k in own if k not in state)


def rng_state() -> dict:
    """Every RNG the run draws from, as plain JSON values (nothing in a checkpoint we write can execute
    code when it is read)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, write) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, run_dir: str | Path, step: int, *, rank: int, world_size: int, keep_last: int,
                    loader_state: dict | None = None, meta: dict | None = None) -> Path:
    """Save a checkpoint after ``step`` optimizer steps; every rank must call it. Returns its path."""
    root, tag = checkpoint_dir(run_dir), tag_for(step)
    final, tmp = root / tag, root / f"{TMP}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP}*"):  # a save killed half-way, or this one's earlier attempt
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "ranks").mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    own = {"rng": rng_state(), "loader": loader_state, "rank": rank}
    _atomic_write(tmp / "ranks" / f"rank_{rank:05d}.json", lambda f: f.write(json.dumps(own).encode()))
    _barrier()
    if rank == 0:
        info = {"step": step, "world_size": world_size, "time": time.time(), **(meta or {})}
        _atomic_write(tmp / "meta.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
        replaced = final.with_name(f"{TMP}replaced-{tag}")
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        _atomic_write(root / "latest", lambda f: f.write(tag.encode()))
        _fsync_dir(root)
        prune(run_dir, keep_last)
    _barrier()
    return final


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all). Returns the deleted."""
    if keep_last <= 0:
        return []
    old = complete_checkpoints(run_dir)[:-keep_last]
    for path in old:
        # rename first, so a kill during rmtree leaves a .tmp- directory (ignored), not a damaged step_
        doomed = path.with_name(f"{TMP}deleted-{path.name}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return old


def load_checkpoint(engine, path: str | Path, *, rank: int, world_size: int) -> dict:
    """Restore DeepSpeed's state and this rank's RNG states from ``path``; returns the checkpoint's
    meta dict with this rank's data-loader state under ``"loader"``. The optimizer state loads whatever
    the sp/cp layout (ZeRO partitions it over all ranks); the world size must match."""
    path = Path(path)
    meta = read_meta(path)
    if meta["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} was saved by {meta['world_size']} ranks, this run has {world_size}: "
                         f"relaunch with {meta['world_size']} ranks, or start afresh with checkpoint.resume=never")
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path / DS_TAG}")
    own = json.loads((path / "ranks" / f"rank_{rank:05d}.json").read_text())
    set_rng_state(own["rng"])
    return {**meta, "loader": own["loader"]}


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend = dist.get_backend()
    t = torch.tensor([int(flag)], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _ignore(signum, frame) -> None:
    pass


class StopSignal:
    """SIGTERM/SIGINT ask the run to stop: the loop saves a checkpoint at the next step boundary and
    exits cleanly. Repeated SIGTERMs are expected (a launcher forwards the signal the whole process
    group also got) and change nothing; launchers follow up with SIGKILL after their grace period, and
    the atomic checkpoint survives that. A second SIGINT (Ctrl-C twice) stops at once, as by default.
    The data-loader workers ignore SIGTERM (``train.data.loader``), so one sent to the whole process group
    leaves them serving the step in flight; should a worker die anyway, the loader's SIGCHLD handler would
    raise in the middle of the save, which needs no more data, so the first stop signal turns that check
    off (a handler that does nothing).
    The first signal is reported on stderr at once (``os.write``: unbuffered, and safe where a handler
    interrupts a ``print``), so a log shows that it arrived even if the process dies before the save.
    While it trains, SIGUSR1 prints every thread's Python stack to stderr (``faulthandler``): for a run
    that hangs, ``kill -USR1 <pid>`` shows where."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self._stacks = hasattr(signal, "SIGUSR1")  # not on Windows
        if self._stacks:
            faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            self.restore()
            signal.raise_signal(signum)
            return
        if self.received is not None:  # a repeat: already stopping
            return
        signal.signal(signal.SIGCHLD, _ignore)  # not SIG_DFL: a SIGCHLD already pending then prints an
        # "OSError: Signal 17 ignored due to race condition" (seen on the H200 as the workers died)
        self.received = signal.Signals(signum).name
        os.write(2, f"{self.received} received (pid {os.getpid()}): saving a checkpoint after this step\n".encode())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._stacks:
            faulthandler.unregister(signal.SIGUSR1)
            self._stacks = False


# Settings a resumed run may change (an explicit override such as run.steps=... or optim.lr=...): what
# the checkpoint holds stays valid under them. Anything else under these sections must match.
MUST_MATCH = ("model", "attention", "data")
MAY_DIFFER = ("data.num_workers", "data.prefetch")


def check_resume_config(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of a different model, attention or data config (e.g. a --multirun
    job pointed at another job's run directory), naming the keys that differ."""
    if saved is None:  # a checkpoint from before the config was recorded
        return
    before, after = flatten_config(saved), flatten_config(now)
    keys = sorted(k for k in set(before) | set(after)
                  if k.split(".")[0] in MUST_MATCH and k not in MAY_DIFFER and before.get(k) != after.get(k))
    if keys:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys[:8])
        more = ", ..." if len(keys) > 8 else ""
        raise ValueError(f"{path} holds a checkpoint of another configuration ({diff}{more}): point run_dir "
                         f"elsewhere, or set checkpoint.resume=never to start afresh in it")


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{dotted key: value}`` (lists are values, not walked)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out
