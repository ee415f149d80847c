#!/bin/bash
# bench/parallel.py for several layouts, each under its own time limit, results appended to
# $OUT/parallel.jsonl (logs beside it). Run from the repository root on the GPU machine:
#   SEQ_LENS="524288" LIMITS="240 170 170" bash bench/parallel_gpu.sh
# LAYOUTS picks them (default "sp1 sp2 cp2", for 2 GPUs; "sp2cp2" and "cp4" need 4), LIMITS their
# time limits in seconds, in the same order.
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl).
set -uo pipefail
OUT=${OUT:-runs/parallel}
mkdir -p "$OUT"
SEQ_LENS=${SEQ_LENS:-32768 131072 524288}
read -r -a LIM <<< "${LIMITS:-300 200 200}"
COMMON="parallel.activation_checkpointing=true parallel.mlp_tile_tokens=32768"
source "$(dirname "$0")/gpu_run.sh" gpus.txt
LAYOUTS=${LAYOUTS:-sp1 sp2 cp2}
i=0
for layout in $LAYOUTS; do
  case $layout in
    sp1) args=(--sp 1); n=1 ;;
    sp2) args=(--sp 2); n=2 ;;
    cp2) args=(--cp 2); n=2 ;;
    sp2cp2) args=(--sp 2 --cp 2); n=4 ;;
    cp4) args=(--cp 4); n=4 ;;
    *) echo "unknown layout $layout"; exit 2 ;;
  esac
  if [ "$n" = 1 ]; then
    run "$layout" "${LIM[$i]:-300}" python3 -m bench.parallel "${args[@]}" --seq-lens $SEQ_LENS \
      --out "$OUT/parallel.jsonl" -- $COMMON
  else
    run "$layout" "${LIM[$i]:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" -m bench.parallel \
      "${args[@]}" --seq-lens $SEQ_LENS --out "$OUT/parallel.jsonl" -- $COMMON
  fi
  tail -n 4 "$OUT/$layout.log"
  i=$((i + 1))
done
cat "$OUT/parallel.jsonl"
