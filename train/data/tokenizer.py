"""Tokenisers: byte-level by default (no download), a local HF `tokenizers` JSON file, or a
pretrained checkpoint's tokenizer through `transformers.AutoTokenizer` (local files only).

All expose the same small interface the data pipeline and the model need: `vocab_size`,
`encode(str) -> list[int]`, `decode(ids) -> str`, `doc_prefix` (the ids put before every document,
e.g. a checkpoint's BOS) and the special ids `eod`, `pad`, `img_start`, `img_end`, `img_patch` (the
placeholder id at image-patch positions; the model overwrites the embedding there with the vision
projector's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = {
    "eod": "<|endoftext|>",
    "pad": "<|pad|>",
    "img_start": "<img>",
    "img_end": "</img>",
    "img_patch": "<|img_patch|>",
}


IMAGE_MARKERS = ("img_start", "img_end", "img_patch")


@dataclass
class TokenizerConfig:
    kind: str = "bytes"  # "bytes" | "hf" (a tokenizers JSON file) | "pretrained" (a checkpoint directory)
    path: str | None = None  # the JSON file (kind="hf") or the checkpoint directory (kind="pretrained")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow in SPECIAL_TOKENS order."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(self.special)
        self.eod, self.pad = self.special["eod"], self.special["pad"]
        self.img_start, self.img_end = self.special["img_start"], self.special["img_end"]
        self.img_patch = self.special["img_patch"]
        self.doc_prefix: list[int] = []
        self._names = {i: SPECIAL_TOKENS[name] for name, i in self.special.items()}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._names.get(i, f"<|{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A local `tokenizers` JSON file; special tokens it lacks are added to its vocabulary."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path!r} not found: set data.tokenizer.path")
        self._tok = Tokenizer.from_file(path)
        missing = [t for t in SPECIAL_TOKENS.values() if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        for name, token in SPECIAL_TOKENS.items():
            setattr(self, name, self._tok.token_to_id(token))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.doc_prefix: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class PretrainedTokenizer:
    """A checkpoint directory's tokenizer (``transformers.AutoTokenizer``, local files only), used as
    the checkpoint expects: documents end with its EOS (our ``eod``), start with what it puts before a
    text (its BOS, if it adds one), and text holding its special tokens (a rendered chat template's
    markers) encodes them as their single ids. Padding uses its pad token, else the EOS. The image
    markers are added as special tokens when missing; the vocabulary then grows (``model.vocab_size``
    follows ``vocab_size``, docs/hf.md)."""

    def __init__(self, path: str):
        from train.hf import import_transformers

        AutoTokenizer = import_transformers().AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path!r} not found: set data.tokenizer.path (or model.path)")
        self._tok = tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has no eos_token: documents need an end marker; use "
                             f"data.tokenizer.kind=hf with a tokenizers file, or add one to tokenizer_config.json")
        markers = [SPECIAL_TOKENS[name] for name in IMAGE_MARKERS]
        tok.add_tokens([t for t in markers if t not in tok.get_vocab()], special_tokens=True)
        for name in IMAGE_MARKERS:
            setattr(self, name, tok.convert_tokens_to_ids(SPECIAL_TOKENS[name]))
        self.eod = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eod
        self.vocab_size = len(tok)
        self.doc_prefix = _added_prefix(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        """The tokenizer files, with the added markers, as transformers reads them."""
        self._tok.save_pretrained(directory)


def _added_prefix(tok) -> list[int]:
    """The ids a tokenizer puts before a text of its own accord (e.g. ``[bos]``; an appended EOS is
    not needed: documents end with ``eod``)."""
    plain, full = list(tok("a", add_special_tokens=False).input_ids), list(tok("a").input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []


def build_tokenizer(cfg: TokenizerConfig):
    if cfg.kind == "bytes":
        return ByteTokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise ValueError("data.tokenizer.kind=hf needs data.tokenizer.path (a tokenizers JSON file)")
        return HFTokenizer(cfg.path)
    if cfg.kind == "pretrained":
        if not cfg.path:
            raise ValueError("data.tokenizer.kind=pretrained needs data.tokenizer.path (a checkpoint directory)")
        return PretrainedTokenizer(cfg.path)
    raise ValueError(f"data.tokenizer.kind={cfg.kind!r}: expected 'bytes', 'hf' or 'pretrained'")
