#!/usr/bin/env bash
# The tile forward in training: `small` trained twice on LEN-token rows of the embedded corpus (dense warm-up,
# then sparse), the same seed and data, attention.fwd_path=kv then =auto (the tile forward where the layer's
# selection is local enough, kernels/sparse_tile.py), compared by bench/fwd_path_compare.py: the sparse phase's
# median step time, the LM loss step by step, the tile union. Run from the repository root (device machine):
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/fwd_path_gpu.sh
# Knobs: LEN (65536), STEPS (150), WARMUP (30), STATS_EVERY (25), PATHS ("kv auto"; "kv kv" measures how far two
# runs of the same code drift apart, the floor for the loss comparison), EXTRA (more Hydra
# overrides), CPU_CHECK=1 (a rehearsal without a GPU: tiny model, 256-token rows, 8 steps, the kernels in the
# Triton interpreter). Results in $OUT: fwd_path_<path>_metrics.jsonl (the second of "kv kv": kv2), fwd_path.json,
# fwd_path.log.
set -uo pipefail
OUT=${OUT:-runs/fwd_path}
LOG=$OUT/fwd_path.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
MODEL=(model=small "data.seq_len=${LEN:-65536}")
STEPS=${STEPS:-150}
read -r -a PATHS <<< "${PATHS:-kv auto}"
if [ "${CPU_CHECK:-0}" = 1 ]; then
  MODEL=(model=tiny data.seq_len=256 attention.impl=triton attention.block_size=16 attention.topk=4)
  STEPS=8; STATS_EVERY=${STATS_EVERY:-4}; WARMUP=${WARMUP:-2}  # about 8 minutes in the interpreter
  export TRITON_INTERPRET=1
else
  setup
fi
n=${#PATHS[@]}
NAMES=()
for p in "${PATHS[@]}"; do
  name=$p
  [ "${#NAMES[@]}" -gt 0 ] && [ "${NAMES[0]}" = "$p" ] && name=${p}2  # PATHS="kv kv": the runs' own spread
  NAMES+=("$name")
  RUN=$(mktemp -d)/run
  TAIL=3 stage "train_$name" $(( $(left) / n - 5 )) python3 -m train "${MODEL[@]}" "run.steps=$STEPS" \
    "recipe.warmup_steps=${WARMUP:-30}" "logging.stats_every=${STATS_EVERY:-25}" logging.progress=false \
    logging.wandb.mode=disabled "run_dir=$RUN" "attention.fwd_path=$p" ${EXTRA:-}
  cp "$RUN/metrics.jsonl" "$OUT/fwd_path_${name}_metrics.jsonl"
  n=$((n - 1))
done
META=$(python3 -c "import json, sys; from bench.meta import run_meta; m = run_meta(); m['command'] = sys.argv[1]; print(json.dumps(m))" \
  "LEN=${LEN:-65536} STEPS=$STEPS WARMUP=${WARMUP:-30} STATS_EVERY=${STATS_EVERY:-25} EXTRA=${EXTRA:-} bash bench/fwd_path_gpu.sh")
python3 -m bench.fwd_path_compare "${NAMES[0]}=$OUT/fwd_path_${NAMES[0]}_metrics.jsonl" \
  "${NAMES[1]}=$OUT/fwd_path_${NAMES[1]}_metrics.jsonl" --json "$OUT/fwd_path.json" --meta "$META" 2>&1 | tee -a "$LOG"
ls -l "$OUT"
