"""Data pipeline: tokenisers, the embedded corpus, formats round trip, images, packing, vision.

Shards are written by the tests themselves (webdataset's TarWriter) into tmp_path."""

import io
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from train.data import DataConfig, ImageConfig, TokenizerConfig, build_dataloader, build_tokenizer
from train.data.build_corpus import build_corpus, ensure_corpus
from train.data.config import CorpusConfig
from train.data.images import decode_image, fit_grid, unpatchify
from train.data.packing import IGNORE
from train.data.samples import decode_sample
from train.vision import VisionConfig, build_vision

TOK = build_tokenizer(TokenizerConfig())
TINY_CORPUS = CorpusConfig(seed=3, n_text=6, n_pairs=12, n_interleaved=4, n_shards=2, max_doc_bytes=3000)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt)
    return out.getvalue()


def random_image(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_shard(path, samples):
    with TarWriter(str(path), mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def text_samples(n: int, rng, prefix: str = "t", lo: int = 1, hi: int = 400) -> list[dict]:
    """Plain-text samples of random lengths (in bytes = tokens of the byte tokenizer)."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    out = []
    for i in range(n):
        n_words = int(rng.integers(lo, hi)) // 6 + 1
        text = " ".join(words[j] for j in rng.integers(0, len(words), n_words)) + f" #{prefix}{i}"
        out.append({"__key__": f"{prefix}{i:05d}", "txt": text.encode()})
    return out


def data_cfg(shards, **kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("image", ImageConfig(max_patches=16))
    return DataConfig(shards=shards, **kw)


def test_byte_tokenizer_round_trip_and_specials():
    text = "déf f(x):\n    return x  # ünïcode ✓"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    specials = [TOK.eod, TOK.pad, TOK.img_start, TOK.img_end, TOK.img_patch]
    assert len(set(specials)) == 5 and min(specials) >= 256 and max(specials) < TOK.vocab_size
    assert TOK.decode([TOK.img_start]) == "<img>"


def test_hf_tokenizer_from_json_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    hf = build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "tok.json")))
    assert hf.encode("hello world") == [1, 2]
    assert hf.eod == 3  # an existing special is reused; the missing ones are added after the vocab
    assert sorted([hf.pad, hf.img_start, hf.img_end, hf.img_patch]) == [4, 5, 6, 7]
    assert hf.vocab_size == 8
    with pytest.raises(ValueError, match="data.tokenizer.path"):
        build_tokenizer(TokenizerConfig(kind="hf"))
    with pytest.raises(ValueError, match="data.tokenizer.kind"):
        build_tokenizer(TokenizerConfig(kind="sentencepiece"))


def test_fit_grid_keeps_aspect_within_budget():
    cfg = ImageConfig(patch_size=16, max_patches=64)
    assert fit_grid(48, 32, cfg) == (2, 3)  # small: native size, no upscaling
    rows, cols = fit_grid(1600, 1200, cfg)
    assert rows * cols <= 64 and abs(cols / rows - 4 / 3) < 0.2
    rows, cols = fit_grid(10000, 10, cfg)  # extreme aspect ratio: clipped to the budget
    assert rows == 1 and cols == 64


def test_decode_image_patch_layout_and_resize():
    rng = np.random.default_rng(0)
    arr = random_image(rng, 32, 48)
    patches, grid = decode_image(png(arr), ImageConfig(patch_size=16, max_patches=64))
    assert grid == (2, 3) and patches.shape == (6, 16 * 16 * 3) and patches.dtype == np.uint8
    np.testing.assert_array_equal(patches[4].reshape(16, 16, 3), arr[16:32, 16:32])  # raster order
    np.testing.assert_array_equal(unpatchify(patches, grid, 16), arr)
    big = random_image(rng, 480, 640)
    patches, (rows, cols) = decode_image(png(big, "WEBP"), ImageConfig(patch_size=16, max_patches=48))
    assert rows * cols <= 48 and len(patches) == rows * cols and cols > rows


def formats_shard(tmp_path, rng):
    """One sample of each layout, with known content."""
    img_a, img_b, img_c = random_image(rng, 32, 48), random_image(rng, 16, 16), random_image(rng, 16, 32)
    samples = [
        {"__key__": "plain", "txt": b"just text\n"},
        {"__key__": "pair", "png": png(img_a), "txt": b"a caption",
         "json": json.dumps({"caption": "ignored when txt exists", "width": 48}).encode()},
        {"__key__": "pairjson", "jpg": png(img_b, "JPEG"), "json": json.dumps({"caption": "from json"}).encode()},
        {"__key__": "inter", "0.png": png(img_b), "1.png": png(img_c), "json": json.dumps(
            {"segments": [{"text": "first "}, {"image": "0.png"}, {"text": "middle"}, {"image": "1.png"},
                          {"text": " last"}]}).encode()},
        {"__key__": "obelics", "0.png": png(img_c), "json": json.dumps(
            {"texts": ["intro", None], "images": [None, "0.png"]}).encode()},
    ]
    return write_shard(tmp_path / "formats.tar", samples), (img_a, img_b, img_c)


def test_round_trip_formats_text_images_and_order(tmp_path):
    shard, (img_a, img_b, img_c) = formats_shard(tmp_path, np.random.default_rng(1))
    from train.data.shards import iter_tar

    cfg = ImageConfig(patch_size=16, max_patches=64)
    docs = {s["__key__"]: decode_sample(s, TOK, cfg, 1 << 20) for s in iter_tar(shard)}
    assert TOK.decode(docs["plain"].tokens) == "just text\n<|endoftext|>"
    pair = docs["pair"]
    assert TOK.decode(pair.tokens[pair.tokens != TOK.img_patch]) == "<img></img>a caption<|endoftext|>"
    (first, patches, grid), = pair.images
    assert first == 1 and grid == (2, 3)
    np.testing.assert_array_equal(unpatchify(patches, grid, 16), img_a)
    assert TOK.decode(docs["pairjson"].tokens[-10:]) == "from json<|endoftext|>"
    inter = docs["inter"]
    kept = inter.tokens[inter.tokens != TOK.img_patch]
    assert TOK.decode(kept) == "first <img></img>middle<img></img> last<|endoftext|>"
    assert [g for _, _, g in inter.images] == [(1, 1), (1, 2)]
    for (first, patches, grid), img in zip(inter.images, (img_b, img_c)):
        assert inter.tokens[first - 1] == TOK.img_start and inter.tokens[first + len(patches)] == TOK.img_end
        np.testing.assert_array_equal(unpatchify(patches, grid, 16), img)
    assert TOK.decode(docs["obelics"].tokens[docs["obelics"].tokens != TOK.img_patch]) == (
        "intro<img></img><|endoftext|>")


def test_batch_contract_and_image_slots(tmp_path):
    shard, _ = formats_shard(tmp_path, np.random.default_rng(2))
    loader = build_dataloader(data_cfg(shard, image=ImageConfig(max_patches=16)), TOK, seq_len=64,
                              batch_size=3, seed=0)
    batch = next(iter(loader))
    B, N = 3, 64
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (B, N)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["image_slots"].dtype == torch.int64
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * N
    assert set(range(0, B * N + 1, N)) <= set(cu.tolist())  # segments never cross rows
    flat_ids, flat_lab = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    slots, patches = batch["image_slots"], batch["image_patches"]
    assert patches.dtype == torch.float32 and patches.shape == (len(slots), 768)
    assert patches.min() >= -1 and patches.max() <= 1 and len(slots) > 0
    assert (flat_ids[slots] == TOK.img_patch).all() and (flat_ids == TOK.img_patch).sum() == len(slots)
    assert int(batch["image_sizes"].prod(1).sum()) == len(slots)
    # loss on text only: never at an image patch, never with a patch as target
    assert (flat_lab[slots] == IGNORE).all() and not (flat_lab == TOK.img_patch).any()


def test_corpus_deterministic_and_readable(tmp_path):
    a = build_corpus(tmp_path / "a", TINY_CORPUS)
    b = build_corpus(tmp_path / "b", TINY_CORPUS)
    c = build_corpus(tmp_path / "c", CorpusConfig(**{**TINY_CORPUS.__dict__, "seed": 4}))
    bytes_of = lambda paths: [open(p, "rb").read() for p in paths]
    assert bytes_of(a) == bytes_of(b)
    assert bytes_of(a) != bytes_of(c)
    from train.data.shards import iter_tar

    samples = [s for p in a for s in iter_tar(p)]
    kinds = sorted(s["__key__"].split("-")[0] for s in samples)
    assert kinds.count("text") == 6 and kinds.count("pair") == 12 and kinds.count("interleaved") == 4
    for s in samples:
        if s["__key__"].startswith("pair"):
            caption = s["txt"].decode()
            assert json.loads(s["json"])["caption"] == caption and caption.strip()
            ext = next(e for e in ("png", "jpg", "webp") if e in s)
            im = np.asarray(Image.open(io.BytesIO(s[ext])).convert("L"))
            assert im.min() < 100 and im.max() > 200  # dark text drawn on white
            doc = decode_sample(s, TOK, ImageConfig(), 1 << 20)
            assert len(doc.images) == 1 and TOK.decode(doc.tokens[-len(caption.encode()) - 1:-1]) == caption


def test_ensure_corpus_builds_once_and_rejects_other_settings(tmp_path):
    root = str(tmp_path / "corpus")
    paths = ensure_corpus(root, TINY_CORPUS)
    mtimes = [open(p, "rb").read() for p in paths]
    assert ensure_corpus(root, TINY_CORPUS) == paths and [open(p, "rb").read() for p in paths] == mtimes
    with pytest.raises(ValueError, match="data.corpus_dir"):
        ensure_corpus(root, CorpusConfig(**{**TINY_CORPUS.__dict__, "n_text": 7}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a corpus")
    with pytest.raises(ValueError, match="data.corpus_dir"):
        ensure_corpus(str(tmp_path / "other"), TINY_CORPUS)


def _ensure_in_child(root, log_path, out):
    import train.data.build_corpus as bc

    build = bc.build_corpus

    def counted(path, cfg):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return build(path, cfg)

    bc.build_corpus = counted
    out.put(bc.ensure_corpus(root, TINY_CORPUS))


def test_ensure_corpus_concurrent_callers_build_once(tmp_path):
    """Every rank of a job calls ensure_corpus at start: one builds, the others wait and reuse it."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    log_path = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path / "corpus"), str(log_path), out))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log_path.read_text().split()) == 1
    assert all(r == results[0] for r in results) and all(os.path.exists(p) for p in results[0])
    assert not list(tmp_path.glob("corpus.tmp-*"))


def rows_of_epoch(loader, epoch: int = 0, limit: int = 10000):
    """Rows until the first piece of a later epoch (with one reader, epoch `epoch` is then complete)."""
    rows = []
    for row in loader.iter_rows():
        rows.append(row)
        if any(e > epoch for _, e, _, _ in row.pieces) or len(rows) >= limit:
            return rows
    raise AssertionError("unreachable")


def test_packing_cu_seqlens_coverage_labels_positions(tmp_path):
    rng = np.random.default_rng(5)
    samples = text_samples(40, rng, lo=1, hi=300)
    source = {s["__key__"]: np.asarray(TOK.encode(s["txt"].decode()) + [TOK.eod]) for s in samples}
    shard = write_shard(tmp_path / "text.tar", samples)
    N = 96  # shorter than many documents: they are split across rows
    loader = build_dataloader(data_cfg(shard, shuffle_buffer=7, image=ImageConfig(max_patches=16)), TOK,
                              seq_len=N, batch_size=1, seed=0)
    covered = {k: np.zeros(len(v), dtype=int) for k, v in source.items()}
    for row in rows_of_epoch(loader):
        tokens, labels, positions = row.tokens.numpy(), row.labels.numpy(), row.positions.numpy()
        assert sum(row.seg_lens) == N
        starts = np.cumsum([0] + row.seg_lens)
        for (key, epoch, a, b), s, e in zip(row.pieces, starts, starts[1:]):
            assert e - s == b - a
            np.testing.assert_array_equal(tokens[s:e], source[key][a:b])
            np.testing.assert_array_equal(positions[s:e], np.arange(e - s))
            np.testing.assert_array_equal(labels[s:e - 1], source[key][a + 1:b])  # next token, same doc
            assert labels[e - 1] == IGNORE  # no target across a segment boundary
            if epoch == 0:
                covered[key][a:b] += 1
        if len(row.seg_lens) > len(row.pieces):  # padding tail
            s = starts[len(row.pieces)]
            assert (tokens[s:] == TOK.pad).all() and (labels[s:] == IGNORE).all()
    assert all((c == 1).all() for c in covered.values()), "every token once per epoch"
    assert any(len(v) > N for v in source.values())


def test_images_are_never_split_across_rows(tmp_path):
    rng = np.random.default_rng(6)
    samples = [{"__key__": f"p{i}", "png": png(random_image(rng, 16 * int(rng.integers(1, 4)), 48)),
                "txt": f"caption {i}".encode()} for i in range(30)]
    shard = write_shard(tmp_path / "img.tar", samples)
    loader = build_dataloader(data_cfg(shard, image=ImageConfig(max_patches=9)), TOK, seq_len=24, seed=0)
    n_img = 0
    for row in rows_of_epoch(loader):
        toks = row.tokens.numpy()
        assert (toks == TOK.img_start).sum() == (toks == TOK.img_end).sum() == len(row.grids)
        assert (toks == TOK.img_patch).sum() == len(row.slots) == sum(r * c for r, c in row.grids)
        n_img += sum(e == 0 for _, e, a, _ in row.pieces if a == 0)
    assert n_img == 30


def test_config_errors_name_the_key(tmp_path):
    shard, _ = formats_shard(tmp_path, np.random.default_rng(0))
    with pytest.raises(ValueError, match="data.image.max_patches"):
        build_dataloader(data_cfg(shard, image=ImageConfig(max_patches=256)), TOK, seq_len=64)
    with pytest.raises(ValueError, match="data.shards"):
        build_dataloader(data_cfg(str(tmp_path / "nothing-{000..003}.tar")), TOK, seq_len=512)
    with pytest.raises(ValueError, match="data.shards"):
        build_dataloader(data_cfg(str(tmp_path / "*.nomatch")), TOK, seq_len=512)


@pytest.mark.parametrize("kind", ["linear", "mlp", "vit"])
def test_vision_shapes_and_image_isolation(kind):
    cfg = VisionConfig(kind=kind, patch_size=4, vit_width=32, vit_heads=4, vit_depth=1)
    vision = build_vision(cfg, 24)
    sizes = torch.tensor([[2, 3], [1, 2]])
    x = torch.randn(8, 48)
    y = vision(x, sizes)
    assert y.shape == (8, 24) and torch.isfinite(y).all()
    x2 = x.clone()
    x2[6:] += 1  # change only the second image
    y2 = vision(x2, sizes)
    torch.testing.assert_close(y2[:6], y[:6])  # the first image does not see the second
    assert (y2[6:] - y[6:]).abs().max() > 1e-3
    assert vision(torch.zeros(0, 48), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 24)
    if kind != "vit":  # row/column embeddings tell patches of one image apart
        same = torch.zeros(2, 48)
        out = vision(same, torch.tensor([[1, 2]]))
        assert (out[0] - out[1]).abs().max() > 1e-4
