#!/usr/bin/env bash
# torchrun c10d rendezvous; run the same line on every node.
#   launch/torchrun_multi_node.sh --nnodes 2 --gpus 8 --rdzv-endpoint node1:29500 --rdzv-id job1 key=value ...
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/launch.py" torchrun "$@"
