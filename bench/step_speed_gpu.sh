#!/bin/bash
# One GPU call (DEADLINE, default 530 s) for the training-step options: bench/step_speed.py stage by stage,
# each under its own cap and the call's deadline (bench/gpu_stages.sh), every measured point appended to
# $OUT/step_speed.jsonl as it finishes, one log $OUT/step_speed.log. From the repository root on a one-GPU
# machine:
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/step_speed_gpu.sh
# Stages (STAGES): test (the gpu tests of the varlen path), small (32K and 128K one-document rows: MSA full
# and selective checkpointing, dense; one profiled step each at 32K), packed (a 192K row of documents under
# 6K tokens: the same plus dense varlen and the warm-up phase with and without varlen, each profiled),
# compile (MSA selective with compiled blocks, 128K then 32K), base (the base model, with what is left);
# short (not in the default list: a 192K row of documents under 2,048 tokens, where every query of small
# sees at most topk blocks and MSA takes the dense path: dense, dense varlen, MSA with the loop and with
# varlen, the warm-up with varlen, each profiled); klbwd (not in the default list: the KL's teacher in the
# attention backward against the separate KL, small at 32K and 128K with both checkpointing policies, dense
# beside them, the 32K row profiled; then the attention-level pair msa_whole / msa_whole_klbwd of
# bench/msa_attention.py at G = 4 and 16; first the gpu tests of the fused path and the varlen lse, then
# bench/tune_sparse_attention.py kl: both places of the KL per dK/dV launch setting, by kernel); groups (not
# in the default list: what the per-source losses cost, the `_groups` points against the same points without
# them, small at 32K and on the 192K row of documents under 6K tokens, each point profiled).
# A CPU dry run at toy sizes (the model, rows and EXTRA Hydra overrides are the only differences):
#   MODEL=tiny BASE=tiny ONE="one:256" PACKED="packed:512:128" EXTRA="model.n_layers=2" DEADLINE=2000 \
#     bash bench/step_speed_gpu.sh
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl).
set -uo pipefail
OUT=${OUT:-runs/step_speed}
LOG=$OUT/step_speed.log
DEADLINE=${DEADLINE:-530}
source "$(dirname "$0")/gpu_stages.sh"
setup
STAGES=${STAGES:-test small packed compile base}
MODEL=${MODEL:-small}
BASE=${BASE:-base}
ONE=${ONE:-one:32768 one:131072}
PACKED=${PACKED:-packed:196608:6144}
SHORT=${SHORT:-packed:196608:2048}
read -r -a ONE_ROWS <<< "$ONE"
LONGEST_FIRST=$(printf '%s\n' "${ONE_ROWS[@]}" | tac | tr '\n' ' ')  # compile: the longest row first
JSON=$OUT/step_speed.jsonl
bench() {  # name, cap in seconds, bench/step_speed.py arguments...
  local name=$1 cap=$2; shift 2
  TAIL=14 stage "$name" "$cap" python3 -m bench.step_speed --out "$JSON" "$@" -- ${EXTRA:-}
}
for s in $STAGES; do
  case $s in
    test) TAIL=3 stage test 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dense.py ;;
    small) bench small 150 --model "$MODEL" --rows "${ONE_ROWS[@]}" --points msa_full msa_selective dense \
             --profile-rows "${ONE_ROWS[0]}" ;;
    packed) bench packed 120 --model "$MODEL" --rows "$PACKED" --points msa_full msa_selective dense \
              dense_varlen warmup_loop warmup_varlen --profile-rows "$PACKED" ;;
    short) bench short 150 --model "$MODEL" --rows "$SHORT" --points dense dense_varlen msa_selective \
             msa_selective_varlen warmup_varlen --profile-rows "$SHORT" ;;
    klbwd) TAIL=3 stage klbwd_test 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_sparse_kl.py \
             tests/test_dense.py
           TAIL=40 stage klbwd_sweep 150 env OUT="$OUT" python3 bench/tune_sparse_attention.py kl
           bench klbwd 240 --model "$MODEL" --rows "${ONE_ROWS[@]}" --points msa_selective msa_selective_klbwd \
             msa_full msa_full_klbwd dense --profile-rows "${ONE_ROWS[0]}"
           TAIL=14 stage klbwd_attention 150 python3 bench/msa_attention.py --sizes 32768 131072 --hkv 2 8 \
             --cases msa_whole msa_whole_klbwd --json "$OUT/msa_attention_klbwd.json" ;;
    groups) bench groups 200 --model "$MODEL" --rows "${ONE_ROWS[0]}" "$PACKED" --points msa_selective \
              msa_selective_groups dense dense_groups --profile-rows "${ONE_ROWS[0]}" "$PACKED" ;;
    compile) bench compile 150 --model "$MODEL" --rows $LONGEST_FIRST --points msa_selective_compile ;;
    base) bench base "$DEADLINE" --model "$BASE" --rows "${ONE_ROWS[@]}" --points msa_full msa_selective dense ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "== done in $((SECONDS - T_START)) s; $(wc -l < "$JSON" 2>/dev/null || echo 0) points in $JSON" | tee -a "$LOG"
