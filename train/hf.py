"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 decoders.

Import (``model=hf model.path=DIR``): ``resolve_model_config`` reads the checkpoint's config.json
(through ``transformers.AutoConfig``, local files only) into ``model.*`` options of our one decoder
(GQA, RMSNorm eps, SwiGLU width, QKV/output biases, QK-norm, RoPE base and scaling, tied embeddings,
sliding-window layers); a feature it cannot express (MoE, an unknown rope type, another activation...)
fails at start with a message that names it. ``load_weights`` copies the checkpoint's tensors, read
from safetensors only (a pickle can run code), into the decoder; what the checkpoint lacks keeps its
fresh initialisation: the MSA index branch, the vision embedding, and embedding rows for tokens our
data pipeline adds (the image markers), which start at the mean of the checkpoint's rows.

Export (``write_hf``): the main weights under transformers' names with a config.json of the original
architecture, the tokenizer (with the added markers), and beside them ``msa_index.safetensors``,
``vision_embed.safetensors`` and ``msa_config.json`` (docs/hf.md describes them).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from msa.rope import RopeScaling
from train.model import Decoder, ModelConfig, sliding_layers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# keys that only a mixture-of-experts (or other block we do not have) config carries
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_LAYER = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
          "attn.wo": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
          "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "mlp.w_gate": "mlp.gate_proj",
          "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
# the index branch, named as transformers' minimax_m3_vl names its indexer (docs/hf.md: what differs)
_INDEX = {"attn.wq_idx": "self_attn.indexer.q_proj", "attn.wk_idx": "self_attn.indexer.k_proj",
          "attn.q_idx_norm": "self_attn.indexer.q_norm", "attn.k_idx_norm": "self_attn.indexer.k_norm"}
_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def hf_name(name: str) -> tuple[str, str]:
    """Our parameter name -> ``(transformers' name, part)``, part ``main`` (the original architecture),
    ``index`` (MSA's index branch) or ``vision`` (our image embedding, kept under its own name)."""
    if name.startswith("vision."):
        return name, "vision"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        i, module, kind = m.groups()
        part = "index" if module in _INDEX else "main"
        return f"model.layers.{i}.{(_INDEX if part == 'index' else _LAYER)[module]}.{kind}", part
    module, kind = name.rsplit(".", 1)
    return f"{_TOP[module]}.{kind}", "main"


# ---- config.json -> model.*


def hub_kernels_clash() -> str | None:
    """Why ``transformers`` cannot be imported here, or None. This project's MSA kernels are the import
    package ``kernels``, and so is Hugging Face's ``kernels`` distribution (a dependency of transformers
    >= 5.25): with both installed, transformers imports ours for its hub kernels and fails with an
    ImportError from deep inside; this names the cause and the fix first."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return (f"Hugging Face's `kernels` package ({version}) is installed, and its import name is the one of this "
            f"project's MSA kernels (kernels/): transformers would import ours and fail. Uninstall it "
            f"(`pip uninstall kernels`) and keep transformers below 5.25, which requires it (pyproject.toml pins "
            f"transformers<5.25)")


def import_transformers():
    """``transformers``, once ``hub_kernels_clash`` has found nothing in the way."""
    clash = hub_kernels_clash()
    if clash:
        raise ImportError(clash)
    import transformers

    return transformers


def read_hf_config(path: str | Path):
    """The checkpoint's config (transformers' class for its model_type), after the support checks."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r} has no config.json: point it at a local Hugging Face "
                                f"checkpoint directory")
    raw = json.loads((path / "config.json").read_text())
    check_supported(raw, path)
    return import_transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)


