"""Shard lists and the resumable sample stream of one reader.

A reader is one loader worker of one data-parallel rank: reader `r = dp_rank * W + worker` of
`R = dp_world * W`. All sequence/context-parallel ranks of one data-parallel group pass the same
dp_rank, so they read the same samples.

Epoch `e` visits the shards in a permutation seeded by (seed, e), the same on every reader. With at
least R shards, reader r reads shards r, r+R, ... of that order; with fewer, every reader reads all
shards and keeps the samples whose index in the epoch's stream is r mod R. Either way the readers
split the epoch into disjoint parts that cover it.

Shuffling is block-wise so that a position is a handful of integers: the reader fills a block of
`shuffle_buffer` samples, emits it in a permutation seeded by (seed, epoch, reader, block), and
fills the next. A Position names the block's first raw sample (shard, offset) and how many of the
block's samples were taken; resuming re-reads that block (one block, not the epoch) and skips the
taken ones, so nothing is repeated or skipped. webdataset's rolling shuffle buffer would need its
whole content in the checkpoint instead.
"""

from __future__ import annotations

import glob
import logging
import os
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from train.data.samples import SampleError

log = logging.getLogger(__name__)
MAX_LOGGED_PER_REASON = 10


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_shards(shards: str | list[str]) -> list[str]:
    """data.shards -> shard URLs. One entry or a list of them (also `::`-separated), each one of:
    - a path or URL pattern: brace ranges (`d/{000..009}.tar`), globs, `pipe:` commands;
    - a directory: its `*.tar` files, sorted;
    - `@list.txt`: a text file with one of the above per line (blank lines and `#` comment lines are
      skipped; relative paths are relative to the list file's folder, `pipe:` commands run as given).

    An entry none of whose local files exists, an empty directory and an unreadable or empty list are
    errors that name `data.shards`; single missing files of a pattern stay in the list and are skipped
    (and counted) as unreadable when read."""
    entries = [shards] if isinstance(shards, str) else list(shards)
    if not entries:
        raise ValueError("data.shards is empty: give a shard pattern, a directory, an @list file, a list of "
                         "them, or 'default'")
    urls = []
    for entry in entries:
        for part in str(entry).split("::"):
            urls.extend(_expand_list(part[1:]) if part.startswith("@") else _expand(part, repr(part)))
    return urls


def _expand_list(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"data.shards: cannot read the shard list @{path} ({e}; cwd {os.getcwd()})") from e
    urls, base, n = [], os.path.dirname(path), 0
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            raise ValueError(f"data.shards: {path}:{lineno}: a shard list cannot name another list ({line})")
        if not _is_remote(line):
            line = os.path.normpath(os.path.join(base, line))  # unchanged where line is absolute
        urls.extend(_expand(line, f"{line!r} ({path}:{lineno})"))
        n += 1
    if n == 0:
        raise ValueError(f"data.shards: the shard list @{path} names no shard (only blank or # lines)")
    return urls


def _expand(pattern: str, where: str) -> list[str]:
    matched = []
    for url in expand_urls(pattern):
        if _is_remote(url):
            matched.append(url)
        elif os.path.isdir(url):
            tars = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
            if not tars:
                raise ValueError(f"data.shards: directory {url!r} from {where} holds no *.tar file (for other "
                                 "names give a glob such as 'dir/*.tar.gz')")
            matched.extend(tars)
        elif any(c in url for c in "*?["):
            matched.extend(sorted(glob.glob(url)))
        else:
            matched.append(url)
    if not any(_is_remote(u) or os.path.exists(u) for u in matched):
        raise ValueError(f"data.shards: {where} matches no shard (cwd {os.getcwd()})")
    missing = [u for u in matched if not _is_remote(u) and not os.path.exists(u)]
    if missing:
        log.warning("data.shards: %d of %d shards of %s do not exist, e.g. %s", len(missing), len(matched), where,
                    missing[0])
    return matched


def iter_tar(url: str):
    """Samples (dicts of member bytes, with __key__ and __url__) of one shard, in tar order.

    A read error (unreadable URL, truncated or corrupt tar) is raised after the samples before it;
    the sample that was being read when it happened is dropped unless the failing member belongs to
    the next sample. A member name that comes twice in a sample (also `a.JPG` beside `a.jpg`: suffixes
    are lower-cased) is listed in the sample's `__duplicates__` (decode_sample skips it) instead of
    ending the shard as webdataset's grouping would."""
    stream = gopen(url, "rb")
    member, error, duplicates = {}, [], {}

    def duplicate(e):  # group_by_keys' handler: True drops the member and goes on
        if "duplicate file name" not in str(e.args[0] if e.args else ""):
            raise e
        key, suffix = base_plus_ext(member["name"])
        duplicates.setdefault(key, []).append(suffix)
        return True

    def note(name):  # tar_file_iterator calls this before reading each member's data
        member["name"] = name
        return name

    def files():
        try:
            for f in tar_file_iterator(stream, rename_files=note):
                yield {**f, "__url__": url}
        except Exception as e:
            error.append(e)

    try:
        for sample in group_by_keys(files(), handler=duplicate):
            if error and "name" in member and base_plus_ext(member["name"])[0] == sample["__key__"]:
                break  # incomplete: its last member is the one that failed
            if sample["__key__"] in duplicates:
                sample["__duplicates__"] = duplicates.pop(sample["__key__"])
            yield sample
        if error:
            raise error[0]
    finally:
        stream.close()


