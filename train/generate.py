"""Generation with a KV cache and MSA's index-key cache: the library the evals use, and the Hydra app

    python -m train.generate checkpoint=runs/x "prompt='def fibonacci(n):'" max_new_tokens=64

``extend(model, cache, batch)`` runs the decoder over new tokens of every row: it appends their keys,
values and (MSA layers) index keys to the cache, then calls each layer's own attention core with the
new tokens as the last queries of the cached sequence. The core is the one training runs, so MSA picks
blocks at every step exactly as in training: ``select_blocks`` over all cached index keys, the query's
own block forced, top-k by max-pooled score, then sparse attention over the selected blocks (a dense
layer attends to every cached key). A prompt's prefill, each decode step and the scoring of a
candidate answer are all ``extend`` calls. Plain PyTorch around the cores; the rows of one cache share
a length (``generate`` groups prompts by length). ``load_model`` rebuilds a trained model from a run
directory or checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf

from msa.layer import PHASES, DenseCore, MSACore
from msa.rope import Rotary
from train.data.loader import collate
from train.data.packing import IGNORE, Row


@dataclass
class Prompt:
    """Token ids (``img_patch`` placeholders where image patches go) and the images, as
    ``Document.images``: ``(index of the first patch, patches uint8 [n, p*p*3], (rows, cols))``."""

    ids: np.ndarray
    images: list[tuple[int, np.ndarray, tuple[int, int]]] = field(default_factory=list)


class KVCache:
    """Per layer ``k, v [B, max_len, Hkv, D]`` and, in MSA layers, ``k_idx [B, max_len, Di]``; the first
    ``length`` positions are filled."""

    def __init__(self, model, batch: int, max_len: int):
        p = next(model.parameters())
        cfg = model.cfg
        kv = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(kv, device=p.device, dtype=p.dtype) for _ in model.layers]
        self.v = [torch.zeros(kv, device=p.device, dtype=p.dtype) for _ in model.layers]
        self.k_idx = [torch.zeros(batch, max_len, b.attn.index_dim, device=p.device, dtype=p.dtype)
                      if hasattr(b.attn, "index_dim") else None for b in model.layers]
        self.batch, self.max_len, self.length = batch, max_len, 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the next ``extend`` writes there)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


class Extended(NamedTuple):
    """``hidden [B, m, dim]`` after the final norm; per MSA layer the selection stats (None unless
    ``stats_queries``) and the blocks chosen for the last ``select_last`` queries ``[B, Hkv, n, topk]``."""

    hidden: torch.Tensor
    stats: list
    selected: list


def own_core(attn):
    """``attn``'s own attention core, through the ``EagerCore`` that ``parallel.compile_blocks`` puts around
    it (the cached path calls the core directly, outside the compiled block)."""
    from train.parallel.parallelize import EagerCore

    core = attn.core
    while isinstance(core, EagerCore):
        core = core.inner
    if not isinstance(core, (DenseCore, MSACore)):
        raise ValueError("generation and evals run the model's own attention cores, not sequence/context-parallel "
                         "wrappers: use parallel.sp_size=1 parallel.cp_size=1")
    return core


@torch.no_grad()
def extend(model, cache: KVCache, batch: dict, phase: str = "sparse", stats_queries: int = 0,
           select_last: int = 0) -> Extended:
    """Run ``batch`` (``input_ids [B, m]``, optional ``image_patches/image_slots/image_sizes`` as the loader
    makes them, slots indexing the ``B*m`` new tokens) at positions ``cache.length ...`` of each row."""
    B, m = batch["input_ids"].shape
    n0, n1 = cache.length, cache.length + m
    if B != cache.batch or n1 > cache.max_len:
        raise ValueError(f"{B} rows of {m} tokens do not fit a cache of {cache.batch} rows at {n0}/{cache.max_len}")
    x = model.embed_inputs(batch)
    rotary = Rotary(torch.arange(n0, n1, device=x.device).expand(B, m), model.rope_base, model.rope_scaling,
                    model.cfg.rope_impl)
    stats, selected = [], []
    for i, block in enumerate(model.layers):
        attn, core = block.attn, own_core(block.attn)
        h = block.attn_norm(x)
        q, k, v = attn.project(h, rotary)
        cache.k[i][:, n0:n1], cache.v[i][:, n0:n1] = k, v
        index = attn.index_inputs(h, rotary)
        if index is not None:
            cache.k_idx[i][:, n0:n1] = index[1]
            index = (index[0], cache.k_idx[i][:, :n1])
        out = core(q, cache.k[i][:, :n1], cache.v[i][:, :n1], None, index, phase, stats_queries, with_kl=False)
        x = x + attn.wo(out.o.reshape(B, m, -1))  # the block's residual stream, as Block.forward
        x = x + block.mlp(block.mlp_norm(x))
        if index is not None:
            stats.append(out.stats)
            if select_last:
                ops = core.ops_for(index[0].device)
                selected.append(ops.select_blocks(index[0][:, -select_last:], index[1], core.block_size, core.topk))
    cache.length = n1
    return Extended(model.norm(x), stats, selected)


def logits_of(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``hidden [..., dim]``."""
    return (hidden @ model.output_weight().t()).float()