def check_supported(raw: dict, path: Path) -> None:
    """Refuse a checkpoint whose architecture our decoder cannot reproduce, naming the feature."""
    where = f"model.path={str(path)!r}"
    kind = raw.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{where}: model_type {kind!r} is not supported (the importer covers the decoder families "
                         f"{', '.join(FAMILIES)}; mixture-of-experts and multimodal variants are other model types)")
    moe = [k for k in MOE_KEYS if raw.get(k)]
    if moe:
        raise ValueError(f"{where}: a mixture of experts ({', '.join(moe)}) is not supported: our decoder has one "
                         f"dense SwiGLU MLP per layer")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={raw['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if raw.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (the MLP projections have no bias)")
    rope = {**(raw.get("rope_parameters") or {}), **(raw.get("rope_scaling") or {})}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: per-layer-type rope_parameters are not supported (one RoPE for every layer)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (default, linear, dynamic, yarn, llama3)")
    extra = sorted(set(rope) & {"mscale", "mscale_all_dim", "short_factor", "long_factor"})
    if extra:
        raise ValueError(f"{where}: rope parameters {extra} are not supported")
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported: transformers' {kind} rotates "
                         f"every head dim, so such a checkpoint would not load there faithfully either")
    odd = sorted({t for t in raw.get("layer_types") or [] if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise ValueError(f"{where}: layer types {odd} are not supported (full_attention, sliding_attention)")


def rope_from_hf(hf) -> tuple[float, RopeScaling]:
    """``(base, scaling)`` from a transformers config's standardised ``rope_parameters``."""
    p = dict(hf.rope_parameters)
    base, kind = float(p["rope_theta"]), p.get("rope_type", "default")
    if kind == "default":
        return base, RopeScaling()
    s = RopeScaling(type=kind, factor=float(p["factor"]))
    if kind == "dynamic":
        s.original_max_len = int(hf.max_position_embeddings)
    if kind in ("yarn", "llama3"):
        s.original_max_len = int(p.get("original_max_position_embeddings") or hf.max_position_embeddings)
    if kind == "llama3":
        s.low_freq_factor, s.high_freq_factor = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    if kind == "yarn":
        s.beta_fast, s.beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)
        s.attention_factor = p.get("attention_factor")
        s.truncate = bool(p.get("truncate", True))
    return base, s


def rope_to_hf(base: float, s: RopeScaling, max_len: int) -> tuple[dict, int]:
    """transformers' ``rope_parameters`` and ``max_position_embeddings`` for our RoPE."""
    p = {"rope_type": "default" if s.type == "none" else s.type, "rope_theta": float(base)}
    if s.type != "none":
        p["factor"] = s.factor
    if s.type == "dynamic":
        max_len = s.original_max_len  # transformers' dynamic scaling starts past max_position_embeddings
    if s.type in ("yarn", "llama3"):
        p["original_max_position_embeddings"] = s.original_max_len
    if s.type == "llama3":
        p.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        p.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        if s.attention_factor is not None:
            p["attention_factor"] = s.attention_factor
    return p, max_len


def _sliding(hf) -> tuple[int, list[int] | None]:
    window = getattr(hf, "sliding_window", None) or 0
    if hf.model_type in ("qwen2", "qwen3"):
        if not getattr(hf, "use_sliding_window", False):
            return 0, None
        return window, [i for i, t in enumerate(hf.layer_types) if t == "sliding_attention"]
    return window, None  # Mistral: every layer


def model_fields(hf) -> dict:
    """The ``model.*`` values a transformers config determines."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    base, scaling = rope_from_hf(hf)
    window, layers = _sliding(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return {"vocab_size": hf.vocab_size, "dim": hf.hidden_size, "n_layers": hf.num_hidden_layers,
            "n_heads": hf.num_attention_heads, "n_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
            "head_dim": head_dim, "ffn_dim": hf.intermediate_size, "rope_dim": head_dim, "rope_base": base,
            "rope_scaling": scaling, "norm_eps": float(hf.rms_norm_eps), "tie_embeddings": bool(hf.tie_word_embeddings),
            "qk_norm": hf.model_type == "qwen3", "qkv_bias": hf.model_type == "qwen2" or bias, "out_bias": bias,
            "sliding_window": window, "sliding_layers": layers}


def resolve_model_config(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """With ``model.path``, the decoder options from the checkpoint; ``vocab_size`` (the tokenizer's,
    with its added tokens) grows the vocabulary where it exceeds the checkpoint's. A shape key also set
    on the command line must agree with the checkpoint."""
    if not cfg.path:
        return cfg
    values = model_fields(read_hf_config(cfg.path))
    default = ModelConfig()
    for key, value in values.items():
        mine = getattr(cfg, key)
        if mine != getattr(default, key) and mine != value and key != "vocab_size":
            raise ValueError(f"model.{key}={mine!r} but the checkpoint in model.path has {value!r}: drop the "
                             f"override (model.path sets the shape; a stage may change RoPE: recipe.stages)")
    values["vocab_size"] = max(values["vocab_size"], vocab_size)
    return replace(cfg, **values)


def copy_source_files(path: str | Path, dest: str | Path) -> None:
    """The checkpoint's small files (config, generation config, tokenizer, chat template) into ``dest``,
    so an export needs the run directory only."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dest / f.name)


# ---- safetensors -> the decoder


def weight_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (one, or the shards its index lists). Pickle formats are
    refused: loading them can run code."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ValueError(f"model.path={str(path)!r} holds only pickle weights ({', '.join(pickles[:3])}): "
                         f"weights are loaded from safetensors only; convert them first (save_pretrained with "
                         f"safe_serialization in a trusted environment)")
    raise FileNotFoundError(f"model.path={str(path)!r} has no model.safetensors nor model.safetensors.index.json")


@torch.no_grad()
def load_weights(model: Decoder, path: str | Path) -> list[str]:
    """Copy the checkpoint's tensors into ``model`` (built from ``resolve_model_config``'s options).
    Returns our names of the parameters the checkpoint did not provide (index branch, vision)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    wanted = {hf_name(n)[0]: n for n in params if hf_name(n)[1] == "main"}
    seen: set[str] = set()
    unexpected = []
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in wanted:
                    if not (key == "lm_head.weight" and model.lm_head is None):  # tied: the embedding is the head
                        unexpected.append(key)
                    continue
                _copy_rows(params[wanted[key]], f.get_tensor(key), key)
                seen.add(key)
    missing = sorted(set(wanted) - seen)
    if missing or unexpected:
        raise ValueError(f"model.path={str(path)!r} does not match the decoder: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]} (a feature the importer does not map)")
    return sorted(n for n in params if hf_name(n)[1] != "main")


def _copy_rows(param: torch.Tensor, t: torch.Tensor, key: str) -> None:
    """Copy ``t`` into ``param``; a vocabulary that grew keeps extra rows at the checkpoint's mean row."""
    if param.shape == t.shape:
        param.copy_(t)
        return
    if param.ndim == 2 and param.shape[1] == t.shape[1] and param.shape[0] > t.shape[0]:
        param[:t.shape[0]].copy_(t)
        param[t.shape[0]:].copy_(t.float().mean(0, keepdim=True))
        return
    raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)}, decoder {tuple(param.shape)}")


