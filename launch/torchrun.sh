#!/usr/bin/env bash
# Train a recipe with several processes on one machine (torchrun; the recipe's train.distributed picks
# the back-end: ddp, the default, fsdp2, zero2 or zero3 -- see launch/README.md).
#
#   launch/torchrun.sh RECIPE [NPROC] [key.path=value ...] [--resume]
#
#   launch/torchrun.sh recipes/nano/generator_lora_480p.yaml            # one process per GPU (DDP)
#   launch/torchrun.sh recipes/nano/generator_full_480p.yaml 8 train.distributed.backend=zero3 train.packing.enabled=false
#   launch/torchrun.sh recipes/tiny/t2v_lora.yaml 2 train.max_steps=20 train.device=cpu  # 2 CPU processes (gloo)
#
# NPROC defaults to the GPUs in CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists, else 1.
# Each process takes train.batch_size samples per micro-step, so the global batch is
# NPROC x batch_size x grad_accum_steps. Rank 0 alone writes metrics.jsonl and checkpoints.
# Extra torchrun flags go in TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--master_port=29600").
# torchrun sets OMP_NUM_THREADS=1 per process unless you set it yourself.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,15s/^# \{0,1\}//p' "$0"
    exit 2
fi
recipe=$1
shift

source "$(dirname "$0")/_common.sh"
nproc_from_args "$@"
shift "$SHIFT"
# The trainer compares this with the processes that really joined the run (cosmos_train/trainer/launch_check.py).
export COSMOS_TRAIN_EXPECTED_PROCESSES=$NPROC

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${LAUNCHER[@]}" --standalone --nproc_per_node="$NPROC" ${TORCHRUN_ARGS:-} \
    -m cosmos_train.cli train "$recipe" "$@"