def prompt_batch(prompts: list[Prompt], device, patch_dim: int) -> dict:
    """The loader's batch of prompts of one length (its collate: the same image scaling as training);
    ``patch_dim`` = values per image patch (``channels * patch_size**2``)."""
    lengths = {len(p.ids) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"prompts of one batch must have one length, got {sorted(lengths)}")
    rows = []
    for p in prompts:
        ids = torch.as_tensor(np.asarray(p.ids), dtype=torch.int32)
        patches = np.concatenate([pt for _, pt, _ in p.images]) if p.images else np.zeros((0, patch_dim), np.uint8)
        slots = np.concatenate([first + np.arange(len(pt)) for first, pt, _ in p.images]) if p.images else []
        rows.append(Row(tokens=ids, labels=torch.full_like(ids, IGNORE), seg_lens=[len(ids)],
                        positions=torch.arange(len(ids), dtype=torch.int32), patches=torch.from_numpy(patches),
                        slots=torch.as_tensor(slots, dtype=torch.int64), grids=[g for _, _, g in p.images]))
    batch = collate(rows)
    keep = ["input_ids", "position_ids", "labels"]
    if len(batch["image_slots"]):
        keep += ["image_patches", "image_slots", "image_sizes"]
    return {k: batch[k].to(device) for k in keep}


