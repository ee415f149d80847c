"""data.sources: token shares follow the weights, a resume continues exactly with several sources
(shards and the synthetic retrieval source), synthetic documents stay whole, and bad settings name
their key."""

from collections import Counter

import numpy as np
import pytest

from tests.test_data import text_samples, write_shard
from tests.test_data_resume import assert_batches_equal, take
from train.data import DataConfig, ImageConfig, build_dataloader, build_tokenizer
from train.data.config import SourceConfig
from train.data.loader import check_data

TOK = build_tokenizer(DataConfig().tokenizer)
WEIGHTS = {"a": 0.5, "b": 0.2, "tasks": 0.3}


def sources_cfg(tmp_path, num_workers=0, haystack="default") -> DataConfig:
    """Two shard sources whose document keys start with their name, and the synthetic source (its filler
    text from the standard library, or from shards)."""
    rng = np.random.default_rng(0)
    dirs = {}
    for name, n_shards in (("a", 2), ("b", 3)):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        for s in range(n_shards):
            write_shard(dirs[name] / f"{s}.tar", text_samples(15, rng, prefix=f"{name}{s}-", lo=20, hi=300))
    return DataConfig(num_workers=num_workers, shuffle_buffer=4, image=ImageConfig(max_patches=16), sources=[
        SourceConfig(name="a", shards=str(dirs["a"]), weight=WEIGHTS["a"]),
        SourceConfig(name="b", shards=str(dirs["b"]), weight=WEIGHTS["b"]),
        SourceConfig(name="tasks", kind="synthetic", weight=WEIGHTS["tasks"], tasks=["passkey", "image_needle"],
                     min_len=130, seed=7, haystack=haystack if haystack == "default" else str(dirs[haystack])),
    ])


def test_token_shares_follow_the_weights(tmp_path):
    loader = build_dataloader(sources_cfg(tmp_path), TOK, seq_len=200, batch_size=1, seed=1)
    tokens = Counter()
    for row in take(loader.iter_rows(), 200):
        for key, _, start, end in row.pieces:
            tokens[key.split("/")[0] if "/" in key else key[0]] += end - start
    total = sum(tokens.values())
    # the mixer draws by tokens: each share is off by at most about one document (<= 300 of ~38K tokens)
    for name, weight in WEIGHTS.items():
        assert abs(tokens[name] / total - weight) < 0.015, (name, tokens)


def test_resume_is_exact_with_several_sources(tmp_path):
    cfg = sources_cfg(tmp_path, num_workers=2, haystack="b")  # each worker reads its haystack: keep it small
    make = lambda: build_dataloader(cfg, TOK, seq_len=160, batch_size=2, seed=5)
    full = make()
    first = take(iter(full), 7)
    state = full.state_dict()
    rest = take(iter(full), 6)
    full.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert_batches_equal(take(iter(resumed), 6), rest)
    resumed.close()
    assert any(len(b["image_slots"]) for b in first + rest), "the image needles reach the batches"
    other = DataConfig(**{**cfg.__dict__, "sources": [*cfg.sources[:2], SourceConfig(kind="synthetic", seed=8)]})
    with pytest.raises(ValueError, match=r"data\.sources"):
        build_dataloader(other, TOK, seq_len=160, batch_size=2, seed=5).load_state_dict(state)


def test_synthetic_documents_stay_whole_and_shards_still_split(tmp_path):
    loader = build_dataloader(sources_cfg(tmp_path), TOK, seq_len=200, batch_size=1, seed=2)
    whole = split = 0
    for row in take(loader.iter_rows(), 60):
        at = 0
        for key, _, start, end in row.pieces:
            if key.startswith("tasks/"):
                assert start == 0 and row.tokens[at + end - 1] == TOK.eod, f"{key} was split"
                whole += 1
            else:
                split += start > 0
            at += end - start
    assert whole > 10 and split > 0


def test_source_settings_are_checked():
    base = DataConfig(image=ImageConfig(max_patches=16)).__dict__
    bad = [
        (SourceConfig(weight=0.0), "weight"),
        (SourceConfig(kind="web"), "kind"),
        (SourceConfig(kind="synthetic", tasks=["needle"]), "tasks"),
        (SourceConfig(kind="synthetic", tasks=["multikey"], min_len=128), "min_len"),
        (SourceConfig(kind="synthetic", max_len=4096), "max_len"),
    ]
    for src, key in bad:
        with pytest.raises(ValueError, match=rf"data\.sources\[0\]\.{key}"):
            check_data(DataConfig(**{**base, "sources": [src]}), 1024, 1)
    with pytest.raises(ValueError, match="repeat"):
        check_data(DataConfig(**{**base, "sources": [SourceConfig(name="x"), SourceConfig(name="x")]}), 1024, 1)
    # the message names what bounds min_len from above: the row, or max_len where it is set
    for src, bound in ((SourceConfig(kind="synthetic", tasks=["multikey"], min_len=128), "the row is 1024"),
                       (SourceConfig(kind="synthetic", tasks=["multikey"], min_len=128, max_len=256),
                        r"data\.sources\[0\]\.max_len is 256")):
        with pytest.raises(ValueError, match=bound):
            check_data(DataConfig(**{**base, "sources": [src]}), 1024, 1)


def test_a_longer_stage_continues_the_mixed_stream(tmp_path):
    """A curriculum stage with longer rows loads the position of the shorter ones (as enter_stage does)."""
    cfg = sources_cfg(tmp_path)
    short = build_dataloader(cfg, TOK, seq_len=200, batch_size=1, seed=3)
    take(iter(short), 3)
    longer = build_dataloader(cfg, TOK, seq_len=400, batch_size=1, seed=3)
    longer.load_state_dict(short.state_dict())
    assert next(iter(longer))["input_ids"].shape == (1, 400)
