"""The embedded default corpus, built from what every machine has.

- text documents: the Python standard library's source files, less about one in `heldout_every` (by
  a hash of the path) that no corpus holds: the evals' held-out text (train/data/text_stream.py);
- image-caption pairs: snippets of those files rendered with Pillow's built-in font; the caption
  is the snippet, so the text has to be read off the image (png, jpg and webp, as img2dataset
  writes them: `key.<ext>`, `key.txt`, `key.json`);
- interleaved documents: a file cut into chunks, some given as text and some as rendered images
  (`key.json` with `segments`, images in `key.<i>.png`).
Snippets come from the same files, never the held-out ones. Samples of the three kinds are shuffled
together and dealt into shards. The output is deterministic for a seed (on one Python and Pillow
version: the source files and font come from them).

    python -m train.data.build_corpus --out data/corpus --seed 0
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from webdataset import TarWriter

from train.data.config import CorpusConfig

log = logging.getLogger(__name__)
FORMATS = ("png", "jpg", "webp")
MANIFEST = "manifest.json"


def stdlib_files(heldout_every: int = 0, heldout: bool = False) -> list[Path]:
    """The standard library's source files, sorted. With ``heldout_every = n > 0`` the files split by a
    hash of their path into the held-out set (about one in n: ``heldout=True``) and the rest: the corpus
    is built from the rest only, so evals can measure on text no training run saw."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    if not files:
        raise RuntimeError(f"no Python source files under {root}: cannot build the default corpus")
    if heldout_every > 0:
        files = [p for p in files if (zlib.crc32(p.relative_to(root).as_posix().encode()) % heldout_every == 0)
                 == heldout]
    return files


def read_source(path: Path, max_bytes: int) -> str:
    text = path.read_bytes()[:max_bytes].decode("utf-8", errors="ignore")
    if len(text.encode()) >= max_bytes:
        text = text[: text.rfind("\n") + 1]  # keep whole lines
    return text


class Renderer:
    def __init__(self, size: int = 14):
        try:
            self.font = ImageFont.load_default(size=size)
        except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
            self.font = ImageFont.load_default()
        self._measure = ImageDraw.Draw(Image.new("L", (1, 1)))

    def render(self, text: str, fmt: str) -> bytes:
        left, top, right, bottom = self._measure.multiline_textbbox((0, 0), text, font=self.font)
        im = Image.new("L", (right + 8, bottom + 8), 255)
        ImageDraw.Draw(im).multiline_text((4, 4), text, font=self.font, fill=0)
        out = io.BytesIO()
        im.convert("RGB").save(out, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=90)
        return out.getvalue()


def snippet(rng: np.random.Generator, lines: list[str], max_lines: int = 4, width: int = 48) -> str:
    """A few non-blank lines (cut to `width` characters) from a random place in a file."""
    for _ in range(20):
        start = int(rng.integers(len(lines)))
        chunk = [ln.rstrip()[:width] for ln in lines[start : start + int(rng.integers(1, max_lines + 1))]]
        if any(ln.strip() for ln in chunk):
            return "\n".join(chunk).strip("\n")
    return "pass"


def make_samples(cfg: CorpusConfig, files: list[Path]):
    """Yield the corpus's samples (dicts for TarWriter) in a seeded order of kinds."""
    rng = np.random.default_rng(cfg.seed)
    renderer = Renderer()
    kinds = ["text"] * cfg.n_text + ["pair"] * cfg.n_pairs + ["interleaved"] * cfg.n_interleaved
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    sources: dict[Path, list[str]] = {}
    counts = dict.fromkeys(("text", "pair", "interleaved"), 0)
    for kind in kinds:
        path = files[int(rng.integers(len(files)))]
        if path not in sources:
            sources[path] = read_source(path, cfg.max_doc_bytes).splitlines() or ["pass"]
        lines = sources[path]
        i = counts[kind]
        counts[kind] += 1
        key = f"{kind}-{i:06d}"
        if kind == "text":
            yield {"__key__": key, "txt": ("\n".join(lines) + "\n").encode()}
        elif kind == "pair":
            fmt = FORMATS[i % len(FORMATS)]
            text = snippet(rng, lines)
            meta = {"caption": text, "source": str(path.name)}
            yield {"__key__": key, fmt: renderer.render(text, fmt), "txt": text.encode(),
                   "json": json.dumps(meta).encode()}
        else:
            yield _interleaved(key, rng, lines, renderer)