def patch_dim(model) -> int:
    v = model.cfg.vision
    return v.channels * v.patch_size ** 2


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids ``[B]`` from ``logits [B, V]``: greedy at temperature 0, else softmax(logits / temperature)
    restricted to the smallest set of ids whose probability reaches ``top_p`` (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        outside = p.cumsum(-1) - p >= top_p  # ids after the nucleus (the first id always stays)
        probs = torch.zeros_like(probs).scatter(-1, order, p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Completion:
    ids: list[int]
    logits: torch.Tensor | None = None  # [n, V] float32: the logits each generated id was drawn from


@torch.no_grad()
def decode(model, cache: KVCache, hidden: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, generator: torch.Generator | None = None, stop_ids=(), phase: str = "sparse",
           keep_logits: bool = False) -> list[Completion]:
    """Continue every row of ``cache`` from its last hidden state ``hidden [B, dim]`` by up to
    ``max_new_tokens`` ids; a row ends after an id of ``stop_ids`` (its later steps are dropped)."""
    stop = torch.as_tensor(list(stop_ids), device=hidden.device, dtype=torch.long)
    ids, steps, done = [], [], torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for t in range(max_new_tokens):
        logits = logits_of(model, hidden)
        nxt = sample(logits, temperature, top_p, generator)
        ids.append(nxt)
        steps.append(logits if keep_logits else None)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        hidden = extend(model, cache, {"input_ids": nxt[:, None]}, phase).hidden[:, -1]
    table = torch.stack(ids, 1).tolist()
    out = []
    for r, row in enumerate(table):
        n = next((t + 1 for t, tok in enumerate(row) if tok in stop_ids), len(row))
        out.append(Completion(row[:n], torch.stack([s[r] for s in steps[:n]]) if keep_logits else None))
    return out


@torch.no_grad()
def generate(model, prompts: list[Prompt], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids=(), phase: str = "sparse", keep_logits: bool = False) -> list[Completion]:
    """Complete each prompt by up to ``max_new_tokens`` ids (greedy at temperature 0). Prompts of one
    length run as one batch with one cache."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[Completion | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p.ids), []).append(i)
    for length, rows in by_length.items():
        cache = KVCache(model, len(rows), length + max_new_tokens)
        batch = prompt_batch([prompts[i] for i in rows], device, patch_dim(model))
        hidden = extend(model, cache, batch, phase).hidden[:, -1]
        done = decode(model, cache, hidden, max_new_tokens, temperature=temperature, top_p=top_p,
                      generator=generator, stop_ids=stop_ids, phase=phase, keep_logits=keep_logits)
        for i, c in zip(rows, done):
            out[i] = c
    return out


# ---- a trained model from its run directory


@dataclass
class Loaded:
    model: torch.nn.Module
    cfg: Any  # the run's TrainConfig
    stage: Any  # the recipe stage of the checkpoint's last step: its phase, length and RoPE base
    step: int
    path: Path
    tokenizer: Any


def load_model(checkpoint: str | Path, device: str = "auto", impl: str = "auto", precision: str = "auto") -> Loaded:
    """The model of a run directory (its newest checkpoint) or checkpoint, with the RoPE base of the
    stage that ran its last step, on ``device`` (auto: CUDA if present), in the run's precision
    (``auto``: bf16 on CUDA when the run trained in bf16, else fp32)."""
    from train.checkpoint import consolidated_state, find_checkpoint, read_meta
    from train.config import TrainConfig
    from train.data import build_tokenizer
    from train.model import build_model
    from train.recipe import build_recipe, stage_at

    path = find_checkpoint(checkpoint)
    meta = read_meta(path)
    saved = meta.get("config") or OmegaConf.to_container(OmegaConf.load(path.parents[1] / "config.yaml"))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    cfg.attention.impl = impl
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = build_model(cfg.model, cfg.attention)
    model.load_state_dict(consolidated_state(path))
    stage = stage_at(build_recipe(cfg), max(meta["step"] - 1, 0))
    model.set_rope(stage.rope_base, stage.rope_scaling)
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda" and cfg.run.precision == "bf16")
    model.to(device=dev, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    return Loaded(model, cfg, stage, meta["step"], path, build_tokenizer(cfg.data.tokenizer))


# ---- the app


@dataclass
class GenerateConfig:
    """``python -m train.generate``: complete prompts with a trained model."""

    checkpoint: str = MISSING  # a run directory (its newest checkpoint) or a step_* checkpoint directory
    prompt: Any = ""  # one string, or a list of strings (one batch)
    images: list[str] = field(default_factory=list)  # image files placed before every prompt, in order
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of ids holding this probability
    seed: int = 0
    stop_at_eod: bool = True  # stop a row at the end-of-document id
    phase: str | None = None  # warmup | sparse; default: the phase of the checkpoint's last stage
    rope_base: float | None = None  # default: the checkpoint's last stage's
    rope_scaling: Any = None  # e.g. {type:yarn,factor:4,original_max_len:8192}; default: the stage's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    impl: str = "auto"  # MSA ops: auto (Triton on CUDA) | triton | reference
    precision: str = "auto"  # auto (the run's on CUDA, fp32 on CPU) | bf16 | fp32
    out: str | None = None  # also write the completions to this JSON-lines file


def make_prompt(text: str, image_files: list[str], tokenizer, image_cfg) -> Prompt:
    """``<img>`` patches ``</img>`` for each image file, then the text's ids."""
    from train.data.images import decode_image
    from train.data.text_stream import encode

    parts, images, n = [], [], 0
    for f in image_files:
        patches, grid = decode_image(Path(f).read_bytes(), image_cfg)
        marks = np.full(len(patches) + 2, tokenizer.img_patch, dtype=np.int32)
        marks[0], marks[-1] = tokenizer.img_start, tokenizer.img_end
        images.append((n + 1, patches, grid))
        parts.append(marks)
        n += len(marks)
    parts.append(encode(tokenizer, text))
    return Prompt(np.concatenate(parts).astype(np.int32), images)


def set_eval_rope(model, base: float | None, scaling: dict | None) -> None:
    """``rope_base=`` and ``rope_scaling=`` of generation (as ``eval.rope_*`` work, without ``factor: auto``):
    each one given replaces the checkpoint's last stage's, e.g. YaRN to read past the trained length."""
    from train.eval.config import EvalSpec, eval_rope

    model.set_rope(*eval_rope(EvalSpec(rope_base=base, rope_scaling=scaling), (model.rope_base, model.rope_scaling),
                              None, None))


def check_phase(phase: str | None) -> None:
    if phase not in (None, *PHASES):
        raise ValueError(f"phase={phase!r}: use warmup or sparse (or leave it unset: the checkpoint's)")


def run_generate(cfg: GenerateConfig) -> list[dict]:
    check_phase(cfg.phase)
    loaded = load_model(cfg.checkpoint, cfg.device, cfg.impl, cfg.precision)
    model, tok = loaded.model, loaded.tokenizer
    set_eval_rope(model, cfg.rope_base, cfg.rope_scaling)
    texts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
    prompts = [make_prompt(t, cfg.images, tok, loaded.cfg.data.image) for t in texts]
    if any(len(p.ids) == 0 for p in prompts):
        raise ValueError("prompt= is empty: give a text (or images=[...])")
    done = generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    stop_ids=(tok.eod,) if cfg.stop_at_eod else (), phase=cfg.phase or loaded.stage.phase)
    results = [{"prompt": t, "completion": tok.decode(c.ids), "ids": c.ids, "checkpoint": str(loaded.path)}
               for t, c in zip(texts, done)]
    if cfg.out:
        Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return results


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def main() -> None:
    import hydra

    from train.__main__ import CONFIG_DIR

    register_schema()

    @hydra.main(config_path=CONFIG_DIR, config_name="generate", version_base="1.3")
    def app(cfg) -> None:
        for r in run_generate(OmegaConf.to_object(cfg)):
            print(r["prompt"] + (f"\033[1m{r['completion']}\033[0m" if sys.stdout.isatty() else r["completion"]))

    app()


if __name__ == "__main__":
    main()
