"""No sample can raise out of the loader: the decoders either return a valid Document or raise
SampleError with a known reason, whatever the sample's members hold.

The fuzz cases are real samples of the embedded corpus (pairs in png/jpg/webp, interleaved
documents, plain text; the interleaved ones also rewritten as OBELICS-style `texts`/`images` lists)
with seeded mutations of their bytes, members and JSON fields."""

import functools
import json
import logging
import tarfile
import time
from collections import Counter

import numpy as np
import pytest

from tests.test_data import TOK, data_cfg, png, random_image, rows_of_epoch, text_samples, write_shard
from train.data import ImageConfig, build_dataloader
from train.data.build_corpus import build_corpus
from train.data.config import CorpusConfig
from train.data.samples import SKIP_REASONS, SampleError, decode_sample
from train.data.shards import ShardReader, iter_tar

IMAGE_CFG = ImageConfig(patch_size=16, max_patches=24)
MAX_BYTES = 1 << 16
N_CASES = 10000
MEMBER_NAMES = ["txt", "json", "png", "jpg", "jpeg", "webp", "0.png", "1.png", "7.png", "bin", "cls"]
BAD_VALUES = [
    0, 5, -1, -(2**63), 2**64, 10**300, 1e308, float("inf"), float("nan"), -0.5, True, False, None, "", "nope",
    "9.png", "__key__", "__url__", "json", "txt", "\ud800 lone surrogate", "\x00", [], [[[]]], [1, "a", None],
    {}, {"text": 5}, {"text": None, "image": None}, {"text": "t", "image": "0.png"}, {"image": ["0.png"]},
]
LAYOUTS = [
    {"texts": 5, "images": "nope"}, {"segments": "x"}, {"segments": [5, "a"]}, {"texts": ["a"]},
    {"texts": ["a", None], "images": [None]}, {"texts": ["a", None], "images": [None, "9.png"]},
    {"segments": [{"text": "a"}, {"image": "9.png"}]}, {"segments": [{"text": "a", "image": "0.png"}]},
    {"segments": []}, {"caption": 5}, {"text": ["a"]}, {"caption": None, "text": None}, {"images": [1]},
]


