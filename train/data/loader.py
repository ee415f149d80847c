"""The training data loader: shards -> documents -> packed rows -> batches, resumable.

`build_dataloader(...)` returns a Loader: an endless iterable of batches (dicts of CPU tensors):
  input_ids     int64 [B, N]
  labels        int64 [B, N]   next token of the same document piece; -100 at a piece's last
                               position, padding, image patches and positions whose target is a patch
  position_ids  int64 [B, N]   position inside its document piece (restarts at 0)
  cu_seqlens    int32 [S + 1]  segment boundaries over the flattened B*N tokens (flash-attn
                               convention; segments never cross rows; a row's padding is a segment)
  image_patches float32 [P, 3*p*p] in [-1, 1], (row, col, channel) order inside a patch
  image_slots   int64 [P]      flat index into B*N of each patch
  image_sizes   int64 [I, 2]   (rows, cols) patch grid of each image, in slot order
With two or more data.sources, also (for the LM loss of each source, ``loss/lm/<name>``, and of the
answers of its synthetic items, ``loss/answer/<name>``):
  loss_groups   int64 [B, N]   s, the data.sources entry of the token's document, or S + s where the target
                               is an answer token of a synthetic item (S sources); -1 on padding
  n_loss_groups int            2 S
Rows come round-robin from the workers (torch DataLoader workers); each row carries its reader's
position, so `state_dict()` after any batch resumes exactly after it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.config import DataConfig, SourceConfig
from train.data.mix import MixedReader, SyntheticReader
from train.data.packing import Packer
from train.data.samples import decode_sample
from train.data.shards import ShardReader, expand_shards

log = logging.getLogger(__name__)


def check_data(cfg: DataConfig, seq_len: int, batch_size: int, seq_key: str = "data.seq_len") -> None:
    """The loader's settings for rows of ``seq_len`` tokens (``seq_key`` names where that length is set)."""
    if seq_len < 2:
        raise ValueError(f"{seq_key}={seq_len}: must be at least 2")
    if batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size}: must be at least 1")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers}: must be >= 0")
    if cfg.image.max_patches + 2 > seq_len:
        raise ValueError(f"data.image.max_patches={cfg.image.max_patches} (+2 markers) exceeds {seq_key}={seq_len}: "
                         "lower data.image.max_patches")
    names = [source_name(s, i) for i, s in enumerate(cfg.sources)]
    if len(set(names)) < len(names):
        raise ValueError(f"data.sources: names {names} repeat: give each source its own name")
    for i, src in enumerate(cfg.sources):
        check_source(src, f"data.sources[{i}]", seq_len, seq_key, cfg)


def source_name(src: SourceConfig, index: int) -> str:
    return src.name or f"{src.kind}{index}"


def check_source(src: SourceConfig, key: str, seq_len: int, seq_key: str, cfg: DataConfig) -> None:
    if src.kind not in ("shards", "synthetic"):
        raise ValueError(f"{key}.kind={src.kind!r}: use shards or synthetic")
    if not src.weight > 0:
        raise ValueError(f"{key}.weight={src.weight} must be > 0")
    if src.kind == "shards":
        return
    from train.data.tokenizer import build_tokenizer
    from train.eval.tasks import TRAIN_TASKS, fixed_tokens

    unknown = [t for t in src.tasks if t not in TRAIN_TASKS]  # the eval tasks and the training-only drills
    if not src.tasks or unknown:
        raise ValueError(f"{key}.tasks={list(src.tasks)}: name one or more of {', '.join(TRAIN_TASKS)}")
    if src.choices < 2:
        raise ValueError(f"{key}.choices={src.choices} must be >= 2 (the answer and at least one distractor)")
    max_len = src.max_len or seq_len
    if max_len > seq_len:
        raise ValueError(f"{key}.max_len={src.max_len} exceeds {seq_key}={seq_len}: a synthetic document must fit "
                         f"in a row")
    if cfg.tokenizer.kind == "bytes":  # other tokenizers are checked when a document is made
        tokenizer = build_tokenizer(cfg.tokenizer)
        # + the end of document and one filler token
        need = max(fixed_tokens(t, tokenizer, cfg.image, src.choices) for t in src.tasks) + 2
        if not need <= src.min_len <= max_len:
            longest = f"{key}.max_len is {max_len}" if src.max_len else f"the row is {max_len}"
            raise ValueError(f"{key}.min_len={src.min_len} must lie in [{need}, {max_len}] (the longest question "
                             f"of {list(src.tasks)} and its needles take {need - 2} tokens; {longest})")


