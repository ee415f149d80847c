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


def _source_of(key: str) -> str:
    return key.split("/")[0] if "/" in key else key[0]


def test_token_shares_follow_the_weights(tmp_path):
    loader = build_dataloader(sources_cfg(tmp_path), TOK, seq_len=200, batch_size=1, seed=1)
    tokens = Counter()
    for row in take(loader.iter_rows(), 200):
        for key, _, start, end in row.pieces:
            tokens[_source_of(key)] += end - start
    total = sum(tokens.values())
    # the mixer draws by tokens: each share is off by at most about one document (<= 300 of ~38K tokens)
    for name, weight in WEIGHTS.items():
        assert abs(tokens[name] / total - weight) < 0.015, (name, tokens)


@pytest.mark.parametrize("weights", [None, [0.1, 0.1, 0.8]])  # data.sources' own, or a recipe stage's
def test_resume_is_exact_with_several_sources(tmp_path, weights):
    cfg = sources_cfg(tmp_path, num_workers=2, haystack="b")  # each worker reads its haystack: keep it small
    make = lambda: build_dataloader(cfg, TOK, seq_len=160, batch_size=2, seed=5, weights=weights)
    full = make()
    first = take(iter(full), 7)
    state = full.state_dict()
    assert state["weights"] == (weights or list(WEIGHTS.values()))
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
    # another choices makes other documents: refused too (the default 4 is left out of the saved key)
    fewer = SourceConfig(**{**cfg.sources[2].__dict__, "choices": 2})
    other = DataConfig(**{**cfg.__dict__, "sources": [*cfg.sources[:2], fewer]})
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


def test_batches_say_which_source_and_answer_each_target_belongs_to(tmp_path):
    """``loss_groups`` (for ``loss/lm/<name>`` and ``loss/answer/<name>``): each piece's tokens carry its
    source's index in data.sources, padding -1, read from the document keys of the same rows; in a synthetic
    document the targets of its answer carry 3 + the source instead: they are a run that ends where the
    next target is the end of the document, and spell a number (a pass key's, written earlier in the
    document). One source adds nothing."""
    cfg = sources_cfg(tmp_path)
    make = lambda: build_dataloader(cfg, TOK, seq_len=200, batch_size=2, seed=3)
    rows, batches = take(make().iter_rows(), 40), take(iter(make()), 20)
    names, seen, answers = list(WEIGHTS), Counter(), 0
    for b, batch in enumerate(batches):
        assert batch["n_loss_groups"] == 6 and batch["loss_groups"].shape == batch["input_ids"].shape
        for i, row in enumerate(rows[2 * b:2 * b + 2]):
            groups, labels, at = batch["loss_groups"][i], batch["labels"][i], 0
            for key, _, start, end in row.pieces:
                source = names.index(_source_of(key))
                mine = groups[at:at + end - start]
                if source == 2:  # synthetic: whole documents, each with its answer
                    ans = (mine == 5).nonzero().squeeze(1)
                    assert len(ans) and set(mine.tolist()) == {2, 5}, key
                    lo, hi = at + int(ans[0]), at + int(ans[-1]) + 1
                    assert len(ans) == hi - lo and labels[hi] == TOK.eod, key  # one run, then the end
                    answer = TOK.decode(labels[lo:hi].tolist())
                    if "/passkey/" in key:  # the image needle's key is drawn in its image
                        assert answer.strip() and answer in TOK.decode(row.tokens[at:lo].tolist()), (key, answer)
                    assert answer.strip().isdigit(), (key, answer)
                    answers += 1
                else:
                    assert set(mine.tolist()) == {source}, key
                at += end - start
            assert set(groups[at:].tolist()) <= {-1}
            seen.update(groups.tolist())
    assert all(seen[s] for s in (-1, 0, 1, 2, 5)) and answers > 5, (seen, answers)
    one = DataConfig(**{**cfg.__dict__, "sources": cfg.sources[:1]})
    assert "loss_groups" not in next(iter(build_dataloader(one, TOK, seq_len=200, batch_size=2, seed=3)))


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


