#!/usr/bin/env bash
# Launcher and stop/resume check on one host with 2 GPUs (the project and its dependencies installed):
# a deepspeed-launcher run stopped with SIGTERM after ~12 steps must save and leave no process behind,
# torchrun resumes it, a last launch finishes it; metrics.jsonl must then hold each step once.
#   OUT=/tmp/smoke bash launch/smoke_test.sh
set -u
OUT=${OUT:-/tmp/msa-smoke}
rm -rf "$OUT/run"; mkdir -p "$OUT"
mkdir -p /tmp/txt && python3 - <<'PY'
import io, pathlib, sysconfig, tarfile
src = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
for s in range(4):
    with tarfile.open(f"/tmp/txt/text-{s}.tar", "w") as tar:
        for i, f in enumerate(src[s::4]):
            data = f.read_bytes()[:20000]
            info = tarfile.TarInfo(f"doc{s}_{i:04d}.txt"); info.size = len(data); tar.addfile(info, io.BytesIO(data))
PY
RUN=$OUT/run
ARGS=(model.n_layers=3 model.dim=64 data.seq_len=256 data.batch_size=1 attention.block_size=16 attention.topk=2
      attention.impl=reference recipe.warmup_steps=2 data.image.max_patches=64 logging.progress=false
      logging.wandb.mode=disabled run.steps=40 checkpoint.every=5 checkpoint.keep_last=2 "run_dir=$RUN"
      "data.shards='/tmp/txt/text-{0..3}.tar'")
python3 launch/launch.py local --gpus 2 --python python3 --dry-run "${ARGS[@]}"
wait_steps() {  # wait until metrics.jsonl has $1 rows
  for i in $(seq 1 1500); do
    n=$(grep -c '"step"' $RUN/metrics.jsonl 2>/dev/null); n=${n:-0}
    [ "$n" -ge "$1" ] && return; sleep 0.2
  done
}
phase() {  # launcher, rows to wait for (0: run to the end), log name
  python3 launch/launch.py local --gpus 2 --launcher $1 --python python3 "${ARGS[@]}" > $OUT/$3.log 2>&1 &
  LPID=$!
  if [ "$2" -gt 0 ]; then wait_steps $2; echo "$1: $n rows logged, SIGTERM to launch.py"; kill -TERM $LPID; fi
  wait $LPID; echo "$1 exit code $?"; sleep 3
  pgrep -af "m train " | grep -v pgrep || echo "no rank process left"
  echo "checkpoints: $(ls $RUN/checkpoints | tr '\n' ' ')"
  grep -hE "resumed from|saved a checkpoint|Traceback|Error" $OUT/$3.log | head -5
}
phase deepspeed 12 ds
phase torchrun 30 tr
phase deepspeed 0 ds2
python3 - <<PY
import json
rows = [json.loads(l) for l in open("$RUN/metrics.jsonl")]
steps = [r["step"] for r in rows]
ok = steps == list(range(40))
print("rows", len(rows), "steps 0..39 once each:", ok)
print("loss/lm first", rows[0]["loss/lm"], "last", rows[-1]["loss/lm"])
raise SystemExit(0 if ok else 1)
PY
