#!/bin/bash
# Training-step throughput of MSA against dense attention (issue 15, item 1) in one GPU call of at most ~9.5
# minutes (DEADLINE=555 s; every stage has its own time limit and bench/train_step.py its own --time-budget
# inside it, so a stage ends by itself with what fitted and says what it skipped and why):
#   1. setup: DeepSpeed/Hydra/webdataset wheels from .whl/ into .site (bench/gpu_wheels.sh), GPU and versions;
#   2. small: one-document rows 16K, 32K, 128K, 512K, 1M and a packed 192K row, MSA first, then dense as far
#      as the budget allows;
#   3. base: one-document rows 16K, 32K, 128K and the packed 192K row, MSA then dense;
#   4. base_1m: one MSA step of model=base at 1M with the memory breakdown, under full checkpointing
#      (selective keeps each layer's attention output: +84 GB at 1M for base, more than the card holds);
#      after an out-of-memory, the same with the block inputs offloaded to host memory
#      (parallel.checkpoint_offload: 48 GiB for base at 1M) and the MLP tiled over 64K tokens
#      (parallel.mlp_tile_tokens) if time is left; both with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
# STAGES (default "small base base_1m") picks the stages; two more, for a second call:
#   5. 1b: model=1b at 16K, 128K, 512K and the packed 192K row, MSA then dense (an out-of-memory ends a
#      series and is recorded);
#   6. dense_layer: what the dense first layer costs at long context, model=small MSA at 128K and 1M three
#      ways, one process each: as configured (attention.n_dense_layers=1), with no dense layer
#      (attention.n_dense_layers=0), and with the first layer a sliding window of 4096 keys
#      (model.sliding_window=4096 model.sliding_layers=[0]).
#   each fills most of a call: STAGES=dense_layer MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/train_step_gpu.sh,
#   then STAGES=1b in the next call;
#   7. host: where the host time of the host-bound short rows goes, model=small at 16K and 32K, MSA and dense,
#      each point also under a CPU profile with Python stacks and the sync sites (--host-profile; ~2 min);
#   8. old_new: one MSA training step of model=small, this tree against OLD_TREE (a `git archive` of commit
#      OLD_COMMIT in an ignored folder, carried), side by side in alternating rounds
#      (bench/step_time_old_new.py), at each of OLD_NEW_LENGTHS (default 16K, 32K, 128K; ~80 s each), after
#      the GPU tests of the reverse-index builders and the index kernels (tests/test_kernel_csr.py,
#      tests/test_kernel_index.py).
#   9. rope: the fused RoPE kernel (kernels/rope.py) against the PyTorch path: bench/rope.py for small and
#      base at 16K and 32K (device time, host time, kernels per forward+backward), its GPU tests, and MSA and
#      dense steps of small at 16K and 32K with model.rope_impl=torch, then =triton, twice (~5 min);
#      rope_steps: those steps only (~4 min).
#  10. dense_1m: model=small at 1M, MSA then dense, one warm-up and one timed step each (dense: about 170 s a
#      step by the fit over 16K-128K, so about 6 minutes in all), so the 1M ratio is measured side by side
#      rather than extrapolated; it fills most of a call: STAGES=dense_1m MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...
#  11. first_layer_1m: the same at 1M with the MSA series' first layer a sliding window of 4096 keys
#      (bench.train_step --msa-overrides), dense as configured, in one process (about 4.5 minutes on an H200:
#      dense's step of about 185 s runs once, timed by itself, --time-warmup-above 100), then, if about 100 s
#      are left, MSA with no dense first layer alone (attention.n_dense_layers=0), so the two options' 1M ratios
#      are measured in one call (321 s in all): STAGES=first_layer_1m MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...;
#      on a card under 100 GB, dense_1m and first_layer_1m run both series with full checkpointing and the MLP
#      tiled (FIT_1M below; an H100 ran out of memory without them; 334 s on an H100, docs/scaling.md 3v)
#  12. base_1m_window: model=base at 1M, MSA with the first layer a sliding window of 4096 keys, and dense at 256K
#      and 512K in the same process, dense at 1M extrapolated from those two and labelled so (--extrapolate-dense:
#      base dense at 1M, about 620 s a step by that fit, does not fit a call); checkpoint policy full for both,
#      as base_1m (selective does not fit base at 1M). 391 s on an H200 (docs/scaling.md 3n):
#      STAGES=base_1m_window MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...; since 3o it first runs the GPU test of the
#      full policy's kept selection and, where time is left, the MSA step with parallel.checkpoint_keep_selection=false
#      (MSA_ONLY=1: no dense points, for a short call: 189 s on an H200 with the A/B left out by NOKEEP_MIN=400,
#      docs/scaling.md 3o; about 330 s with it)
#  13. 1b_long: how far up one GPU takes model=1b (issue 15, item 3), MSA alone, the first layer a sliding window
#      of 4096 keys and checkpoint policy full, as base_1m_window: one warm-up and one timed step at 512K with
#      the memory breakdown, again with the block inputs in host memory (parallel.checkpoint_offload) if it runs
#      out of memory; then 1M with the block inputs offloaded and the MLP tiled over 64K tokens (an
#      out-of-memory is recorded, with where it was raised; on an H100 at 00b037a: 512K ran offloaded, 1M ran out in
#      the sparse backward's dK/dV partials, since taken a group of query chunks at a time, docs/scaling.md 3q;
#      the GPU test of those groups runs first; at 4ea91cc with the overrides below, 0.5 GiB short in the sparse
#      backward, docs/scaling.md 3t; at 043ed09, past every MSA layer's backward, out of memory in the window
#      layer's recompute, whose SDPA chunks' output was copied for the output projection; at f6510d5, with the
#      window in one FlashAttention call, out of memory in its fp32 dq accumulator, since taken in query chunks,
#      docs/scaling.md 3u; the GPU tests of the window in FlashAttention, one call and chunks, run first too):
#      STAGES=1b_long MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...; SKIP_512K=1 leaves the 512K point out,
#      LONG_1B_OVERRIDES adds overrides to both points (e.g. "attention.dq_path=tile attention.kl_path=tile": no
#      dQ or dq_idx partials, for an 80 GB card); LONG_1B_1M_ARGS adds bench.train_step arguments to the 1M point
#      (e.g. "--time-warmup-above 100": one step, timed by itself, where a call has no room for two)
#  14. rows: model=$ROWS_MODEL (default small) at 16K and 32K with ROWS (default "1 2 4") one-document rows per micro-batch
#      (bench.train_step --rows), MSA then dense in one process per row count, so each ratio is side by side at the
#      same tokens per step: whether MSA's host-bound short rows catch up when a step carries more rows (~5 min):
#      STAGES=rows MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...; ROWS_KL_STRIDES (default 1) repeats it per MSA
#      attention.kl_query_stride, e.g. ROWS="8" ROWS_KL_STRIDES="4 1": the GPU-bound ratio with each stride
#  15. kl_stride: the strided index KL (attention.kl_query_stride, msa/layer.py): model=small at 16K, 32K and 128K,
#      one process per stride in KL_STRIDES (default "4 1"), each MSA with that stride then dense, so each ratio is
#      side by side and the strides compare through dense (~5 min): STAGES=kl_stride MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...
#  16. ncu: Nsight Compute on the MSA kernels of one attention step of model=small at 128K (bench/ncu_msa.py: block
#      selection, the sparse attention's forward and backward, the index KL with strides 1 and 4; NCU_LEN sets the
#      length): speed of light, pipes, warp stalls, occupancy per kernel, into $OUT/ncu_msa.txt (~2 min); it can
#      follow kl_stride in one call: STAGES="kl_stride ncu" MSA_GIT_COMMIT=<sha> OUT=$OUT bash ...
# EXTRA_OVERRIDES adds Hydra overrides to every stage's steps, e.g. EXTRA_OVERRIDES=model.rope_impl=torch.
# Every run: bf16, ZeRO-1, activation checkpointing (the project's measured configuration; policy
# selective, the default, except base_1m), sparse phase.
# Run from the repository root:  MSA_GIT_COMMIT=<sha of this tree> bash bench/train_step_gpu.sh
# Results in $OUT: train_step_small.json, train_step_base.json, train_step_base_1m.json (and
# train_step_base_1m_offload.json after an OOM), train_step_1b.json, train_step_small_dense{1,0,window}.json,
# train_step_small_host.json, step_time_old_new_<length>.json, train_step_small_1m_both.json (dense_1m),
# train_step_small_1m_{window_both,dense0}.json (first_layer_1m), train_step_base_1m_window{,_nokeep}.json,
# train_step_1b_{512k,512k_offload,1m_offload}.json (1b_long), train_step_<ROWS_MODEL>_rows{1,2,4}.json (rows),
# train_step_small_kl_stride{4,1}.json (kl_stride), ncu_msa.txt (ncu), train_step.log.
set -uo pipefail
OUT=${OUT:-runs/train_step_gpu}
LOG=$OUT/train_step.log
DEADLINE=${DEADLINE:-555}
source "$(dirname "$0")/gpu_stages.sh"
AC="parallel.activation_checkpointing=true ${EXTRA_OVERRIDES:-}"
# CPU_CHECK=1: a rehearsal of this script on a machine without a GPU (tiny model, toy rows, same stages)
SMALL=(--model small --lengths 16384 32768 131072 524288 1048576 --packed 196608 --time-budget 200)
BASE=(--model base --lengths 16384 32768 131072 --packed 196608 --time-budget 165)
BIG=(--model base --lengths 1048576)
ONE_B=(--model 1b --lengths 16384 131072 524288 --packed 196608 --time-budget 230)
# --no-skip: the 1M point's projection from the one 128K point is coarse (the dense layer's share grows 64x)
LAYER=(--model small --lengths 131072 1048576 --packed --time-budget 100 --no-skip)
HOST=(--model small --lengths 16384 32768 --packed --time-budget 100 --host-profile)
OLD_NEW=(--model small --rounds 2 --steps 2)
DENSE_1M=(--model small --lengths 1048576 --packed --steps 1 --no-skip --no-profile --time-budget 480 --dense-reserve 390)
BASE_1M_WINDOW=(--model base --lengths 1048576 --dense-lengths 262144 524288 --packed --steps 1 --no-skip --no-profile
  --dense-reserve 330 --time-warmup-above 100 --extrapolate-dense)  # --time-budget: the stage's, from DEADLINE
