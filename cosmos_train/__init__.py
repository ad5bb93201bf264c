"""cosmos_train: post-training for NVIDIA Cosmos 3 world models."""

import logging as _logging

__version__ = "0.1.0"

# torchao (the quantized-base option, `cosmos-train[quant]`) is imported by diffusers whenever it is installed, and
# its import warns about CUDA kernels a CPU build lacks, enum registrations and serialized-tensor classes diffusers
# 0.42 cannot find; none of it concerns a run here, and it would open every command's output.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
