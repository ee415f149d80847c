"""Each eval metric against a hand computation, and the eval's forward against the training path."""

import math

import numpy as np
import pytest
import torch

from msa.layer import AttentionConfig
from train.data.text_stream import TextStream
from train.data.tokenizer import ByteTokenizer
from train.eval.config import EvalSpec, check_eval, eval_due
from train.eval.runner import (
    bits_per_byte,
    bucket_bpb,
    buckets,
    evaluate,
    fmt_tokens,
    needle_hit,
    needle_hit_groups,
    needle_recall,
    perplexity,
    summarise,
    token_bytes,
)
from train.model import ModelConfig, build_model

TOK = ByteTokenizer()


def test_bits_per_byte_by_hand():
    # 3 targets of 1 byte with NLLs of 1, 2 and 3 bits, one special target (0 bytes) with NLL 5 bits
    nll = np.array([1.0, 2.0, 3.0, 5.0]) * math.log(2)
    nbytes = np.array([1, 1, 1, 0])
    assert bits_per_byte(nll, nbytes) == pytest.approx((1 + 2 + 3 + 5) / 3)
    assert bits_per_byte(nll[3:], nbytes[3:]) is None
    assert token_bytes(TOK)[[65, 255, TOK.eod, TOK.img_patch]].tolist() == [1, 1, 0, 0]


def test_bucketed_bits_per_byte_by_hand():
    # 2 rows of 10 positions; position i of row r has NLL (r + 1) * i bits, one byte each
    bits = np.array([[i for i in range(10)], [2 * i for i in range(10)]], dtype=float)
    out = bucket_bpb(bits * math.log(2), np.ones_like(bits), [4, 8, 16])
    assert list(out) == ["0-4", "4-8", "8-10"]
    assert out["0-4"] == pytest.approx((0 + 1 + 2 + 3) * 3 / 8)  # both rows: 6 + 12 bits over 8 bytes
    assert out["4-8"] == pytest.approx((4 + 5 + 6 + 7) * 3 / 8)
    assert out["8-10"] == pytest.approx((8 + 9) * 3 / 4)
    assert buckets(8192, [1024, 4096, 16384]) == [(0, 1024), (1024, 4096), (4096, 8192)]
    assert [fmt_tokens(n) for n in (300, 1024, 6144, 65536, 2**20)] == ["300", "1K", "6K", "64K", "1M"]


