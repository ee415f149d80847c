"""Hugging Face import and export (train/hf.py, train/convert.py) against transformers itself, on tiny
random checkpoints built here with transformers' own classes and ``save_pretrained`` (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msa.layer import AttentionConfig

transformers = pytest.importorskip("transformers")

VOCAB = 320  # above the tokenizers' 300 ids + 3 image markers, as checkpoints pad their vocabulary
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"attention_bias": True, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", {"sliding_window": 7, "max_position_embeddings": 24,
                                  "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1,
                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen3": ("Qwen3Config", {}),
    "qwen3-tied": ("Qwen3Config", {"tie_word_embeddings": True, "rope_theta": 1e6, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
}
CORPUS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]


def make_tokenizer(directory: Path, bos: bool):
    """A byte-level BPE of 300 ids trained here: Llama-style (``<s>`` BOS added to every text, ``</s>``
    EOS) or Qwen-style (no BOS, ``<|endoftext|>`` EOS and pad, chat markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"] if bos else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        kw = {"bos_token": "<s>", "eos_token": "</s>"}
    else:
        kw = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(str(directory))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that a mistake shows in the logits (transformers' init gives logits near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.2 * noise)


def make_checkpoint(directory: Path, family: str, vocab: int = VOCAB, seed: int = 0, **save_kw) -> Path:
    cls, extra = FAMILIES[family]
    kw = {**SHAPE, "vocab_size": vocab, **extra}
    if "rope_theta" in kw or "rope_scaling" in kw:  # the config form transformers 5 writes
        kw["rope_parameters"] = {"rope_theta": kw.pop("rope_theta", 1e4), **kw.pop("rope_scaling", {})}
    config = getattr(transformers, cls)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model.save_pretrained(str(directory), **save_kw)
    make_tokenizer(directory, bos=family.startswith(("llama", "mistral")))
    return directory


def load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             local_files_only=True).eval()


def import_model(path: Path, attn: AttentionConfig | None = None):
    from train.data.tokenizer import PretrainedTokenizer
    from train.hf import load_weights, resolve_model_config
    from train.model import ModelConfig, build_model

    tokenizer = PretrainedTokenizer(str(path))
    cfg = resolve_model_config(ModelConfig(path=str(path)), tokenizer.vocab_size)
    model = build_model(cfg, attn or AttentionConfig(block_size=8, topk=2, index_dim=16))
    load_weights(model, path)
    return model.eval(), tokenizer


def packed_inputs(n: int = 40, cut: int = 15, vocab: int = 300, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, n), generator=gen)
    pos = torch.cat([torch.arange(cut), torch.arange(n - cut)])[None]
    return ids, pos, torch.tensor([0, cut, n], dtype=torch.int32)


