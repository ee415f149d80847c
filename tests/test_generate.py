"""Cached generation (train/generate.py) against the full forward, sampling, and the batch of prompts."""

import numpy as np
import pytest
import torch

from msa.layer import AttentionConfig
from train.data.tokenizer import ByteTokenizer
from train.generate import KVCache, Prompt, extend, generate, logits_of, prompt_batch, sample
from train.model import ModelConfig, build_model

TOK = ByteTokenizer()
PATCH = 8  # small image patches keep the vision projection cheap


def tiny_model(kind: str):
    from train.vision import VisionConfig

    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      rope_dim=8, vision=VisionConfig(patch_size=PATCH))
    attn = AttentionConfig(kind=kind, impl="reference", block_size=8, topk=3, index_dim=16, n_dense_layers=1)
    torch.manual_seed(0)
    return build_model(cfg, attn).eval()


def prompt(n: int, seed: int, image_at: int | None = None) -> Prompt:
    rng = np.random.default_rng(seed)
    ids = rng.integers(32, 127, size=n).astype(np.int32)
    images = []
    if image_at is not None:  # <img>, 6 patches of a 2x3 grid, </img>
        ids[image_at], ids[image_at + 1:image_at + 7], ids[image_at + 7] = TOK.img_start, TOK.img_patch, TOK.img_end
        images.append((image_at + 1, rng.integers(0, 256, size=(6, 3 * PATCH * PATCH), dtype=np.uint8), (2, 3)))
    return Prompt(ids, images)


def full_logits(model, p: Prompt, generated: list[int], phase: str) -> torch.Tensor:
    """Logits at every position of prompt + generated ids from one forward of the training path."""
    batch = prompt_batch([Prompt(np.concatenate([p.ids, generated]).astype(np.int32), p.images)], "cpu", 3 * PATCH ** 2)
    hidden, _, _ = model.hidden_states(batch, phase)
    return logits_of(model, hidden[0])


@pytest.mark.parametrize("kind,phase", [("dense", "sparse"), ("msa", "sparse"), ("msa", "warmup")])
def test_cached_decoding_equals_full_forward(kind, phase):
    """Every step's logits from the cache equal the full forward's at that position, with and without an
    image in the prompt; the sequences pass 8 blocks of 8 with topk 3, so MSA really selects."""
    model = tiny_model(kind)
    prompts = [prompt(30, 1, image_at=4), prompt(30, 2), prompt(22, 3, image_at=10)]
    out = generate(model, prompts, 24, phase=phase, keep_logits=True)
    for p, c in zip(prompts, out):
        assert len(c.ids) == 24
        full = full_logits(model, p, c.ids[:-1], phase)[len(p.ids) - 1:]
        err = (full - c.logits).abs().max().item()
        assert err < 1e-4, (kind, phase, err)
        assert c.ids == full.argmax(-1).tolist()  # greedy: each id is the full forward's argmax


