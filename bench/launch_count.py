"""Kernel launches per training step of one MSA layer against one dense layer, counted on the CPU.

A short row's MSA step is bound by the host, which pays for every kernel it launches (``docs/scaling.md``:
at 16K tokens ``model=small`` spent about two thirds of a profiled step with no kernel running). This counts,
for one forward and backward of a model under selective activation checkpointing (the trainer's default),
the aten ops that launch a kernel on a GPU (views and allocations left out) and the Triton kernel launches,
with the kernels' host code run by the Triton interpreter on the CPU (``TRITON_INTERPRET=1``, which the
command line sets; the interpreter's own tensor copies are not counted). Two models of ``model.n_layers``
layers (2 unless an override says otherwise) run the same row: ``attention=dense`` and MSA with one dense
first layer, so what an MSA layer adds is the difference over its MSA layers. The ops are also counted by
the function of the counted tree that launched them (``aten_by_caller``; ``?`` for autograd's own backward
formulas).

It counts launches, not time: a count can drop while the step does not get faster (a fused kernel that runs
slower, or host time spent elsewhere: Python in autograd functions, synchronisations). The step time is
measured on a GPU (``bench/step_time_old_new.py``, ``bench/train_step.py --host-profile``). On the CPU the
RMSNorms run as PyTorch's composite (five ops, one fused kernel on CUDA), and a CUDA sort runs one launch per
8 key bits where this counts one: so the CPU count of a layer is not the GPU's, but the difference between
two commits' counts carries over.

    python -m bench.launch_count [--seq-len 512] [--packed] [--json out.json] [-- overrides]

Overrides are Hydra keys of ``python -m train`` (default ``model=tiny`` with 8 query heads over 2 KV heads,
head dim 16, blocks of 16 keys, top-4, the Triton kernels and their fused RoPE).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.meta import compose, run_meta

# aten ops that launch no kernel: views, and allocations (host work, no launch)
NO_LAUNCH = frozenset({
    "aten.view", "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.permute",
    "aten.transpose", "aten.t", "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.as_strided",
    "aten._reshape_alias", "aten._unsafe_view", "aten.unflatten", "aten.detach", "aten.alias", "aten.empty",
    "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.lift_fresh",
})

DEFAULTS = ["model=tiny", "model.n_heads=8", "model.n_kv_heads=2", "model.head_dim=16", "model.rope_dim=8",
            "model.rope_impl=triton", "attention.impl=triton", "attention.block_size=16", "attention.topk=4",
            "attention.index_dim=16", "attention.n_dense_layers=1", "parallel.checkpoint_policy=selective"]


@functools.cache
def _tree() -> str:
    """The source tree whose code is counted: where ``kernels`` is imported from (``PYTHONPATH`` may put
    another checkout first, to count an older commit with this script)."""
    import kernels

    return str(Path(kernels.__file__).resolve().parents[1])


def _caller() -> str | None:
    """``None`` inside Triton's interpreter (its own tensor copies), else the innermost frame of the counted
    tree's code outside ``bench/`` as ``path:function`` (``?`` for ops autograd's engine runs: backward
    formulas of torch's own ops)."""
    root = _tree()
    f, site = sys._getframe(2), None
    while f is not None:
        name = f.f_code.co_filename
        if "triton" in name and "interpreter" in name:
            return None
        if site is None and name.startswith(root) and "/.venv/" not in name and "/bench/" not in name:
            site = f"{Path(name).relative_to(root).as_posix()}:{f.f_code.co_name}"
        f = f.f_back
    return site or "?"


@contextlib.contextmanager
def on_triton_launch(hook, tool: str):
    """Inside: ``hook(executor, args, kwargs)`` before every Triton launch, which the interpreter then runs
    (``executor.fn``: the kernel's Python function). ``tool`` names the caller in the errors."""
    from triton.runtime import interpreter

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{tool} sees Triton launches under the interpreter only: set TRITON_INTERPRET=1 before "
                           f"triton is imported (python -m {tool} does)")
    if not hasattr(interpreter, "GridExecutor"):
        raise RuntimeError(f"{tool} needs Triton's interpreter (triton.runtime.interpreter.GridExecutor), which "
                           "this Triton version does not have")
    call = interpreter.GridExecutor.__call__

    def hooked(executor, *args, **kwargs):
        hook(executor, args, kwargs)
        return call(executor, *args, **kwargs)

    interpreter.GridExecutor.__call__ = hooked
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = call


