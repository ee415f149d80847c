#!/bin/bash
# The forked quality run on one GPU: both arms continue one dense model that already retrieves, so from the
# fork on the attention is the only difference (docs/quality.md, the eighteenth run).
#   MSA_GIT_COMMIT=<sha> OUT=$OUT bash bench/quality_fork_gpu.sh
# Run from the repository root; the same command again, at once (the lent machine keeps runs/ only while it is
# held), continues where the last call stopped. On an H100 the whole of it took three calls (about 510, 510 and
# 110 s: the source 290 s, the fork 770 s). Three phases:
# 1. source: dense runs of SOURCE_SEEDS (default 2 3, SOURCE_JOBS (2) at once), SOURCE_STEPS (1200) steps of the
#    tenth run's mix (the last 15% on 16K rows) after the pass-key primer alone for the first PRIMER_STEPS (600)
#    steps; evals at 512, 2K, 8K and 16K; runs in $WORK/source. With 600 primer steps dense seed 2 copied up to
#    8K on an H100 (eighteenth run); with the tenth run's 225 neither seed did there (on an H200 seed 2 had).
# 2. pick (bench/quality_fork.py): the source run with the best pass-key choice at 2K-16K, at least MIN_CHOICE
#    (0.75; over the eval lengths from MIN_TOKENS, 2048, up), into $OUT/pick.txt; when none reaches it the call
#    stops there and says so.
# 3. fork: dense and msa_wide, seeds 0 1 2, FORK_STEPS (600) steps from the picked run's weights
#    (checkpoint.init_from; the MSA arm's index branch starts fresh and learns in its dense warm-up), the tenth
#    run's mix without the primer stage, FORK_JOBS (3: six runs of 16K rows and 64K evals at once may not fit an
#    H100's 80 GB) at once, evals at 512 to 64K; runs in $WORK/fork.
# 4. plain (bench/quality_plain.py): the fork's runs evaluated again at PLAIN_LENGTHS (32768 65536; empty: no
#    such phase, and the fork keeps no checkpoints) with the model's own RoPE, no stretch: the pass key, the same
#    items; one JSON, $OUT/fork/plain.json, and its table in $OUT/plain.log.
# OVERRIDES, Hydra overrides to both phases, default to YaRN at eval time (eval.rope_scaling={type:yarn,
# factor:auto}: each eval length over the training length, none up to it; docs/quality.md, thirteenth run);
# setting OVERRIDES replaces it. BUDGET_S (535) is the call's budget, start-up included; each phase gets what is
# left, the fork only when at least 150 s are. SOURCE_ARGS and FORK_ARGS add bench.quality arguments to a phase
# (a later one wins); a CPU dry run of the whole script (toy settings, about 2 minutes):
#   PATH=$PWD/.venv/bin:$PATH OUT=/tmp/qf WORK=/tmp/qf_work BUDGET_S=900 MIN_CHOICE=0 MIN_TOKENS=256 \
#   SOURCE_SEEDS="0 1" SOURCE_JOBS=2 SOURCE_STEPS=8 PRIMER_STEPS=2 FORK_STEPS=6 FORK_JOBS=2 PLAIN_LENGTHS=1024 \
#   OVERRIDES="attention.block_size=16 eval.rope_scaling={type:yarn,factor:auto}" \
#   SOURCE_ARGS="$TOY" FORK_ARGS="$TOY --seeds 0 --wide-topk 4" bash bench/quality_fork_gpu.sh
#   with TOY="--model tiny --seq-len 256 --batch 1 --save-every 4 --final-len 512 --multiples 1 2
#   --extra-lengths 128 --items 1 --rows 1 --tasks passkey --depths 0 1 --eval-s 10". $OUT gets gpus.txt, pick.txt, source.log, fork.log and plain.log (each phase's output) and
# source/, fork/ (each phase's quality.json, and plain.json; the plots and worker logs go to $WORK/extra, as the device returns 8 files:
# `bench.quality.write` draws the plots again from quality.json).
set -uo pipefail
OUT=${OUT:-runs/quality_fork}
WORK=${WORK:-runs/quality_fork_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export MSA_GIT_COMMIT=${MSA_GIT_COMMIT:-$(python3 -m bench.meta --commit)}
source "$(dirname "$0")/gpu_run.sh" gpus.txt
t0=$SECONDS
BUDGET_S=${BUDGET_S:-535}
left() { echo $((BUDGET_S - (SECONDS - t0))); }
tidy() {  # what the device would not return: plots and worker logs
  mkdir -p "$WORK/extra"
  for phase in source fork; do
    [ -d "$OUT/$phase" ] || continue
    rm -rf "$WORK/extra/$phase"
    mkdir -p "$WORK/extra/$phase"
    mv "$OUT/$phase"/*.png "$OUT/$phase/logs" "$WORK/extra/$phase/" 2>/dev/null
  done
}
trap tidy EXIT
finished() {  # whether a phase's quality.json has every run done
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if d['runs'] and not (d['stopped'] or d['not_started'] or d['failed']) else 1)" "$1" 2>/dev/null
}

source_steps=${SOURCE_STEPS:-1200}
OVERRIDES=${OVERRIDES-"eval.rope_scaling={type:yarn,factor:auto}"}
# shellcheck disable=SC2086  # SOURCE_ARGS and FORK_ARGS are lists of words
run source $(($(left) + 35)) python3 -m bench.quality --budget-s "$(left)" --out "$OUT/source" --work "$WORK/source" \
  --jobs "${SOURCE_JOBS:-2}" --items 4 --eval-s 60 --arms dense --seeds ${SOURCE_SEEDS:-2 3} \
  --steps "$source_steps" --save-every 100 --keep-checkpoints --warmup-frac 0.3 --mix 0.3 --primer 0.15 \
  --primer-first "$(python3 -c "print(${PRIMER_STEPS:-600} / $source_steps)")" \
  --final-len 16384 --final-frac 0.15 --multiples 1 2 --extra-lengths 512 2048 ${SOURCE_ARGS:-} -- ${OVERRIDES:-}
if [ ! -f "$OUT/source/quality.json" ]; then
  echo "source: no report; $OUT/source.log says why"
  tail -3 "$OUT/source.log"
  exit 1
fi
grep -E "^(plan|dense|failed|stopped|done|Traceback|[A-Za-z]+Error)" "$OUT/source.log"
if ! finished "$OUT/source/quality.json"; then
  echo "source: not finished; the same command again continues it"
  exit 0
fi
if ! python3 -m bench.quality_fork "$OUT/source/quality.json" --work "$WORK/source" \
    --min-choice "${MIN_CHOICE:-0.75}" --min-tokens "${MIN_TOKENS:-2048}" > "$OUT/pick.txt"; then
  echo "source: no run retrieves well enough to fork from (above); nothing forked"
  exit 0
fi
echo "fork from $(cat "$OUT/pick.txt")"
if [ "$(left)" -lt 150 ]; then
  echo "fork: $(left) s left in this call; the same command again starts it"
  exit 0
fi
fork_jobs=${FORK_JOBS:-3}  # the fork's runs and the plain phase's evals at once
plain_lengths=${PLAIN_LENGTHS-32768 65536}
keep=${plain_lengths:+--keep-checkpoints}  # the plain phase evaluates the fork's checkpoints again
# shellcheck disable=SC2086
run fork $(($(left) + 35)) python3 -m bench.quality --budget-s "$(left)" --out "$OUT/fork" --work "$WORK/fork" \
  --jobs "$fork_jobs" --items 4 --eval-s 110 --arms dense msa_wide --seeds 0 1 2 --steps "${FORK_STEPS:-600}" \
  --save-every 100 --warmup-frac 0.3 --mix 0.3 --primer 0.15 --final-len 16384 --final-frac 0.15 $keep \
  --extra-lengths 512 2048 ${FORK_ARGS:-} -- ${OVERRIDES:-} "checkpoint.init_from=$(cat "$OUT/pick.txt")"
grep -E "^(plan|skip|failed|stopped|dense|msa|done|Traceback|[A-Za-z]+Error)" "$OUT/fork.log"
[ -n "$plain_lengths" ] || exit 0
if ! finished "$OUT/fork/quality.json"; then
  echo "fork: not finished; the same command again continues it"
  exit 0
fi
if [ "$(left)" -lt 60 ]; then
  echo "plain: $(left) s left in this call; the same command again runs it"
  exit 0
fi
# shellcheck disable=SC2086
run plain $(($(left) + 35)) python3 -m bench.quality_plain --work "$WORK/fork" --lengths $plain_lengths \
  --out "$OUT/fork/plain.json" --jobs "$fork_jobs" --budget-s "$(left)"
cat "$OUT/plain.log"
