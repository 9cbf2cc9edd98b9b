#!/usr/bin/env bash
# Train on several nodes listed in a DeepSpeed hostfile ("host slots=8" per line), launched from one
# node over pdsh/ssh. Every node needs this repository and its .venv at the same path, and a shared
# filesystem for the run's output_dir (checkpoints are renamed into place by rank 0).
#   scripts/train_multi_node_hostfile.sh HOSTFILE configs/video_finetune.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 2 ]] || { echo "usage: $0 HOSTFILE CONFIG.yaml [key=value ...]" >&2; exit 2; }
hostfile=$1; shift
master=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
exec .venv/bin/longvu train "$@" --hostfile "$hostfile" launch.master_addr="$master"
