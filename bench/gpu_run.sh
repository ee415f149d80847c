# Sourced by the bench/*_gpu.sh scripts: the wheels (bench/gpu_wheels.sh), the GPUs into $OUT/$1 and a `run`
# that times one step.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_wheels.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/$1"
run() {  # name, limit in seconds, command...: output to $OUT/<name>.log, exit status and time printed
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0))s"
}
