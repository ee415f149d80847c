"""Hugging Face checkpoints in and out, as Hydra apps:

    python -m train.convert to-hf run_dir=runs/x out=exported/x
    python -m train.convert from-hf path=/models/qwen3 attention.n_dense_layers=2

``to-hf`` exports a run that started from a checkpoint (``model=hf model.path=...``): the newest complete
checkpoint (or ``checkpoint=``) is consolidated from its DeepSpeed/ZeRO files with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint``, written as the original architecture (transformers'
``AutoModelForCausalLM`` loads it) with the MSA index weights, the vision embedding and msa_config.json
beside it, and reloaded with transformers to compare its logits with our dense path (``check=true``).
``from-hf`` runs the import that training does at start and compares our logits with transformers'
on the CPU: a preflight for a new checkpoint before a GPU run; ``out=`` saves the report as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from msa.layer import AttentionConfig
from train.checkpoint import consolidated_state
from train.hf import import_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ToHFConfig:
    """``python -m train.convert to-hf``."""

    run_dir: str = MISSING
    out: str = MISSING
    checkpoint: str = "latest"  # latest: the newest complete checkpoint in run_dir | a step_XXXXXXXX directory
    dtype: str = "source"  # source: the imported checkpoint's dtype | float32 | bfloat16 | float16
    check: bool = True  # reload with transformers (CPU, fp32) and compare logits with our dense path
    check_tokens: int = 64
    max_shard_gb: float = 5.0


@dataclass
class FromHFConfig:
    """``python -m train.convert from-hf``."""

    path: str = MISSING  # a local Hugging Face checkpoint directory (what model.path takes)
    out: str | None = None  # write the report here as import_report.json
    check: bool = True  # compare our logits with transformers' (CPU, fp32)
    check_tokens: int = 64
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def find_checkpoint(run_dir: str, which: str) -> Path:
    """``checkpoint=latest``: the run's newest complete checkpoint; else the one named (a step_* name under
    run_dir/checkpoints, or a path)."""
    from train.checkpoint import find_checkpoint as find

    if which == "latest":
        return find(run_dir)
    return find(Path(which) if Path(which).is_absolute() else Path(run_dir) / "checkpoints" / which)


def run_config(checkpoint: Path):
    """The resolved TrainConfig the checkpoint's run trained with (meta.json)."""
    from train.checkpoint import read_meta
    from train.config import to_train_config

    return to_train_config(OmegaConf.create(read_meta(checkpoint)["config"])), read_meta(checkpoint)["step"]


def parity(model, hf_model, vocab: int, n_tokens: int) -> dict:
    """Max |logit difference| between our dense path and transformers on one random sequence and on the
    same tokens packed as two documents, with the scale of the logits."""
    from train.hf import hf_logits, our_logits

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, n_tokens), generator=gen)
    cut = n_tokens // 3
    pos = torch.cat([torch.arange(cut), torch.arange(n_tokens - cut)])[None]
    cu = torch.tensor([0, cut, n_tokens], dtype=torch.int32)
    ours, theirs = our_logits(model, ids), hf_logits(hf_model, ids)
    ours_p, theirs_p = our_logits(model, ids, pos, cu), hf_logits(hf_model, ids, pos)
    return {"max_abs_diff": float((ours - theirs).abs().max()),
            "max_abs_diff_packed": float((ours_p - theirs_p).abs().max()),
            "max_abs_logit": float(theirs.abs().max()), "tokens": n_tokens}


def check_parity(report: dict, what: str) -> None:
    worst = max(report["max_abs_diff"], report["max_abs_diff_packed"])
    if worst > 1e-4 * max(1.0, report["max_abs_logit"]):
        raise RuntimeError(f"{what}: our logits and transformers' differ by {worst:.3g} (logits up to "
                           f"{report['max_abs_logit']:.3g}): the conversion is wrong")