def test_accuracy_by_depth_by_hand():
    scores = [{"depth": 0.0, "choice": True, "share": 0.9, "nll": 1.0, "exact": True, "needle": 0.9},
              {"depth": 0.0, "choice": False, "share": 0.1, "nll": 3.0, "exact": False, "needle": 0.1},  # wrong
              {"depth": 1.0, "choice": True, "share": 0.4, "nll": 2.0, "exact": False, "needle": 0.5},
              {"depth": 1.0, "choice": True, "share": 0.6, "nll": 4.0, "exact": None, "needle": None}]  # not generated
    out = summarise(scores, {2: [0.5, 1.0], 3: [0.0]}, [0.0, 1.0])
    assert out["choice"] == 0.75 and out["nll"] == 2.5 and out["exact"] == pytest.approx(1 / 3)
    assert out["share"] == pytest.approx(0.5) and out["depths"]["0.0"]["share"] == pytest.approx(0.5)
    assert out["depths"]["1.0"]["share"] == pytest.approx(0.5)
    assert out["depths"]["0.0"]["choice"] == 0.5 and out["depths"]["1.0"]["choice"] == 1.0
    assert out["depths"]["1.0"]["exact"] == 0.0 and out["depths"]["1.0"]["items"] == 2
    # the needles below depth 1 only: the two at depth 0, one right
    assert out["far"]["choice"] == 0.5 and out["far"]["items"] == 2 and out["far"]["share"] == pytest.approx(0.5)
    assert summarise(scores[2:], {}, [1.0])["far"] is None  # every needle next to the question
    assert out["needle_recall"] == {"all": pytest.approx(0.5), "layers": {"2": 0.75, "3": 0.0},
                                    "correct": pytest.approx(0.7), "n_correct": 2}  # (0.9 + 0.5) / 2
    # per depth, over the items with a recall: (0.9 + 0.1) / 2 at depth 0; depth 1's second item has none
    assert out["depths"]["0.0"]["needle"] == pytest.approx(0.5) and out["depths"]["1.0"]["needle"] == 0.5
    assert out["depths"]["0.0"]["needle_hit"] is None and "hit" not in out["needle_recall"]  # not measured
    # found at the question's last token: its own per-layer lists and per-item values
    last = [{**s, "needle_hit": v} for s, v in zip(scores, [1.0, 0.0, 0.5, None])]
    got = summarise(last, {2: [0.5, 1.0], 3: [0.0]}, [0.0, 1.0], {2: [1.0, 1.0], 3: [0.25]})
    assert got["needle_recall"]["hit"] == pytest.approx(0.75) and got["needle_recall"]["hit_layers"] == {
        "2": 1.0, "3": 0.25}
    assert got["needle_recall"]["hit_correct"] == pytest.approx(0.75)  # items 1 and 3: (1.0 + 0.5) / 2
    assert got["depths"]["0.0"]["needle_hit"] == 0.5 and got["depths"]["1.0"]["needle_hit"] == 0.5
    assert "hit_groups" not in got["needle_recall"]  # not given: not reported
    # per layer and group, over items: layer 2's group 0 finds it (1.0 + 0.5) / 2, group 1 (0.5 + 0.0) / 2
    grouped = summarise(last, {2: [0.5, 1.0], 3: [0.0]}, [0.0, 1.0], {2: [0.75, 0.25], 3: [0.5]},
                        {2: [[1.0, 0.5], [0.5, 0.0]], 3: [[0.25, 0.75]]})["needle_recall"]
    assert grouped["hit_groups"] == {"2": [0.75, 0.25], "3": [0.25, 0.75]}
    assert grouped["hit_best_group"] == {"2": 0.75, "3": 0.75}
    wrong = summarise([{**s, "choice": False} for s in scores], {2: [0.5]}, [0.0, 1.0])["needle_recall"]
    assert wrong["correct"] is None and wrong["n_correct"] == 0  # nothing answered: no number, not 0


def test_needle_recall_by_hand():
    # row 0: needle tokens 10..25 with 8-token blocks -> blocks 1, 2, 3; row 1: one needle in block 0
    selected = torch.tensor([
        [[[1, 2, 7, -1], [1, 5, 6, 7]], [[3, 2, 1, 0], [-1, -1, -1, -1]]],
        [[[0, 4, 5, 6], [4, 5, 6, 7]], [[0, 1, 2, 3], [0, 9, 8, 7]]],
    ], dtype=torch.int32)  # [B=2, Hkv=2, q=2, topk=4]
    out = needle_recall(selected, [[(10, 26)], [(3, 5)]], 8)
    assert out[0] == pytest.approx((2 / 3 + 1 / 3 + 1 + 0) / 4)
    assert out[1] == pytest.approx((1 + 0 + 1 + 1) / 4)
    # found: any block of each needle; row 0 with a second needle in block 5 (tokens 40..47)
    hit = needle_hit(selected, [[(10, 26), (40, 48)], [(3, 5)]], 8)
    assert hit[0] == pytest.approx(((1 + 1 + 1 + 0) + (0 + 1 + 0 + 0)) / 8)
    assert hit[1] == pytest.approx((1 + 0 + 1 + 1) / 4)
    # per group: row 0's group 0 finds A at both queries and B at the second; group 1 finds A once, B never
    groups = needle_hit_groups(selected, [[(10, 26), (40, 48)], [(3, 5)]], 8)
    assert groups[0] == pytest.approx([3 / 4, 1 / 4]) and groups[1] == pytest.approx([1 / 2, 1.0])


def test_eval_due_and_checks():
    assert [s for s in range(10) if eval_due(4, s, 10)] == [3, 7, 9]
    assert not any(eval_due(0, s, 10) for s in range(10))
    with pytest.raises(ValueError, match=r"eval\.tasks"):
        check_eval(EvalSpec(tasks=["bpb", "needle"]), 512)
    with pytest.raises(ValueError, match=r"eval\.lengths: multikey needs"):
        check_eval(EvalSpec(tasks=["multikey"], lengths=[256]), 512, tokenizer=TOK,
                   image_cfg=__import__("train.data.config", fromlist=["ImageConfig"]).ImageConfig())
    with pytest.raises(ValueError, match=r"^depths"):
        check_eval(EvalSpec(depths=[1.5]), 512, key="")


