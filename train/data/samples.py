"""One webdataset sample (a dict of member bytes) -> one tokenised Document.

Accepted layouts (member names after the sample key, as webdataset groups them):
- image-caption pair, as img2dataset writes it: `jpg|jpeg|png|webp` with `txt` and/or `json`
  (`caption` or `text` field) -> `<img> patches </img> caption <eod>`.
- interleaved document: `json` with `segments`, an ordered list of `{"text": str}` and
  `{"image": "<member>"}` (e.g. `"0.png"` for the member `key.0.png`), or OBELICS-style parallel
  lists `texts` / `images` (one of the two non-null at each position) -> segments in order + `<eod>`.
- plain text: `txt` (or a `json` with only `text`) -> text + `<eod>`.
Anything else raises SampleError with the reason it is skipped under.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from train.data.config import ImageConfig
from train.data.images import IMAGE_EXTS, decode_image


class SampleError(Exception):
    """A sample that is skipped; `reason` is the counter it goes to in `data/skipped`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Document:
    key: str
    tokens: np.ndarray  # int32 [L], image patches hold tokenizer.img_patch
    images: list[tuple[int, np.ndarray, tuple[int, int]]] = field(default_factory=list)
    # (index in tokens of the image's first patch, patches uint8 [n, p*p*3], (rows, cols))


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_text", str(e)) from e


def _json(value: bytes) -> dict:
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", str(e)) from e
    if not isinstance(obj, dict):
        raise SampleError("bad_json", "top level is not an object")
    return obj


def _image_member(sample: dict) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def _segments(sample: dict) -> list[tuple[str, str]]:
    """The ordered ("text" | "image", value) segments of a sample."""
    meta = _json(sample["json"]) if "json" in sample else {}
    if "segments" in meta or "texts" in meta:
        if "segments" in meta:
            items = meta["segments"]
            if not isinstance(items, list) or not all(isinstance(s, dict) for s in items):
                raise SampleError("bad_json", "segments must be a list of objects")
            pairs = [(s.get("text"), s.get("image")) for s in items]
        else:
            texts, images = meta.get("texts") or [], meta.get("images") or []
            if len(texts) != len(images):
                raise SampleError("bad_json", "texts and images differ in length")
            pairs = list(zip(texts, images))
        out = []
        for text, image in pairs:
            if (text is None) == (image is None):
                raise SampleError("bad_json", "each segment needs exactly one of text / image")
            out.append(("text", text) if text is not None else ("image", str(image)))
        return out
    caption = _text(sample["txt"]) if "txt" in sample else meta.get("caption", meta.get("text"))
    image = _image_member(sample)
    if image is not None:
        if not caption:
            raise SampleError("empty", "image without caption")
        return [("image", image), ("text", caption)]
    if caption is None:
        raise SampleError("unknown_format", f"members {sorted(k for k in sample if not k.startswith('__'))}")
    return [("text", caption)]


def decode_sample(sample: dict, tokenizer, image_cfg: ImageConfig, max_bytes: int) -> Document:
    """Tokenise one raw sample; raises SampleError for anything that must be skipped."""
    key = sample.get("__key__", "?")
    size = sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes))
    if size > max_bytes:
        raise SampleError("oversize", f"{size} bytes > data.max_sample_bytes={max_bytes}")
    pieces, images, n = [], [], 0
    has_text = False
    for kind, value in _segments(sample):
        if kind == "text":
            ids = tokenizer.encode(value)
            has_text = has_text or len(ids) > 0
            pieces.append(np.asarray(ids, dtype=np.int32))
            n += len(ids)
            continue
        if value not in sample:
            raise SampleError("missing_image", f"member {value!r} not in sample")
        try:
            patches, grid = decode_image(sample[value], image_cfg)
        except Exception as e:  # Pillow raises many types for corrupt or truncated data
            raise SampleError("bad_image", f"{value}: {e}") from e
        ids = np.full(len(patches) + 2, tokenizer.img_patch, dtype=np.int32)
        ids[0], ids[-1] = tokenizer.img_start, tokenizer.img_end
        images.append((n + 1, patches, grid))
        pieces.append(ids)
        n += len(ids)
    if not has_text:
        raise SampleError("empty", "no text tokens")
    pieces.append(np.asarray([tokenizer.eod], dtype=np.int32))
    return Document(key=key, tokens=np.concatenate(pieces), images=images)
