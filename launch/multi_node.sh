#!/usr/bin/env bash
# Several nodes from a hostfile ('<host> slots=<gpus>' per line) through the deepspeed launcher (pdsh).
# Run once, on the first host.  launch/multi_node.sh --hostfile hosts.txt [--dry-run] key=value ...
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/launch.py" hostfile "$@"
