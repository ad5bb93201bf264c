"""LoRA adapters as PEFT directories (`adapter_config.json` + `adapter_model.safetensors`), one per tool
where one file cannot serve two (each folder is named for its tool).

Generator (diffusers names, `transformer.` prefix, LoRA config also in the safetensors metadata):
    OUT/                 diffusers: `pipe.transformer.load_lora_adapter(OUT, weight_name="adapter_model.safetensors")`
    OUT/vllm-omni/       vLLM-Omni's module names (`gen_layers.N.cross_attention.to_q`, ...)
Reasoner:
    OUT/                 PEFT on transformers: `PeftModel.from_pretrained(Cosmos3OmniForConditionalGeneration, OUT)`
    OUT/vllm/            vLLM's Cosmos 3 class: flat diffusers names (`layers.N.self_attn.to_q`)

The vLLM / vLLM-Omni name rules were read from their wheels (vllm 0.33.0 `model_executor/models/cosmos3.py`
and `lora/utils.py::parse_fine_tuned_lora_name`; vllm_omni 0.30.0 `diffusion/lora/manager.py` and
`diffusion/models/cosmos3/pipeline_cosmos3.py::_remap_ckpt_key`); neither can be installed beside this
stack, so tests/test_adapters.py pins them:
- vLLM strips `base_model.model.`, renames `layers.`/`embed_tokens.`/`norm.` to `language_model.model.` and
  `to_q/to_k/to_v/to_out` to `q/k/v/o_proj` itself; a PEFT name under `model.language_model.` is skipped
  silently, and a generation-pathway name (`add_q_proj`, ...) makes the whole adapter fail.
- vLLM-Omni does no renaming at all: names must be its own modules, tensor names must end `.lora_A.weight` /
  `.lora_B.weight`, `target_modules` must name its layers, and every tensor must bind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cosmos_train.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
VLLM_DIR = "vllm"
VLLM_OMNI_DIR = "vllm-omni"

# diffusers module (after `layers.N.`) -> vLLM-Omni module (after the layer index), vllm_omni 0.30.0
OMNI_GEN = {"self_attn.add_q_proj": "cross_attention.to_q", "self_attn.add_k_proj": "cross_attention.to_k",
            "self_attn.add_v_proj": "cross_attention.to_v", "self_attn.to_add_out": "cross_attention.to_out",
            "mlp_moe_gen.gate_proj": "mlp.gate_proj", "mlp_moe_gen.up_proj": "mlp.up_proj",
            "mlp_moe_gen.down_proj": "mlp.down_proj"}
OMNI_UND = ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v", "self_attn.to_out", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def omni_module_name(diffusers_module: str) -> str | None:
    """vLLM-Omni's name for a diffusers transformer module (`layers.3.self_attn.add_q_proj` ->
    `gen_layers.3.cross_attention.to_q`); None when vLLM-Omni has no LoRA-capable layer for it."""
    match = _LAYER.match(diffusers_module)
    if not match:
        return None
    index, rest = match.groups()
    if rest in OMNI_GEN:
        return f"gen_layers.{index}.{OMNI_GEN[rest]}"
    if rest in OMNI_UND:
        return f"language_model.layers.{index}.{rest}"
    return None


def _split(key: str) -> tuple[str, str]:
    """`a.b.lora_A.weight` -> (`a.b`, `lora_A.weight`)."""
    module, _, tail = key.partition(".lora_")
    return module, "lora_" + tail


def _save(directory: Path, tensors: dict[str, torch.Tensor], config: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt", **(metadata or {})})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _peft_config_dict(config, base_model: str, target_modules) -> dict:
    data = config.to_dict()
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    data["peft_type"] = "LORA"
    data["target_modules"] = target_modules
    data["base_model_name_or_path"] = base_model
    data.pop("runtime_config", None)
    return json.loads(json.dumps(data, default=str))


# ---- generator ------------------------------------------------------------------------------------------


def write_generator_adapters(transformer, out: Path, base_model: str, adapter_name: str = "default") -> dict:
    """The diffusers adapter at OUT and the vLLM-Omni variant in OUT/vllm-omni (when every adapted module
    has a vLLM-Omni layer). -> {"diffusers": ..., "vllm-omni": ... or the reason it was left out}."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict

    config = transformer.peft_config[adapter_name]
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    diffusers_config = _peft_config_dict(config, base_model, sorted(config.target_modules)
                                         if isinstance(config.target_modules, (set, list)) else config.target_modules)
    # diffusers rebuilds the LoRA config (rank, alpha, targets) from this metadata entry
    lora_meta = {f"transformer.{k}": v for k, v in diffusers_config.items()}
    _save(out, {f"transformer.{k}": v for k, v in state.items()}, diffusers_config,
          {LORA_ADAPTER_METADATA_KEY: json.dumps(lora_meta, sort_keys=True)})
    result = {"diffusers": ".", "tensors": len(state)}

    omni: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        module, tail = _split(key)
        name = omni_module_name(module)
        if name is None:
            unmapped.append(module)
            continue
        omni[f"{PEFT_PREFIX}{name}.{tail}"] = value
    if unmapped:
        result[VLLM_OMNI_DIR] = f"not written: vLLM-Omni has no LoRA layer for {sorted(set(unmapped))[:3]}"
        return result
    # a regex (re.search on "transformer.<module>") that wraps exactly the adapted kinds of layer
    groups: dict[str, set] = {}
    for key in omni:
        module = _split(key)[0][len(PEFT_PREFIX):]
        stack, _, rest = module.partition(".")
        if stack == "language_model":  # language_model.layers.N.<rest>
            stack, rest = "language_model.layers", rest.split(".", 2)[2]
        else:  # gen_layers.N.<rest>
            rest = rest.split(".", 1)[1]
        groups.setdefault(stack, set()).add(rest)
    pattern = "|".join(f"{re.escape(stack)}\\.\\d+\\.({'|'.join(re.escape(x) for x in sorted(leaves))})$"
                       for stack, leaves in sorted(groups.items()))
    omni_config = _peft_config_dict(config, base_model, pattern)
    _save(out / VLLM_OMNI_DIR, omni, omni_config)
    result[VLLM_OMNI_DIR] = VLLM_OMNI_DIR
    return result


# ---- reasoner -------------------------------------------------------------------------------------------


def write_reasoner_adapters(model, trained: dict, out: Path, base_model: str, adapter_name: str = "default") -> dict:
    """The PEFT adapter for transformers at OUT and the vLLM variant in OUT/vllm."""
    from peft.utils import get_peft_model_state_dict

    from cosmos_train.models.reasoner import hf_key_to_unified

    full = sorted(k for k in trained if ".lora_" not in k)
    if full:
        raise UserError(f"--lora-only: this run also trained whole weights ({full[:2]}...), which an adapter cannot "
                        "carry; export it merged instead")
    config = model.peft_config[adapter_name]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    _save(out, {f"{PEFT_PREFIX}{k}": v for k, v in state.items()},
          _peft_config_dict(config, base_model, config.target_modules))

    vllm: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, tail = _split(key)
        flat = hf_key_to_unified(module + ".weight")[: -len(".weight")]
        vllm[f"{PEFT_PREFIX}{flat}.{tail}"] = value
    leaves = sorted({_split(k)[0].rsplit(".", 1)[-1] for k in vllm})
    _save(out / VLLM_DIR, vllm, _peft_config_dict(config, base_model, leaves))
    vision = any(".blocks." in k for k in vllm)
    return {"transformers": ".", VLLM_DIR: VLLM_DIR, "tensors": len(state), "vision_lora": vision}