def to_obelics(sample: dict) -> dict:
    segments = json.loads(sample["json"])["segments"]
    meta = {"texts": [s.get("text") for s in segments], "images": [s.get("image") for s in segments]}
    return {**sample, "__key__": "obelics-" + sample["__key__"], "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[dict]:
    """Real samples of all layouts: a small embedded corpus (about 1 s to build)."""
    cfg = CorpusConfig(seed=1, n_text=12, n_pairs=24, n_interleaved=16, n_shards=1, max_doc_bytes=3000)
    (shard,) = build_corpus(tmp_path_factory.mktemp("fuzz") / "corpus", cfg)
    samples = list(iter_tar(shard))
    samples += [to_obelics(s) for s in samples if s["__key__"].startswith("interleaved")]
    kinds = Counter(s["__key__"].split("-")[0] for s in samples)
    exts = Counter(e for s in samples for e in ("png", "jpg", "webp") if e in s)
    assert min(kinds.values()) >= 12 and min(exts.values()) >= 8, (kinds, exts)
    return samples


def members(s: dict) -> list[str]:
    return sorted(k for k in s if not k.startswith("__"))


def json_nodes(obj, path=()):
    """(container, key) of every value inside a parsed JSON document."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        yield obj, k
        yield from json_nodes(v, path + (k,))


def dump_json(obj, rng) -> bytes:
    text = json.dumps(obj, ensure_ascii=bool(rng.integers(2)))
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def mutate_bytes(s, rng):
    name = rng.choice(members(s) or ["txt"])
    data = bytearray(s.get(name, b""))
    op = int(rng.integers(6))
    if op == 0 and data:
        for i in rng.integers(0, len(data), int(rng.integers(1, 9))):
            data[i] ^= 1 << int(rng.integers(8))
    elif op == 1:
        del data[int(rng.integers(len(data) + 1)):]
    elif op == 2:
        at = int(rng.integers(len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 64)))
    elif op == 3:
        data = bytearray()
    elif op == 4:
        at = int(rng.integers(len(data) + 1))
        data[at:at] = b"\xff\xfe\x80\xc3"  # never valid UTF-8
    else:
        data += b"a" * MAX_BYTES  # valid text, but the sample is now over the size limit
    s[name] = bytes(data)
    return f"bytes[{op}] {name}"


def mutate_members(s, rng):
    names = members(s)
    op = int(rng.integers(3))
    if op == 0 and names:
        name = rng.choice(names)
        del s[name]
        return f"drop {name}"
    if op == 1 and names:
        old, new = rng.choice(names), rng.choice(MEMBER_NAMES)
        s[new] = s.pop(old)
        return f"rename {old}->{new}"
    new = rng.choice(MEMBER_NAMES)
    s[new] = s[rng.choice(names)] if names and rng.integers(2) else rng.bytes(int(rng.integers(0, 100)))
    return f"add {new}"


def bad_value(rng):
    return BAD_VALUES[int(rng.integers(len(BAD_VALUES)))]


def mutate_json(s, rng):
    try:
        obj = json.loads(s["json"])
    except (KeyError, ValueError):
        obj = None
    if rng.integers(4) == 0 or obj is None:
        obj = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
        s["json"] = dump_json(obj, rng)
        return f"json layout {obj!r}"
    nodes = list(json_nodes(obj))
    op = int(rng.integers(4))
    if op == 0 or not nodes:  # the whole document: a scalar or a list instead of an object
        obj = bad_value(rng)
    elif op == 1:
        parent, key = nodes[int(rng.integers(len(nodes)))]
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == 2 and isinstance(obj, dict):
        obj[rng.choice(["segments", "texts", "images", "caption", "text"])] = bad_value(rng)
    else:
        parent, key = nodes[int(rng.integers(len(nodes)))]
        parent[key] = bad_value(rng)
    s["json"] = dump_json(obj, rng)
    return f"json[{op}]"


def check_document(doc, key):
    t = doc.tokens
    assert doc.key == key and t.dtype == np.int32 and t.ndim == 1
    assert t.min() >= 0 and t.max() < TOK.vocab_size and t[-1] == TOK.eod
    assert (t < 256).any(), "a document has text tokens"
    p, n_patches, prev = IMAGE_CFG.patch_size, 0, 0
    for first, patches, (rows, cols) in doc.images:
        assert first > prev and patches.dtype == np.uint8
        assert patches.shape == (rows * cols, 3 * p * p) and 1 <= rows * cols <= IMAGE_CFG.max_patches
        assert t[first - 1] == TOK.img_start and t[first + len(patches)] == TOK.img_end
        assert (t[first:first + len(patches)] == TOK.img_patch).all()
        n_patches, prev = n_patches + len(patches), first + len(patches)
    assert (t == TOK.img_patch).sum() == n_patches
    assert (t == TOK.img_start).sum() == (t == TOK.img_end).sum() == len(doc.images)


def test_fuzzed_samples_decode_or_raise_sample_error(seeds):
    rng = np.random.default_rng(1234)
    mutations = (mutate_bytes, mutate_members, mutate_json)
    outcomes, failures = Counter(), []
    t0 = time.time()
    for case in range(N_CASES):
        s = dict(seeds[case % len(seeds)])
        what = [mutations[int(rng.integers(3))](s, rng) for _ in range(int(rng.integers(1, 4)))]
        try:
            doc = decode_sample(s, TOK, IMAGE_CFG, MAX_BYTES)
        except SampleError as e:
            assert e.reason in SKIP_REASONS, e.reason
            outcomes[e.reason] += 1
            continue
        except Exception as e:  # what the test is for: print the first few, with what was done
            failures.append(f"case {case} {s['__key__']} {what}: {type(e).__name__}: {e}"[:300])
            continue
        check_document(doc, s["__key__"])
        outcomes["ok"] += 1
    elapsed = time.time() - t0
    assert not failures, f"{len(failures)} of {N_CASES} raised out of decode_sample:\n" + "\n".join(failures[:8])
    print(f"{N_CASES} cases in {elapsed:.1f} s: {dict(outcomes)}")
    # every reason a sample's content can cause was reached, and mutated samples still decode
    assert outcomes["ok"] > N_CASES // 20
    assert set(outcomes) >= {"ok", "bad_json", "bad_schema", "missing_image", "bad_image", "bad_text", "oversize",
                             "empty", "unknown_format"}, outcomes


def test_fuzzed_shard_bytes_never_raise_out_of_the_reader(seeds, tmp_path):
    """Corrupt the tar itself (headers included): the reader keeps what it can, counts the rest under
    a known reason (never decode_error), and raises nothing but the no-usable-sample error."""
    rng = np.random.default_rng(99)
    clean = open(write_shard(tmp_path / "clean.tar", seeds[:10]), "rb").read()
    decode = functools.partial(decode_sample, tokenizer=TOK, image_cfg=IMAGE_CFG, max_bytes=MAX_BYTES)
    reasons, failures = Counter(), []
    for case in range(300):
        data = bytearray(clean)
        if rng.integers(3) == 0:
            del data[int(rng.integers(len(data))):]
        for i in rng.integers(0, len(data), int(rng.integers(1, 20))):
            data[i] = int(rng.integers(256))
        path = tmp_path / f"case{case % 4}.tar"
        path.write_bytes(bytes(data))
        reader = ShardReader([str(path)], reader=0, n_readers=1, seed=0, block_size=4, shuffle_shards=False,
                             decode=decode)
        try:
            for doc, pos in reader.documents():
                if pos.epoch > 0:
                    break
                check_document(doc, doc.key)
        except RuntimeError as e:
            assert "no usable sample" in str(e)
        except Exception as e:
            failures.append(f"case {case}: {type(e).__name__}: {e}"[:300])
        reasons.update(reader.skipped)
    assert not failures, "\n".join(failures[:8])
    assert set(reasons) <= set(SKIP_REASONS) | {"truncated_tar", "unreadable_shard"}, reasons
    assert reasons["truncated_tar"] > 0 and reasons["bad_image"] > 0, reasons


def bad_samples(rng) -> list[tuple[dict, str]]:
    """(sample, the reason it is skipped under), one or more per reason and per schema rule."""
    img = png(random_image(rng, 16, 32))
    seg = lambda *s: json.dumps({"segments": list(s)}).encode()
    return [
        ({"json": json.dumps({"texts": 5, "images": "nope"}).encode(), "0.png": img}, "bad_schema"),
        ({"json": json.dumps({"texts": ["a"]}).encode()}, "bad_schema"),
        ({"json": json.dumps({"texts": ["a", None], "images": [None]}).encode()}, "bad_schema"),
        ({"json": json.dumps({"texts": ["a", 7], "images": [None, None]}).encode()}, "bad_schema"),
        ({"json": seg({"text": "a"}, {"image": 0}), "0.png": img}, "bad_schema"),
        ({"json": seg({"text": "a", "image": "0.png"}), "0.png": img}, "bad_schema"),
        ({"json": seg({"text": ["a"]})}, "bad_schema"),
        ({"json": seg("text")}, "bad_schema"),
        ({"json": json.dumps({"segments": {"text": "a"}}).encode()}, "bad_schema"),
        ({"json": json.dumps({"caption": 5}).encode(), "png": img}, "bad_schema"),
        ({"json": json.dumps({"text": ["a"]}).encode()}, "bad_schema"),
        ({"json": seg({"text": "a"}, {"image": "9.png"}), "0.png": img}, "missing_image"),
        ({"json": seg({"text": "a"}, {"image": "__key__"})}, "missing_image"),
        ({"json": b"{not json"}, "bad_json"),
        ({"json": b"[1, 2]"}, "bad_json"),
        ({"json": b""}, "bad_json"),
        ({"json": b"{\"text\": \"\xff\"}"}, "bad_json"),
        ({"json": b"{\"text\": " + b"1" * 5000 + b"}"}, "bad_json"),  # beyond Python's int digits limit
        ({"json": b"[" * 5000}, "bad_json"),  # nested deeper than the recursion limit
        ({"json": json.dumps({"text": "lone \ud800"}).encode()}, "bad_text"),
        ({"json": seg({"text": "a \udfff"})}, "bad_text"),
        ({"txt": b"caf\xe9"}, "bad_text"),
        ({"png": b"\x89PNG\r\n\x1a\n" + rng.bytes(100), "txt": b"caption"}, "bad_image"),
        ({"webp": b"", "txt": b"caption"}, "bad_image"),
        ({"png": png(random_image(rng, 16, 16), "GIF"), "txt": b"a GIF named png"}, "bad_image"),
        ({"json": seg({"text": "a"}, {"image": "0.png"}), "0.png": b"not an image"}, "bad_image"),
        ({"txt": b""}, "empty"),
        ({"png": img, "txt": b""}, "empty"),
        ({"json": json.dumps({"segments": []}).encode()}, "empty"),
        ({"json": seg({"image": "0.png"}), "0.png": img}, "empty"),
        ({"txt": b"x" * (MAX_BYTES + 1)}, "oversize"),
        ({"bin": b"\x00\x01"}, "unknown_format"),
        ({"json": json.dumps({"width": -5, "height": 10**30}).encode()}, "unknown_format"),
        ({}, "unknown_format"),
    ]


def test_each_malformed_sample_is_skipped_under_its_reason():
    rng = np.random.default_rng(0)
    for i, (members_, reason) in enumerate(bad_samples(rng)):
        with pytest.raises(SampleError) as info:
            decode_sample({"__key__": f"bad{i}", "__url__": "u", **members_}, TOK, IMAGE_CFG, MAX_BYTES)
        assert info.value.reason == reason, (i, members_, str(info.value))


def test_declared_sizes_are_not_trusted():
    """Sizes in a pair's json (img2dataset writes width/height) are ignored: the image header decides."""
    rng = np.random.default_rng(0)
    meta = {"caption": "c", "width": -5, "height": 10**30, "original_width": 1e308}
    doc = decode_sample({"__key__": "k", "png": png(random_image(rng, 16, 32)), "json": json.dumps(meta).encode()},
                        TOK, IMAGE_CFG, MAX_BYTES)
    assert [g for _, _, g in doc.images] == [(1, 2)]


def write_tar(path, members_: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these members (TarWriter cannot write a member name twice)."""
    import io

    with tarfile.open(path, "w") as tf:
        for name, data in members_:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_duplicate_member_skips_its_sample_not_the_rest_of_the_shard(tmp_path):
    shard = write_tar(tmp_path / "dup.tar", [("a.txt", b"first"), ("b.txt", b"one"), ("b.TXT", b"two"),
                                             ("c.txt", b"after")])
    samples = list(iter_tar(shard))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    with pytest.raises(SampleError, match="duplicate_member"):
        decode_sample(samples[1], TOK, IMAGE_CFG, MAX_BYTES)
    assert TOK.decode(decode_sample(samples[2], TOK, IMAGE_CFG, MAX_BYTES).tokens) == "after<|endoftext|>"


def test_unexpected_exception_is_a_decode_error_skip_logged_with_traceback(tmp_path, caplog):
    """The last-resort guard: a bug in decoding one sample is skipped under its own reason and logged at
    warning level with the exception type, shard, key and where it was raised."""
    rng = np.random.default_rng(3)
    shard = write_shard(tmp_path / "s.tar", text_samples(6, rng, prefix="k"))

    def decode(sample):
        if sample["__key__"] in ("k00002", "k00004"):
            return {}["missing"]
        return sample["__key__"]

    reader = ShardReader([shard], reader=0, n_readers=1, seed=0, block_size=1, shuffle_shards=False,
                         decode=decode)
    with caplog.at_level(logging.WARNING, logger="train.data.shards"):
        keys = []
        for key, pos in reader.documents():
            if pos.epoch > 0:
                break
            keys.append(key)
    assert keys == ["k00000", "k00001", "k00003", "k00005"]
    assert reader.skipped == {"decode_error": 2}
    logged = [r for r in caplog.records if "decode_error" in r.getMessage()]
    assert len(logged) == 2 and all(r.levelno == logging.WARNING for r in logged)
    message = logged[0].getMessage()
    assert "KeyError" in message and "k00002" in message and shard in message
    assert "test_data_fuzz.py" in message and "in decode" in message  # where it was raised


def test_malformed_samples_through_the_loader_with_a_worker(tmp_path, monkeypatch):
    """End to end: a shard mixing good and malformed samples, read by a worker process; every bad
    sample is counted under its reason and the good ones all arrive."""
    rng = np.random.default_rng(11)
    good = text_samples(4, rng, prefix="good")
    cases = [(m, reason) for m, reason in bad_samples(rng) if m]  # a sample without members is no tar entry
    bad = [{"__key__": f"bad{i:03d}", **m} for i, (m, _) in enumerate(cases)]
    bad.append({"__key__": "boom", "txt": b"fine text, but the decoder has a bug for this key"})
    bad.append({"__key__": "okpair", "png": png(random_image(rng, 16, 16)), "txt": b"fine"})
    urls = [write_shard(tmp_path / "good.tar", good), write_shard(tmp_path / "bad.tar", bad),
            write_tar(tmp_path / "dup.tar", [("d.txt", b"one"), ("d.TXT", b"two"), ("after.txt", b"kept")])]
    import train.data.loader as loader_mod

    real = loader_mod.decode_sample

    def buggy(sample, **kw):  # forked into the worker
        if sample["__key__"] == "boom":
            raise ZeroDivisionError("a decoder bug")
        return real(sample, **kw)

    monkeypatch.setattr(loader_mod, "decode_sample", buggy)
    cfg = data_cfg(urls, num_workers=1, shuffle_buffer=1, shuffle_shards=False, max_sample_bytes=MAX_BYTES,
                   image=IMAGE_CFG)
    loader = build_dataloader(cfg, TOK, seq_len=64, seed=0)
    rows = rows_of_epoch(loader)
    expected = Counter(reason for _, reason in cases) + Counter(decode_error=1, duplicate_member=1)
    assert loader.skipped == dict(expected)
    keys = {k for r in rows for k, e, _, _ in r.pieces if e == 0}
    assert keys == {s["__key__"] for s in good} | {"okpair", "after"}
    assert any(len(r.grids) for r in rows)
