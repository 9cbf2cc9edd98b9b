#!/usr/bin/env bash
# Run this same command on every node (torchrun with a c10d rendezvous endpoint); no ssh needed.
#   MASTER_ADDR=node0 NNODES=8 scripts/train_torchrun_multi_node.sh configs/video_finetune.yaml [key=value ...]
# Optional: MASTER_PORT (29500), GPUS_PER_NODE (all visible GPUs), RDZV_ID (a job id shared by the nodes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 1 ]] || { echo "usage: MASTER_ADDR=host NNODES=N $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}" "${NNODES:?set NNODES}"
gpus=${GPUS_PER_NODE:-$(.venv/bin/python -c "import torch; print(torch.cuda.device_count() or 1)")}
exec .venv/bin/python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$gpus" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-longvu}" \
    -m train train "$@"