def assert_logits_match(model, hf_model) -> None:
    from train.hf import hf_logits, our_logits

    ids, pos, cu = packed_inputs()
    for args, hf_args in (((ids,), (ids,)), ((ids, pos, cu), (ids, pos))):
        ours, theirs = our_logits(model, *args), hf_logits(hf_model, *hf_args)
        assert theirs.abs().max() > 1.0  # a real signal, not logits near zero
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-5, f"max |logit difference| {err:.3g} (packed={len(args) > 1})"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_checkpoint(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_round_trip(family, checkpoints, tmp_path):
    """Our logits equal transformers' (packed and unpacked); the export loads in transformers with the
    same logits; every original tensor comes back bitwise; the index weights and settings are there."""
    from safetensors.torch import load_file

    from train.hf import write_hf

    path = checkpoints[family]
    model, tokenizer = import_model(path)
    hf_model = load_hf(path)
    assert type(hf_model).__name__ == FAMILIES[family][0].replace("Config", "ForCausalLM")
    assert_logits_match(model, hf_model)
    # the exported directory, as to-hf writes it (the run's last stage keeps the checkpoint's RoPE)
    out = write_hf(model, model.state_dict(), path, tmp_path / "out", (model.rope_base, model.rope_scaling),
                   torch.float32, tokenizer)
    again = load_hf(out)
    assert type(again) is type(hf_model)
    assert_logits_match(model, again)
    before, after = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == again.config.rope_parameters
    meta = json.loads((out / "msa_config.json").read_text())
    index = load_file(str(out / "msa_index.safetensors"))
    assert meta["msa_layers"] == model.msa_layers() and meta["block_size"] == 8 and meta["topk"] == 2
    for i in model.msa_layers():
        assert torch.equal(index[f"model.layers.{i}.self_attn.indexer.q_proj.weight"],
                           model.layers[i].attn.wq_idx.weight)


def test_families_map_their_options(checkpoints):
    """What each family's config turns into: biases, QK-norm, sliding layers (kept dense), RoPE, tying."""
    from train.hf import model_fields, read_hf_config

    f = {name: model_fields(read_hf_config(path)) for name, path in checkpoints.items()}
    assert (f["qwen2"]["qkv_bias"], f["qwen2"]["out_bias"], f["qwen2"]["qk_norm"]) == (True, False, False)
    assert (f["llama3-rope"]["qkv_bias"], f["llama3-rope"]["out_bias"]) == (True, True)
    assert f["qwen3"]["qk_norm"] and not f["llama"]["qk_norm"]
    assert (f["mistral"]["sliding_window"], f["mistral"]["sliding_layers"]) == (7, None)
    assert (f["qwen2"]["sliding_window"], f["qwen2"]["sliding_layers"]) == (9, [1, 2])
    assert f["qwen3-tied"]["tie_embeddings"] and f["qwen3-tied"]["rope_scaling"].type == "yarn"
    assert f["llama3-rope"]["rope_scaling"].original_max_len == 16 and f["llama3-rope"]["rope_base"] == 5e5
    model, _ = import_model(checkpoints["qwen2"], AttentionConfig(block_size=8, topk=2, index_dim=16,
                                                                 n_dense_layers=0))
    assert model.msa_layers() == [0]  # layers 1 and 2 slide: they stay dense, windowed


def test_tokenizer_as_the_checkpoint_expects(checkpoints):
    """BOS where the checkpoint's tokenizer adds one, its EOS ends documents, chat markers in text are
    single ids, and the image markers are new special ids below the checkpoint's padded vocabulary."""
    from train.data.tokenizer import PretrainedTokenizer

    llama, qwen = PretrainedTokenizer(str(checkpoints["llama"])), PretrainedTokenizer(str(checkpoints["qwen3"]))
    assert llama.doc_prefix == [0] and qwen.doc_prefix == []
    assert (llama.eod, qwen.eod, qwen.pad) == (1, 0, 0) and llama.pad == llama.eod
    assert qwen.encode("<|im_start|>user hi<|im_end|>")[0] == 1 and qwen.encode("x<|im_end|>")[-1] == 2
    assert [qwen.img_start, qwen.img_end, qwen.img_patch] == [300, 301, 302] and qwen.vocab_size == 303
    assert qwen.decode(qwen.encode("the fox <img>")) == "the fox <img>"


def test_sharded_checkpoint_with_index_loads(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", "qwen3", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file(), shards
    model, _ = import_model(path)
    assert_logits_match(model, load_hf(path))


def test_vocabulary_grows_for_the_image_markers(tmp_path):
    """A checkpoint whose vocabulary is exactly its tokenizer's: the three markers get new rows (the
    mean of the checkpoint's rows, in the embedding and the untied head); the old rows' logits stay."""
    path = make_checkpoint(tmp_path / "exact", "llama", vocab=300)
    model, tokenizer = import_model(path)
    assert model.cfg.vocab_size == tokenizer.vocab_size == 303
    hf_model = load_hf(path)
    for table, hf_table in ((model.embed.weight, hf_model.model.embed_tokens.weight),
                            (model.lm_head.weight, hf_model.lm_head.weight)):
        assert torch.equal(table[:300], hf_table)
        assert torch.allclose(table[300:], hf_table.mean(0, keepdim=True).expand(3, -1))
    from train.hf import hf_logits, our_logits

    ids = packed_inputs()[0]
    assert (our_logits(model, ids)[..., :300] - hf_logits(hf_model, ids)).abs().max() <= 1e-5


def _edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("change, message", [
    ({"num_local_experts": 4, "num_experts_per_tok": 2}, "mixture of experts"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_unsupported_feature_is_named(change, message, checkpoints, tmp_path):
    import shutil

    from train.hf import resolve_model_config
    from train.model import ModelConfig

    path = _edit_config(Path(shutil.copytree(checkpoints["llama"], tmp_path / "ckpt")), **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_model_config(ModelConfig(path=str(path)), 0)


def test_hugging_face_kernels_package_is_named_before_transformers_fails(checkpoints, monkeypatch):
    """transformers >= 5.25 installs Hugging Face's `kernels`, whose import name is our kernels/'s:
    transformers would then import ours and fail deep inside; the import stops first and names the fix."""
    import importlib.metadata

    from train import hf

    real = importlib.metadata.version
    monkeypatch.setattr(hf.importlib.metadata, "version",
                        lambda name: "0.19.1" if name == "kernels" else real(name))
    with pytest.raises(ImportError, match=r"`kernels` package \(0.19.1\).*pip uninstall kernels"):
        hf.read_hf_config(checkpoints["qwen3"])
    monkeypatch.setattr(hf.importlib.metadata, "version", real)
    assert hf.hub_kernels_clash() is None  # this environment: none installed


def test_pickle_weights_are_refused(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from train.hf import weight_files

    path = Path(shutil.copytree(checkpoints["llama"], tmp_path / "ckpt"))
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors only"):
        weight_files(path)


def _text_batch(vocab: int, n: int = 48, cut: int = 20):
    ids, pos, cu = packed_inputs(n, cut, vocab)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    labels[0, cut - 1] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def test_converted_model_warmup_is_the_dense_model_and_index_learns_only_from_the_kl(checkpoints):
    """At step 0 of the warm-up a converted model computes exactly what the imported dense model does;
    the LM loss reaches no index weight, the KL reaches nothing but the index weights."""
    attn = AttentionConfig(block_size=8, topk=2, index_dim=16)
    msa, _ = import_model(checkpoints["qwen3"], attn)
    dense, _ = import_model(checkpoints["qwen3"], AttentionConfig(kind="dense"))
    batch = _text_batch(300)
    out, ref = msa(batch, phase="warmup"), dense(batch, phase="warmup")
    assert torch.equal(out["lm_sum"], ref["lm_sum"]) and out["kl"] > 0
    index = [p for i in msa.msa_layers() for p in msa.layers[i].attn.index_params()]
    main = [p for n, p in msa.named_parameters() if "_idx" not in n and not n.startswith("vision.")]
    assert all(g is None for g in torch.autograd.grad(out["lm_sum"], index, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(out["kl"], main, retain_graph=True, allow_unused=True))
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(out["kl"], index))


def test_hf_config_composes_and_checks(checkpoints):
    """model=hf recipe=msa_cpt composes (the tokenizer follows model.path), its stages resolve (frozen
    warm-up, YaRN in the last stage), and settings that cannot work name their key."""
    from tests.utils import compose_train_config
    from train.config import check_config
    from train.hf import resolve_model_config
    from train.recipe import build_recipe

    path = str(checkpoints["llama"])
    cfg = compose_train_config(["model=hf", f"model.path={path}", "recipe=msa_cpt"])
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.path) == ("pretrained", path)
    stages = build_recipe(cfg)
    assert [s.freeze_main for s in stages] == [True, False, False, False]
    assert stages[-1].rope_scaling.type == "yarn" and stages[0].rope_scaling.type == "none"
    model = resolve_model_config(cfg.model, 303)
    assert (model.dim, model.n_layers, model.vocab_size, model.qk_norm) == (64, 3, 320, False)
    with pytest.raises(ValueError, match=r"model\.dim=256"):
        resolve_model_config(compose_train_config(["model=hf", f"model.path={path}", "model.dim=256"]).model, 0)
    dense = compose_train_config(["model=hf", f"model.path={path}", "recipe=msa_cpt", "attention=dense"])
    dense.model = model
    with pytest.raises(ValueError, match=r"recipe\.freeze_main_in_warmup"):
        check_config(dense, build_recipe(dense)[0], 1, 303)
    sliding = compose_train_config(["model=hf", f"model.path={checkpoints['qwen2']}", "recipe=msa_cpt"])
    sliding.model = resolve_model_config(sliding.model, 303)  # layer 0 dense, layers 1-2 slide: no MSA layer
    with pytest.raises(ValueError, match=r"recipe\.freeze_main_in_warmup.*sliding-window layers stay dense"):
        check_config(sliding, build_recipe(sliding)[0], 1, 303)
    stage = "recipe.stages=[{steps:60,rope_scaling:{type:dynamic,factor:2.0,original_max_len:64}}]"
    dyn = compose_train_config(["model=hf", f"model.path={path}", "parallel.sp_size=2", stage])
    dyn.model = model
    with pytest.raises(ValueError, match=r"recipe\.stages\[0\]\.rope_scaling\.type=dynamic"):
        check_config(dyn, build_recipe(dyn)[0], 2, 303)


def test_convert_commands_in_the_docs_compose():
    """Every `python -m train.convert <command> ...` in docs/hf.md composes against that command's Hydra
    config into its typed config (unknown keys, wrong types and missing required keys fail)."""
    from hydra import compose, initialize
    from omegaconf import OmegaConf

    from tests.test_docs_commands import ROOT, extract_commands, invocations
    from train.convert import COMMANDS, register

    found = [(cmd, inv) for cmd, inv in invocations(extract_commands("docs/hf.md", (ROOT / "docs/hf.md").read_text()))
             if inv.kind == "module" and inv.module == "train.convert"]
    assert {inv.args[0] for _, inv in found} == set(COMMANDS), found
    register()
    for cmd, inv in found:
        name, node, _ = COMMANDS[inv.args[0]]
        try:
            with initialize(version_base="1.3", config_path=None):
                conf = compose(config_name=name, overrides=inv.args[1:])
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(node), conf))
        except Exception as e:
            raise AssertionError(f"{cmd.where}: `{cmd.text}` does not compose: {e}") from e


@pytest.mark.parametrize("nq, cu", [(700, None), (300, [0, 250, 640, 700])])
def test_sliding_window_attention_in_chunks(nq, cu):
    """Windowed SDPA in query chunks (a 700-key row with window 100 takes three) against one explicit
    mask, for packed documents and for queries that are the last Nq keys (a context-parallel chunk)."""
    from msa.dense import dense_attention

    N, W = 700, 100
    q, k, v = torch.randn(1, nq, 4, 16), torch.randn(1, N, 2, 16), torch.randn(1, N, 2, 16)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = dense_attention(q, k, v, cu_t, window=W)
    i, j = torch.arange(N - nq, N)[:, None], torch.arange(N)[None, :]
    doc = torch.zeros(N, dtype=torch.long) if cu is None else torch.bucketize(torch.arange(N), cu_t[1:], right=True)
    mask = (j <= i) & (i - j < W) & (doc[i] == doc[j])
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5


def test_from_hf_preflight(checkpoints, tmp_path):
    """`python -m train.convert from-hf`'s work: the import, its parity with transformers, the report."""
    from train.convert import FromHFConfig, from_hf

    report = from_hf(FromHFConfig(path=str(checkpoints["qwen2"]), out=str(tmp_path),
                                  attention=AttentionConfig(block_size=8, topk=2, index_dim=16)))
    saved = json.loads((tmp_path / "import_report.json").read_text())
    assert saved["parity"] == report["parity"] and report["parity"]["max_abs_diff"] <= 1e-5
    assert saved["msa_layers"] == [] and saved["model"]["sliding_layers"] == [1, 2]  # layer 0 dense, 1-2 slide
    assert saved["tokenizer"]["img_start"] == 300 and saved["vocab_grown_by"] == 0