def _pieces(loader, n_rows: int) -> list[tuple[str, str]]:
    """(source, document key) of each piece of the next ``n_rows`` rows, in order."""
    return [(_source_of(key), key) for row in take(loader.iter_rows(), n_rows) for key, *_ in row.pieces]


def test_a_stage_with_new_weights_continues_every_source(tmp_path):
    """A recipe stage's data_weights (as enter_stage builds its loader): the same sources in the new shares,
    counted from the stage's start, and each source's documents continue where the last stage left them."""
    cfg = sources_cfg(tmp_path)
    make = lambda weights=None: build_dataloader(cfg, TOK, seq_len=200, batch_size=1, seed=4, weights=weights)
    first = make()
    before = _pieces(first, 30)
    # a stage of the synthetic source alone: after the document in flight, nothing else
    only_tasks = make([0, 0, 1])
    only_tasks.load_state_dict(first.state_dict())
    during = _pieces(only_tasks, 20)
    assert during[0][0] == "tasks" or during[0][1] == before[-1][1]  # a document in flight continues
    assert {src for src, _ in during[1:]} == {"tasks"}
    # then a and b in equal shares, counted from this stage's start: with the counts of the earlier stages
    # b (behind its share by 0.3 of the ~6K tokens so far) would take nearly every document at first
    even = make([1, 1, 0])
    even.load_state_dict(only_tasks.state_dict())
    after = _pieces(even, 20)
    tokens = Counter()  # per source, since the stage's start (the position's counts)
    for w in even.state_dict()["workers"].values():
        tokens.update(dict(zip(["a", "b", "tasks"], w["pos"]["tokens"])))
    assert tokens["tasks"] == 0 and abs(tokens["a"] / (tokens["a"] + tokens["b"]) - 0.5) < 0.1, tokens
    # every shard source continues its own stream: no document of a repeats or is skipped across the stages
    pure_a = make([1, 0, 0])
    stream = list(dict.fromkeys(key for _, key in _pieces(pure_a, 60)))
    seen = list(dict.fromkeys(key for src, key in before + during + after if src == "a"))
    assert seen == stream[:len(seen)] and len(seen) > 5


def test_states_saved_with_weights_in_sources_still_load(tmp_path):
    """A checkpoint from before stages could set weights held each weight in its sources entry."""
    cfg = sources_cfg(tmp_path)
    make = lambda: build_dataloader(cfg, TOK, seq_len=200, batch_size=1, seed=6)
    full = make()
    take(iter(full), 3)
    state = full.state_dict()
    rest = _pieces(full, 5)
    old = {k: v for k, v in state.items() if k != "weights"}
    old["sources"] = [[name, kind, WEIGHTS[name], rest_] for name, kind, rest_ in state["sources"]]
    resumed = make()
    resumed.load_state_dict(old)
    assert _pieces(resumed, 5) == rest
    with pytest.raises(ValueError, match="3 data weights for 2"):
        build_dataloader(DataConfig(**{**cfg.__dict__, "sources": cfg.sources[:2]}), TOK, seq_len=200,
                         batch_size=1, weights=[1, 1, 1])


