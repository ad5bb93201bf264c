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

if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    nproc=$1
    shift
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    nproc=${#gpus[@]}
else
    nproc=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    [[ $nproc -ge 1 ]] || nproc=1
fi

# torchrun is the console script of torch.distributed.run; fall back to the module if it is not on PATH.
if command -v torchrun >/dev/null 2>&1; then
    launcher=(torchrun)
else
    launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${launcher[@]}" --standalone --nproc_per_node="$nproc" ${TORCHRUN_ARGS:-} \
    -m cosmos_train.cli train "$recipe" "$@"
