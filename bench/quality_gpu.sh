#!/bin/bash
# The quality run (bench/quality.py) on one GPU, within 10 minutes of wall time, results in $OUT:
#   OUT=/path/to/out bash bench/quality_gpu.sh
# Run from the repository root. BUDGET_S (default 535) is the script's own budget, start-up included;
# LIMIT_S (default 570) kills it if it overruns (the results of finished runs are already written);
# JOBS (default 6: every run of 3 seeds x 2 arms at once) runs that many in their own processes;
# QUALITY_ARGS adds arguments, e.g. QUALITY_ARGS="--seeds 0 1 --generate".
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl); W&B is
# not needed (every run logs with logging.wandb.mode=disabled); matplotlib is on the GPU image.
# $OUT gets gpus.txt, quality.log, quality.json, quality_{loss,bpb,retrieval,recall}.png and logs/ (a log per
# worker process).
set -uo pipefail
OUT=${OUT:-runs/quality}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MSA_GIT_COMMIT=${MSA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
source "$(dirname "$0")/gpu_run.sh" gpus.txt
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of words
run quality "${LIMIT_S:-570}" python3 -m bench.quality --budget-s "${BUDGET_S:-535}" --out "$OUT" \
  --work "${WORK:-/tmp/msa-quality}" --jobs "${JOBS:-6}" --items 4 ${QUALITY_ARGS:-}
grep -E "^(probe|plan|skip|failed|dense|msa|done|Traceback|[A-Za-z]+Error)" "$OUT/quality.log"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