ONE_B_LONG=(--model 1b --attention msa --packed --steps 1 --no-skip --no-profile --memory-breakdown)
LONG_1B=(524288 1048576)
OFFLOAD=(parallel.checkpoint_offload=true parallel.mlp_tile_tokens=65536)
ON_LENGTHS="16384 32768 131072"
ROWS_MODEL=${ROWS_MODEL:-small}
ROWS_ARGS=(--model "$ROWS_MODEL" --lengths 16384 32768 --packed --time-budget 110 --dense-reserve 45)
# shave a short call with KL_STRIDE_LENGTHS="16384 32768"
KL_STRIDE_ARGS=(--model small --lengths ${KL_STRIDE_LENGTHS:-16384 32768 131072} --packed --time-budget 140 --dense-reserve 60)
WINDOW=4096
if [ "${CPU_CHECK:-0}" = 1 ]; then
  SMALL=(--device cpu --model tiny --lengths 128 256 --packed 256 --time-budget 60)
  BASE=(--device cpu --model tiny --lengths 128 --packed --time-budget 30); BIG=(--device cpu --model tiny --lengths 512)
  ONE_B=(--device cpu --model tiny --lengths 128 --time-budget 30)
  LAYER=(--device cpu --model tiny --lengths 128 512 --packed --time-budget 30 --no-skip); WINDOW=64
  HOST=(--device cpu --model tiny --lengths 128 --packed --time-budget 30 --host-profile)
  OLD_NEW=(--device cpu --model tiny --rounds 1 --steps 1); ON_LENGTHS=256
  ROWS_ARGS=(--device cpu --model tiny --lengths 128 256 --packed --time-budget 30 --dense-reserve 10)
  KL_STRIDE_ARGS=(--device cpu --model tiny --lengths 256 --packed --time-budget 30 --dense-reserve 10)
  DENSE_1M=(--device cpu --model tiny --lengths 512 --packed --steps 1 --no-skip --no-profile --time-budget 60)
  BASE_1M_WINDOW=(--device cpu --model tiny --lengths 512 --dense-lengths 128 256 --packed --steps 1 --no-skip
    --no-profile --time-warmup-above 100 --extrapolate-dense)
  ONE_B_LONG=(--device cpu --model tiny --attention msa --packed --steps 1 --no-skip --no-profile --memory-breakdown)
  LONG_1B=(512 1024)
  OFFLOAD=(parallel.mlp_tile_tokens=256)  # checkpoint_offload needs a GPU (check_parallel says so)
  AC="$AC model.n_layers=2"; NOKEEP_MIN=${NOKEEP_MIN:-0}