def tiny(kind="msa"):
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, rope_dim=4)
    return build_model(cfg, AttentionConfig(kind=kind, impl="reference", block_size=16, topk=2, index_dim=8)).eval()


def test_eval_forward_matches_the_training_loss_and_recall():
    """bits per byte of one held-out row = the training path's summed LM loss over ln 2 x bytes; the
    index recall = the training forward's selection stats on the same row."""
    model = tiny()
    stream = TextStream(np.frombuffer(b"def f(x):\n    return x * 2  # twice\n" * 40, dtype=np.uint8), "t")
    spec = EvalSpec(rows=2, buckets=[64], recall_queries=64, batch_tokens=200)
    got = perplexity(model, TOK, spec, 200, stream, "sparse")
    starts = np.linspace(0, len(stream) - 201, 2).round().astype(int)
    lm, recall = 0.0, []
    for s in starts:
        ids = torch.as_tensor(stream.window(s, 201), dtype=torch.long)[None]
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(200)[None]}
        with torch.no_grad():
            out = model(batch, "sparse", stats_queries=64)
        lm += float(out["lm_sum"])
        recall.append(out["layer_stats"][0])
    assert got["bpb"] == pytest.approx(lm / math.log(2) / 400, rel=1e-5)
    assert got["index_recall"]["layers"]["1"] == pytest.approx((recall[0] + recall[1]).ratios()["index_recall"],
                                                               rel=1e-5)
    assert got["index_recall"]["oracle_layers"]["1"] == pytest.approx(
        (recall[0] + recall[1]).ratios()["oracle_recall"], rel=1e-5)
    assert got["index_recall"]["oracle_2x_layers"]["1"] == pytest.approx(
        (recall[0] + recall[1]).ratios()["oracle_recall_2x"], rel=1e-5)
    assert got["index_recall"]["tile_union"] == pytest.approx((recall[0] + recall[1]).ratios()["tile_union"],
                                                              rel=1e-9)
    assert list(got["buckets"]) == ["0-64", "64-200"]


def test_document_windows_lie_inside_one_long_enough_document():
    """Documents of 50, 300, 120 and 260 ids: windows of 201 ids go to the two documents that hold them (the
    longer first, in turn), spread over each; none where no document holds the window."""
    parts = [np.full(n, i, dtype=np.int32) for i, n in enumerate((50, 300, 120, 260))]
    stream = TextStream.from_parts(parts, "t")
    assert stream.doc_starts.tolist() == [0, 50, 350, 470] and stream.doc_lengths().tolist() == [50, 300, 120, 260]
    assert stream.document_windows(201, 1).tolist() == [50]
    # 3 windows: two in the 300-id document (its start and its end), one in the 260-id one
    assert stream.document_windows(201, 3).tolist() == [50, 50 + 99, 470]
    for count in (1, 2, 5):
        for s in stream.document_windows(201, count):
            window = stream.window(int(s), 201)
            assert len(set(window.tolist())) == 1, (count, s)  # one document's ids only
    assert stream.document_windows(301, 2).tolist() == []
    assert TextStream(np.arange(10), "one").doc_starts.tolist() == [0]  # no parts given: one document
    with pytest.raises(ValueError, match="document starts must rise from 0"):
        TextStream(np.arange(10), "bad", np.array([0, 5, 5]))


def test_shard_streams_keep_each_documents_bounds(tmp_path):
    """``eval.heldout=<shards>``: each text document of the shards (its newline after it) is one document of the
    stream, in shard order, so rows inside one document never cross two of them."""
    from tests.run_helpers import write_text_shards

    write_text_shards(tmp_path / "shards", 2, docs_per_shard=3)
    stream = TextStream.shards(str(tmp_path / "shards" / "part-{0..1}.tar"), TOK)
    text = bytes(stream.tokens.astype(np.uint8)).decode()
    docs = [f"shard {s} document {i}: {'the quick brown fox jumps over the lazy dog ' * 12}\n" for s in range(2)
            for i in range(3)]
    assert text == "".join(docs)
    assert stream.doc_starts.tolist() == np.cumsum([0, *map(len, docs[:-1])]).tolist()
    (start,) = stream.document_windows(len(docs[0]), 1)
    assert bytes(stream.window(int(start), len(docs[0])).astype(np.uint8)).decode() in docs