# ---- the decoder -> a transformers directory


def split_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict -> ``{part: {transformers name: tensor}}`` (``main``, ``index``, ``vision``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"main": {}, "index": {}, "vision": {}}
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        key, part = hf_name(name)
        parts[part][key] = t.detach().contiguous()
    return parts


def save_safetensors(tensors: dict[str, torch.Tensor], out: Path, stem: str, max_shard_bytes: int) -> None:
    """``stem.safetensors``, or shards ``stem-0000i-of-0000n.safetensors`` with transformers' index."""
    from safetensors.torch import save_file

    shards, size = [{}], 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def msa_config(model: Decoder, dtype: torch.dtype) -> dict:
    """What an inference engine needs to run the exported MSA layers (docs/hf.md, "Export")."""
    attn, cfg = model.attn_cfg, model.cfg
    msa = model.msa_layers()
    return {
        "format": "msa-trainer/1",
        "index_weights": "msa_index.safetensors",
        "block_size": attn.block_size, "topk": attn.topk, "index_dim": attn.index_dim,
        "index_heads": cfg.n_kv_heads, "index_rope_dim": min(cfg.rope_dim, attn.index_dim),
        "layer_types": ["msa" if i in msa else "sliding" if i in sliding_layers(cfg) else "dense"
                        for i in range(cfg.n_layers)],
        "msa_layers": msa,
        "norm": "rms: x * rsqrt(mean(x^2) + norm_eps) * weight",
        "norm_eps": cfg.norm_eps,
        "selection": ("per query and KV group: score S = q_idx . k_idx / sqrt(index_dim) over visible keys; block "
                      "score = max over the block's visible keys; keep the query's own block and the top blocks by "
                      "score, topk in all; exact softmax attention over the visible keys of the kept blocks; "
                      "blocks counted from each document's first token"),
        "vision_weights": "vision_embed.safetensors", "vision": asdict(cfg.vision),
        "dtype": str(dtype).removeprefix("torch."),
    }


