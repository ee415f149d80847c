"""Several weighted document sources in one stream (``data.sources``), and the synthetic retrieval source.

``MixedReader`` draws each next document from the source furthest behind its share of tokens: source
``s`` is next when ``tokens_s / weight_s`` is the smallest (ties to the first listed; a weight of 0
leaves a source out). Over a stream the token shares then match the normalised weights to within one
document, with no random draw to replay on resume: its position is the token counts, the source of the
current document and each source's own position (the last document it gave), so a resume continues
exactly. A recipe stage with other weights (``recipe.stages[i].data_weights``) continues each source's
position with the counts set to 0 (``Loader.load_state_dict``): the shares count from the stage's start.

``SyntheticReader`` yields the retrieval tasks of ``train/eval/tasks.py`` as documents (task, length
and depth drawn per document), from random streams of the training domain seeded by the source's
``seed``, the run's data seed and the reader: never an eval item. Its documents are ``whole``: the
packer starts a row rather than split one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from train.data.config import ImageConfig, SourceConfig
from train.data.samples import Document


@dataclass
class SyntheticPosition:
    index: int = 0  # the document's number in the reader's stream
    epoch: int = 0  # an endless stream has one epoch

    def to_dict(self) -> dict:
        return {"index": self.index}


class SyntheticReader:
    """Documents ``i = 0, 1, ...`` of one reader, each a retrieval item plus the end-of-document id."""

    def __init__(self, cfg: SourceConfig, name: str, tokenizer, image_cfg: ImageConfig, seq_len: int, seed: int,
                 reader: int, heldout_every: int):
        self.cfg, self.name, self.tokenizer, self.image_cfg = cfg, name, tokenizer, image_cfg
        self.max_len = cfg.max_len or seq_len
        self.seed, self.reader, self.heldout_every = seed, reader, heldout_every
        self.skipped: Counter = Counter()
        self._haystack = None

    def haystack(self):
        from train.data.text_stream import TextStream

        if self._haystack is None:  # built in the worker that reads, on first use
            if self.cfg.haystack == "default":
                self._haystack = TextStream.stdlib(self.tokenizer, self.heldout_every, heldout=False)
            else:
                self._haystack = TextStream.shards(self.cfg.haystack, self.tokenizer)
        return self._haystack

    def document(self, i: int) -> Document:
        from train.eval.tasks import TRAIN_DOMAIN, make_item

        rng = np.random.default_rng([TRAIN_DOMAIN, self.cfg.seed, self.seed, self.reader, i])
        task = self.cfg.tasks[int(rng.integers(len(self.cfg.tasks)))]
        length = int(rng.integers(self.cfg.min_len, self.max_len + 1))
        item = make_item(task, length - 1, float(rng.uniform()), rng, self.tokenizer, self.haystack(),
                         self.image_cfg, self.cfg.choices)
        tokens = np.append(item.tokens, np.int32(self.tokenizer.eod)).astype(np.int32)
        return Document(f"{self.name}/{task}/{self.reader}-{i}", tokens, item.images, whole=True,
                        answer=(item.prompt_len, len(item.tokens)))

    def documents(self, pos: SyntheticPosition | dict | None = None):
        i = pos["index"] if isinstance(pos, dict) else (pos.index if pos else 0)
        while True:
            yield self.document(i), SyntheticPosition(i)
            i += 1


@dataclass
class MixPosition:
    """Where a MixedReader is: the current document came from ``source``; ``tokens`` were drawn from
    each source before it; ``last`` is each source's position of the last document it gave (None:
    none yet), the current one's included."""

    source: int
    tokens: list[int]
    last: list[dict | None]

    @property
    def epoch(self) -> int:
        return (self.last[self.source] or {}).get("epoch", 0)

    def to_dict(self) -> dict:
        return {"source": self.source, "tokens": list(self.tokens), "last": list(self.last)}


class MixedReader:
    """One document stream from ``readers`` (each with ``documents(pos)`` and ``skipped``) in the token
    shares ``weights``."""

    def __init__(self, readers: list, weights: list[float]):
        total = float(sum(weights))
        self.readers, self.weights = readers, [w / total for w in weights]
        self.skipped: Counter = Counter()
        for r in readers:  # one counter: the packer saves and restores it with the position
            r.skipped = self.skipped

    def _next_source(self, tokens: list[int]) -> int:
        return min((s for s, w in enumerate(self.weights) if w > 0), key=lambda s: tokens[s] / self.weights[s])

    def documents(self, pos: MixPosition | dict | None = None):
        pos = pos.to_dict() if isinstance(pos, MixPosition) else pos
        n = len(self.readers)
        tokens = list(pos["tokens"]) if pos else [0] * n
        last = list(pos["last"]) if pos else [None] * n
        streams = []
        for s, reader in enumerate(self.readers):
            stream = reader.documents(last[s])
            if last[s] is not None and s != pos["source"]:
                next(stream)  # that source's last document was packed before: continue after it
            streams.append(stream)
        while True:
            s = self._next_source(tokens)
            doc, p = next(streams[s])
            last[s] = p.to_dict()
            yield doc, MixPosition(s, list(tokens), list(last))
            tokens[s] += len(doc.tokens)


__all__ = ["SyntheticReader", "SyntheticPosition", "MixedReader", "MixPosition"]
