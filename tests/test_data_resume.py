"""Data pipeline: rank split, exact resume, bad input, shard patterns. Shards are written here."""

import copy
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from tests.test_data import (
    TOK,
    data_cfg,
    formats_shard,
    png,
    random_image,
    rows_of_epoch,
    text_samples,
    write_shard,
)
from tests.utils import compose_train_config
from train.data import ImageConfig, build_dataloader
from train.data.shards import ShardReader, expand_shards


def text_shards(tmp_path, n_shards: int, per_shard: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    urls, keys = [], []
    for i in range(n_shards):
        samples = text_samples(per_shard, rng, prefix=f"s{i}-", lo=1, hi=120)
        urls.append(write_shard(tmp_path / f"shard-{i:03d}.tar", samples))
        keys += [s["__key__"] for s in samples]
    return urls, keys


def reader_epoch(urls, reader, n_readers, block=4, epoch=0) -> list[str]:
    r = ShardReader(urls, reader=reader, n_readers=n_readers, seed=1, block_size=block, shuffle_shards=True,
                    decode=lambda s: s["__key__"])
    keys = []
    for key, pos in r.documents():
        if pos.epoch > epoch:
            return keys
        if pos.epoch == epoch:
            keys.append(key)


@pytest.mark.parametrize("n_shards,n_readers", [(5, 2), (1, 3), (4, 4)])
def test_readers_split_the_epoch_disjointly(tmp_path, n_shards, n_readers):
    urls, keys = text_shards(tmp_path, n_shards, 9)
    parts = [reader_epoch(urls, r, n_readers) for r in range(n_readers)]
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat)), "a sample read twice in one epoch"
    assert sorted(flat) == sorted(keys), "the readers together cover the epoch"
    assert all(parts), "every reader gets samples"
    assert parts[0] != reader_epoch(urls, 0, n_readers, epoch=1), "epochs are reshuffled"


def epoch_keys_of_rank(urls, dp_rank, dp_world, num_workers) -> set[str]:
    cfg = data_cfg(urls, num_workers=num_workers, shuffle_buffer=3, image=ImageConfig(max_patches=16))
    loader = build_dataloader(cfg, TOK, seq_len=48, dp_rank=dp_rank, dp_world=dp_world, seed=2)
    keys, done = [], set()
    for row in loader.iter_rows():
        worker = row.state["worker"]
        for key, epoch, start, _ in row.pieces:
            if epoch == 0 and start == 0:
                keys.append(key)
            done |= {worker} if epoch > 0 else set()
        if len(done) == max(1, num_workers):
            assert len(keys) == len(set(keys))
            return set(keys)


def test_data_parallel_ranks_with_worker_processes(tmp_path):
    urls, keys = text_shards(tmp_path, 6, 7)
    rank0 = epoch_keys_of_rank(urls, 0, 2, num_workers=2)
    rank1 = epoch_keys_of_rank(urls, 1, 2, num_workers=2)
    assert not rank0 & rank1 and rank0 | rank1 == set(keys)


def truncated_shard(tmp_path, rng, lo=2000, hi=3000) -> tuple[str, list[str]]:
    samples = text_samples(6, rng, prefix="trunc", lo=lo, hi=hi)
    path = write_shard(tmp_path / "full.tar", samples)
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    data = open(path, "rb").read()[: last.offset_data + last.size // 2]  # cut inside the last member
    (tmp_path / "trunc.tar").write_bytes(data)
    return str(tmp_path / "trunc.tar"), [s["__key__"] for s in samples[:-1]]


def mixed_shards(tmp_path) -> list[str]:
    """Text, all sample layouts, and input that is skipped (so resumed skip counts are checked too)."""
    fmt, _ = formats_shard(tmp_path, np.random.default_rng(3))
    urls, _ = text_shards(tmp_path, 3, 5, seed=4)
    trunc, _ = truncated_shard(tmp_path, np.random.default_rng(9), lo=50, hi=120)
    bad = write_shard(tmp_path / "bad.tar", [{"__key__": "empty", "txt": b""}, {"__key__": "j", "json": b"{"}])
    return [fmt, trunc, bad, "pipe:false"] + urls


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=f"batch key {k}")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(tmp_path, num_workers):
    """Stop after some batches, resume in a new loader from the state: the same batches follow as in
    the uninterrupted run (mid-block, mid-document, and over epoch boundaries; images included)."""
    urls = mixed_shards(tmp_path)
    cfg = data_cfg(urls, num_workers=num_workers, shuffle_buffer=4, image=ImageConfig(max_patches=16))
    make = lambda: build_dataloader(cfg, TOK, seq_len=40, batch_size=2, seed=5)
    full = make()
    it = iter(full)
    take(it, 5)
    state = json.loads(json.dumps(full.state_dict()))  # the state is plain JSON
    assert any(w["used"] > 0 for w in state["workers"].values())
    expected = take(it, 30)
    assert max(w["pos"]["epoch"] for w in full.state_dict()["workers"].values()) >= 1
    resumed = make()
    resumed.load_state_dict(copy.deepcopy(state))
    assert_batches_equal(take(iter(resumed), 30), expected)
    assert resumed.skipped == full.skipped and full.skipped["truncated_tar"] >= 1
    for loader in (full, resumed):  # left to the garbage collector, the workers took ~20 s to stop
        loader.close()


