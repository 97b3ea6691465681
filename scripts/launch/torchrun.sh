#!/usr/bin/env bash
# Launch `qat distill` with torchrun: one node with N processes, or one such launch per node of a multi-node run.
#
#   single node, all GPUs (or N CPU processes):
#     scripts/launch/torchrun.sh configs/smollm2-135m/efficientqat-w2g64.yaml --output runs/eq-w2
#     NPROC=2 scripts/launch/torchrun.sh ...                        # 2 processes
#   multi node: run the same command on every node, with the node's rank and the address of node 0
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch/torchrun.sh <recipe> --output /shared/runs/eq-w2   # node 0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/launch/torchrun.sh <recipe> --output /shared/runs/eq-w2   # node 1
#
# Everything after the recipe goes to `qat distill` (e.g. --strategy fsdp, --resume last). The output and run
# directories must be on a filesystem every node sees: rank 0 writes them, and every process reads the checkpoint on
# resume. See docs/SCALING.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
RECIPE=${1:?usage: scripts/launch/torchrun.sh RECIPE [qat distill options]}
shift
if [ -z "${NPROC:-}" ]; then  # one process per GPU, else 1 (CPU processes: set NPROC)
  NPROC=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
NNODES=${NNODES:-1}
exec .venv/bin/torchrun \
  --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --no-python .venv/bin/qat distill --config "$RECIPE" --devices "$NPROC" --num_nodes "$NNODES" "$@"