def resolve_shards(cfg: DataConfig, shards=None) -> list[str]:
    """Shard URLs of ``shards`` (default data.shards); "default" builds the embedded corpus into
    data.corpus_dir if missing."""
    shards = cfg.shards if shards is None else shards
    if shards == "default":
        from train.data.build_corpus import ensure_corpus

        return ensure_corpus(cfg.corpus_dir, cfg.corpus)
    return expand_shards(shards)


def resolve_sources(cfg: DataConfig) -> list[tuple[str, SourceConfig, list[str] | None]]:
    """(name, config, shard URLs or None for a synthetic source) of each entry of data.sources."""
    return [(source_name(src, i), src, resolve_shards(cfg, src.shards) if src.kind == "shards" else None)
            for i, src in enumerate(cfg.sources)]


class _Rows(IterableDataset):
    """Rows of the logical workers a torch DataLoader worker plays (one each; all of them in-process)."""

    def __init__(self, urls, tokenizer, cfg, *, seq_len, dp_rank, n_workers, dp_world, seed, states, first,
                 sources=(), weights=()):
        self.urls, self.tokenizer, self.cfg, self.sources = urls, tokenizer, cfg, list(sources)
        self.weights = list(weights)
        self.seq_len, self.dp_rank, self.n_workers, self.dp_world = seq_len, dp_rank, n_workers, dp_world
        self.seed, self.states, self.first = seed, states, first

    def shard_reader(self, urls, reader: int, seed: int) -> ShardReader:
        decode = functools.partial(
            decode_sample, tokenizer=self.tokenizer, image_cfg=self.cfg.image,
            max_bytes=self.cfg.max_sample_bytes,
        )
        return ShardReader(
            urls, reader=reader, n_readers=self.dp_world * self.n_workers, seed=seed,
            block_size=self.cfg.shuffle_buffer, shuffle_shards=self.cfg.shuffle_shards, decode=decode,
        )

    def packer(self, worker: int) -> Packer:
        index = self.dp_rank * self.n_workers + worker
        if not self.sources:
            reader = self.shard_reader(self.urls, index, self.seed)
        else:  # each source its own stream; a second source of the same shards is shuffled differently
            reader = MixedReader([
                self.shard_reader(urls, index, self.seed + 7919 * i) if src.kind == "shards" else
                SyntheticReader(src, name, self.tokenizer, self.cfg.image, self.seq_len, self.seed, index,
                                self.cfg.corpus.heldout_every)
                for i, (name, src, urls) in enumerate(self.sources)], self.weights)
        p = self.cfg.image.patch_size
        return Packer(reader, self.seq_len, self.tokenizer.pad, self.tokenizer.img_patch, 3 * p * p)

    def __iter__(self):
        info = get_worker_info()
        order = [(self.first + i) % self.n_workers for i in range(self.n_workers)]
        if info is not None:  # one logical worker per process, so the round-robin order is kept
            order = [order[info.id]]
        streams = [(w, self.packer(w).rows(self.states.get(w))) for w in order]
        while True:
            for w, rows in streams:
                row = next(rows)
                row.state["worker"] = w
                yield row