@pytest.mark.parametrize("phase", ["sparse", "warmup"])
def test_generation_skips_the_index_kl(monkeypatch, phase):
    """Prefill and decode steps never compute the index distillation loss (nothing reads it there; its
    teacher pass costs about what the attention does), while the training forward still does."""
    import msa.chunked_reference as ops

    model, calls, real = tiny_model("msa"), [], ops.index_kl_loss
    monkeypatch.setattr(ops, "index_kl_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    generate(model, [prompt(30, 1), prompt(30, 2)], 4, phase=phase)
    assert calls == []
    _, _, (kl, _, _) = model.hidden_states(prompt_batch([prompt(30, 1)], "cpu", 3 * PATCH ** 2), phase)
    assert len(calls) == 1 and float(kl.detach()) > 0  # one MSA layer of two


def test_extend_in_chunks_equals_one_prefill():
    """A prompt fed in three pieces leaves the same last hidden state and cache as one prefill."""
    model = tiny_model("msa")
    p = prompt(45, 4, image_at=3)
    one = KVCache(model, 1, 45)
    h_one = extend(model, one, prompt_batch([p], "cpu", 3 * PATCH ** 2)).hidden
    pieces = KVCache(model, 1, 45)
    batch = prompt_batch([p], "cpu", 3 * PATCH ** 2)
    extend(model, pieces, {k: v for k, v in batch.items() if not k.startswith("image")} | {
        "input_ids": batch["input_ids"][:, :20]} | {k: batch[k] for k in ("image_patches", "image_sizes")} | {
        "image_slots": batch["image_slots"]})
    extend(model, pieces, {"input_ids": batch["input_ids"][:, 20:37]})
    h = extend(model, pieces, {"input_ids": batch["input_ids"][:, 37:]}).hidden
    torch.testing.assert_close(h[:, -1], h_one[:, -1], atol=1e-5, rtol=1e-5)
    for a, b in zip(one.k_idx[1:], pieces.k_idx[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4000)
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, temperature=1.0, top_p=0.7, generator=g)
    p = torch.softmax(logits[0], -1)  # 0.644, 0.237, ...: the nucleus of 0.7 is the first two ids
    assert set(ids.tolist()) == {0, 1}
    share = (ids == 0).float().mean().item()
    expected = (p[0] / (p[0] + p[1])).item()
    assert abs(share - expected) < 4 * (expected * (1 - expected) / len(ids)) ** 0.5
    again = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    assert sample(logits[:1], temperature=0.0).item() == 0


def test_batch_of_prompts_keeps_order_and_stops():
    """Prompts of different lengths run in groups; each completion is its own prompt's, as run alone,
    and stops after a stop id."""
    model = tiny_model("msa")
    prompts = [prompt(20, 5), prompt(33, 6), prompt(20, 7)]
    together = generate(model, prompts, 12, temperature=0.8, top_p=0.9, seed=3)
    alone = [generate(model, [p], 12)[0].ids for p in prompts]
    greedy = generate(model, prompts, 12)
    assert [c.ids for c in greedy] == alone
    assert all(len(c.ids) == 12 for c in together)
    stop = greedy[1].ids[4]
    stopped = generate(model, prompts[1:2], 12, stop_ids=(stop,))[0].ids
    assert stopped == greedy[1].ids[:greedy[1].ids.index(stop) + 1]


def test_eval_rope_overrides_replace_the_checkpoints():
    """``rope_base=`` and ``rope_scaling=`` of train.eval / train.generate (as Hydra composes them) replace
    the checkpoint's RoPE, each alone keeping the other; a bad scaling names the key to fix."""
    from tests.test_eval_docs import compose
    from train.generate import set_eval_rope

    model = tiny_model("msa")
    base = model.rope_base
    for module in ("train.eval", "train.generate"):
        cfg = compose(module, ["checkpoint=x", "rope_scaling={type:yarn,factor:4,original_max_len:32}"])
        set_eval_rope(model, cfg.rope_base, cfg.rope_scaling)
        s = model.rope_scaling
        assert (model.rope_base, s.type, s.factor, s.original_max_len) == (base, "yarn", 4.0, 32), module
    set_eval_rope(model, 5e5, None)
    assert (model.rope_base, model.rope_scaling.type) == (5e5, "yarn")
    # the new frequencies reach the forward: another RoPE, other logits
    batch = prompt_batch([prompt(30, 1)], "cpu", 3 * PATCH ** 2)
    before = model.hidden_states(batch, "sparse")[0]
    set_eval_rope(model, None, {"type": "none"})
    assert model.rope_scaling.type == "none" and not torch.allclose(before, model.hidden_states(batch, "sparse")[0])
    with pytest.raises(ValueError, match=r"rope_scaling=.*give a dict of .*original_max_len"):
        set_eval_rope(model, None, {"type": "yarn", "factr": 4})
    with pytest.raises(ValueError, match=r"rope_scaling\.original_max_len must be set"):
        set_eval_rope(model, None, {"type": "yarn", "factor": 4})
