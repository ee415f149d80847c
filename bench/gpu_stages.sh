# Sourced by bench/renovation_gpu.sh and bench/train_step_gpu.sh: wheels, versions and `stage`, which
# runs one command under a time limit that also respects the script's DEADLINE (seconds from its start),
# appends its output to $LOG and prints the exit status, time taken and the last lines of its output.
# Expects OUT (results folder) and LOG (the one log file) to be set.
mkdir -p "$OUT"
: > "$LOG"
T_START=$SECONDS
DEADLINE=${DEADLINE:-555}

setup() {
  source "$(dirname "${BASH_SOURCE[0]}")/gpu_wheels.sh" >>"$LOG" 2>&1
  if [ -z "${MSA_GIT_COMMIT:-}" ]; then
    MSA_GIT_COMMIT=$(python3 -m bench.meta --commit)
    echo "note: MSA_GIT_COMMIT not set; recording '$MSA_GIT_COMMIT'" | tee -a "$LOG"
  fi
  export MSA_GIT_COMMIT
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  python3 -c "import torch, triton, deepspeed as ds; print(torch.__version__, triton.__version__, ds.__version__)" \
    2>&1 | tee -a "$LOG"
}

left() { echo $(( DEADLINE - (SECONDS - T_START) )); }

stage() {  # name, cap in seconds, command...; `TAIL=n` lines of its output are printed afterwards
  local name=$1 cap=$2; shift 2
  local lim; lim=$(left)
  [ "$cap" -lt "$lim" ] && lim=$cap
  if [ "$lim" -lt 15 ]; then
    echo "== $name: not run, $(left) s left of the ${DEADLINE} s deadline" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (limit ${lim} s, $(left) s left): $*" | tee -a "$LOG"
  local t=$SECONDS part=/tmp/stage_$name.log
  timeout -k 10 "$lim" "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$LOG"
  tail -n "${TAIL:-15}" "$part"
  echo "== $name: rc=$rc in $((SECONDS - t)) s$([ "$rc" = 124 ] && echo ' (stopped at its time limit)')" \
    | tee -a "$LOG"
}
