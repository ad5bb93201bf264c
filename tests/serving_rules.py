"""How vLLM and vLLM-Omni read Cosmos 3 weights and LoRA adapters, restated from their wheels.

Neither can be installed beside this project's transformers / diffusers (vllm 0.33.0 needs transformers
>=5.16.1,<5.21; vllm_omni 0.30.0 needs transformers <5.15 and diffusers 0.40.0), so the tests pin their
name rules here, each with its source, and check exports against them:

- vLLM 0.33.0, vllm/model_executor/models/cosmos3.py: `Cosmos3ForConditionalGeneration.hf_to_vllm_mapper`
  (a WeightsMapper: regex rules, then the first matching substring rule, then prefix rules; a None target
  drops the tensor) and `allow_patterns_overrides = ["[tv]*er/*.safetensors"]` (every safetensors file in
  transformer/ and vision_encoder/, no index read; loading is strict both ways).
- vLLM 0.33.0, vllm/lora/utils.py `parse_fine_tuned_lora_name`: strip "base_model.model.", apply the mapper's
  rename-only rules, require ".lora_A.weight" / ".lora_B.weight".
- vllm_omni 0.30.0, vllm_omni/diffusion/models/cosmos3/pipeline_cosmos3.py `_remap_ckpt_key`: diffusers
  transformer keys -> its own modules (gen pathway in `gen_layers.N`, und in `language_model.layers.N`);
  an unmapped key is dropped silently, a parameter left without a weight is an error.
"""

from __future__ import annotations

import re

VLLM_REGEX = ((r"^(layers\.|embed_tokens\.|norm\.)(.+)$", r"language_model.model.\1\2"),
              (r"^(blocks\.|merger\.|patch_embed\.|pos_embed\.|deepstack_merger_list\.)", r"visual.\1"),
              (r"^audio_modality_embed(?:\..*)?$", None), (r"^action_modality_embed(?:\..*)?$", None))
VLLM_SUBSTR = (("_moe_gen", None), (".add_q_proj.", None), (".add_k_proj.", None), (".add_v_proj.", None),
               (".to_add_out.", None), (".norm_added_q.", None), (".norm_added_k.", None),
               (".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."), (".to_out.", ".o_proj."),
               (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."))
VLLM_PREFIX = (("proj_in.", None), ("proj_out.", None), ("time_embedder.", None), ("audio_proj_in.", None),
               ("audio_proj_out.", None), ("action_proj_in.", None), ("action_proj_out.", None),
               ("lm_head.", "language_model.lm_head."))
VLLM_WEIGHT_DIRS = re.compile(r"^[tv][^/]*er$")  # glob "[tv]*er/*.safetensors"


def vllm_weight_name(key: str, rename_only: bool = False) -> str | None:
    """vLLM's parameter name for a checkpoint tensor (None: dropped)."""
    for pattern, target in VLLM_REGEX:
        if target is None and rename_only:
            continue
        if re.search(pattern, key):
            if target is None:
                return None
            key = re.sub(pattern, target, key)
    for old, new in VLLM_SUBSTR:
        if new is None and rename_only:
            continue
        if old in key:
            if new is None:
                return None
            key = key.replace(old, new, 1)
            break
    for old, new in VLLM_PREFIX:
        if new is None and rename_only:
            continue
        if key.startswith(old):
            if new is None:
                return None
            key = new + key[len(old):]
    return key


def vllm_name_of_transformers_param(name: str) -> str:
    """transformers' Cosmos3OmniForConditionalGeneration parameter -> the same parameter in vLLM's class."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(name)


def vllm_lora_module(key: str) -> str:
    """The vLLM module a LoRA tensor binds to; ValueError where vLLM rejects the whole adapter."""
    name = key.removeprefix("base_model.model.")
    if not re.search(r"\.lora_[AB]\.weight$", name):
        raise ValueError(f"{key} is unsupported LoRA weight")
    if any(m in name for m in ("_moe_gen", ".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.")):
        raise ValueError(f"{key}: not a module of vLLM's reasoner (generation pathway)")
    return re.sub(r"\.lora_[AB]\.weight$", "", vllm_weight_name(name, rename_only=True))


_OMNI_LAYER = {
    "self_attn.to_q.": "und.self_attn.to_q.", "self_attn.to_k.": "und.self_attn.to_k.",
    "self_attn.to_v.": "und.self_attn.to_v.", "self_attn.to_out.": "und.self_attn.to_out.",
    "self_attn.norm_q.": "und.self_attn.norm_q.", "self_attn.norm_k.": "und.self_attn.norm_k.",
    "self_attn.k_norm_und_for_gen.": "und.self_attn.k_norm_und_for_gen.",
    "self_attn.add_q_proj.": "gen.cross_attention.to_q.", "self_attn.add_k_proj.": "gen.cross_attention.to_k.",
    "self_attn.add_v_proj.": "gen.cross_attention.to_v.", "self_attn.to_add_out.": "gen.cross_attention.to_out.",
    "self_attn.norm_added_q.": "gen.cross_attention.norm_q.", "self_attn.norm_added_k.": "gen.cross_attention.norm_k.",
    "input_layernorm.": "und.input_layernorm.", "post_attention_layernorm.": "und.post_attention_layernorm.",
    "input_layernorm_moe_gen.": "gen.input_layernorm.", "post_attention_layernorm_moe_gen.": "gen.post_attention_layernorm.",
    "mlp.gate_proj.": "und.mlp.gate_proj.", "mlp.up_proj.": "und.mlp.up_proj.", "mlp.down_proj.": "und.mlp.down_proj.",
    "mlp_moe_gen.gate_proj.": "gen.mlp.gate_proj.", "mlp_moe_gen.up_proj.": "gen.mlp.up_proj.",
    "mlp_moe_gen.down_proj.": "gen.mlp.down_proj.",
}


def omni_weight_name(key: str) -> str | None:
    """vLLM-Omni's parameter for a transformer/ tensor (None: dropped without a word)."""
    k = key.removeprefix("transformer.").removeprefix("model.")
    if k.startswith(("proj_in.", "proj_out.", "time_embedder.", "audio_proj_in.", "audio_proj_out.",
                     "action_proj_in.", "action_proj_out.", "norm_moe_gen.")):
        return f"transformer.{k}"
    for embed in ("audio_modality_embed", "action_modality_embed"):
        if k in (embed, f"{embed}.weight"):
            return f"transformer.{embed}"
    if k.startswith(("action_pos_embed.", "lm_head.")):
        return None
    if k.startswith(("embed_tokens.", "norm.")):
        return f"transformer.language_model.{k}"
    match = re.match(r"^layers\.(\d+)\.(.+)$", k)
    if not match:
        return None
    index, rest = match.groups()
    for old, new in _OMNI_LAYER.items():
        if rest.startswith(old):
            stack = "language_model.layers" if new.startswith("und.") else "gen_layers"
            return f"transformer.{stack}.{index}.{new[4:]}{rest[len(old):]}"
    return None