def to_hf(cfg: ToHFConfig) -> dict:
    AutoConfig = import_transformers().AutoConfig

    from train.data.tokenizer import PretrainedTokenizer
    from train.hf import write_hf
    from train.model import Decoder
    from train.recipe import build_recipe, stage_at

    checkpoint = find_checkpoint(cfg.run_dir, cfg.checkpoint)
    train_cfg, step = run_config(checkpoint)
    source = Path(cfg.run_dir) / "hf_source"
    if not (source / "config.json").is_file():
        raise ValueError(f"run_dir={cfg.run_dir!r} did not start from a Hugging Face checkpoint (no hf_source/"
                         f"config.json): to-hf exports runs trained with model=hf model.path=...")
    if cfg.dtype != "source" and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: use source, {', '.join(DTYPES)}")
    source_dtype = AutoConfig.from_pretrained(str(source), local_files_only=True).dtype
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "source" else _as_dtype(source_dtype)
    # the check runs on the CPU: the reference MSA ops, whatever the run used
    model = Decoder(train_cfg.model, replace(train_cfg.attention, impl="reference"))
    model.load_state_dict(consolidated_state(checkpoint))
    stages = build_recipe(train_cfg)
    stage = stage_at(stages, max(step - 1, 0))
    trained_len = max(s.seq_len for s in stages if s.start < max(step, 1))
    model.set_rope(stage.rope_base, stage.rope_scaling)
    tokenizer = PretrainedTokenizer(str(source)) if train_cfg.data.tokenizer.kind == "pretrained" else None
    rounded = {k: v.to(dtype) for k, v in model.state_dict().items()}
    write_hf(model, rounded, source, cfg.out, (stage.rope_base, stage.rope_scaling), dtype, tokenizer,
             trained_len=trained_len, max_shard_bytes=int(cfg.max_shard_gb * 2**30))
    report = {"checkpoint": str(checkpoint), "step": step, "out": cfg.out, "dtype": str(dtype), "stage": stage.name,
              "msa_layers": model.msa_layers()}
    if cfg.check:
        AutoModelForCausalLM = import_transformers().AutoModelForCausalLM

        model.load_state_dict({k: v.float() for k, v in rounded.items()})  # what the files hold
        hf_model = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32, local_files_only=True)
        report["parity"] = parity(model.eval(), hf_model.eval(), train_cfg.model.vocab_size, cfg.check_tokens)
        check_parity(report["parity"], f"the export in {cfg.out}")
    print(json.dumps(report, indent=1))
    return report


def _as_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).removeprefix("torch."), torch.float32)


def from_hf(cfg: FromHFConfig) -> dict:
    from train.data.tokenizer import PretrainedTokenizer
    from train.hf import load_weights, read_hf_config, resolve_model_config
    from train.model import ModelConfig, build_model

    path = Path(cfg.path)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = PretrainedTokenizer(str(path)) if has_tokenizer else None
    hf = read_hf_config(path)
    model_cfg = resolve_model_config(ModelConfig(path=str(path)), tokenizer.vocab_size if tokenizer else 0)
    model = build_model(model_cfg, replace(cfg.attention, impl="reference"))  # checked on the CPU
    load_weights(model, path)
    report = {"path": str(path), "model_type": hf.model_type, "model": OmegaConf.to_container(
        OmegaConf.structured(model_cfg)), "msa_layers": model.msa_layers(),
        "vocab_grown_by": model_cfg.vocab_size - hf.vocab_size,
        "new_parameters": sum(p.numel() for n, p in model.named_parameters()
                              if n.startswith("vision.") or "_idx" in n)}
    if tokenizer is not None:
        report["tokenizer"] = {"eod": tokenizer.eod, "pad": tokenizer.pad, "doc_prefix": tokenizer.doc_prefix,
                               "img_start": tokenizer.img_start, "img_end": tokenizer.img_end,
                               "img_patch": tokenizer.img_patch, "vocab_size": tokenizer.vocab_size}
    if cfg.check:
        AutoModelForCausalLM = import_transformers().AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        model.float()
        report["parity"] = parity(model.eval(), hf_model.eval(), hf.vocab_size, cfg.check_tokens)
        check_parity(report["parity"], f"the import of {path}")
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "import_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


COMMANDS = {"to-hf": ("to_hf", ToHFConfig, to_hf), "from-hf": ("from_hf", FromHFConfig, from_hf)}
# the converter writes only what it is asked to: no Hydra output directory or log file
HYDRA_QUIET = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]


def register() -> None:
    from hydra.core.config_store import ConfigStore

    for name, node, _ in COMMANDS.values():
        ConfigStore.instance().store(name=name, node=node)


def main() -> None:
    import hydra

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m train.convert {{{'|'.join(COMMANDS)}}} key=value ...")
    name, node, run = COMMANDS[sys.argv.pop(1)]
    register()
    sys.argv += HYDRA_QUIET

    def app(conf) -> None:
        run(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(node), conf)))

    hydra.main(config_path=None, config_name=name, version_base="1.3")(app)()


if __name__ == "__main__":
    main()
