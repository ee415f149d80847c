#!/bin/bash
# The quality run (bench/quality.py) on one GPU, within 9 minutes of wall time, results in $OUT:
#   OUT=/path/to/out bash bench/quality_gpu.sh
# Run from the repository root. BUDGET_S (default 470) is the script's own budget, start-up included;
# LIMIT_S (default 520) kills it if it overruns (the results of finished runs are already written);
# QUALITY_ARGS adds arguments, e.g. QUALITY_ARGS="--seeds 0 1 --generate".
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl); W&B is
# not needed (every run logs with logging.wandb.mode=disabled); matplotlib is on the GPU image.
# $OUT gets 7 files: gpus.txt, quality.log, quality.json and quality_{loss,bpb,retrieval,recall}.png.
set -uo pipefail
OUT=${OUT:-runs/quality}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MSA_GIT_COMMIT=${MSA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
source "$(dirname "$0")/gpu_run.sh" gpus.txt
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of words
run quality "${LIMIT_S:-520}" python3 -m bench.quality --budget-s "${BUDGET_S:-470}" --out "$OUT" \
  --work "${WORK:-/tmp/msa-quality}" ${QUALITY_ARGS:-}
grep -E "^(probe|plan|skip|dense|msa|done|Traceback|[A-Za-z]+Error)" "$OUT/quality.log"
