"""Long streams of plain-text token ids: the haystack of the synthetic retrieval tasks and the rows the
evals measure bits per byte on.

``TextStream.stdlib(tokenizer, heldout_every, heldout)`` concatenates standard-library source files in
path order, each under a ``# file: <path>`` line, so neighbouring files of one package sit next to each
other (long rows then hold related code, as a repository-level concatenation does). ``heldout=True``
takes the files the embedded corpus leaves out (``data.corpus.heldout_every``): text no training run
on the default corpus saw; ``heldout=False`` the files it is built from. ``TextStream.shards(spec, ...)``
concatenates the text documents of webdataset shards instead (``data.shards`` syntax), in shard order.
Either remembers where each document starts: ``document_windows`` places windows inside single documents,
as the training rows see them (each document its own attention segment, ``train/data/packing.py``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from train.data.build_corpus import stdlib_files
from train.data.tokenizer import ByteTokenizer


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (the byte tokenizer's without a Python list in between)."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


class TextStream:
    """A token stream ``tokens [T]``; ``window(start, n)`` reads ``n`` ids from ``start``, wrapping around.
    ``doc_starts`` (sorted, from 0): where each document begins; default one document, the whole stream."""

    def __init__(self, tokens: np.ndarray, name: str, doc_starts: np.ndarray | None = None):
        if len(tokens) == 0:
            raise ValueError(f"text stream {name} is empty")
        dtype = np.uint8 if tokens.max() < 256 else np.int32  # the byte tokenizer's streams stay small
        self.tokens, self.name = tokens.astype(dtype, copy=False), name
        starts = np.zeros(1, np.int64) if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)
        if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(tokens):
            raise ValueError(f"text stream {name}: document starts must rise from 0 below {len(tokens)}")
        self.doc_starts = starts

    def doc_lengths(self) -> np.ndarray:
        return np.diff(np.append(self.doc_starts, len(self.tokens)))

    def document_windows(self, n: int, count: int) -> np.ndarray:
        """Starts of ``count`` windows of ``n`` ids, each inside one document of at least ``n`` ids: the
        documents long enough take the windows in turn (the longest first), and a document taking several
        spreads them evenly over its length. Empty where no document has ``n`` ids."""
        lengths = self.doc_lengths()
        long = np.flatnonzero(lengths >= n)
        if len(long) == 0 or count <= 0:
            return np.zeros(0, np.int64)
        long = long[np.argsort(-lengths[long], kind="stable")]
        per = np.bincount(np.arange(count) % len(long), minlength=len(long))
        starts = [self.doc_starts[d] + np.linspace(0, lengths[d] - n, c).round().astype(np.int64)
                  for d, c in zip(long, per) if c]
        return np.sort(np.concatenate(starts))

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, n: int) -> np.ndarray:
        """``n`` ids from ``start`` (mod the length), as int32."""
        return np.take(self.tokens, np.arange(start, start + n), mode="wrap").astype(np.int32)

    @classmethod
    def from_parts(cls, parts, name: str, max_tokens: int = 0) -> TextStream:
        """The concatenation of the id arrays ``parts``, one document each (read up to ``max_tokens``; 0: all)."""
        kept, starts, total = [], [], 0
        for ids in parts:
            if len(ids) == 0:
                continue
            kept.append(ids)
            starts.append(total)
            total += len(ids)
            if max_tokens and total >= max_tokens:
                break
        tokens = np.concatenate(kept) if kept else np.zeros(0, np.int32)
        return cls(tokens[:max_tokens] if max_tokens else tokens, name, starts or None)

    @classmethod
    def stdlib(cls, tokenizer, heldout_every: int, heldout: bool, max_tokens: int = 0) -> TextStream:
        if heldout and heldout_every <= 0:
            raise ValueError("data.corpus.heldout_every=0 holds no standard-library file out of the corpus: "
                             "set it > 0 (default 20) or give eval.heldout shards")
        root = Path(sysconfig.get_paths()["stdlib"])
        parts = (encode(tokenizer, f"# file: {p.relative_to(root).as_posix()}\n{p.read_text(errors='ignore')}\n")
                 for p in stdlib_files(heldout_every, heldout))
        return cls.from_parts(parts, "held-out stdlib" if heldout else "stdlib", max_tokens)

    @classmethod
    def shards(cls, spec, tokenizer, max_tokens: int = 0) -> TextStream:
        """The text documents of shards ``spec`` (``data.shards`` syntax), image segments dropped."""
        from train.data.config import ImageConfig
        from train.data.samples import SampleError, decode_sample
        from train.data.shards import expand_shards, iter_tar

        image_ids = [tokenizer.img_patch, tokenizer.img_start, tokenizer.img_end, tokenizer.eod]
        newline = encode(tokenizer, "\n")

        def parts():
            for url in expand_shards(spec):
                for sample in iter_tar(url):
                    try:
                        doc = decode_sample(sample, tokenizer, ImageConfig(), max_bytes=2**62)
                    except SampleError:
                        continue
                    yield np.concatenate([doc.tokens[~np.isin(doc.tokens, image_ids)], newline])

        return cls.from_parts(parts(), f"shards {spec}", max_tokens)


__all__ = ["TextStream"]
