"""Parallelism applied from outside the plain model: process groups (``mesh``), which tokens a rank
holds (``shard``), the sequence/context-parallel attention cores (``sequence``), the hooks that apply
them and the memory savers (``parallelize``), and the DeepSpeed engine (``engine``)."""

from train.parallel.engine import build_engine, check_deepspeed, deepspeed_config, write_deepspeed_json
from train.parallel.mesh import DistEnv, Mesh, ParallelConfig, build_mesh, init_distributed, kv_replicas
from train.parallel.parallelize import parallelize
from train.parallel.shard import local_token_index, shard_batch, shard_sum, truncate_cu_seqlens, zigzag_ranges

__all__ = [
    "ParallelConfig", "DistEnv", "Mesh", "init_distributed", "build_mesh", "kv_replicas", "parallelize",
    "shard_batch", "shard_sum", "zigzag_ranges", "local_token_index", "truncate_cu_seqlens", "deepspeed_config",
    "check_deepspeed", "write_deepspeed_json", "build_engine",
]
