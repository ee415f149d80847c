"""Data loader throughput (CPU): packed tokens/s at a long sequence length, text only and with images,
for several worker counts, next to what one GPU consumes for the base model at that length.

The GPU figure is an estimate, not a measurement: FLOPs per
token from the model's own count (train/model.py `flops_per_token`: 6 x params + attention, MSA
context capped at topk x block_size) at an assumed MFU of the bf16 dense peak.

    .venv/bin/python -m bench.data --seq-len 131072 --workers 1 2 --out docs/data_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch

from train.data import CorpusConfig, DataConfig, build_dataloader, build_tokenizer
from train.data.build_corpus import ensure_corpus

CORPORA = {  # name -> corpus sizes; "images" is all image-caption pairs and interleaved documents
    "text": CorpusConfig(seed=0, n_text=600, n_pairs=0, n_interleaved=0, n_shards=8),
    "images": CorpusConfig(seed=0, n_text=0, n_pairs=1600, n_interleaved=400, n_shards=8),
}
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100 SXM (NVIDIA datasheet); H200: same


def measure(cfg: DataConfig, seq_len: int, seconds: float) -> dict:
    tok = build_tokenizer(cfg.tokenizer)
    loader = build_dataloader(cfg, tok, seq_len=seq_len, batch_size=1, seed=0)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # worker start-up and the first shards
    first = time.perf_counter() - t0
    n = patches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        batch = next(it)
        n += 1
        patches += len(batch["image_slots"])
    dt = time.perf_counter() - t0
    loader.close()
    return {"batches": n, "seconds": round(dt, 2), "first_batch_s": round(first, 2),
            "tokens_per_s": round(n * seq_len / dt), "image_token_fraction": round(patches / (n * seq_len), 3),
            "skipped": loader.skipped}


def gpu_tokens_per_s(seq_len: int, mfu: float) -> dict:
    from omegaconf import OmegaConf

    from msa.layer import AttentionConfig
    from train.model import ModelConfig, build_model

    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/base.yaml").model)
    attn_cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), OmegaConf.load("conf/attention/msa.yaml"))
    with torch.device("meta"):
        model = build_model(OmegaConf.to_object(model_cfg), OmegaConf.to_object(attn_cfg))
    out = {"model": "base", "params": model.num_params(), "mfu_assumed": mfu, "peak_flops": H100_BF16_PEAK}
    for name, sparse in (("msa", True), ("dense", False)):
        fpt = model.flops_per_token(seq_len, sparse)
        out[f"{name}_flops_per_token"] = fpt
        out[f"{name}_tokens_per_s_estimate"] = round(mfu * H100_BF16_PEAK / fpt)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--corpus-root", default="data/bench")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--no-gpu-estimate", action="store_true", help="loader numbers only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for corpus, sizes in CORPORA.items():
        shards = ensure_corpus(os.path.join(args.corpus_root, corpus), sizes)
        for workers in args.workers:
            cfg = DataConfig(shards=shards, num_workers=workers)
            res = {"corpus": corpus, "workers": workers, **measure(cfg, args.seq_len, args.seconds)}
            rows.append(res)
            print(f"{corpus:7s} workers={workers}  {res['tokens_per_s']:>10,d} tokens/s  "
                  f"(image tokens {res['image_token_fraction']:.1%}, {res['batches']} rows of {args.seq_len} "
                  f"in {res['seconds']} s, first row {res['first_batch_s']} s)", flush=True)
    gpu = None if args.no_gpu_estimate else gpu_tokens_per_s(args.seq_len, args.mfu)
    if gpu:
        print(f"base model at {args.seq_len}: {gpu['msa_flops_per_token'] / 1e9:.2f} GFLOP/token with MSA -> "
              f"~{gpu['msa_tokens_per_s_estimate']:,d} tokens/s per GPU at {args.mfu:.0%} MFU (estimate); dense "
              f"attention: ~{gpu['dense_tokens_per_s_estimate']:,d} tokens/s")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "commit": commit, "seq_len": args.seq_len}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "loader": rows, "gpu": gpu}, f, indent=1)


if __name__ == "__main__":
    main()
