"""Tokenisers: byte-level by default (no download), or a local HF `tokenizers` JSON file.

Both expose the same small interface the data pipeline and the model need: `vocab_size`,
`encode(str) -> list[int]`, `decode(ids) -> str` and the special ids `eod`, `pad`, `img_start`,
`img_end`, `img_patch` (the placeholder id at image-patch positions; the model overwrites the
embedding there with the vision projector's output).
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


@dataclass
class TokenizerConfig:
    kind: str = "bytes"  # "bytes" | "hf"
    path: str | None = None  # HF tokenizers JSON file (kind="hf")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow in SPECIAL_TOKENS order."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(self.special)
        self.eod, self.pad = self.special["eod"], self.special["pad"]
        self.img_start, self.img_end = self.special["img_start"], self.special["img_end"]
        self.img_patch = self.special["img_patch"]
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

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(cfg: TokenizerConfig):
    if cfg.kind == "bytes":
        return ByteTokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise ValueError("data.tokenizer.kind=hf needs data.tokenizer.path (a tokenizers JSON file)")
        return HFTokenizer(cfg.path)
    raise ValueError(f"data.tokenizer.kind={cfg.kind!r}: expected 'bytes' or 'hf'")
