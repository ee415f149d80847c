#!/bin/bash
# A random 0.5B-shaped Qwen3 checkpoint (Qwen3-0.6B's config, random weights, a BPE tokenizer trained
# here: nothing downloaded) imported with model=hf, trained at 32K with recipe=msa_cpt (frozen warm-up,
# then sparse CPT), exported with train.convert to-hf (reloaded with transformers, logits compared),
# and the same model trained dense at 32K for the tokens/s comparison.
# Run from the repository root on the GPU machine:
#   OUT=runs/hf_gpu bash bench/hf_gpu.sh
# WARMUP_STEPS, SPARSE_STEPS and DENSE_STEPS set the step counts (default 20, 180, 15); ARMS (default
# "msa dense") which of the two training runs to make and in which order (the export follows the MSA run);
# CKPT_EVERY (default 100) the MSA run's periodic checkpoints; DEADLINE (default
# 560) is the script's wall-time budget in seconds. The script resumes: when the budget runs out in the
# middle of a training run, that run gets SIGTERM, saves its checkpoint and stops; the same command run
# again on the same machine (WORK kept) resumes it exactly and goes on with the next steps, so a run
# longer than one device call spans several. WORK (default runs/hf_work: several GB, not under $OUT)
# holds the checkpoint, the runs and the export; $OUT gets the logs and hf_gpu.json.
# CPU_CHECK=1: a rehearsal on a machine without a GPU (a tiny checkpoint of the same family, 256-token rows,
# small blocks, GRACE 30 s; with a small DEADLINE it exercises the cut and the resume).
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl), and
# so must transformers, safetensors and the packages they import (docs/hf.md lists them).
set -uo pipefail
OUT=${OUT:-runs/hf_gpu}
WORK=${WORK:-runs/hf_work}
mkdir -p "$OUT" "$WORK"
T0=$SECONDS
DEADLINE=${DEADLINE:-560}
NEEDS="deepspeed, hydra, webdataset, transformers, safetensors"
source "$(dirname "$0")/gpu_run.sh" gpus.txt
python3 -c "import transformers, safetensors" || { echo "transformers/safetensors missing: add their wheels"; exit 2; }
W=${WARMUP_STEPS:-20} S=${SPARSE_STEPS:-180} D=${DENSE_STEPS:-15}
GRACE=${GRACE:-90}  # seconds a run cut at the deadline has to save its checkpoint
CK=$WORK/qwen3-0.6b-random
COMMON=(model=hf "model.path=$CK" data.seq_len=32768 logging.wandb.mode=disabled logging.progress=false
        logging.stats_every=1000 parallel.activation_checkpointing=true checkpoint.keep_last=1)
export HF_SHAPE=0.6b HF_SEQ=32768
if [ "${CPU_CHECK:-0}" = 1 ]; then
  GRACE=30 HF_SHAPE=tiny HF_SEQ=256 CK=$WORK/qwen3-tiny-random
  COMMON=(model=hf "model.path=$CK" data.seq_len=256 data.image.max_patches=64 attention.block_size=32
          attention.topk=4 attention.index_dim=32 logging.wandb.mode=disabled logging.progress=false
          parallel.activation_checkpointing=true checkpoint.keep_last=1)
fi

step() {  # name, command...: skipped once done; stopped by SIGTERM (then GRACE s to save) at the deadline
  local name=$1; shift
  if [ -e "$WORK/$name.done" ]; then echo "== $name: done in an earlier call"; return 0; fi
  local left=$(( DEADLINE - (SECONDS - T0) - GRACE ))
  if [ "$left" -lt 30 ]; then echo "== $name: not started, $left s left before the deadline"; return 1; fi
  echo "== $name (limit ${left}s): $*"
  local t=$SECONDS
  PYTHONUNBUFFERED=1 timeout -s TERM -k "$GRACE" "$left" "$@" <&0 >> "$OUT/$name.log" 2>&1 &  # <&0: a here-document
  local tpid=$!
  # a run still going 5 s before its SIGKILL prints every thread's stack into its log (SIGUSR1)
  ( sleep $(( left + GRACE - 5 )); pkill -USR1 -P "$tpid" ) > /dev/null 2>&1 &
  local wpid=$!
  wait "$tpid"
  local rc=$?
  pkill -P "$wpid" > /dev/null 2>&1; kill "$wpid" 2> /dev/null
  case $rc in
    0) echo "   rc=0 in $((SECONDS - t))s" ;;
    124) echo "   rc=124 in $((SECONDS - t))s: stopped at the deadline, run the script again to resume" ;;
    137) echo "   rc=137 in $((SECONDS - t))s: killed $GRACE s after its SIGTERM (stacks in $OUT/$name.log)" ;;
    *) echo "   rc=$rc in $((SECONDS - t))s: failed, see $OUT/$name.log" ;;
  esac
  [ $rc = 0 ] && touch "$WORK/$name.done"
  return $rc
}