def test_document_windows_eval_by_hand():
    """``doc``: bits per byte and index recall on windows inside single documents equal the training path on
    the same windows; a length no document holds is skipped with the reason, and ``flatten`` writes the
    ``_doc`` keys only where windows ran."""
    from train.eval.runner import flatten

    model = tiny()
    text = b"def f(x):\n    return x * 2  # twice\n"
    parts = [np.frombuffer(text * n, dtype=np.uint8).astype(np.int32) for n in (3, 9, 2, 7)]
    stream = TextStream.from_parts(parts, "t")
    spec = EvalSpec(rows=1, doc_rows=2, buckets=[64], recall_queries=64, batch_tokens=200)
    got = perplexity(model, TOK, spec, 200, stream, "sparse")
    doc = got["doc"]
    assert doc["documents"] == 2 and doc["rows"] == 2  # 9 and 7 copies of 36 bytes hold 201 ids
    lm, recall = 0.0, None
    for s in doc["starts"]:
        d = np.searchsorted(stream.doc_starts, s, side="right") - 1
        assert s + 201 <= stream.doc_starts[d] + stream.doc_lengths()[d]
        ids = torch.as_tensor(stream.window(s, 201), dtype=torch.long)[None]
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(200)[None]}
        with torch.no_grad():
            out = model(batch, "sparse", stats_queries=64)
        lm += float(out["lm_sum"])
        recall = out["layer_stats"][0] if recall is None else recall + out["layer_stats"][0]
    assert doc["bpb"] == pytest.approx(lm / math.log(2) / 400, rel=1e-5)
    assert doc["index_recall"]["layers"]["1"] == pytest.approx(recall.ratios()["index_recall"], rel=1e-5)
    assert doc["index_recall"]["oracle"] == pytest.approx(recall.ratios()["oracle_recall"], rel=1e-5)
    results = {"seconds": 1.0, "bpb": {"200": got}, "retrieval": {}, "msa_layers": [1]}
    keys = flatten(results)
    assert keys["eval/bpb_doc/200"] == doc["bpb"] and keys["eval/index_recall_doc/200"] == doc["index_recall"]["all"]
    assert keys["eval/bpb_doc/200/64-200"] == doc["buckets"]["64-200"]
    long = perplexity(model, TOK, EvalSpec(rows=1, doc_rows=2, buckets=[64]), 400, stream, "sparse")
    assert "no document of t holds 401 tokens (the longest 324)" in long["doc"]["skipped"]
    assert not any("_doc" in k for k in flatten({**results, "bpb": {"400": long}}))
    assert "doc" not in perplexity(model, TOK, EvalSpec(rows=1, doc_rows=0, buckets=[64]), 200, stream, "sparse")


def test_exact_match_reads_an_answer_that_ends_the_document(monkeypatch):
    """Greedy exact match through the runner: a model that writes the answer and then the end-of-document id
    (what the synthetic training documents teach) scores 1, one that writes a wrong answer 0."""
    from dataclasses import replace

    from train.eval import runner
    from train.eval.tasks import eval_item
    from train.generate import Completion

    monkeypatch.setattr(runner, "eval_item", lambda *a, **k: replace(eval_item(*a, **k), answer="7"))
    stream = TextStream(np.frombuffer(b"def f(x):\n    return x * 2  # twice\n" * 40, dtype=np.uint8), "t")
    spec = EvalSpec(tasks=["passkey"], depths=[0.0, 1.0], items=2, generate=True)
    for written, want in ((b"7", 1.0), (b"8", 0.0), (b" 7.\nmore", 1.0)):
        ids = [*written, TOK.eod]
        monkeypatch.setattr(runner, "decode", lambda model, cache, hidden, *a, ids=ids, **k: [
            Completion(list(ids)) for _ in range(hidden.shape[0])])
        got = runner.retrieval(tiny(), TOK, spec, "passkey", 256, stream, "sparse", None)
        assert got["exact"] == want, (written, got)
    assert runner.generated_text(TOK, [*b"52586", TOK.eod]) == "52586"
    assert runner.generated_text(TOK, [*b"52586"]) == "52586"  # the step budget ran out first


