# Shared by launch/*.sh (sourced, not run): processes per node and the torchrun launcher.

# nproc_from_args ARGS...: sets NPROC (a leading integer argument, else CUDA_VISIBLE_DEVICES, else the
# GPUs nvidia-smi lists, else 1) and SHIFT (1 if the first argument was consumed).
nproc_from_args() {
    SHIFT=0
    if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
        NPROC=$1
        SHIFT=1
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
        NPROC=${#gpus[@]}
    else
        NPROC=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
        [[ $NPROC -ge 1 ]] || NPROC=1
    fi
}

# torchrun is the console script of torch.distributed.run; fall back to the module if it is not on PATH.
if command -v torchrun >/dev/null 2>&1; then
    LAUNCHER=(torchrun)
else
    LAUNCHER=("${PYTHON:-python3}" -m torch.distributed.run)
fi
