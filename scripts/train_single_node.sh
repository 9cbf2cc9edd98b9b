#!/usr/bin/env bash
# Train on every GPU of this machine with DeepSpeed (two CPU processes when there is no GPU).
#   scripts/train_single_node.sh configs/video_finetune.yaml [key=value ...] [--nproc N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG.yaml [key=value ...] [--nproc N]" >&2; exit 2; }
exec .venv/bin/longvu train "$@"
