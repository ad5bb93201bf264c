"""LoRA over a quantized frozen base (`model.quantize_base`): the generator transformer's frozen Linear weights
are quantized with torchao before the LoRA adapters are added, and PEFT's torchao LoRA layer
(`peft.tuners.lora.torchao.TorchaoLoraLinear`) trains the fp32 adapters on top of them.

- `int8`: torchao `Int8WeightOnlyConfig` (per-row int8 weights, activations stay in the base's dtype). Works
  wherever torch runs (CPU included); halves the frozen weights' memory against bf16.
- `fp8`: torchao `Float8WeightOnlyConfig` (float8 e4m3 weights), only on a GPU with float8 support (compute
  capability 8.9+); anywhere else a UserError names the key.

Only training quantizes. Exports rebuild the model from the unquantized checkpoint on disk and merge the trained
adapters there (cosmos_train/export/generator.py), so exported weights keep the base's stored precision.
torchao is imported here only, when a recipe asks for it (`pip install 'cosmos-train[quant]'`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from cosmos_train.errors import UserError

KEY = "model.quantize_base"
QUANTIZE_BASE = ("none", "int8", "fp8")

# Linear layers that stay in the base's precision, by module name: the latent / sound / timestep projections at
# the transformer's input and output (proj_in, proj_out, audio_proj_*, time_embedder.*). They hold well under 1 %
# of the weights, their error is not averaged away by later layers (proj_out writes the velocity itself), diffusers
# keeps time_embedder in fp32 on purpose (`_keep_in_fp32_modules`), and full finetuning trains them. The action
# heads are embedding tables (DomainAwareLinear), not Linear, and are never quantized. Everything else that is an
# nn.Linear is quantized: the decoder layers' und and gen pathways (the bulk of the weights) and lm_head (unused
# by the generator's forward, so its precision cannot matter there). What trains stays high precision: LoRA's own
# weights are added after this, in fp32, and the only base weights a LoRA run trains are the action heads' rows.
KEEP_PREFIXES = ("proj_in", "proj_out", "time_embedder", "audio_proj_in", "audio_proj_out", "action_proj_in",
                 "action_proj_out")
# torchao's kernels want aligned shapes; a Linear with a dimension that is not a multiple of this is an odd,
# small layer in this architecture and stays as it is.
ALIGN = 16


def _torchao_config(mode: str):
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise UserError(f"{KEY}: {mode} needs torchao, which is not installed: pip install 'cosmos-train[quant]'") \
            from None
    # set_inductor_config=False: do not change torch.compile's global settings behind the user's back.
    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def check_hardware(mode: str, device: str) -> None:
    """fp8 weights need a GPU with float8 support; anything else is refused with the key named."""
    if mode != "fp8":
        return
    if device == "cpu" or not torch.cuda.is_available():
        raise UserError(f"{KEY}: fp8 needs a GPU with float8 support (compute capability 8.9 or newer: Ada, Hopper, "
                        f"Blackwell); this run is on the CPU. Use {KEY}: int8, which works everywhere")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise UserError(f"{KEY}: fp8 needs a GPU with float8 support (compute capability 8.9 or newer); "
                        f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}. Use {KEY}: int8")


def is_quantized(tensor) -> bool:
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(tensor, TorchAOBaseTensor)


def should_quantize(name: str, module: nn.Module) -> bool:
    if type(module) is not nn.Linear:  # exactly Linear: never a PEFT layer or another subclass
        return False
    if any(name == p or name.startswith(p + ".") for p in KEEP_PREFIXES):
        return False
    return module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def quantize_frozen_base(transformer: nn.Module, mode: str, device: str = "auto") -> list[str]:
    """Quantize the frozen base's Linear weights in place (before LoRA is added); returns the quantized modules'
    names. The model's other parameters (norms, embeddings, the layers kept above) are untouched."""
    if mode not in QUANTIZE_BASE or mode == "none":
        raise UserError(f"{KEY}: expected one of {', '.join(QUANTIZE_BASE)}, got {mode!r}")
    check_hardware(mode, device)
    config = _torchao_config(mode)
    from torchao.quantization import quantize_

    if any("lora_" in n for n, _ in transformer.named_parameters()):
        raise RuntimeError("quantize the frozen base before LoRA adapters are added")
    transformer.requires_grad_(False)  # the whole base is frozen (LoRA freezes it too); quantized weights never train
    chosen = [n for n, m in transformer.named_modules() if should_quantize(n, m)]
    if not chosen:
        raise UserError(f"{KEY}: the transformer has no Linear layer to quantize")
    names = set(chosen)
    quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in names)
    return chosen


def _check_lora_layers(transformer: nn.Module) -> int:
    """Every LoRA layer over a quantized weight must be PEFT's torchao layer (its forward dequantizes inside the
    base layer; a plain lora.Linear would not know the weight is quantized). Returns how many there are."""
    from peft.tuners.lora.torchao import TorchaoLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for name, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and is_quantized(getattr(module.get_base_layer(), "weight", None)):
            if not isinstance(module, TorchaoLoraLinear):
                raise RuntimeError(f"{name}: PEFT wrapped a quantized Linear with {type(module).__name__}, not its "
                                   "torchao LoRA layer; this PEFT / torchao pair does not support LoRA over "
                                   f"{KEY}")
            count += 1
    return count


def _ddp_ignore_quantized(transformer: nn.Module) -> None:
    """DDP broadcasts every parameter when it wraps the model, and torchao's quantized tensors cannot be
    broadcast. They are frozen and the same on every rank (same checkpoint, deterministic quantization), so
    DDP is told to leave them alone."""
    names = [n for n, p in transformer.named_parameters() if is_quantized(p)]
    names += [n for n, b in transformer.named_buffers() if is_quantized(b)]
    previous = list(getattr(transformer, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        transformer, sorted(set(previous + names)))


@contextlib.contextmanager
def quantized_base(transformer: nn.Module, cfg):
    """Around the trainable-parameter setup: quantize the frozen base first when the recipe asks for it (LoRA is
    then added over the quantized layers), and check afterwards that PEFT put its torchao LoRA layer on them."""
    mode = getattr(cfg.model, "quantize_base", "none")
    if mode == "none":
        yield
        return
    if cfg.train.method != "lora":  # validate() refuses this already; a programmatic config gets the same answer
        raise UserError(f"{KEY}: {mode} is for train.method=lora (a quantized base cannot be finetuned itself)")
    quantize_frozen_base(transformer, mode, cfg.train.device)
    with warnings.catch_warnings():
        # PEFT warns that merge() would need the requantization config: a quantized base is never merged here
        # (exports merge into the unquantized checkpoint).
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        yield
    _check_lora_layers(transformer)
    _ddp_ignore_quantized(transformer)
