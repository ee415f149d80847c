#!/usr/bin/env bash
# How local a trained model's block selection is: msa/tile_union (docs/run_management.md), read while
# `small` trains with MSA on LEN-token rows of the embedded corpus (dense warm-up, then sparse), one
# GPU, bf16, selection stats every STATS_EVERY steps. The number decides whether a kernel that runs each
# tile of queries over the union of its queries' blocks could beat the KV-outer kernels (docs/kernels.md,
# "Next steps"). Run from the repository root (device machine):
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/tile_union_gpu.sh
# Knobs: LEN (16384), STEPS (300), WARMUP (50), STATS_EVERY (25), EXTRA (more Hydra overrides),
# CPU_CHECK=1 (a rehearsal on a machine without a GPU: tiny model, 256-token rows, 12 steps).
# Results in $OUT: tile_union_metrics.jsonl (the run's metrics), tile_union.json (the stats rows),
# tile_union.log.
set -uo pipefail
OUT=${OUT:-runs/tile_union}
LOG=$OUT/tile_union.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
MODEL=(model=small "data.seq_len=${LEN:-16384}")
STEPS=${STEPS:-300}
if [ "${CPU_CHECK:-0}" = 1 ]; then
  MODEL=(model=tiny data.seq_len=256); STEPS=12; STATS_EVERY=${STATS_EVERY:-4}; WARMUP=${WARMUP:-4}
else
  setup
fi
RUN=$(mktemp -d)/run  # the checkpoint stays on the machine; the metrics come back
TAIL=4 stage train $(( $(left) - 20 )) python3 -m train "${MODEL[@]}" "run.steps=$STEPS" \
  "recipe.warmup_steps=${WARMUP:-50}" "logging.stats_every=${STATS_EVERY:-25}" logging.progress=false \
  logging.wandb.mode=disabled "run_dir=$RUN" ${EXTRA:-}
cp "$RUN/metrics.jsonl" "$OUT/tile_union_metrics.jsonl"
python3 - "$OUT/tile_union_metrics.jsonl" "$OUT/tile_union.json" <<'EOF' | tee -a "$LOG"
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
keys = ("msa/tile_union", "msa/index_recall", "msa/oracle_recall", "msa/sparsity", "msa/nontrivial_share")
stats = [{"step": r["step"], "sparse": r.get("train/phase_sparse"), "seq_len": r.get("train/seq_len"),
          "loss": r.get("loss/lm"), **{k: r.get(k) for k in keys}} for r in rows if r.get("msa/tile_union") is not None]
json.dump({"commit": os.environ.get("MSA_GIT_COMMIT"), "rows": stats}, open(sys.argv[2], "w"), indent=1)
print("step  sparse  loss    tile_union  index_recall  oracle  sparsity")
for s in stats:
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
    print(f"{s['step']:>4}  {s['sparse']!s:>6}  {f(s['loss'])}  {f(s['msa/tile_union'], 2):>10}  "
          f"{f(s['msa/index_recall']):>12}  {f(s['msa/oracle_recall'])}  {f(s['msa/sparsity'])}")
EOF
ls -l "$OUT"