def write_hf(model: Decoder, state: dict[str, torch.Tensor], source: str | Path, out: str | Path,
             rope: tuple[float, RopeScaling], dtype: torch.dtype, tokenizer=None, trained_len: int = 0,
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """A directory that transformers loads with the checkpoint's original architecture, plus the MSA
    index weights, the vision embedding and msa_config.json. ``source`` holds the original config files
    (``copy_source_files``); ``rope`` is the last stage's RoPE; ``trained_len`` the longest sequence
    trained (``max_position_embeddings`` grows to it); ``tokenizer`` (a ``PretrainedTokenizer``, with
    the image markers it added) is saved beside them."""
    AutoConfig = import_transformers().AutoConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf = AutoConfig.from_pretrained(str(source), local_files_only=True)
    hf.vocab_size = cfg.vocab_size
    hf.rope_parameters, hf.max_position_embeddings = rope_to_hf(*rope, max(hf.max_position_embeddings, trained_len))
    hf.dtype = dtype
    hf.save_pretrained(str(out))
    for name in ("generation_config.json",):
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, out / name)
    if tokenizer is not None:
        tokenizer.save(str(out))
    parts = split_state({k: v.to(dtype) for k, v in state.items()}, tied=cfg.tie_embeddings)
    save_safetensors(parts["main"], out, "model", max_shard_bytes)
    for part, stem in (("index", "msa_index"), ("vision", "vision_embed")):
        save_safetensors(parts[part], out, stem, max_shard_bytes)
    meta = msa_config(model, dtype)
    if tokenizer is not None:  # where the vision embedding's outputs go in the token stream
        meta["image_tokens"] = {name: getattr(tokenizer, name) for name in ("img_start", "img_end", "img_patch")}
    (out / "msa_config.json").write_text(json.dumps(meta, indent=2))
    return out


# ---- logits, for the parity checks


def our_logits(model: Decoder, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               cu_seqlens: torch.Tensor | None = None, phase: str = "warmup") -> torch.Tensor:
    """``[B, N, vocab]`` float32 logits of our decoder (``warmup``: the dense main path)."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    batch = {"input_ids": input_ids, "labels": torch.full_like(input_ids, -100), "position_ids": position_ids}
    if cu_seqlens is not None:
        batch["cu_seqlens"] = cu_seqlens
    with torch.no_grad():
        h, _, _ = model.hidden_states(batch, phase)
        return (h @ model.output_weight().t()).float().reshape(*input_ids.shape, -1)


def hf_logits(hf_model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' logits of ``input_ids [1, N]``; packed documents (``position_ids`` restarting at 0)
    run one at a time (its SDPA path does not separate packed documents by their positions)."""
    starts = [0] if position_ids is None else (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, input_ids.shape[1]]
    with torch.no_grad():
        return torch.cat([hf_model(input_ids=input_ids[:, s:e]).logits.float()
                          for s, e in zip(bounds[:-1], bounds[1:])], dim=1)


__all__ = ["FAMILIES", "hf_name", "hub_kernels_clash", "import_transformers", "read_hf_config", "check_supported",
           "rope_from_hf", "rope_to_hf", "model_fields", "resolve_model_config", "copy_source_files", "weight_files",
           "load_weights", "split_state", "save_safetensors", "msa_config", "write_hf", "our_logits", "hf_logits"]