def test_synthetic_choices_set_the_keys_per_document_and_the_shortest_one():
    """``choices`` of a synthetic source: a multikey document holds that many magic-number sentences (the
    asked key's and the distractors'), so 2 makes items short enough for a primer; the min_len check follows
    it, and fewer than 2 is refused."""
    from train.data.mix import SyntheticReader
    from train.eval.tasks import fixed_tokens

    base = DataConfig(image=ImageConfig(max_patches=16)).__dict__
    short = {c: fixed_tokens("multikey", TOK, ImageConfig(), c) + 2 for c in (2, 4)}
    assert short[2] < short[4]
    for choices in (2, 3, 4):
        src = SourceConfig(kind="synthetic", tasks=["multikey"], min_len=short[4], max_len=short[4] + 40,
                           choices=choices)
        check_data(DataConfig(**{**base, "sources": [src]}), 1024, 1)
        reader = SyntheticReader(src, "mk", TOK, ImageConfig(max_patches=16), 1024, seed=0, reader=0,
                                 heldout_every=20)
        for i in range(3):
            doc = reader.document(i)
            text = TOK.decode(doc.tokens[:-1].tolist())
            assert text.count("One of the special magic numbers for ") == choices, text
            asked = text.rsplit("The special magic number for ", 1)[1].split(" ", 1)[0]
            value = TOK.decode(doc.tokens[doc.answer[0]:doc.answer[1]].tolist())
            assert f"One of the special magic numbers for {asked} is: {value}." in text
            assert short[4] <= len(doc.tokens) <= short[4] + 40
    # min_len between the two shortest: fits 2 keys, not the default 4
    mid = SourceConfig(kind="synthetic", tasks=["multikey"], min_len=short[2], max_len=short[4] - 1, choices=2)
    check_data(DataConfig(**{**base, "sources": [mid]}), 1024, 1)
    with pytest.raises(ValueError, match=rf"data\.sources\[0\]\.min_len={short[2]} must lie in \[{short[4]}, "):
        check_data(DataConfig(**{**base, "sources": [SourceConfig(**{**mid.__dict__, "choices": 4})]}), 1024, 1)
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.choices=1 must be >= 2"):
        check_data(DataConfig(**{**base, "sources": [SourceConfig(**{**mid.__dict__, "choices": 1})]}), 1024, 1)


def test_the_synthetic_source_draws_the_training_only_drill_and_the_evals_refuse_it():
    """``tasks: [multikey_drill]`` is a synthetic source's (``TRAIN_TASKS``), with min_len bounded by the drill's
    own needles and question; its documents answer the other keys before the asked one. The eval tasks stay
    ``TASKS``: an eval config naming the drill is refused."""
    from train.data.mix import SyntheticReader
    from train.eval.config import EvalSpec, check_eval
    from train.eval.tasks import DRILL_KEYS, TASKS, TRAIN_TASKS, fixed_tokens

    assert "multikey_drill" in TRAIN_TASKS and "multikey_drill" not in TASKS and set(TASKS) < set(TRAIN_TASKS)
    base = DataConfig(image=ImageConfig(max_patches=16)).__dict__
    need = fixed_tokens("multikey_drill", TOK, ImageConfig(), 4) + 2
    src = SourceConfig(kind="synthetic", tasks=["multikey_drill"], min_len=need, max_len=need + 60, choices=4)
    check_data(DataConfig(**{**base, "sources": [src]}), 1024, 1)
    reader = SyntheticReader(src, "drill", TOK, ImageConfig(max_patches=16), 1024, seed=0, reader=0, heldout_every=20)
    for i in range(3):
        doc = reader.document(i)
        text = TOK.decode(doc.tokens[:-1].tolist())
        assert doc.key.startswith("drill/multikey_drill/") and need <= len(doc.tokens) <= need + 60
        assert text.count("One of the special magic numbers for ") == DRILL_KEYS
        assert text.count(" mentioned in the provided text is ") == DRILL_KEYS  # the other keys' lines, the question
        asked = text.rsplit("The special magic number for ", 1)[1].split(" ", 1)[0]
        value = TOK.decode(doc.tokens[doc.answer[0]:doc.answer[1]].tolist())
        assert f"One of the special magic numbers for {asked} is: {value}." in text
    with pytest.raises(ValueError, match=rf"data\.sources\[0\]\.min_len={need - 1} must lie in \[{need}, "):
        check_data(DataConfig(**{**base, "sources": [SourceConfig(**{**src.__dict__, "min_len": need - 1})]}), 1024, 1)
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.tasks=\['drill'\]: name one or more of .*drill"):
        check_data(DataConfig(**{**base, "sources": [SourceConfig(kind="synthetic", tasks=["drill"])]}), 1024, 1)
    with pytest.raises(ValueError, match=r"eval\.tasks=\['multikey_drill'\]: name one or more of"):
        check_eval(EvalSpec(tasks=["multikey_drill"], lengths=[1024]), 1024)