def test_eval_rope_by_hand():
    """eval.rope_base / eval.rope_scaling: each replaces the model's and keeps the other; factor auto is the
    length over the training length (1 up to it), original_max_len defaults to the training length."""
    from msa.rope import RopeScaling
    from train.eval.config import eval_rope

    model_rope = (1e4, RopeScaling(type="linear", factor=2.0))
    assert eval_rope(EvalSpec(), model_rope, 512, 256) == model_rope
    assert eval_rope(EvalSpec(rope_base=5e5), model_rope, 512, 256) == (5e5, model_rope[1])
    auto = EvalSpec(rope_scaling={"type": "yarn", "factor": "auto"})
    for length, factor in ((128, 1.0), (256, 1.0), (1024, 4.0), (640, 2.5)):
        base, s = eval_rope(auto, model_rope, length, 256)
        assert (base, s.type, s.factor, s.original_max_len) == (1e4, "yarn", factor, 256), length
    _, s = eval_rope(EvalSpec(rope_scaling={"type": "yarn", "factor": "auto", "original_max_len": 100}), model_rope,
                     1024, 256)
    assert (s.factor, s.original_max_len) == (4.0, 100)
    for bad, match in (({"type": "yarn", "factr": 2}, r"eval\.rope_scaling=.*give a dict of"),
                       ({"type": "yarn", "factor": 2}, r"eval\.rope_scaling\.original_max_len must be set"),
                       ({"type": "linear", "factor": "big"}, r"eval\.rope_scaling\.factor='big': give a number"),
                       ({"type": "warp"}, r"eval\.rope_scaling\.type='warp'")):
        with pytest.raises(ValueError, match=match):
            check_eval(EvalSpec(rope_scaling=bad), 256)
    with pytest.raises(ValueError, match=r"eval\.rope_base=-1\.0 must be > 0"):
        check_eval(EvalSpec(rope_base=-1.0), 256)
    with pytest.raises(ValueError, match=r"rope_scaling\.factor=auto needs an eval length"):
        eval_rope(auto, model_rope, None, None)


def test_evals_run_each_length_with_its_rope_and_restore_the_models():
    """With factor auto, the eval at 2x the training length is the eval of the model with YaRN x2 set by
    hand, the one at 1x that of the plain model; afterwards the model has its own RoPE back."""
    from msa.rope import RopeScaling
    from train.eval.runner import heldout_stream

    model = tiny()
    spec = EvalSpec(tasks=["bpb"], lengths=[128, 256], rows=2, buckets=[64],
                    rope_scaling={"type": "yarn", "factor": "auto"})
    got = evaluate(model, TOK, spec, train_len=128, phase="sparse", image_cfg=None, heldout_every=20)
    stream = heldout_stream(spec.heldout, TOK, 20)
    assert (model.rope_base, model.rope_scaling) == (10000.0, RopeScaling())
    assert got["rope"]["256"]["scaling"]["factor"] == 2.0 and got["rope"]["128"]["scaling"]["factor"] == 1.0
    plain = EvalSpec(tasks=["bpb"], rows=2, buckets=[64])
    assert got["bpb"]["128"]["bpb"] == pytest.approx(perplexity(model, TOK, plain, 128, stream, "sparse")["bpb"],
                                                     rel=1e-6)
    no_scaling = perplexity(model, TOK, plain, 256, stream, "sparse")["bpb"]
    model.set_rope(10000.0, RopeScaling(type="yarn", factor=2.0, original_max_len=128))
    by_hand = perplexity(model, TOK, plain, 256, stream, "sparse")["bpb"]
    assert got["bpb"]["256"]["bpb"] == pytest.approx(by_hand, rel=1e-6)
    assert abs(by_hand - no_scaling) > 1e-4  # YaRN changed the eval at 2x