def test_resume_does_not_count_skips_twice(tmp_path):
    """A block spanning the whole epoch holds the shard errors; re-reading it on resume must not count
    them again."""
    cfg = data_cfg(mixed_shards(tmp_path), shuffle_buffer=1000)
    full = build_dataloader(cfg, TOK, seq_len=40, seed=5)
    it = iter(full)
    take(it, 2)
    state = full.state_dict()
    expected = take(it, 3)
    resumed = build_dataloader(cfg, TOK, seq_len=40, seed=5)
    resumed.load_state_dict(state)
    assert_batches_equal(take(iter(resumed), 3), expected)
    assert resumed.skipped == full.skipped
    assert full.skipped["truncated_tar"] == full.skipped["unreadable_shard"] == 1


@pytest.mark.parametrize("next_seq_len", [64, 160])
def test_resume_yields_exactly_the_rest_of_the_epoch(tmp_path, next_seq_len):
    """Also across a change of seq_len (a curriculum stage continues the same document stream)."""
    urls, keys = text_shards(tmp_path, 2, 10)
    cfg = data_cfg(urls, shuffle_buffer=6)
    first = build_dataloader(cfg, TOK, seq_len=64, seed=7)
    rows = first.iter_rows()
    before = [p for _ in range(4) for p in next(rows).pieces]
    second = build_dataloader(cfg, TOK, seq_len=next_seq_len, batch_size=3, seed=7)
    second.load_state_dict(first.state_dict())
    after = [p for r in rows_of_epoch(second) for p in r.pieces if p[1] == 0]
    covered = {}
    for key, _, a, b in before + after:
        covered.setdefault(key, []).append((a, b))
    assert sorted(covered) == sorted(keys)
    for key, spans in covered.items():  # pieces of a document tile it without gap or overlap
        spans.sort()
        assert spans[0][0] == 0 and all(x[1] == y[0] for x, y in zip(spans, spans[1:])), key


def test_load_state_rejects_other_settings(tmp_path):
    urls, _ = text_shards(tmp_path, 2, 3)
    a = build_dataloader(data_cfg(urls, image=ImageConfig(max_patches=16)), TOK, seq_len=32)
    b = build_dataloader(data_cfg(urls, num_workers=2, image=ImageConfig(max_patches=16)), TOK, seq_len=32)
    with pytest.raises(ValueError, match="data.num_workers"):
        b.load_state_dict(a.state_dict())


def test_bad_input_is_skipped_counted_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(8)
    good = text_samples(5, rng, prefix="good")
    write_shard(tmp_path / "good.tar", good)
    ok_png = png(random_image(rng, 16, 32))
    bad = [
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n" + rng.bytes(200), "txt": b"caption"},
        {"__key__": "truncimg", "jpg": png(random_image(rng, 64, 64), "JPEG")[:300], "txt": b"caption"},
        {"__key__": "emptydoc", "txt": b""},
        {"__key__": "oversize", "txt": b"x" * 5000},
        {"__key__": "noimage", "json": json.dumps({"segments": [{"text": "a"}, {"image": "0.png"}]}).encode()},
        {"__key__": "badjson", "json": b"{not json"},
        {"__key__": "okpair", "png": ok_png, "txt": b"fine"},
    ]
    bad_shard = write_shard(tmp_path / "bad.tar", bad)
    trunc, trunc_keys = truncated_shard(tmp_path, rng)
    urls = [str(tmp_path / "{good,missing}.tar"), bad_shard, trunc, "pipe:false"]  # missing.tar: unreadable
    cfg = data_cfg(urls, shuffle_buffer=1, shuffle_shards=False, max_sample_bytes=4096,
                   image=ImageConfig(max_patches=16))
    loader = build_dataloader(cfg, TOK, seq_len=64, seed=0)
    with caplog.at_level(logging.WARNING, logger="train.data.shards"):
        rows = rows_of_epoch(loader)
    assert loader.skipped == {"bad_image": 2, "empty": 1, "oversize": 1, "missing_image": 1, "bad_json": 1,
                              "truncated_tar": 1, "unreadable_shard": 2}
    keys = {k for r in rows for k, e, _, _ in r.pieces if e == 0}
    assert keys == {s["__key__"] for s in good} | {"okpair"} | set(trunc_keys)
    log = caplog.text
    assert "corrupt" in log and bad_shard in log and trunc in log and "pipe:false" in log