class Launches(TorchDispatchMode):
    """Inside: ``aten`` counts the kernel-launching aten ops by name, ``triton`` the Triton kernels by name,
    ``sites`` the aten ops by the project function that called them (``_caller``)."""

    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.sites = collections.Counter(), collections.Counter(), collections.Counter()
        self._hooked, self._depth = None, 0

    def __enter__(self):
        self._depth += 1  # entered again around a custom op's host code: hooked once
        if self._depth == 1:
            counter = self.triton

            def count(executor, args, kwargs):
                counter[getattr(executor.fn, "__name__", str(executor.fn))] += 1

            self._hooked = on_triton_launch(count, "bench.launch_count")
            try:
                self._hooked.__enter__()
            except RuntimeError:
                self._depth = 0
                raise
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._hooked.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import _maybe_get_opdef  # private: imported where counting needs it

        name = str(func.overloadpacket)
        opdef = _maybe_get_opdef(func) if name.startswith("msa.") else None
        if opdef is not None:  # the kernels' custom ops: count what their host code launches, not the op
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        if name not in NO_LAUNCH:
            site = _caller()
            if site is not None:
                self.aten[name] += 1
                self.sites[site] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


def training_step(overrides: list[str], seq_len: int, packed: bool, dtype: torch.dtype = torch.float32):
    """``(step, model)``: ``step()`` runs one forward and backward of the model that ``overrides`` configure
    (its weights in ``dtype``), under selective activation checkpointing where it is on, on one row of
    ``seq_len`` tokens (``packed``: documents of 1/8, 3/8 and 1/2)."""
    from bench.train_step import make_batch
    from train.model import build_model
    from train.parallel.parallelize import selective_checkpointed

    cfg = compose(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention).to(dtype)
    if cfg.parallel.activation_checkpointing:
        if cfg.parallel.checkpoint_policy != "selective":
            raise ValueError("bench.launch_count and bench.kernel_resources run parallel.checkpoint_policy=selective "
                             "only: full checkpointing goes through DeepSpeed's engine, which they do not build")
        model.set_block_runner(selective_checkpointed)
    lengths = [seq_len // 8, seq_len // 2 - seq_len // 8, seq_len - seq_len // 2] if packed else [seq_len]
    batch = make_batch(lengths, cfg.model.vocab_size, seed=0, packed=packed)

    def step():
        out = model(batch)
        (out["lm_sum"] / out["n_tokens"] + out["kl"]).backward()

    return step, model


def count_step(overrides: list[str], seq_len: int, packed: bool) -> dict:
    """Launches of the second forward+backward (the first builds the caches a step reuses) of
    ``training_step``."""
    step, model = training_step(overrides, seq_len, packed)
    step()
    with Launches() as n:
        step()
    return {"aten": n.total - sum(n.triton.values()), "triton": sum(n.triton.values()), "total": n.total,
            "aten_ops": dict(n.aten.most_common()), "triton_kernels": dict(n.triton.most_common()),
            "aten_by_caller": dict(n.sites.most_common()),
            "n_layers": len(model.layers), "msa_layers": len(model.msa_layers())}


def main() -> None:
    # here, not at import: a test module that imports this on a GPU machine must not switch Triton to the
    # interpreter for every kernel test after it (TRITON_INTERPRET is read when a kernel is first decorated)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.launch_count: triton was imported before TRITON_INTERPRET=1 could be set; run it as "
                 "python -m bench.launch_count")
    os.environ["TRITON_INTERPRET"] = "1"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--packed", action="store_true", help="three documents in the row (cu_seqlens)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [*DEFAULTS, "model.n_layers=2", "parallel.activation_checkpointing=true", *args.overrides]
    msa = count_step([*base, "attention=msa"], args.seq_len, args.packed)
    dense = count_step([*base, "attention=dense"], args.seq_len, args.packed)
    per_layer = (msa["total"] - dense["total"]) / max(msa["msa_layers"], 1)
    result = {"meta": {**run_meta(), "seq_len": args.seq_len, "packed": args.packed, "overrides": base},
              "msa": msa, "dense": dense, "msa_layer_extra": per_layer}
    print(f"launches per step ({msa['n_layers']} layers, {args.seq_len} tokens{', packed' if args.packed else ''}): "
          f"MSA {msa['total']} ({msa['aten']} aten + {msa['triton']} Triton), dense {dense['total']}; "
          f"an MSA layer adds {per_layer:.0f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
