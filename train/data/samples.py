"""One webdataset sample (a dict of member bytes) -> one tokenised Document.

Accepted layouts (member names after the sample key, as webdataset groups them):
- image-caption pair, as img2dataset writes it: `jpg|jpeg|png|webp` with `txt` and/or `json`
  (`caption` or `text` field) -> `<img> patches </img> caption <eod>`.
- interleaved document: `json` with `segments`, an ordered list of `{"text": str}` and
  `{"image": "<member>"}` (e.g. `"0.png"` for the member `key.0.png`), or OBELICS-style parallel
  lists `texts` / `images` (one of the two non-null at each position) -> segments in order + `<eod>`.
- plain text: `txt` (or a `json` with only `text`) -> text + `<eod>`.
Anything else raises SampleError with the reason it is skipped under (SKIP_REASONS); nothing a
sample holds raises anything else. Sizes a json declares (img2dataset's `width`, `height`...) are
never used: an image's size comes from its own header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from train.data.config import ImageConfig
from train.data.images import IMAGE_EXTS, decode_image

SKIP_REASONS = (
    "bad_json",  # a `json` member that is not JSON, not UTF-8, or not an object at the top
    "bad_schema",  # JSON of the wrong shape: a field of the wrong type, texts/images of unequal length...
    "bad_text",  # text that is not valid Unicode (a `txt` not UTF-8, a JSON string with a lone surrogate)
    "bad_image",  # an image member Pillow cannot decode (corrupt, truncated, a decompression bomb...)
    "missing_image",  # an interleaved segment names a member the sample does not have
    "duplicate_member",  # a member name twice in one sample (`a.jpg` and `a.JPG`): which one is meant?
    "empty",  # no text tokens, or an image without a caption
    "oversize",  # members together above data.max_sample_bytes
    "unknown_format",  # none of the layouts above
)


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
    whole: bool = False  # never split across rows when it fits in one (packing.py)
    answer: tuple[int, int] | None = None  # a synthetic item's answer: its token range [start, end) in tokens


def _text(value: bytes, member: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_text", f"{member}: {e}") from e


def _json(value: bytes) -> dict:
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise SampleError("bad_json", str(e)[:200]) from e
    if not isinstance(obj, dict):
        raise SampleError("bad_json", f"top level is {type(obj).__name__}, not an object")
    return obj


def _string(value, what: str) -> str | None:
    """A JSON string field (None where absent); a lone surrogate has no UTF-8 form to tokenise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SampleError("bad_schema", f"{what} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError("bad_text", f"{what}: {e}") from e
    return value


def _interleaved(meta: dict) -> list[tuple[str, str]]:
    if "segments" in meta:
        items = meta["segments"]
        if not isinstance(items, list) or not all(isinstance(s, dict) for s in items):
            raise SampleError("bad_schema", "segments must be a list of objects")
        pairs = [(s.get("text"), s.get("image")) for s in items]
    else:
        texts, images = meta.get("texts"), meta.get("images")
        if not isinstance(texts, list) or not isinstance(images, list):
            raise SampleError("bad_schema", f"texts and images must be lists, not {type(texts).__name__} and "
                                            f"{type(images).__name__}")
        if len(texts) != len(images):
            raise SampleError("bad_schema", f"texts and images differ in length ({len(texts)}, {len(images)})")
        pairs = list(zip(texts, images))
    out = []
    for i, (text, image) in enumerate(pairs):
        text, image = _string(text, f"segment {i} text"), _string(image, f"segment {i} image")
        if (text is None) == (image is None):
            raise SampleError("bad_schema", f"segment {i} needs exactly one of text / image")
        out.append(("text", text) if text is not None else ("image", image))
    return out


def _segments(sample: dict) -> list[tuple[str, str]]:
    """The ordered ("text" | "image", value) segments of a sample; an image's value is its member."""
    meta = _json(sample["json"]) if "json" in sample else {}
    if "segments" in meta or "texts" in meta:
        return _interleaved(meta)
    if "txt" in sample:
        caption = _text(sample["txt"], "txt")
    else:
        field_ = next((f for f in ("caption", "text") if meta.get(f) is not None), None)
        caption = _string(meta[field_], field_) if field_ else None
    image = next((ext for ext in IMAGE_EXTS if ext in sample), None)
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
    if sample.get("__duplicates__"):  # set by shards.iter_tar
        raise SampleError("duplicate_member", f"{sample['__duplicates__']} more than once")
    size = sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes))
    if size > max_bytes:
        raise SampleError("oversize", f"{size} bytes > data.max_sample_bytes={max_bytes}")
    prefix = list(tokenizer.doc_prefix)  # e.g. a pretrained tokenizer's BOS
    pieces, images, decoded, n = [np.asarray(prefix, dtype=np.int32)], [], {}, len(prefix)
    has_text = False
    for kind, value in _segments(sample):
        if kind == "text":
            ids = tokenizer.encode(value)
            has_text = has_text or len(ids) > 0
            pieces.append(np.asarray(ids, dtype=np.int32))
            n += len(ids)
            continue
        if value.startswith("__") or value not in sample:
            raise SampleError("missing_image", f"member {value!r} not in sample")
        if value not in decoded:  # an image named twice is decoded once
            try:
                decoded[value] = decode_image(sample[value], image_cfg)
            except Exception as e:  # Pillow raises many types for corrupt or truncated data
                raise SampleError("bad_image", f"{value}: {type(e).__name__}: {e}") from e
        patches, grid = decoded[value]
        ids = np.full(len(patches) + 2, tokenizer.img_patch, dtype=np.int32)
        ids[0], ids[-1] = tokenizer.img_start, tokenizer.img_end
        images.append((n + 1, patches, grid))
        pieces.append(ids)
        n += len(ids)
    if not has_text:
        raise SampleError("empty", "no text tokens")
    pieces.append(np.asarray([tokenizer.eod], dtype=np.int32))
    return Document(key=key, tokens=np.concatenate(pieces), images=images)
