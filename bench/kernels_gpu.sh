#!/bin/bash
# One GPU call for kernel work: the GPU kernel tests, a launch-setting sweep and the timings of
# bench/tune_sparse_attention.py, bench/compare_kernels.py against a baseline tree's kernels, and the
# full benchmark bench/msa_attention.py.
# Run from the repository root on the GPU machine (results and logs to $OUT):
#   mkdir -p .base && git archive <commit> kernels | tar -x -C .base     # here, before the call
#   MSA_GIT_COMMIT=<sha> STAGES="test tune compare bench" bash bench/kernels_gpu.sh
# Settings (environment): STAGES; TUNE_ENV (e.g. "SWEEP_KERNELS=dkdv_dq SWEEP_N=131072");
# COMPARE_ARGS (default "--sizes 131072"); LIMITS (seconds for test, tune, compare, bench);
# BENCH_BUDGET (msa_attention.py's --time-budget, default 430).
set -uo pipefail
OUT=${OUT:-runs/kernels_gpu}
mkdir -p "$OUT"
STAGES=${STAGES:-test tune compare}
read -r -a LIM <<< "${LIMITS:-200 240 240 500}"
source "$(dirname "$0")/gpu_run.sh" gpu.txt
for stage in $STAGES; do
  case $stage in
    test) run test "${LIM[0]}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_sparse_attention.py \
            tests/test_kernel_sparse_kl.py \
            tests/test_kernel_index.py tests/test_kernel_csr.py
          tail -n 3 "$OUT/test.log" ;;
    tune) run tune "${LIM[1]}" env ${TUNE_ENV:-} python3 bench/tune_sparse_attention.py sweep
          grep -E "sweep N|N= |fwd kv \+ bwd|bitwise|rel err|^ +[0-9.]+ " "$OUT/tune.log" | head -n 80 ;;
    compare) run compare "${LIM[2]}" python3 bench/compare_kernels.py --baseline .base ${COMPARE_ARGS:---sizes 131072} \
               --dq-path kv dkdv --json "$OUT/compare_kernels.json"
             tail -n 60 "$OUT/compare.log" ;;
    bench) run bench "${LIM[3]}" python3 bench/msa_attention.py --time-budget "${BENCH_BUDGET:-430}" \
             --json "$OUT/msa_attention_h200.json"
           tail -n 80 "$OUT/bench.log" ;;
  esac
done