fi
OLD_NEW_LENGTHS=${OLD_NEW_LENGTHS:-$ON_LENGTHS}
# small at 1M on a card under 100 GB (an 80 GB H100): selective checkpointing runs out of memory for MSA and dense,
# and under full MSA still does, in the MLP's hidden tensors (three of 5.4 GiB); full with the MLP tiled over 64K
# tokens fits both series (docs/scaling.md 3v). Both series get the same overrides, so the ratio stays like for like.
FIT_1M=()
if [ "${CPU_CHECK:-0}" != 1 ] && [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" \
     -lt 100000 ]; then
  FIT_1M=(parallel.checkpoint_policy=full parallel.mlp_tile_tokens=65536)
  echo "a card under 100 GB: the small 1M stages run with ${FIT_1M[*]}" | tee -a "$LOG"
fi
STAGES=${STAGES:-small base base_1m}
want() { [[ " $STAGES " == *" $1 "* ]]; }
for s in $STAGES; do
  case $s in small|base|base_1m|1b|dense_layer|host|old_new|rope|rope_steps|dense_1m|first_layer_1m|base_1m_window|1b_long|rows|kl_stride|ncu) ;;
    *) echo "STAGES: unknown stage '$s' (small base base_1m 1b dense_layer host old_new rope rope_steps dense_1m" \
         "first_layer_1m base_1m_window 1b_long rows kl_stride ncu)"
       exit 2;; esac
