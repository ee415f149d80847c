#!/bin/bash
# One GPU call (<= 9 minutes) for the training-step options: bench/step_speed.py stage by stage, each under
# its own time limit, every measured point appended to $OUT/step_speed.jsonl as it finishes (logs beside
# it: 7 files). Run from the repository root on a one-GPU machine:
#   MSA_GIT_COMMIT=<sha> bash bench/step_speed_gpu.sh
# Stages (STAGES): test (the gpu tests of the varlen path), small (32K and 128K single-document rows: dense,
# MSA full and selective checkpointing, one profiled step each at 32K), packed (a 192K row of documents
# under 6K tokens: the same plus dense varlen and the warm-up phase with and without varlen, each profiled),
# compile (MSA selective with compiled blocks, 128K then 32K), base (the base model, if BASE_MIN seconds
# are left).
# A CPU dry run at toy sizes (the model, rows and EXTRA Hydra overrides are the only differences):
#   MODEL=tiny BASE=tiny ONE="one:256" PACKED="packed:512:128" EXTRA="model.n_layers=2" TOTAL=2000 \
#     STAGES="small packed compile base" bash bench/step_speed_gpu.sh
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl).
set -uo pipefail
OUT=${OUT:-runs/step_speed}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import deepspeed, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
STAGES=${STAGES:-test small packed compile base}
TOTAL=${TOTAL:-530}  # seconds for the whole call; base takes what the others leave
BASE_MIN=${BASE_MIN:-90}
MODEL=${MODEL:-small}
BASE=${BASE:-base}
ONE=${ONE:-one:32768 one:131072}
PACKED=${PACKED:-packed:196608:6144}
read -r -a ONE_ROWS <<< "$ONE"
LONGEST_FIRST=$(printf '%s\n' "${ONE_ROWS[@]}" | tac | tr '\n' ' ')  # compile: the longest row first
JSON="$OUT/step_speed.jsonl"
source "$(dirname "$0")/gpu_run.sh" gpu.txt
bench() {  # name, limit, bench/step_speed.py arguments...
  local name=$1 limit=$2; shift 2
  run "$name" "$limit" python3 -m bench.step_speed --out "$JSON" "$@" -- ${EXTRA:-}
  grep -E "^ +(row|one|packed)|Error" "$OUT/$name.log" | tail -n 14
}
for stage in $STAGES; do
  case $stage in
    test) run test 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dense.py
          tail -n 3 "$OUT/test.log" ;;
    small) bench small 150 --model "$MODEL" --rows "${ONE_ROWS[@]}" --points msa_full msa_selective dense \
             --profile-rows "${ONE_ROWS[0]}" ;;
    packed) bench packed 120 --model "$MODEL" --rows "$PACKED" --points msa_full msa_selective dense \
              dense_varlen warmup_loop warmup_varlen --profile-rows "$PACKED" ;;
    compile) bench compile 150 --model "$MODEL" --rows $LONGEST_FIRST --points msa_selective_compile ;;
    base) left=$((TOTAL - SECONDS - 10))
          if [ "$left" -lt "$BASE_MIN" ]; then echo "== base skipped: ${left}s left"; continue; fi
          bench base "$left" --model "$BASE" --rows "${ONE_ROWS[@]}" --points msa_full msa_selective dense ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "== done in ${SECONDS}s; $(wc -l < "$JSON" 2>/dev/null || echo 0) points in $JSON"