def _where(e: Exception, depth: int = 4) -> str:
    """The innermost frames of an exception's traceback, innermost first, on one line."""
    frames = traceback.extract_tb(e.__traceback__)[-depth:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))


@dataclass
class Position:
    """Where a reader is: the block holding the next sample, and how much of it was taken."""

    epoch: int = 0
    shard: int = 0  # index into the reader's shard order of the epoch, at the block's first sample
    offset: int = 0  # raw samples of that shard before the block's first sample
    raw: int = 0  # raw samples of the epoch's stream before the block's first sample
    block: int = 0  # block number within the epoch (seeds its permutation)
    taken: int = 0  # samples of the block before the current one

    def to_dict(self) -> dict:
        return asdict(self)


class ShardReader:
    """The decoded, shuffled, resumable document stream of reader `reader` of `n_readers`."""

    def __init__(self, urls, *, reader, n_readers, seed, block_size, shuffle_shards, decode):
        self.urls, self.reader, self.n_readers = list(urls), reader, n_readers
        self.seed, self.block_size, self.shuffle_shards = seed, max(1, block_size), shuffle_shards
        self.decode = decode  # raw sample -> Document, raises SampleError
        self.skipped: Counter = Counter()
        self._quiet = False  # while re-reading a block whose skips were already counted

    def shards_for(self, epoch: int) -> tuple[list[str], bool]:
        """This reader's shard order for an epoch, and whether samples are split by index."""
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls)).tolist()
        if len(self.urls) >= self.n_readers:
            return [self.urls[i] for i in order[self.reader :: self.n_readers]], False
        return [self.urls[i] for i in order], True

    def _skip(self, reason: str, url: str, key: str, detail: str = ""):
        if self._quiet:
            return
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= MAX_LOGGED_PER_REASON:
            more = " (further ones of this reason are counted, not logged)" if n == MAX_LOGGED_PER_REASON else ""
            log.warning("data: skipped %s in shard %s key %s %s%s", reason, url, key, detail, more)

    def _raw(self, epoch, shard, offset, raw):
        """(shard, offset, raw, sample or None) after each raw sample of the epoch from a cursor;
        the sample is None where another reader owns it."""
        shards, by_index = self.shards_for(epoch)
        for si in range(shard, len(shards)):
            url, k = shards[si], offset if si == shard else 0
            try:
                for i, sample in enumerate(iter_tar(url)):
                    if si == shard and i < offset:
                        continue
                    mine = not by_index or raw % self.n_readers == self.reader
                    k, raw = k + 1, raw + 1
                    yield si, k, raw, sample if mine else None
            except Exception as e:  # unreadable URL, truncated or corrupt tar: the shard ends here
                reason = "truncated_tar" if k > 0 else "unreadable_shard"
                self._skip(reason, url, f"after sample {k}", f"({type(e).__name__}: {e})")

    def _blocks(self, pos: Position, resumed: bool):
        """(Position of the block, permuted samples of the block), from pos's block onwards.

        On resume the first block is re-read: its reading skips were counted before, not again."""
        epoch, block, cursor = pos.epoch, pos.block, (pos.shard, pos.offset, pos.raw)
        self._quiet = resumed
        while True:
            stream = self._raw(epoch, *cursor)
            while True:
                start, buf = Position(epoch, *cursor, block, 0), []
                for item in stream:
                    *cursor, sample = item
                    if sample is not None:
                        buf.append(sample)
                        if len(buf) == self.block_size:
                            break
                self._quiet = False
                perm = np.random.default_rng([self.seed, epoch, self.reader, block]).permutation(len(buf))
                yield start, [buf[i] for i in perm]  # the epoch's last block may be short or empty
                if len(buf) < self.block_size:
                    break
                block += 1
            epoch, block, cursor = epoch + 1, 0, (0, 0, 0)

    def documents(self, pos: Position | dict | None = None):
        """(Document, its Position) from pos (a Position or its dict) on, forever (epochs roll over).

        A whole epoch without one usable document is an error (the stream would never end)."""
        pos = Position(**pos) if isinstance(pos, dict) else pos
        resumed, pos = pos is not None, pos or Position()
        epoch, good, whole = pos.epoch, 0, pos == Position(epoch=pos.epoch)
        skip = pos.taken
        for start, samples in self._blocks(pos, resumed):
            if start.epoch != epoch:
                if good == 0 and whole:
                    self._fail(epoch)
                epoch, good, whole = start.epoch, 0, start.epoch == epoch + 1
            for j in range(skip, len(samples)):
                sample = samples[j]
                url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
                try:
                    doc = self.decode(sample)
                except SampleError as e:
                    self._skip(e.reason, url, key, str(e))
                    continue
                except Exception as e:  # a decoder bug: one sample must not end the run, nor hide it
                    self._skip("decode_error", url, key, f"({type(e).__name__}: {e}) at {_where(e)}")
                    continue
                good += 1
                yield doc, Position(start.epoch, start.shard, start.offset, start.raw, start.block, j)
            skip = 0

    def _fail(self, epoch: int):
        shards, by_index = self.shards_for(epoch)
        raise RuntimeError(
            f"data.shards: reader {self.reader} of {self.n_readers} found no usable sample in epoch {epoch} "
            f"over {len(shards)} shards{' (split by sample index)' if by_index else ''}; skipped: "
            f"{dict(self.skipped)}. Check the shards' format, or lower data.num_workers / the data-parallel "
            "size if there are fewer samples than readers."
        )
