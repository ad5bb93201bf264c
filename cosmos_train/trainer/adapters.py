"""Which weights train: LoRA adapters through the transformer's PEFT API, or selected full parameters.

Trainable weights are kept in fp32 even when the frozen base is bf16 (autocast over fp32 weights
crashes in this transformer, see the facts file): PEFT casts LoRA inputs itself; fully trained
modules get hooks that run them in fp32 and hand bf16 back to the frozen network around them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cosmos_train.config.schema import TrainConfig
from cosmos_train.errors import UserError

# Parameter-name pieces that belong to the generation pathway and its heads; everything else
# (to_q/k/v/out, mlp, input/post_attention_layernorm, norm_q/k, embed_tokens, lm_head, norm) is the
# understanding pathway, i.e. the Reasoner's language model.
GEN_PARAM_PATTERN = re.compile(
    r"(^|\.)(add_[qkv]_proj|to_add_out|norm_added_[qk]|k_norm_und_for_gen|mlp_moe_gen|input_layernorm_moe_gen"
    r"|post_attention_layernorm_moe_gen|norm_moe_gen|proj_in|proj_out|time_embedder|action_proj_in|action_proj_out"
    r"|action_modality_embed|audio_proj_in|audio_proj_out|audio_modality_embed)(\.|$)"
)
ADAPTER_NAME = "default"


def is_gen_param(name: str) -> bool:
    return GEN_PARAM_PATTERN.search(name) is not None


def apply_lora(transformer: nn.Module, train_cfg: TrainConfig) -> None:
    from peft import LoraConfig

    names = [n for n, _ in transformer.named_modules()]
    for target in train_cfg.lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise UserError(f"train.lora.target_modules: no module named '{target}' in the transformer "
                            f"(module names look like 'layers.0.self_attn.add_q_proj')")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=train_cfg.lora.rank, lora_alpha=train_cfg.lora.alpha, lora_dropout=train_cfg.lora.dropout,
        target_modules=list(train_cfg.lora.target_modules), init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()


def _cast_inputs_hook(module, args, kwargs):
    dtype = next(module.parameters()).dtype
    module._ct_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    cast = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return cast, kwargs


def _cast_output_hook(module, args, output):
    in_dtype = getattr(module, "_ct_in_dtype", None)
    if in_dtype is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(in_dtype)
    return output


def enable_full_finetune(transformer: nn.Module, train_cfg: TrainConfig) -> None:
    """Mark the chosen parameter groups trainable, in fp32."""
    # "all" is every weight the generator loss reaches: not lm_head (the understanding pathway's token head, never
    # called by the transformer's forward), which would otherwise hold fp32 weights and Adam moments for nothing
    # (vocabulary x hidden: ~7 GB at Nano's size) and be moved to the accelerator.
    select = is_gen_param if train_cfg.full_trainable == "gen" else (lambda name: not name.startswith("lm_head."))
    transformer.requires_grad_(False)
    base_dtype = transformer.embed_tokens.weight.dtype
    for module_name, module in transformer.named_modules():
        own = list(module.named_parameters(recurse=False))
        chosen = [(n, p) for n, p in own if select(f"{module_name}.{n}" if module_name else n)]
        if not chosen:
            continue
        for _, param in chosen:
            param.requires_grad_(True)
            param.data = param.data.float()
        # The root module's loose parameters (modality embeddings) are added, not called: no hooks there.
        if base_dtype != torch.float32 and module_name and len(chosen) == len(own):
            module.register_forward_pre_hook(_cast_inputs_hook, with_kwargs=True)
            module.register_forward_hook(_cast_output_hook)


def setup_trainable(transformer: nn.Module, train_cfg: TrainConfig) -> list[nn.Parameter]:
    if train_cfg.method == "lora":
        apply_lora(transformer, train_cfg)
    else:
        enable_full_finetune(transformer, train_cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise UserError("train: the recipe selects no trainable parameters")
    return params


def trainable_state_dict(transformer: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: LoRA weights (PEFT naming) or the trainable full parameters."""
    if method == "lora":
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    return {n: p.detach().cpu().contiguous() for n, p in transformer.named_parameters() if p.requires_grad}


def load_trainable_state_dict(transformer: nn.Module, method: str, state: dict[str, torch.Tensor]) -> None:
    if method == "lora":
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(f"checkpoint does not match the recipe's LoRA layout (unexpected keys: {unexpected[:3]})")
        return
    params = dict(transformer.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise UserError(f"checkpoint does not match the model (unknown parameters: {unknown[:3]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
