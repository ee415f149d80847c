"""What the host knows about device tensors without reading them back. A device-to-host read (``tolist``,
``item``, a copy to a CUDA tensor from pageable memory) waits for the GPU's queue to drain, and in a step that is
partly host-bound the GPU then idles while the host catches up (docs/scaling.md 3v, 3w). The per-tensor caches
key on a tensor's in-place write counter (``tensor_version``), so a value is kept only while nothing writes to
the tensor."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

_BOUNDS = WeakIdKeyDictionary()  # cu_seqlens -> (version, its values as a list, its longest document)


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; None where it keeps none (inference mode): no caching. What
    the per-tensor caches here and in ``kernels.common`` key on."""
    try:
        return t._version
    except RuntimeError:
        return None


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, read from the device once per tensor and kept while nothing writes to it: every
    layer of a step, and the recompute under checkpointing, share the tensor, so a step with a dense layer per
    document reads it once instead of once per layer and pass (each read waits for the GPU's queue). The list is
    shared: read it, do not write to it."""
    return _entry(cu_seqlens)[0]


def host_longest(cu_seqlens: torch.Tensor) -> int:
    """The longest document of ``cu_seqlens``, found once with its ``host_bounds`` (every MSA layer asks)."""
    return _entry(cu_seqlens)[1]


def _entry(cu_seqlens: torch.Tensor) -> tuple[list[int], int]:
    version = tensor_version(cu_seqlens)
    hit = _BOUNDS.get(cu_seqlens)
    if version is not None and hit is not None and hit[0] == version:
        return hit[1:]
    return _keep(cu_seqlens, version, _read_bounds(cu_seqlens))


def _keep(cu_seqlens: torch.Tensor, version: int | None, bounds: list[int]) -> tuple[list[int], int]:
    entry = (bounds, max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0))
    if version is not None:
        _BOUNDS[cu_seqlens] = (version, *entry)
    return entry


def _read_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """The device-to-host read itself (one place, so a test can count the reads)."""
    return cu_seqlens.tolist()


def remember_bounds(cu_seqlens: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Record ``bounds`` as ``cu_seqlens``'s values, for a device copy of a host tensor whose values the caller
    has read (the training loop's batch): ``host_bounds`` then reads nothing back. Kept while nothing writes to
    ``cu_seqlens``, as any ``host_bounds`` entry."""
    if cu_seqlens.ndim != 1 or len(bounds) != cu_seqlens.numel():
        raise ValueError(f"{len(bounds)} bounds for a cu_seqlens of shape {tuple(cu_seqlens.shape)}")
    _keep(cu_seqlens, tensor_version(cu_seqlens), [int(b) for b in bounds])
    return cu_seqlens


def to_device_async(values: list[int] | torch.Tensor, device, dtype=torch.int32) -> torch.Tensor:
    """``values`` (a list, or a host tensor, kept in its own dtype) as a tensor on ``device``; to a GPU through
    pinned memory with a non-blocking copy, so the host does not wait for the GPU's queue to drain (the caching
    host allocator keeps the pinned buffer until the copy has run)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
