# Sourced by the bench/*_gpu.sh scripts: DeepSpeed, Hydra and webdataset from the wheels in .whl/ where the
# machine lacks them, the GPUs into $OUT/$1 and a `run` that times one step.
if [ -d .whl ] && ! python3 -c "import deepspeed, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/$1"
run() {  # name, limit in seconds, command...: output to $OUT/<name>.log, exit status and time printed
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0))s"
}
