#!/usr/bin/env bash
# Train a recipe with several processes on one machine (DDP through torchrun + Accelerate).
#
#   launch/torchrun.sh RECIPE [NPROC] [key.path=value ...] [--resume]
#
#   launch/torchrun.sh recipes/nano/generator_lora_480p.yaml            # one process per GPU
#   launch/torchrun.sh recipes/tiny/t2v_lora.yaml 2 train.max_steps=20   # 2 CPU processes (gloo)
#
# NPROC defaults to the GPUs in CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists, else 1.
# Each process takes train.batch_size samples per micro-step, so the global batch is
# NPROC x batch_size x grad_accum_steps. Rank 0 alone writes metrics.jsonl and checkpoints.
# Extra torchrun flags go in TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--master_port=29600").
# torchrun sets OMP_NUM_THREADS=1 per process unless you set it yourself.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,13s/^# \{0,1\}//p' "$0"
    exit 2
fi
recipe=$1
shift

source "$(dirname "$0")/_common.sh"
nproc_from_args "$@"
shift "$SHIFT"

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${LAUNCHER[@]}" --standalone --nproc_per_node="$NPROC" ${TORCHRUN_ARGS:-} \
    -m cosmos_train.cli train "$recipe" "$@"