def test_all_shards_unusable_is_an_error_not_a_hang(tmp_path):
    shard = write_shard(tmp_path / "empty-docs.tar", [{"__key__": f"e{i}", "txt": b""} for i in range(3)])
    loader = build_dataloader(data_cfg(shard, image=ImageConfig(max_patches=16)), TOK, seq_len=32)
    with pytest.raises(RuntimeError, match="data.shards"):
        next(iter(loader))


def test_shard_patterns_braces_globs_lists_and_pipes(tmp_path):
    urls, _ = text_shards(tmp_path, 3, 4)
    base = str(tmp_path / "shard-")
    assert expand_shards(base + "{000..002}.tar") == urls
    assert expand_shards(str(tmp_path / "shard-*.tar")) == urls
    assert expand_shards([urls[0], base + "{001..002}.tar"]) == urls
    assert expand_shards(base + "{000..004}.tar")[3:] == [base + "003.tar", base + "004.tar"]  # kept, skipped later
    piped = build_dataloader(data_cfg([f"pipe:cat {u}" for u in urls], image=ImageConfig(max_patches=16)),
                             TOK, seq_len=32, seed=1)
    local = build_dataloader(data_cfg(urls, image=ImageConfig(max_patches=16)), TOK, seq_len=32, seed=1)
    assert_batches_equal(take(iter(piped), 6), take(iter(local), 6))


def test_shard_directories_and_list_files(tmp_path, monkeypatch):
    urls, _ = text_shards(tmp_path, 3, 4)
    (tmp_path / "notes.txt").write_text("not a shard")
    assert expand_shards(str(tmp_path)) == urls  # its *.tar, sorted
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("# train shards\n\n../shard-000.tar\n  ../shard-{001..002}.tar  \n# end\n")
    (lists / "mixed.txt").write_text(f"{urls[0]}\npipe:cat ../x.tar\nhttps://host/x.tar\n..\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative lines are relative to the list, not the cwd
    assert expand_shards(f"@{lists / 'train.txt'}") == urls
    assert expand_shards(f"@{lists / 'mixed.txt'}") == [urls[0], "pipe:cat ../x.tar", "https://host/x.tar", *urls]
    assert expand_shards([f"@{lists / 'train.txt'}", str(tmp_path)]) == urls + urls
    assert expand_shards(f"{urls[2]}::@{lists / 'train.txt'}") == [urls[2], *urls]
    monkeypatch.chdir(tmp_path)
    assert expand_shards("@lists/train.txt") == [os.path.relpath(u, tmp_path) for u in urls]
    listed, direct = (build_dataloader(data_cfg(s), TOK, seq_len=32, seed=1) for s in ("@lists/train.txt", urls))
    assert_batches_equal(take(iter(listed), 3), take(iter(direct), 3))
    assert compose_train_config(["data.shards=@lists/train.txt"]).data.shards == "@lists/train.txt"


def test_shard_directory_and_list_errors_name_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.tar.gz").write_bytes(b"")
    (tmp_path / "comments.txt").write_text("# nothing here\n\n   \n")
    (tmp_path / "nested.txt").write_text("@comments.txt\n")
    (tmp_path / "nomatch.txt").write_text("# ok\nnothing-*.tar\n")
    cases = [
        (str(tmp_path / "empty"), "holds no \\*.tar"),
        (f"@{tmp_path / 'missing.txt'}", "cannot read the shard list"),
        (f"@{tmp_path / 'empty'}", "cannot read the shard list"),
        (f"@{tmp_path / 'comments.txt'}", "names no shard"),
        (f"@{tmp_path / 'nested.txt'}", "cannot name another list"),
        (f"@{tmp_path / 'nomatch.txt'}", "nomatch.txt:2.*matches no shard"),
    ]
    for shards, message in cases:
        with pytest.raises(ValueError, match="^data.shards.*" + message):
            expand_shards(shards)
