#!/usr/bin/env bash
# One node, N GPUs.  launch/single_node.sh --gpus 8 [--launcher torchrun] [--dry-run] key=value ...
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/launch.py" local "$@"