done
if want old_new && [ ! -d "${OLD_TREE:-}/train" ]; then
  echo "STAGES=old_new needs OLD_TREE, a folder with the old tree (git archive <commit> | tar -x -C <folder>)"; exit 2
fi
setup
if want old_new; then
  # the new tree's reverse-index builders compiled, against the torch ones (SKIP_CSR_TESTS=1: run already)
  if [ "${CPU_CHECK:-0}" != 1 ] && [ "${SKIP_CSR_TESTS:-0}" != 1 ]; then
    TAIL=3 stage csr_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_csr.py \
      tests/test_kernel_index.py
  fi
  for n in $OLD_NEW_LENGTHS; do
    TAIL=8 stage "old_new_$n" 90 python3 bench/step_time_old_new.py --old "$OLD_TREE" --old-commit "${OLD_COMMIT:-?}" \
      --new . "${OLD_NEW[@]}" --seq-len "$n" --json "$OUT/step_time_old_new_$n.json" -- $AC
  done
fi
if want rope || want rope_steps; then
  if [ "${CPU_CHECK:-0}" = 1 ]; then
    echo "rope: needs a GPU (the kernel on CUDA tensors); skipped in the CPU rehearsal" | tee -a "$LOG"
  else
    if want rope; then
      for m in small base; do
        TAIL=3 stage "rope_$m" 60 python3 -m bench.rope --model "$m" --seq-len 16384 32768 --json "$OUT/rope_$m.json"
      done
      TAIL=3 stage rope_tests 90 python3 -m pytest -q tests/test_kernel_rope.py -m gpu
    fi
    # two rounds of torch then triton, MSA and dense each: a drift of the machine between processes shows
    # as a difference between the rounds
    for round in 1 2; do
      for impl in torch triton; do
        TAIL=6 stage "rope_step_${impl}_$round" 80 python3 -m bench.train_step --model small \
          --lengths 16384 32768 --packed --steps 3 --time-budget 60 --dense-reserve 20 --attention msa dense \
          --json "$OUT/train_step_small_rope_${impl}_$round.json" -- $AC "model.rope_impl=$impl"
      done
    done
  fi
fi
if want rows; then
  for st in ${ROWS_KL_STRIDES:-1}; do  # MSA's attention.kl_query_stride; a file name says it where it is not 1
    sfx=$([ "$st" = 1 ] || echo "_kl$st")
    for r in ${ROWS:-1 2 4}; do
      TAIL=4 stage "rows_$r$sfx" 130 python3 -m bench.train_step "${ROWS_ARGS[@]}" --rows "$r" \
        --msa-overrides "attention.kl_query_stride=$st" --json "$OUT/train_step_${ROWS_MODEL}_rows$r$sfx.json" -- $AC
    done
  done