def _outlive_stop_signals(worker_id: int) -> None:
    """A loader worker ignores SIGTERM: a stop signal sent to the whole process group (timeout, SLURM,
    launchers) is the trainer's to act on. Killed by it, a worker could die in the middle of handing the
    trainer a batch, which then failed with "Connection reset by peer" instead of finishing its step and
    saving. The trainer stops its workers itself (``Loader.close``); one left over exits when it finds the
    trainer gone (PyTorch's worker watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(x):
    return x


def collate(rows, n_sources: int = 0) -> dict:
    """One batch of ``rows``; with ``n_sources`` > 1 it says which source each target came from and which
    targets are answers (``loss_groups``)."""
    N = len(rows[0].tokens)
    seg = torch.tensor([0] + [n for r in rows for n in r.seg_lens], dtype=torch.int64)
    patches = torch.cat([r.patches for r in rows])
    batch = {
        "input_ids": torch.stack([r.tokens for r in rows]).long(),
        "labels": torch.stack([r.labels for r in rows]).long(),
        "position_ids": torch.stack([r.positions for r in rows]).long(),
        "cu_seqlens": seg.cumsum(0).to(torch.int32),
        "image_patches": patches.float().div_(127.5).sub_(1.0),
        "image_slots": torch.cat([r.slots + b * N for b, r in enumerate(rows)]),
        "image_sizes": torch.tensor([g for r in rows for g in r.grids], dtype=torch.int64).reshape(-1, 2),
    }
    if n_sources > 1:
        batch["loss_groups"] = torch.stack([_loss_groups(r, n_sources) for r in rows])
        batch["n_loss_groups"] = 2 * n_sources
    return batch


def _loss_groups(row, n_sources: int) -> torch.Tensor:
    """``[N]``: each piece's source over its tokens (the pieces are the row's first segments), plus
    ``n_sources`` over its answer targets; -1 after the pieces."""
    n = len(row.sources)
    ids = torch.full((len(row.tokens),), -1, dtype=torch.int64)
    ids[:sum(row.seg_lens[:n])] = torch.repeat_interleave(torch.tensor(row.sources, dtype=torch.int64),
                                                          torch.tensor(row.seg_lens[:n]))
    for lo, hi in row.answers:
        ids[lo:hi] += n_sources
    return ids


class Loader:
    """Endless batches for one data-parallel rank; `state_dict()` / `load_state_dict()` resume
    exactly; `skipped` counts skipped input by reason."""

    def __init__(self, cfg: DataConfig, tokenizer, urls, *, seq_len, batch_size, dp_rank, dp_world, seed,
                 sources=(), weights=None):
        self.cfg, self.tokenizer, self.urls, self.sources = cfg, tokenizer, urls, list(sources)
        # the token share of each source (a recipe stage's data_weights, else data.sources' weights)
        if weights is not None and len(weights) != len(self.sources):
            raise ValueError(f"{len(weights)} data weights for {len(self.sources)} data.sources: give one per source")
        self.weights = ([float(w) for w in weights] if weights is not None else
                        [src.weight for _, src, _ in self.sources])
        self.seq_len, self.batch_size, self.dp_rank, self.dp_world = seq_len, batch_size, dp_rank, dp_world
        self.seed = seed
        self.n_workers = max(1, cfg.num_workers)
        self._states: dict[int, dict] = {}
        self._next = 0
        self._it = None

    def _fingerprint(self) -> dict:
        """What a saved position depends on. seq_len and batch_size are not in it: a position is a
        document and a token offset, so a later curriculum stage can continue the same stream."""
        return {"dp_rank": self.dp_rank, "dp_world": self.dp_world, "num_workers": self.n_workers,
                "seed": self.seed, "shards": self.urls, "vocab_size": self.tokenizer.vocab_size,
                "image": [self.cfg.image.patch_size, self.cfg.image.max_patches], "sources": self._sources_key()}

    def _sources_key(self) -> list | None:
        """What a mixed stream depends on (None without data.sources, as in states saved before them). A
        synthetic source's ``max_len`` 0 stays 0: a later stage's longer rows continue its stream; its
        ``choices`` is in it only where it is not the default 4, so states saved before the setting still load.
        The weights are not in it: a stage may change them (``state_dict``'s ``weights``)."""
        if not self.sources:
            return None
        return [[name, src.kind, urls if urls is not None else
                 [list(src.tasks), src.min_len, src.max_len, src.seed, src.haystack]
                 + ([src.choices] if src.choices != 4 else [])]
                for name, src, urls in self.sources]

    def iter_rows(self):
        ds = _Rows(self.urls, self.tokenizer, self.cfg, seq_len=self.seq_len,
                   dp_rank=self.dp_rank, n_workers=self.n_workers, dp_world=self.dp_world, seed=self.seed,
                   states=dict(self._states), first=self._next, sources=self.sources, weights=self.weights)
        if self.cfg.num_workers == 0:
            source = iter(ds)
        else:
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                     collate_fn=_identity, prefetch_factor=max(1, self.cfg.prefetch),
                                     worker_init_fn=_outlive_stop_signals,
                                     multiprocessing_context="fork" if os.name == "posix" else None))
        try:
            for row in source:
                w = row.state["worker"]
                self._states[w] = {k: v for k, v in row.state.items() if k != "worker"}
                self._next = (w + 1) % self.n_workers
                yield row
        finally:
            if hasattr(source, "_shutdown_workers"):
                source._shutdown_workers()

    def __iter__(self):
        self.close()  # one live iteration at a time: a new one continues from the current state
        rows = self._it = self.iter_rows()
        while True:
            yield collate([next(rows) for _ in range(self.batch_size)], len(self.sources))

    def close(self):
        """Stop the worker processes (a later iteration starts them again from the current state)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter()
        for s in self._states.values():
            total.update(s["skipped"])
        return dict(total)

    def state_dict(self) -> dict:
        return {**self._fingerprint(), "workers": {str(w): s for w, s in self._states.items()}, "next": self._next,
                "weights": self.weights if self.sources else None}

    def load_state_dict(self, state: dict):
        keys = {"dp_world": "the data-parallel size", "dp_rank": "the data-parallel rank",
                "num_workers": "data.num_workers", "seed": "run.seed", "shards": "data.shards",
                "sources": "data.sources",
                "vocab_size": "data.tokenizer", "image": "data.image.patch_size / data.image.max_patches"}
        now = self._fingerprint()
        state, saved_weights = _split_weights(state)
        for key, cfg_key in keys.items():
            if state.get(key) != now[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)!r}, now {now[key]!r}: "
                    f"resume with the same {cfg_key} (or start this stage's data afresh)"
                )
        self.close()
        self._states = {int(w): s for w, s in state["workers"].items()}
        self._next = state["next"]
        if self.sources and _shares(saved_weights) != _shares(self.weights):
            # new shares (a stage's data_weights): every source continues its stream; the counts that
            # pick the next source start again from 0, so the new shares hold from here on
            log.info("data: source weights %s -> %s; each source continues where it was", saved_weights,
                     self.weights)
            for s in self._states.values():
                s["pos"] = {**s["pos"], "tokens": [0] * len(self.sources)}


def _shares(weights) -> list[float] | None:
    return None if weights is None else [w / sum(weights) for w in weights]


def _split_weights(state: dict) -> tuple[dict, list[float] | None]:
    """The saved state with ``sources`` in today's form, and the weights it was saved with. States saved
    before stages could set weights hold each source's weight in its ``sources`` entry."""
    sources, weights = state.get("sources"), state.get("weights")
    if sources and len(sources[0]) == 4:
        weights = [e[2] for e in sources]
        state = {**state, "sources": [[e[0], e[1], e[3]] for e in sources]}
    return state, weights


def build_dataloader(cfg: DataConfig, tokenizer, *, seq_len=None, batch_size=None, dp_rank=0, dp_world=1,
                     seed=0, weights=None) -> Loader:
    """The loader of one data-parallel rank; ``seq_len`` / ``batch_size`` default to cfg's and ``weights``
    (one per data.sources entry) to data.sources' own (a recipe stage passes its own)."""
    seq_len = seq_len or cfg.seq_len
    batch_size = batch_size or cfg.batch_size
    check_data(cfg, seq_len, batch_size)
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_world={dp_world})")
    sources = resolve_sources(cfg)
    urls = [] if sources else resolve_shards(cfg)
    loader = Loader(cfg, tokenizer, urls, seq_len=seq_len, batch_size=batch_size, dp_rank=dp_rank,
                    dp_world=dp_world, seed=seed, sources=sources, weights=weights)
    if sources:
        log.info("data: data-parallel rank %d of %d mixes %s", dp_rank, dp_world, ", ".join(
            f"{name} (weight {w:g}{'' if u is None else f', {len(u)} shards'})"
            for (name, _, u), w in zip(sources, loader.weights)))
    else:
        log.info("data: data-parallel rank %d of %d reads %d shards", dp_rank, dp_world, len(urls))
    return loader