step checkpoint python3 - "$CK" <<'EOF'
import os
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config
from train.data.build_corpus import read_source, stdlib_files  # the text the default corpus is made of

path = sys.argv[1]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
texts = [read_source(p, 65536) for p in stdlib_files()[:400]]
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, show_progress=False,
                        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(path)
shape = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128)  # Qwen3-0.6B's
if os.environ["HF_SHAPE"] == "tiny":  # the CPU rehearsal
    shape = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
config = Qwen3Config(**shape, max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     tie_word_embeddings=True, rms_norm_eps=1e-6, dtype=torch.bfloat16)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(path)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {path}")
EOF
tail -n 2 "$OUT/checkpoint.log" 2>/dev/null

ARMS=${ARMS:-msa dense}  # in this order; an arm starts only when the one before it is done
EVERY=${CKPT_EVERY:-100}  # the MSA run also saves every EVERY steps, whatever happens at the deadline
for arm in $ARMS; do
  [ -e "$WORK/checkpoint.done" ] || break
  case $arm in
    msa) step msa python3 -m train "${COMMON[@]}" recipe=msa_cpt "run.steps=$((W + S))" "recipe.stages.0.steps=$W" \
           "recipe.stages.1.steps=$S" "checkpoint.every=$EVERY" "run_dir=$WORK/msa" ;;
    dense) step dense python3 -m train "${COMMON[@]}" attention=dense optim.lr=2e-5 "run.steps=$D" "run_dir=$WORK/dense" ;;
    *) echo "ARMS: unknown arm $arm (msa, dense)"; exit 2 ;;
  esac
  tail -n 3 "$OUT/$arm.log" 2>/dev/null
  [ -e "$WORK/$arm.done" ] || break
done
if [ -e "$WORK/msa.done" ]; then
  step export python3 -m train.convert to-hf "run_dir=$WORK/msa" "out=$WORK/export"
  tail -n 12 "$OUT/export.log" 2>/dev/null
fi
cp "$WORK/msa/metrics.jsonl" "$OUT/msa_metrics.jsonl" 2>/dev/null
cp "$WORK/dense/metrics.jsonl" "$OUT/dense_metrics.jsonl" 2>/dev/null
cp "$WORK/export/msa_config.json" "$OUT/" 2>/dev/null

python3 - "$OUT" <<'EOF'
import json, os, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])

def rows(name):
    p = out / f"{name}_metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

def tokens_per_s(rs, skip=3):  # median after the first steps (compilation, autotuning)
    v = [r["perf/tokens_per_s"] for r in rs[skip:]]
    return (statistics.median(v), len(v)) if v else (None, 0)

msa, dense = rows("msa"), rows("dense")
result = {"seq_len": int(os.environ["HF_SEQ"]), "model": f"Qwen3 {os.environ['HF_SHAPE']} shape, random weights", "msa_steps": len(msa), "dense_steps": len(dense)}
for name, rs in (("msa_warmup", [r for r in msa if not r["train/phase_sparse"]]),
                 ("msa_sparse", [r for r in msa if r["train/phase_sparse"]]), ("dense", dense)):
    result[name] = dict(zip(("tokens_per_s", "steps"), tokens_per_s(rs)))
    if rs:
        result[name]["max_allocated_gb"] = max(r["mem/max_allocated_gb"] or 0 for r in rs)
        result[name]["last_loss_lm"] = rs[-1]["loss/lm"]
        n = max(1, min(10, len(rs) // 4))  # the LM loss (and in the warm-up the KL) over its first and last steps
        for key in ("loss/lm", "loss/kl"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                result[name][key.replace("/", "_") + "_first_last"] = [statistics.mean(vals[:n]), statistics.mean(vals[-n:])]
text = (out / "export.log").read_text() if (out / "export.log").exists() else ""
start = text.find("{\n")
result["export"] = json.loads(text[start:text.rfind("}") + 1]) if start >= 0 else "failed: see export.log"
(out / "hf_gpu.json").write_text(json.dumps(result, indent=1))
print(f"{'arm':<12} {'tokens/s':>10} {'steps':>6} {'max GB':>7}")
for name in ("msa_warmup", "msa_sparse", "dense"):
    r = result[name]
    tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
    print(f"{name:<12} {tps:>10} {r.get('steps', 0):>6} {r.get('max_allocated_gb', 0):>7.1f}")
print("export:", json.dumps(result["export"].get("parity") if isinstance(result["export"], dict) else result["export"]))
EOF