fi
if want kl_stride; then
  for st in ${KL_STRIDES:-4 1}; do
    TAIL=6 stage "kl_stride_$st" 160 python3 -m bench.train_step "${KL_STRIDE_ARGS[@]}" \
      --msa-overrides "attention.kl_query_stride=$st" --json "$OUT/train_step_small_kl_stride$st.json" -- $AC
  done
fi
if want ncu; then
  if [ "${CPU_CHECK:-0}" = 1 ] || ! command -v ncu >/dev/null; then
    echo "ncu: needs a GPU and Nsight Compute (ncu on the PATH); skipped" | tee -a "$LOG"
  else
    # only this project's Triton kernels (the reverse-index builders included), each once: the range holds one call
    # of every kernel after a warm-up; --clock-control none leaves the card's clocks as they are
    TAIL=4 stage ncu 240 ncu --profile-from-start off --clock-control none \
      --kernel-name "regex:^(select_blocks|sparse_attention|index_kl|_csr|_kl_csr)" \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --log-file "$OUT/ncu_msa.txt" python3 bench/ncu_msa.py --model small --seq-len "${NCU_LEN:-131072}"
  fi
fi
if want host; then
TAIL=6 stage host 130 python3 -m bench.train_step "${HOST[@]}" --json "$OUT/train_step_small_host.json" -- $AC
fi
if want small; then
TAIL=14 stage small 225 python3 -m bench.train_step "${SMALL[@]}" --dense-reserve 35 --memory-breakdown \
  --json "$OUT/train_step_small.json" -- $AC
fi
if want base; then
TAIL=12 stage base 190 python3 -m bench.train_step "${BASE[@]}" --dense-reserve 50 --memory-breakdown \
  --json "$OUT/train_step_base.json" -- $AC
fi
if want 1b; then
TAIL=10 stage 1b 260 python3 -m bench.train_step "${ONE_B[@]}" --dense-reserve 80 --memory-breakdown \
  --json "$OUT/train_step_1b.json" -- $AC
fi
FULL=parallel.checkpoint_policy=full
if want dense_layer; then
  # the 1M points allocate tensors of 8-16 GB (see base_1m below)
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  for v in dense1 dense0 window; do
    case $v in
      dense1) extra=(attention.n_dense_layers=1) ;;  # the default, named so the tables tell the runs apart
      dense0) extra=(attention.n_dense_layers=0) ;;
      window) extra=("model.sliding_window=$WINDOW" "model.sliding_layers=[0]") ;;
    esac
    TAIL=4 stage "layer_$v" 120 \
      python3 -m bench.train_step "${LAYER[@]}" --attention msa --json "$OUT/train_step_small_$v.json" -- $AC \
      "${extra[@]}"
  done
fi
if want dense_1m; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  TAIL=6 stage dense_1m 500 python3 -m bench.train_step "${DENSE_1M[@]}" --attention msa dense \
    --json "$OUT/train_step_small_1m_both.json" -- $AC ${FIT_1M[@]+"${FIT_1M[@]}"}
fi
if want first_layer_1m; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  TAIL=6 stage first_layer_1m 500 python3 -m bench.train_step "${DENSE_1M[@]}" --attention msa dense \
    --time-warmup-above 100 --msa-overrides "model.sliding_window=$WINDOW" "model.sliding_layers=[0]" \
    --json "$OUT/train_step_small_1m_window_both.json" -- $AC ${FIT_1M[@]+"${FIT_1M[@]}"}
  TAIL=4 stage first_layer_1m_dense0 100 python3 -m bench.train_step "${DENSE_1M[@]}" --attention msa \
    --time-budget 90 --json "$OUT/train_step_small_1m_dense0.json" -- $AC ${FIT_1M[@]+"${FIT_1M[@]}"} \
    attention.n_dense_layers=0
