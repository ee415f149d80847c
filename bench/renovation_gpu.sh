#!/bin/bash
# The renovation's acceptance check (issue 11) and the selection-pattern cases (issue 12, items 18-19), in
# one GPU call of at most ~9.5 minutes (DEADLINE=555 s; every stage has its own time limit).
#   1. setup: DeepSpeed/Hydra/webdataset wheels from .whl/ into .site (bench/gpu_wheels.sh), GPU and versions;
#   2. compare: bench/compare_kernels.py, this tree's kernels against 8eed98b's (.base/kernels): timings and
#      bitwise equality of outputs and gradients, 128K and 32K, H x Hkv = 32x2, 32x4, 8x2, both dQ paths;
#   3. tests: the GPU kernel tests (sparse attention, index top-k and KL, the float64 oracle);
#   4. step: bench/step_time_old_new.py, one training step of model=small at 128K (MSA, bf16, activation
#      checkpointing), old tree (.old = git archive of 8eed98b) against this one, alternating, 2 rounds;
#   5. patterns: bench/msa_attention.py at 128K, Hkv=2: msa_main and index_kl on the random, same, local and
#      sink_local selections, and FlexAttention on the local selection (whatever time is left).
# The comparison and the step run first: they decide the acceptance check.
# Prepare in the checkout before the call (both are carried to the GPU machine):
#   mkdir -p .base && git archive 8eed98b kernels | tar -x -C .base
#   mkdir -p .old && git archive 8eed98b | tar -x -C .old
# Run from the repository root:  MSA_GIT_COMMIT=<sha of this tree> bash bench/renovation_gpu.sh
# Results in $OUT: compare_kernels.json, step_time_old_new.json, msa_patterns.json, renovation.log.
set -uo pipefail
OUT=${OUT:-runs/renovation_gpu}
LOG=$OUT/renovation.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
for need in .base/kernels/__init__.py .old/train/loop.py; do
  [ -f "$need" ] || { echo "missing $need: prepare .base and .old as the header of $0 says"; exit 2; }
done
# CPU_CHECK=1: a rehearsal of this script on a machine without a GPU (toy sizes, same stages and files)
CMP=(--sizes 131072 32768 --shapes 32x2 32x4 8x2 --dq-path kv dkdv --time-budget 95)
STEP=(--model small --seq-len 131072)
PAT=(--sizes 131072)
CAP=(130 120 170)  # seconds for compare, tests, step; patterns get what is left
if [ "${CPU_CHECK:-0}" = 1 ]; then
  CMP=(--device cpu --sizes 32 --shapes 4x2 --time-budget 10); STEP=(--device cpu --model tiny --seq-len 256)
  PAT=(--device cpu --sizes 64); CAP=(900 300 300)
fi
setup
TAIL=24 stage compare "${CAP[0]}" python3 bench/compare_kernels.py --baseline .base "${CMP[@]}" \
  --json "$OUT/compare_kernels.json"
TAIL=8 stage tests "${CAP[1]}" python3 -u -m pytest -v -rfEs -m gpu -p no:cacheprovider \
  tests/test_kernel_sparse_attention.py tests/test_kernel_index.py tests/test_oracle.py
TAIL=12 stage step "${CAP[2]}" python3 bench/step_time_old_new.py --old .old --new . --old-commit 8eed98b "${STEP[@]}" \
  --rounds 2 --steps 2 --json "$OUT/step_time_old_new.json" -- parallel.activation_checkpointing=true
budget=$(( $(left) - 40 ))
TAIL=40 stage patterns 600 python3 bench/msa_attention.py "${PAT[@]}" --hkv 2 --cases msa_main index_kl flex_msa \
  --patterns same local sink_local --flex-patterns local --time-budget "$budget" --json "$OUT/msa_patterns.json"
ls -l "$OUT"
