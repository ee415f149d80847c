"""The decoder: chunked cross-entropy, image slots, gradients every data-parallel rank agrees on."""

import pytest
import torch
import torch.nn.functional as F

from msa.layer import AttentionConfig
from train.model import ModelConfig, build_model, chunked_cross_entropy
from train.vision import VisionConfig


def _model(**kw):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, rope_dim=4,
                      vision=VisionConfig(kind="linear", patch_size=2), **kw)
    return build_model(cfg, AttentionConfig(impl="reference", block_size=8, topk=2, index_dim=8))


def _batch(N=24, patches=0):
    ids = torch.randint(0, 60, (2, N))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(N).expand(2, N),
             "cu_seqlens": torch.tensor([0, N, 2 * N], dtype=torch.int32),
             "image_patches": torch.randn(patches, 12), "image_slots": torch.arange(3, 3 + patches),
             "image_sizes": torch.tensor([[1, patches]]) if patches else torch.zeros(0, 2, dtype=torch.long)}
    if patches:
        labels[0, 2:3 + patches] = -100
    return batch


def test_chunked_cross_entropy_equals_full():
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (50,))
    labels[::7] = -100
    labels[8:16] = -100  # a chunk with no target
    chunked = chunked_cross_entropy(h, w, labels, chunk=8)
    full = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    assert torch.allclose(chunked, full, rtol=1e-5)
    g_chunked = torch.autograd.grad(chunked, (h, w))
    g_full = torch.autograd.grad(full, (h, w))
    for a, b in zip(g_chunked, g_full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cross_entropy_by_source_is_each_sources_share():
    """With ``groups`` the total and its gradients are unchanged, and each group's sum is the hand-computed
    cross-entropy over its own targets (-1 and ignored targets in none)."""
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (50,))
    labels[::7] = -100
    labels[8:16] = -100  # a chunk with no target
    groups = torch.randint(-1, 3, (50,))
    total, sums = chunked_cross_entropy(h, w, labels, chunk=8, groups=groups, n_groups=4)
    per_token = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="none")
    full = per_token.sum()
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)
    expected = torch.stack([per_token[(groups == g) & (labels != -100)].sum() for g in range(4)])
    torch.testing.assert_close(sums, expected.detach(), rtol=1e-5, atol=1e-5)
    assert sums[3] == 0 and not sums.requires_grad
    for a, b in zip(torch.autograd.grad(total, (h, w)), torch.autograd.grad(full, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_decoder_reports_the_loss_of_each_group():
    """A batch with ``loss_groups`` (the loader's, with several data sources) gives each group's LM sum and
    target count; they add up to the totals where every target has a group, and equal the plain forward's."""
    torch.manual_seed(0)
    model = _model()
    batch = _batch(patches=4)
    plain = model(batch)
    sources = torch.zeros_like(batch["labels"])
    sources[0, 12:], sources[1] = 2, 1
    out = model({**batch, "loss_groups": sources, "n_loss_groups": 3})
    torch.testing.assert_close(out["lm_sum"], plain["lm_sum"], rtol=1e-5, atol=1e-5)
    targets = batch["labels"] != -100
    assert out["group_n_tokens"].tolist() == [int(targets[sources == s].sum()) for s in range(3)]
    torch.testing.assert_close(out["group_lm_sum"].sum(), plain["lm_sum"].detach(), rtol=1e-5, atol=1e-5)
    row1 = {k: v[1:] for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    row1 |= {"cu_seqlens": torch.tensor([0, 24], dtype=torch.int32), "image_patches": torch.zeros(0, 12),
             "image_slots": torch.zeros(0, dtype=torch.long), "image_sizes": torch.zeros(0, 2, dtype=torch.long)}
    alone = model(row1)  # group 1 is row 1: its sum is that row's own loss (documents never see each other)
    torch.testing.assert_close(out["group_lm_sum"][1], alone["lm_sum"].detach(), rtol=1e-5, atol=1e-5)


def test_image_patches_replace_their_slots():
    model = _model()
    batch = _batch(patches=4)
    x = model.embed_inputs(batch)
    expected = model.vision(batch["image_patches"], batch["image_sizes"])
    assert torch.allclose(x.reshape(-1, 32)[3:7], expected)
    assert torch.allclose(x.reshape(-1, 32)[7:], model.embed(batch["input_ids"]).reshape(-1, 32)[7:])


def test_every_parameter_gets_a_gradient_without_images():
    """A data-parallel rank whose batch has no image must still reduce the vision gradients (as zeros),
    or ranks disagree on what to reduce (seen as a gloo collective mismatch with 2 ranks)."""
    model = _model()
    out = model(_batch(patches=0), phase="sparse")
    (out["lm_sum"] / out["n_tokens"] + out["kl"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(p.grad.abs().sum() == 0 for p in model.vision.parameters())


def test_loss_counts_only_text_targets():
    model = _model()
    batch = _batch(patches=4)
    out = model(batch)
    assert int(out["n_tokens"]) == int((batch["labels"] != -100).sum())


def test_initial_weights_depend_on_the_seed_and_the_name_only():
    """Each weight is drawn from its seed and name: a dense and an MSA model of one seed start from the same
    shared weights, so in the dense warm-up (the index branch reads detached inputs) they compute the same
    LM loss (the quality run's arms are paired); another seed gives other weights; the scales are
    ``init_std`` and ``init_std / sqrt(2 L)`` for the residual outputs; biases start at zero."""
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, rope_dim=4,
               vision=VisionConfig(kind="linear", patch_size=2))

    def build(kind, seed, **kw):
        torch.manual_seed(seed)
        return build_model(ModelConfig(**cfg, **kw), AttentionConfig(kind=kind, impl="reference", block_size=8,
                                                                     topk=2, index_dim=8, n_dense_layers=0))

    dense, msa = build("dense", 0), build("msa", 0)
    d, m = dict(dense.named_parameters()), dict(msa.named_parameters())
    assert set(d) < set(m) and all(torch.equal(d[n], m[n]) for n in d)
    batch = _batch(N=40)
    torch.testing.assert_close(msa(batch, phase="warmup")["lm_sum"], dense(batch, phase="warmup")["lm_sum"])
    other = dict(build("dense", 1).named_parameters())
    assert not any(torch.equal(d[n], other[n]) for n in d if d[n].ndim == 2)
    assert abs(d["layers.0.attn.wq.weight"].std().item() / 0.02 - 1) < 0.1
    assert abs(d["layers.0.mlp.w_down.weight"].std().item() / (0.02 / 2) - 1) < 0.1  # 1 / sqrt(2 * 2 layers)
    biased = dict(build("dense", 0, qkv_bias=True).named_parameters())
    assert biased["layers.1.attn.wq.bias"].abs().sum() == 0
    assert torch.equal(biased["layers.1.attn.wq.weight"], d["layers.1.attn.wq.weight"])


@pytest.mark.gpu
def test_loss_and_rotary_tables_never_wait_for_the_gpu():
    """The chunked loss (with and without source groups, a chunk with no target included) forward and backward, and
    the rotary tables, run with no host-GPU synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises at
    one): each was a sync a step (four chunks' ``any()``, the groups' boolean index, the frequencies' copy), which
    stalls a host-bound short-row step (docs/scaling.md 3v)."""
    from msa.rope import Rotary

    h = torch.randn(64, 16, device="cuda", requires_grad=True)
    w = torch.randn(30, 16, device="cuda", requires_grad=True)
    labels = torch.randint(0, 30, (64,), device="cuda")
    labels[8:16] = -100
    groups = torch.randint(-1, 3, (64,), device="cuda")
    positions = torch.arange(64, device="cuda")[None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plain = chunked_cross_entropy(h, w, labels, chunk=8)
        total, sums = chunked_cross_entropy(h, w, labels, chunk=8, groups=groups, n_groups=4)
        grads = torch.autograd.grad(plain + total, (h, w))
        cos, sin = Rotary(positions, 1e4).build(32)._tables[32]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(plain, total)
    assert all(torch.isfinite(g).all() for g in grads) and cos.shape[-1] == 16 and sin.is_cuda
