"""Process groups: join the job, and split the world into ``dp x cp x sp``.

``init_distributed`` brings up the default process group (one process works too: it plays rank 0 of
1). ``build_mesh`` lays the ranks out as ``rank = (dp_rank * cp + cp_rank) * sp + sp_rank`` (sp
innermost, so Ulysses' all-to-all stays on the fastest links) with ``torch.distributed.device_mesh``,
and returns a ``Mesh``: every rank and size, the groups, and the object DeepSpeed is given as ``mpu``.
"""

from __future__ import annotations

import datetime
import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """``parallel.*``: how the world is split, which memory savers run, and DeepSpeed's settings."""

    sp_size: int = 1  # Ulysses sequence parallel (heads <-> sequence all-to-all); a stage may set its own
    cp_size: int = 1  # context parallel (K/V all-gather along the sequence); a stage may set its own
    zero_stage: int = 1  # ZeRO stage 0-3
    activation_checkpointing: bool = False  # recompute each block in backward
    # full: DeepSpeed's, the whole block again | selective: keep the attention ops' outputs (select_blocks, sparse
    # attention, index KL, SDPA), recompute the rest (train/parallel/parallelize.py)
    checkpoint_policy: str = "selective"
    # full only: the recompute reuses the forward's block selection (kept in pinned host memory) instead of
    # running the top-k over every earlier key again; selective keeps it anyway
    checkpoint_keep_selection: bool = True
    compile_blocks: bool = False  # torch.compile the token-local work of each block (attention core left eager)
    checkpoint_offload: bool = False  # keep the checkpointed block inputs in CPU memory (GPU only)
    mlp_tile_tokens: int = 0  # >0: DeepSpeed's TiledMLP over tiles of this many tokens (recomputed in backward)
    dist_backend: str = "auto"  # auto: nccl with CUDA, else gloo
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging on a dead rank
    # merged last into the generated DeepSpeed JSON (validated by DeepSpeed's config classes), e.g.
    # {zero_optimization: {offload_optimizer: {device: cpu}, overlap_comm: true}}
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistEnv:
    """This process in the job: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join (or, run alone, create) the default process group; ranks come from the launcher's env."""
    import deepspeed

    init_method = None
    if "RANK" not in os.environ:
        # Alone: rendezvous through a file, not a port, so concurrent single-process runs never race
        # for a free port (seen as EADDRINUSE with several test runs on one machine).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
        init_method = "file://" + os.path.join(tempfile.mkdtemp(prefix="msa-rdzv-"), "store")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    for lock in stale_build_locks():
        print(f"warning: {lock} is {(time.time() - os.path.getmtime(lock)) / 60:.0f} minutes old. DeepSpeed builds "
              "its ops on first use under this lock, and every later run waits for it with no message; if no "
              "other process is building that op (a run killed while building leaves the lock behind), delete "
              "the file.", file=sys.stderr, flush=True)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                   verbose=False, init_method=init_method, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def stale_build_locks(older_than_s: float = 300.0) -> list[str]:
    """Lock files of PyTorch's extension builds (``TORCH_EXTENSIONS_DIR``, else its default root) older
    than ``older_than_s``: an op build takes a minute or two, a lock that old was most likely left by a
    killed build, and torch's loader would wait on it for ever."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    locks = glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
    return sorted(p for p in locks if time.time() - os.path.getmtime(p) > older_than_s)


@dataclass
class Mesh:
    """This rank's place in ``dp x cp x sp`` and the groups it talks in (None for a size-1 axis)."""

    sp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    sp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    sp_group: object = None
    cp_group: object = None
    shard_group: object = None  # the sp*cp ranks that split one sequence
    kv_replicas: int = 1  # sp ranks that share one GQA group (sp_size > n_kv_heads: KV heads replicated)
    replica_group: object = None  # those ranks (consecutive sp ranks)

    @property
    def shards(self) -> int:
        return self.sp_size * self.cp_size

    @property
    def mpu(self):
        """What DeepSpeed is told about the layout (None without sharding)."""
        return _SequenceParallelMPU(self.shard_group) if self.shards > 1 else None


def build_mesh(sp_size: int, cp_size: int, env: DistEnv, kv_replicas: int = 1) -> Mesh:
    """Every rank must call this alike (group creation is collective). ``kv_replicas > 1`` when
    ``sp_size`` exceeds the model's KV heads: then each run of ``kv_replicas`` consecutive sp ranks
    shares one GQA group and gets a group of its own (``replica_group``)."""
    # the layout was checked at start (train.config.check_stage); a shape that does not fill the world
    # fails in init_device_mesh
    dp_size = env.world_size // (sp_size * cp_size)
    if sp_size * cp_size == 1:
        return Mesh(dp_size=dp_size, dp_rank=env.rank)
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dp_size, cp_size, sp_size // kv_replicas, kv_replicas)
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=("dp", "cp", "spg", "spr"))
    sp = mesh["spg", "spr"]._flatten("sp")
    return Mesh(sp_size, cp_size, dp_size, sp.get_local_rank(), mesh.get_local_rank("cp"), mesh.get_local_rank("dp"),
                sp_group=sp.get_group() if sp_size > 1 else None,
                cp_group=mesh.get_group("cp") if cp_size > 1 else None,
                shard_group=mesh["cp", "spg", "spr"]._flatten("shard").get_group(), kv_replicas=kv_replicas,
                replica_group=mesh.get_group("spr") if kv_replicas > 1 else None)


def kv_replicas(sp_size: int, n_kv_heads: int) -> int:
    """How many sp ranks share one GQA group: 1 while ``sp_size`` divides the KV heads, else
    ``sp_size / n_kv_heads`` (the KV heads are then replicated over them)."""
    return 1 if n_kv_heads % sp_size == 0 else sp_size // n_kv_heads


class _SequenceParallelMPU:
    """The interface of ``deepspeed.runtime.sequence_parallel.parallel_state_sp`` over our groups: its
    "sequence parallel" group is the whole token-sharding group (``sp * cp`` ranks), its
    "sequence-data parallel" group every rank (all hold the same parameters). DeepSpeed's own module
    keeps these in module globals that can be set once per process; this holds them per mesh."""

    def __init__(self, shard_group):
        self.group = shard_group

    def get_sequence_parallel_group(self):
        return self.group

    def get_sequence_parallel_world_size(self):
        return dist.get_world_size(self.group)

    def get_sequence_parallel_rank(self):
        return dist.get_rank(self.group)

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self):
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank()

    def initialize_sequence_parallel(self, size: int):
        """Never called: DeepSpeed recognises a sequence-parallel mpu by this method's presence (and then
        takes its data-parallel groups from the sequence-data-parallel ones; deepspeed/utils/groups.py,
        0.19.8). The groups come from ``build_mesh``."""
        raise RuntimeError("the sequence-parallel groups are built by train.parallel.build_mesh")

    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


__all__ = ["ParallelConfig", "DistEnv", "Mesh", "init_distributed", "build_mesh", "kv_replicas"]
