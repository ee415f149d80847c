#!/usr/bin/env bash
# The query-tile-outer MSA forward (kernels/sparse_tile.py) on one GPU: its GPU tests (bf16 against the
# reference and the KV-outer forward), then bench/tile_fwd.py with the launch sweep: KV-outer against
# tile-outer, dense SDPA and FlexAttention on the same selections, small's heads (8 over 2) and 1b's (32 over
# 2), at LENGTHS (32768 131072); then training steps of `small` at STEP_LENGTHS (32768 131072), MSA with the KV-outer
# forward and dense in one process, MSA with STEP_TILE's overrides (attention.fwd_path=tile) in the next (same GPU,
# same call). The index KL two ways too (bench/tile_fwd.py --kl: kernels/index_kl.py against index_kl_tile.py).
# Run from the repository root (device machine):
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/tile_fwd_gpu.sh
# CPU_CHECK=1: a rehearsal without a GPU (toy shapes in the interpreter, about 2 minutes).
# SKIP_STEPS=1 leaves the training steps out, SWEEP=0 the launch sweep (SWEEP=kl: the tile KL's alone);
# TILE_ARGS adds bench/tile_fwd.py arguments (e.g. "--ratios 1.4 --no-random"), STEP_TILE sets the second step
# run's overrides (e.g. attention.kl_path=tile).
# Results in $OUT: tile_fwd.json, train_step_small_fwd_{kv,tile}.json, tile_fwd.log.
set -uo pipefail
OUT=${OUT:-runs/tile_fwd}
LOG=$OUT/tile_fwd.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
AC=(parallel.activation_checkpointing=true)
if [ "${CPU_CHECK:-0}" = 1 ]; then
  ARGS=(--device cpu --lengths 256 --ratios 1.4)
  STEP=(--device cpu --model tiny --lengths 256 --steps 1 --no-profile)
  AC+=(attention.impl=triton attention.block_size=16 attention.topk=4)
  export TRITON_INTERPRET=1  # the kernels on CPU tensors
else
  setup
  TAIL=4 stage tile_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_sparse_tile.py \
    tests/test_kernel_kl_tile.py
  ARGS=(--lengths ${LENGTHS:-32768 131072} ${TILE_ARGS:-})
  [ "${SWEEP:-1}" = 1 ] && ARGS+=(--sweep)
  [ "${SWEEP:-1}" = kl ] && ARGS+=(--kl-sweep)
  STEP=(--model small --lengths ${STEP_LENGTHS:-32768 131072} --no-profile)
fi
STEPS_S=${STEPS_S:-170}  # what the two step runs are left
[ "${SKIP_STEPS:-0}" = 1 ] && STEPS_S=0
TAIL=40 stage tile_fwd $(( $(left) - STEPS_S )) python3 -m bench.tile_fwd "${ARGS[@]}" \
  --time-budget $(( $(left) - STEPS_S - 40 )) --json "$OUT/tile_fwd.json"
if [ "${SKIP_STEPS:-0}" = 1 ]; then ls -l "$OUT"; exit 0; fi
TAIL=8 stage step_kv $(( $(left) * 6 / 10 )) python3 -m bench.train_step "${STEP[@]}" --attention msa dense \
  --time-budget $(( $(left) * 6 / 10 - 10 )) --json "$OUT/train_step_small_fwd_kv.json" -- "${AC[@]}"
TAIL=8 stage step_tile $(( $(left) - 5 )) python3 -m bench.train_step "${STEP[@]}" --attention msa \
  --time-budget $(( $(left) - 15 )) --json "$OUT/train_step_small_fwd_tile.json" -- "${AC[@]}" ${STEP_TILE:-attention.fwd_path=tile}
ls -l "$OUT"
