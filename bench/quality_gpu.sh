#!/bin/bash
# The quality run (bench/quality.py) on one GPU, within 10 minutes of wall time, results in $OUT:
#   OUT=/path/to/out bash bench/quality_gpu.sh
# Run from the repository root. BUDGET_S (default 535) is the script's own budget, start-up included;
# LIMIT_S (default 570) kills it if it overruns (the results of finished runs are already written);
# JOBS (default 6: every run of 3 seeds x 2 arms at once) runs that many in their own processes;
# (on an 80 GB H100 six runs at 16K, three of them msa_fine with 64 blocks, did not fit: JOBS=5 there);
# EVAL_S (default 110: a run's evals with these defaults took 77-96 s on an H200 with 6 runs at once) is
# what the plan reserves for each run's evals, so the probe does not run them (EVAL_S= times them instead);
# QUALITY_ARGS adds arguments, e.g. QUALITY_ARGS="--seeds 0 1 --generate". A run longer than one call:
# QUALITY_ARGS="--steps N --save-every 100" fixes the step count (no probe), and the same command run again
# on the same machine resumes every unfinished run from WORK (default runs/quality_work) until all are done;
# make that call at once: the lent machine (and WORK with it) is given back 30 s after a call ends.
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl); W&B is
# not needed (every run logs with logging.wandb.mode=disabled); matplotlib is on the GPU image.
# $OUT gets gpus.txt, quality.log, quality.json, quality_{loss,bpb,retrieval,recall,paired,share,answer}.png and
# logs/ (a log per worker process).
set -uo pipefail
OUT=${OUT:-runs/quality}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MSA_GIT_COMMIT=${MSA_GIT_COMMIT:-$(python3 -m bench.meta --commit)}
source "$(dirname "$0")/gpu_run.sh" gpus.txt
EVAL_S=${EVAL_S-110}
EVAL_ARGS=()
[ -n "$EVAL_S" ] && EVAL_ARGS=(--eval-s "$EVAL_S")
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of words
run quality "${LIMIT_S:-570}" python3 -m bench.quality --budget-s "${BUDGET_S:-535}" --out "$OUT" \
  --work "${WORK:-runs/quality_work}" --jobs "${JOBS:-6}" --items 4 \
  "${EVAL_ARGS[@]}" ${QUALITY_ARGS:-}
grep -E "^(probe|plan|skip|failed|dense|msa|done|Traceback|[A-Za-z]+Error)" "$OUT/quality.log"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