fi
if want base_1m_window; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  if [ "${CPU_CHECK:-0}" != 1 ]; then  # the full policy's kept selection through pinned host memory, on CUDA
    TAIL=3 stage keep_test 75 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_checkpointing.py
  fi
  budget=$(( $(left) - 15 )); [ "$budget" -gt 500 ] && budget=500
  # MSA_ONLY=1: the MSA steps alone (with and without the kept selection), for a call too short for dense
  attn=(msa dense); [ "${MSA_ONLY:-0}" = 1 ] && attn=(msa)
  TAIL=8 stage base_1m_window 520 python3 -m bench.train_step "${BASE_1M_WINDOW[@]}" --time-budget "$budget" \
    --attention "${attn[@]}" --msa-overrides "model.sliding_window=$WINDOW" "model.sliding_layers=[0]" \
    --json "$OUT/train_step_base_1m_window.json" -- $AC $FULL
  # the same MSA step with the selection run again in the recompute (before 3o), where time is left for it
  budget=$(( $(left) - 10 ))
  [ "$budget" -gt "${NOKEEP_MIN:-150}" ] && TAIL=4 stage base_1m_window_nokeep 200 \
    python3 -m bench.train_step "${BASE_1M_WINDOW[@]}" --time-budget "$budget" --attention msa --json "$OUT/train_step_base_1m_window_nokeep.json" -- $AC $FULL \
    "model.sliding_window=$WINDOW" "model.sliding_layers=[0]" parallel.checkpoint_keep_selection=false
fi
if want 1b_long; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  if [ "${CPU_CHECK:-0}" != 1 ]; then  # the grouped dK/dV partials compiled, against one group (bitwise), and
    # the window layer in FlashAttention (one call, and query chunks of calls) against query chunks of masked SDPA
    TAIL=3 stage grouped_test 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_sparse_attention.py \
      tests/test_dense.py -k "grouped or flash_window"
  fi
  win=("model.sliding_window=$WINDOW" "model.sliding_layers=[0]")
  win+=(${LONG_1B_OVERRIDES:-})
  budget=$(( $(left) - 15 ))
  [ "${SKIP_512K:-0}" = 1 ] || TAIL=6 stage 1b_512k 300 python3 -m bench.train_step "${ONE_B_LONG[@]}" \
    --lengths "${LONG_1B[0]}" --time-budget "$budget" --json "$OUT/train_step_1b_512k.json" -- $AC $FULL "${win[@]}"
  if grep -q '"status": "OOM' "$OUT/train_step_1b_512k.json" 2>/dev/null; then
    budget=$(( $(left) - 15 ))
    TAIL=6 stage 1b_512k_offload 300 python3 -m bench.train_step "${ONE_B_LONG[@]}" --lengths "${LONG_1B[0]}" \
      --time-budget "$budget" --json "$OUT/train_step_1b_512k_offload.json" -- $AC $FULL "${win[@]}" "${OFFLOAD[@]}"
  fi
  budget=$(( $(left) - 10 ))
  # --oom-history: where the largest live tensors were allocated, if it runs out of memory (an H100 did at 00b037a)
  TAIL=6 stage 1b_1m_offload 400 python3 -m bench.train_step "${ONE_B_LONG[@]}" --lengths "${LONG_1B[1]}" --oom-history \
    ${LONG_1B_1M_ARGS:-} --time-budget "$budget" --json "$OUT/train_step_1b_1m_offload.json" -- $AC $FULL "${win[@]}" "${OFFLOAD[@]}"
fi
want base_1m || { ls -l "$OUT"; exit 0; }
budget=$(( $(left) - 25 ))
# the 1M runs allocate tensors of 8-16 GB: without expandable segments the first H200 attempt (commit
# adf1909) ran out of memory with 30 GB reserved but unallocated (fragmentation)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
TAIL=6 stage base_1m 600 python3 -m bench.train_step "${BIG[@]}" --attention msa --packed --time-budget "$budget" \
  --memory-breakdown --json "$OUT/train_step_base_1m.json" -- $AC $FULL
if grep -q '"status": "OOM' "$OUT/train_step_base_1m.json" 2>/dev/null; then
  budget=$(( $(left) - 20 ))
  TAIL=6 stage base_1m_offload 600 python3 -m bench.train_step "${BIG[@]}" --attention msa --packed \
    --time-budget "$budget" --memory-breakdown --json "$OUT/train_step_base_1m_offload.json" -- $AC $FULL "${OFFLOAD[@]}"
fi
ls -l "$OUT"
