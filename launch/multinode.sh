#!/usr/bin/env bash
# Train a recipe across several machines: run this same command once on every node.
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 launch/multinode.sh RECIPE [NPROC_PER_NODE] [key.path=value ...]
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=1 launch/multinode.sh RECIPE [NPROC_PER_NODE] [key.path=value ...]
#
# MASTER_ADDR: host name or IP of node 0, reachable from every node; MASTER_PORT: a free TCP port
# there (default 29500); NNODES / NODE_RANK default to SLURM_NNODES / SLURM_NODEID under srun.
# NPROC_PER_NODE defaults to the GPUs in CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists, else 1.
# output_dir must be on a filesystem every node sees: rank 0 writes the checkpoints (with fsdp2 /
# zero2 / zero3 every rank writes its shard) and --resume reads them on every node. Use the same recipe, overrides and code on all nodes. The back-end is the
# recipe's train.distributed (launch/README.md), e.g. ... launch/multinode.sh RECIPE 8 train.distributed.backend=fsdp2
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,13s/^# \{0,1\}//p' "$0"
    exit 2
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
if [[ -z $NNODES || -z $NODE_RANK ]]; then
    echo "multinode.sh: set NNODES (number of nodes) and NODE_RANK (0 .. NNODES-1), or run under srun" >&2
    exit 2
fi

recipe=$1
shift
source "$(dirname "$0")/_common.sh"
nproc_from_args "$@"
shift "$SHIFT"
# The trainer compares this with the processes that really joined the run (cosmos_train/trainer/launch_check.py).
export COSMOS_TRAIN_EXPECTED_PROCESSES=$((NPROC * NNODES))

# Static rendezvous (torchrun's default backend): node NODE_RANK gets global ranks
# NODE_RANK*NPROC .. NODE_RANK*NPROC+NPROC-1, and global rank 0 (on node 0) hosts the store.
exec "${LAUNCHER[@]}" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m cosmos_train.cli train "$recipe" "$@"
