#!/bin/bash
# bench/parallel.py for the three layouts on a 2-GPU machine, each under its own time limit, results
# appended to $OUT/parallel.jsonl (logs beside it). Run from the repository root on the GPU machine:
#   SEQ_LENS="524288" LIMITS="240 170 170" bash bench/parallel_gpu.sh
# DeepSpeed, Hydra and webdataset come from wheels in .whl/ (../shared/tools/device-wheels .whl).
set -uo pipefail
OUT=${OUT:-runs/parallel}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import deepspeed, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
SEQ_LENS=${SEQ_LENS:-32768 131072 524288}
read -r -a LIM <<< "${LIMITS:-300 200 200}"
COMMON="parallel.activation_checkpointing=true parallel.mlp_tile_tokens=32768"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
run() {  # name, limit, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0))s"; tail -n 4 "$OUT/$name.log"
}
run sp1 "${LIM[0]}" python3 -m bench.parallel --sp 1 --seq-lens $SEQ_LENS --out "$OUT/parallel.jsonl" -- $COMMON
run sp2 "${LIM[1]}" python3 -m torch.distributed.run --nproc-per-node 2 -m bench.parallel --sp 2 \
  --seq-lens $SEQ_LENS --out "$OUT/parallel.jsonl" -- $COMMON
run cp2 "${LIM[2]}" python3 -m torch.distributed.run --nproc-per-node 2 -m bench.parallel --cp 2 \
  --seq-lens $SEQ_LENS --out "$OUT/parallel.jsonl" -- $COMMON
cat "$OUT/parallel.jsonl"
