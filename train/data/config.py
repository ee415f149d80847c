"""Data configuration: one dataclass per concern; the Hydra YAML under `conf/` only sets values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.data.tokenizer import TokenizerConfig


@dataclass
class ImageConfig:
    patch_size: int = 16  # must equal model.vision.patch_size
    max_patches: int = 256  # patch budget per image; bigger images are scaled down (aspect kept)


@dataclass
class CorpusConfig:
    """Sizes of the embedded default corpus (`python -m train.data.build_corpus`)."""

    seed: int = 0
    n_text: int = 600  # standard-library source files as text documents
    n_pairs: int = 1200  # rendered snippet images with their text as caption
    n_interleaved: int = 200  # documents alternating text and rendered snippets
    n_shards: int = 8
    max_doc_bytes: int = 65536  # longer source files are cut at a line boundary
    heldout_every: int = 20  # every Nth standard-library file (by a hash of its path) stays out, for evals


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: a stream of documents and its share of the training tokens."""

    name: str = ""  # shown in logs and kept in the loader state; default: <kind><index>
    kind: str = "shards"  # shards | synthetic (the retrieval tasks of train/eval/tasks.py)
    weight: float = 1.0  # share of tokens, normalised over the sources
    shards: Any = "default"  # kind=shards: as data.shards ("default": the embedded corpus)
    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "multivalue", "vartrack",
                                                      "image_needle"])  # kind=synthetic
    min_len: int = 256  # kind=synthetic: document lengths in tokens, uniform in [min_len, max_len]
    max_len: int = 0  # 0: the row length (a synthetic document is never split across rows)
    seed: int = 0  # kind=synthetic: its own stream (never an eval item's: train/eval/tasks.py)
    # kind=synthetic: candidates per item, which for multikey and multivalue is also how many keys a document
    # holds (the asked one and choices - 1 distractors); 2 makes shorter, easier items, e.g. for a primer
    choices: int = 4
    haystack: Any = "default"  # kind=synthetic: filler text; default: the corpus' standard-library files


@dataclass
class DataConfig:
    # A pattern or list of patterns: local paths, brace ranges ('d/{000..009}.tar'), globs, 'pipe:cmd'
    # URLs, a directory (its *.tar, sorted), '@list.txt' (one of these per line); "default" = the
    # embedded corpus in corpus_dir, built there when missing.
    shards: Any = "default"  # str or list[str]; OmegaConf 2.3 cannot type a union with a list
    # Several weighted sources instead of data.shards (which is then not read), e.g.
    # [{kind: shards, weight: 0.8}, {kind: synthetic, weight: 0.2, tasks: [passkey]}]
    sources: list[SourceConfig] = field(default_factory=list)
    corpus_dir: str = "data/corpus"  # relative to the current directory
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    seq_len: int = 4096
    batch_size: int = 1  # rows per micro-batch per data-parallel rank
    num_workers: int = 1  # loader worker processes per rank (0 = in the training process)
    shuffle_buffer: int = 256  # samples shuffled together (a block of the reader's stream)
    shuffle_shards: bool = True
    prefetch: int = 2  # rows prefetched per worker
    max_sample_bytes: int = 16 * 2**20  # bigger samples are skipped (reason "oversize")
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