def _interleaved(key: str, rng: np.random.Generator, lines: list[str], renderer: Renderer) -> dict:
    """Consecutive chunks of one file; about a third of them (short ones) rendered as images."""
    start = int(rng.integers(max(1, len(lines) - 40)))
    sample, segments, n_img, at = {"__key__": key}, [], 0, start
    for _ in range(int(rng.integers(3, 8))):
        n = int(rng.integers(1, 5))
        chunk = "\n".join(ln.rstrip()[:48] for ln in lines[at : at + n]).strip("\n")
        at += n
        if not chunk.strip():
            continue
        if rng.random() < 0.35:
            name = f"{n_img}.png"
            sample[name] = renderer.render(chunk, "png")
            segments.append({"image": name})
            n_img += 1
        else:
            segments.append({"text": chunk + "\n"})
    if not any("text" in s for s in segments):
        segments.append({"text": "\n".join(lines[start : start + 3]) + "\n"})
    sample["json"] = json.dumps({"segments": segments}).encode()
    return sample


def build_corpus(out: str | Path, cfg: CorpusConfig) -> list[str]:
    """Write cfg.n_shards tar shards into `out` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"corpus-{i:05d}.tar" for i in range(cfg.n_shards)]
    writers = [TarWriter(str(p), mtime=0) for p in paths]
    try:
        for j, sample in enumerate(make_samples(cfg, stdlib_files(cfg.heldout_every))):
            writers[j % cfg.n_shards].write(sample)
    finally:
        for w in writers:
            w.close()
    (out / MANIFEST).write_text(json.dumps({"config": asdict(cfg), "shards": [p.name for p in paths]}))
    return [str(p) for p in paths]


def ensure_corpus(corpus_dir: str, cfg: CorpusConfig) -> list[str]:
    """Shard paths of the corpus in corpus_dir, building it first if missing. Several processes may
    call this at once (every rank of a job): one builds while the others wait on a lock file beside
    the corpus; where the file system cannot lock, each builds into its own temporary folder and the
    first rename wins."""
    root = Path(corpus_dir)
    manifest = root / MANIFEST
    if root.exists() and not manifest.exists() and any(root.iterdir()):
        raise ValueError(f"data.corpus_dir={corpus_dir} exists but holds no {MANIFEST}: delete it or point "
                         "data.corpus_dir elsewhere")
    if not manifest.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.with_name(f"{root.name}.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # no locks on this file system: the rename below still keeps one build
                pass
            if not manifest.exists():
                _build_atomically(root, cfg)
    meta = json.loads(manifest.read_text())
    if meta["config"] != asdict(cfg):
        raise ValueError(
            f"data.corpus_dir={corpus_dir} holds a corpus built with {meta['config']}, not {asdict(cfg)}: "
            "delete it or point data.corpus_dir elsewhere"
        )
    return [str(root / name) for name in meta["shards"]]


def _build_atomically(root: Path, cfg: CorpusConfig) -> None:
    """Build into a temporary sibling folder, then rename it into place (never a half-built corpus)."""
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    t0 = time.time()
    build_corpus(tmp, cfg)
    try:
        os.rename(tmp, root)
        log.info("built the default corpus in %s (%.1f s)", root, time.time() - t0)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / MANIFEST).exists():
            raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpus")
    parser.add_argument("--seed", type=int, default=0)
    for name in ("n_text", "n_pairs", "n_interleaved", "n_shards", "max_doc_bytes", "heldout_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(CorpusConfig, name))
    args = parser.parse_args(argv)
    cfg = CorpusConfig(seed=args.seed, n_text=args.n_text, n_pairs=args.n_pairs, n_interleaved=args.n_interleaved,
                       n_shards=args.n_shards, max_doc_bytes=args.max_doc_bytes, heldout_every=args.heldout_every)
    t0 = time.time()
    paths = build_corpus(args.out, cfg)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} shards, {size / 2**20:.1f} MiB, to {args.out} in {time.time() - t0:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
