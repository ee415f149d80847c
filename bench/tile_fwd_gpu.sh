#!/usr/bin/env bash
# The query-tile-outer MSA forward (kernels/sparse_tile.py) on one GPU: its GPU tests (bf16 against the
# reference and the KV-outer forward), then bench/tile_fwd.py with the launch sweep: KV-outer against
# tile-outer, dense SDPA and FlexAttention on the same selections, small's heads (8 over 2) and 1b's (32 over
# 2), at LENGTHS (32768 131072). Run from the repository root (device machine):
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/tile_fwd_gpu.sh
# CPU_CHECK=1: a rehearsal without a GPU (toy shapes in the interpreter, about 2 minutes).
# Results in $OUT: tile_fwd.json, tile_fwd.log.
set -uo pipefail
OUT=${OUT:-runs/tile_fwd}
LOG=$OUT/tile_fwd.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
if [ "${CPU_CHECK:-0}" = 1 ]; then
  ARGS=(--device cpu --lengths 256 --ratios 1.4)
else
  setup
  TAIL=4 stage tile_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_sparse_tile.py
  ARGS=(--lengths ${LENGTHS:-32768 131072} --sweep)
fi
TAIL=40 stage tile_fwd $(( $(left) - 10 )) python3 -m bench.tile_fwd "${ARGS[@]}" --time-budget $(( $(left) - 40 )) \
  --json "$OUT/tile_fwd.json"
ls -l "$OUT"
