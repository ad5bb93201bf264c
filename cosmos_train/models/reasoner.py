"""Cosmos 3 Reasoner adapter: the one place that knows transformers' `Cosmos3OmniForConditionalGeneration`.

The Reasoner is the Qwen3-VL architecture; its language model IS the understanding (und) pathway of the
unified Cosmos 3 checkpoint, whose root `config.json` (model_type `cosmos3_omni`) and weights transformers
loads directly: it renames the und keys (`layers.N.self_attn.to_q` -> `model.language_model.layers.N.
self_attn.q_proj`, ...), re-targets the flat vision keys (`blocks.*`, `merger.*`, ... -> `model.visual.*`)
and drops the generator keys (`add_*_proj`, `*moe_gen*`, `proj_in/out`, `time_embedder`, sound/action heads).
`unified_key_to_hf` / `hf_key_to_unified` spell that mapping out for the exporter.

Also here: which weights train for the reasoner (`setup_reasoner_trainable`: LoRA and/or full finetuning of
the language model, vision tower and merger, separate learning rates, trainable weights in fp32), and the
checkpoint state of those weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cosmos_train.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
ADAPTER_NAME = "default"

# ---------------------------------------------------------------------------------------------
# Unified checkpoint <-> transformers key mapping (transformers' conversion_mapping["cosmos3_omni"])
# ---------------------------------------------------------------------------------------------

_UND_RENAMES = (
    (".self_attn.to_q.", ".self_attn.q_proj."),
    (".self_attn.to_k.", ".self_attn.k_proj."),
    (".self_attn.to_v.", ".self_attn.v_proj."),
    (".self_attn.to_out.", ".self_attn.o_proj."),
    (".self_attn.norm_q.", ".self_attn.q_norm."),
    (".self_attn.norm_k.", ".self_attn.k_norm."),
)
LANGUAGE_PREFIXES = ("layers.", "embed_tokens.", "norm.")
VISION_PREFIXES = ("blocks.", "merger.", "patch_embed.", "pos_embed.", "deepstack_merger_list.")
HF_LANGUAGE = "model.language_model."
HF_VISUAL = "model.visual."


def _dropped_patterns() -> list[re.Pattern]:
    from transformers.models.cosmos3_omni import modeling_cosmos3_omni as m

    return [re.compile(p) for p in m._COSMOS3_DROPPED_UNIFIED_CHECKPOINT_KEYS]


def is_generator_key(unified_key: str) -> bool:
    """True for unified-checkpoint keys the Reasoner drops (generator pathway, sound / action heads)."""
    return any(p.search(unified_key) for p in _dropped_patterns())


def unified_key_to_hf(key: str) -> str | None:
    """Unified checkpoint key -> `Cosmos3OmniForConditionalGeneration` state-dict key (None: dropped)."""
    if is_generator_key(key):
        return None
    if key.startswith(LANGUAGE_PREFIXES):
        name = "." + key
        for old, new in _UND_RENAMES:
            name = name.replace(old, new)
        return HF_LANGUAGE + name[1:]
    if key.startswith(VISION_PREFIXES):
        return HF_VISUAL + key
    if key == "lm_head.weight":
        return key
    return None


def hf_key_to_unified(key: str) -> str:
    """`Cosmos3OmniForConditionalGeneration` state-dict key -> unified checkpoint key."""
    if key.startswith(HF_LANGUAGE):
        name = "." + key[len(HF_LANGUAGE):]
        for old, new in _UND_RENAMES:
            name = name.replace(new, old)
        return name[1:]
    if key.startswith(HF_VISUAL):
        return key[len(HF_VISUAL):]
    if key == "lm_head.weight":
        return key
    raise ValueError(f"no unified-checkpoint key for {key!r}")


# ---------------------------------------------------------------------------------------------
# Processor settings (image processor + Qwen3-VL video sampling), without torchvision
# ---------------------------------------------------------------------------------------------

# Qwen3-VL's published processor settings, used when a checkpoint ships none.
QWEN3VL_IMAGE_PROCESSOR = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


@dataclass
class VideoSettings:
    """Qwen3VLVideoProcessor's settings (its class defaults unless the checkpoint's
    video_preprocessor_config.json says otherwise). Pixel budgets are totals over the sampled frames."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 32 * 32 * 768
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def from_dict(cls, data: dict) -> "VideoSettings":
        out = cls()
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "fps",
                    "min_frames", "max_frames"):
            if data.get(key) is not None:
                setattr(out, key, data[key])
        size = data.get("size") or {}
        if size.get("shortest_edge"):
            out.min_pixels = int(size["shortest_edge"])
        if size.get("longest_edge"):
            out.max_pixels = int(size["longest_edge"])
        return out


def _looks_local(pretrained: str) -> bool:
    path = Path(pretrained)
    return path.is_absolute() or pretrained.startswith((".", "~")) or path.exists()


ROOT_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def check_source(pretrained: str, what: str = "model.pretrained") -> None:
    """Clear errors for a missing local directory / a non-checkpoint directory / a malformed id. `what`: how
    the messages name the source (the recipe key, or a command-line argument such as `MODEL_DIR`)."""
    if _looks_local(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_dir():
            raise UserError(f"{what}: checkpoint directory not found: {pretrained}")
        config = path / "config.json"
        if not config.is_file():
            raise UserError(
                f"{what}: {pretrained} has no config.json: the reasoner needs the unified Cosmos 3 "
                "checkpoint (root config.json with model_type cosmos3_omni, as nvidia/Cosmos3-Nano) or a "
                "reasoner export")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{what}: {config} is unreadable: {err}") from None
        if model_type not in ("cosmos3_omni", "qwen3_vl"):
            raise UserError(f"{what}: {config} has model_type {model_type!r}; the reasoner needs "
                            "cosmos3_omni (the unified Cosmos 3 checkpoint)")
        if not any((path / name).is_file() for name in ROOT_WEIGHTS):
            raise UserError(
                f"{what}: {pretrained} has config.json but no root weights index (model.safetensors.index.json) "
                "and no root weights (model.safetensors): the reasoner needs the released layout, whose root "
                "index maps the weights in transformer/ and vision_encoder/ (as nvidia/Cosmos3-Nano), or a "
                "reasoner export")
    elif pretrained.count("/") != 1:
        raise UserError(f"{what}: '{pretrained}' is neither a local directory nor a hub id (org/name)")


def _load_error(pretrained: str, err: BaseException) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"model.pretrained: could not load the Cosmos 3 reasoner from '{pretrained}': {first}. A hub id needs "
        "network access (or a filled Hugging Face cache); a local directory needs the unified layout (root "
        "config.json with model_type cosmos3_omni and its weights)."
    )


def resolve_reasoner_pretrained(pretrained: str) -> str:
    """`tiny` -> the built-in tiny checkpoint, rebuilt when an older cache lacks the reasoner files."""
    from cosmos_train.models import TINY, resolve_pretrained

    path = resolve_pretrained(pretrained)
    if pretrained == TINY and not (Path(path) / "config.json").is_file():
        # a cache written before the tiny checkpoint carried the reasoner: make_tiny replaces it in place
        from cosmos_train.models.tiny import make_tiny

        make_tiny(path)
    return path


def _read_json(pretrained: str, name: str, common: dict) -> dict | None:
    if _looks_local(pretrained):
        path = Path(pretrained).expanduser() / name
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(pretrained, name, **common)).read_text())
    except EntryNotFoundError:
        return None


def load_processor(pretrained: str, *, revision: str | None = None, local_files_only: bool = False,
                   trust_remote_code: bool = False, patch_size: int | None = None, merge_size: int | None = None,
                   temporal_patch_size: int | None = None):
    """(tokenizer, PIL image processor, VideoSettings) of a checkpoint, without loading weights.

    The tokenizer is the root one (a reasoner export, or the unified checkpoint's) or else `text_tokenizer/`.
    The image processor is `Qwen2VLImageProcessorPil` (no torchvision needed) with the checkpoint's
    preprocessor_config.json, or Qwen3-VL's published settings; patch/merge sizes follow the vision config.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    common = {"revision": revision, "local_files_only": local_files_only}
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **common)
        except (OSError, ValueError):
            tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="text_tokenizer",
                                                      trust_remote_code=trust_remote_code, **common)
        image_cfg = _read_json(pretrained, "preprocessor_config.json", common)
        video_cfg = _read_json(pretrained, "video_preprocessor_config.json", common)
        model_cfg = _read_json(pretrained, "config.json", common) or {}
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise _load_error(pretrained, err) from None
    vision = model_cfg.get("vision_config") or {}
    patch_size = patch_size or vision.get("patch_size")
    merge_size = merge_size or vision.get("spatial_merge_size")
    temporal_patch_size = temporal_patch_size or vision.get("temporal_patch_size")
    settings = dict(QWEN3VL_IMAGE_PROCESSOR)
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size",
                "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "resample", "rescale_factor"):
        if image_cfg and key in image_cfg:
            settings[key] = image_cfg[key]
    if image_cfg and ("min_pixels" in image_cfg or "max_pixels" in image_cfg):
        size = dict(settings["size"])
        size["shortest_edge"] = image_cfg.get("min_pixels") or size["shortest_edge"]
        size["longest_edge"] = image_cfg.get("max_pixels") or size["longest_edge"]
        settings["size"] = size
    for key, value in (("patch_size", patch_size), ("merge_size", merge_size),
                       ("temporal_patch_size", temporal_patch_size)):
        if value:
            settings[key] = value
    image_processor = Qwen2VLImageProcessorPil(**settings)
    video = VideoSettings.from_dict(video_cfg or {})
    for key, value in (("patch_size", patch_size), ("merge_size", merge_size),
                       ("temporal_patch_size", temporal_patch_size)):
        if value:
            setattr(video, key, value)
    return tokenizer, image_processor, video


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class Cosmos3Reasoner:
    """transformers' `Cosmos3OmniForConditionalGeneration` + its tokenizer, PIL image processor and video
    sampling settings. `model` is what trains; `forward_module` is what training calls (the model itself,
    or its DDP / DeepSpeed wrapper)."""

    def __init__(self, model, tokenizer, image_processor, video: VideoSettings, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video = video
        self.source = source
        self.forward_module = None
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str, *, dtype: str = "bfloat16", revision: str | None = None,
                        local_files_only: bool = False, trust_remote_code: bool = False,
                        attn_implementation: str = "sdpa") -> "Cosmos3Reasoner":
        from transformers import Cosmos3OmniForConditionalGeneration

        check_source(pretrained)
        common = {"revision": revision, "local_files_only": local_files_only}
        try:
            if trust_remote_code:
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(
                    pretrained, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                    trust_remote_code=True, **common)
            else:
                model = Cosmos3OmniForConditionalGeneration.from_pretrained(
                    pretrained, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **common)
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise _load_error(pretrained, err) from None
        vision = model.config.vision_config
        tokenizer, image_processor, video = load_processor(
            pretrained, trust_remote_code=trust_remote_code, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size, **common)
        return cls(model.eval(), tokenizer, image_processor, video, source=pretrained)

    @property
    def transformer(self):
        """The trainable network (named like the generator adapter's, for shared trainer code)."""
        return self.model

    @property
    def compute_dtype(self) -> torch.dtype:
        """The frozen base's dtype (trained weights may be fp32 masters): what sharded back-ends compute in."""
        return self.model.get_input_embeddings().weight.dtype

    def to(self, device) -> "Cosmos3Reasoner":
        self.model.to(device)
        return self

    def place_for_training(self, device, *, encodes_online: bool = True) -> "Cosmos3Reasoner":
        """Everything goes to the device: the next-token loss needs lm_head, and the vision tower encodes every
        image / video of a pack (the processor's pixels are not cached)."""
        return self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- what trains (same interface as the generator adapter) -----------------------------------
    def setup_trainable(self, cfg) -> list[dict]:
        """AdamW parameter groups (language / vision / merger, each with its own lr)."""
        return setup_reasoner_trainable(self.model, cfg)

    def trainable_state_dict(self, cfg) -> dict:
        return reasoner_trainable_state_dict(self.model)

    def load_trainable_state_dict(self, cfg, weights: dict) -> None:
        load_reasoner_trainable_state_dict(self.model, weights)

    @staticmethod
    def ddp_find_unused_parameters(cfg) -> bool:
        # packs without images or videos leave a trainable vision tower / merger unused
        return cfg.reasoner.vision != "frozen" or cfg.reasoner.merger != "frozen"

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def install_packed_attention(self, backend: str = "auto") -> None:
        """Nothing to install: padding-free packing needs only the [4, 1, S] position ids (row 0 restarting
        per conversation makes transformers' causal mask block-diagonal, for sdpa / eager / flash-attention)."""

    # ---- positions ---------------------------------------------------------------------------
    def rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                   image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """[3, L] mRoPE ids of one sample (transformers' own get_rope_index)."""
        from transformers.models.cosmos3_omni.modeling_cosmos3_omni import Cosmos3OmniModel

        inner = _inner_model(self.model)
        position_ids, _ = Cosmos3OmniModel.get_rope_index(
            inner, input_ids[None].cpu(), mm_token_type_ids=mm_token_type_ids[None].cpu(),
            image_grid_thw=None if image_grid_thw is None else image_grid_thw.cpu(),
            video_grid_thw=None if video_grid_thw is None else video_grid_thw.cpu())
        return position_ids[:, 0]

    # ---- forward -------------------------------------------------------------------------
    def forward(self, **inputs):
        module = self.forward_module or self.model
        return module(**inputs)


def _inner_model(model):
    """The Cosmos3OmniModel inside a (possibly wrapped) Cosmos3OmniForConditionalGeneration."""
    while hasattr(model, "module"):  # DDP
        model = model.module
    return model.model


# ---------------------------------------------------------------------------------------------
# Trainable selection
# ---------------------------------------------------------------------------------------------

_LANGUAGE_MODULE = r"model\.language_model\.layers\.\d+\.(?:[^.]+\.)*(?:{})"
_VISION_MODULE = r"model\.visual\.blocks\.\d+\.(?:[^.]+\.)*(?:{})"


def _part_of(name: str) -> str:
    if name.startswith(HF_LANGUAGE) or name.startswith("lm_head."):
        return "language"
    if name.startswith(HF_VISUAL + "merger.") or name.startswith(HF_VISUAL + "deepstack_merger_list."):
        return "merger"
    if name.startswith(HF_VISUAL):
        return "vision"
    return "other"


def _lora_regex(template: str, targets: list[str]) -> str:
    return template.format("|".join(re.escape(t) for t in targets))


def language_mode(cfg) -> str:
    """The language model's trainable mode: reasoner.language, or train.method when that is unset."""
    return cfg.reasoner.language or cfg.train.method


def _cast_hooks(model: nn.Module, chosen: set[str], base_dtype: torch.dtype) -> None:
    from cosmos_train.trainer.adapters import _cast_inputs_hook, _cast_output_hook

    if base_dtype == torch.float32:
        return
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        if module_name and own and all(n in chosen for n in own):
            module.register_forward_pre_hook(_cast_inputs_hook, with_kwargs=True)
            module.register_forward_hook(_cast_output_hook)


def setup_reasoner_trainable(model: nn.Module, cfg) -> list[dict]:
    """Make the recipe's reasoner weights trainable; return AdamW parameter groups (one per part, own lr).

    `cfg` is the RecipeConfig. Per part (reasoner.language / vision / merger):
      lora   - LoRA adapters (rank/alpha/dropout from train.lora) on reasoner.language_lora_targets in the
               language model's decoder layers, or reasoner.vision_lora_targets in the vision blocks;
      full   - every weight of the part (language: embeddings, decoder, final norm and lm_head; vision:
               patch/pos embeddings and blocks; merger: merger + deepstack mergers);
      frozen - nothing.
    Trainable weights are fp32 (cast hooks run fully trainable modules in fp32 over a bf16 base).
    """
    from peft import LoraConfig, inject_adapter_in_model

    r = cfg.reasoner
    modes = {"language": language_mode(cfg), "vision": r.vision, "merger": r.merger}
    for part, mode in modes.items():
        allowed = ("full", "frozen") if part == "merger" else ("lora", "full", "frozen")
        if mode not in allowed:
            key = f"reasoner.{part}" if not (part == "language" and r.language is None) else "train.method"
            raise UserError(f"{key}: invalid value {mode!r} ({', '.join(allowed)})")
    base_dtype = model.get_input_embeddings().weight.dtype
    model.requires_grad_(False)

    patterns = []
    if modes["language"] == "lora":
        patterns.append(_lora_regex(_LANGUAGE_MODULE, list(r.language_lora_targets)))
    if modes["vision"] == "lora":
        patterns.append(_lora_regex(_VISION_MODULE, list(r.vision_lora_targets)))
    if patterns:
        regex = "|".join(f"(?:{p})" for p in patterns)
        names = [n for n, _ in model.named_modules()]
        for part, template, targets in (("language", _LANGUAGE_MODULE, r.language_lora_targets),
                                        ("vision", _VISION_MODULE, r.vision_lora_targets)):
            if modes[part] != "lora":
                continue
            for target in targets:
                if not any(re.fullmatch(_lora_regex(template, [target]), n) for n in names):
                    raise UserError(f"reasoner.{part}_lora_targets: no module named '{target}' in the {part} "
                                    "model's layers (module names look like "
                                    + ("'model.language_model.layers.0.self_attn.q_proj')" if part == "language"
                                       else "'model.visual.blocks.0.attn.qkv')"))
        lora = LoraConfig(r=cfg.train.lora.rank, lora_alpha=cfg.train.lora.alpha,
                          lora_dropout=cfg.train.lora.dropout, target_modules=regex, init_lora_weights=True)
        inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.float()

    full = {part for part, mode in modes.items() if mode == "full"}
    chosen: set[str] = set()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        if _part_of(name) in full:
            param.requires_grad_(True)
            param.data = param.data.float()
            chosen.add(name)
    _cast_hooks(model, chosen, base_dtype)

    lrs = {"language": r.language_lr, "vision": r.vision_lr, "merger": r.merger_lr}
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = _part_of(name)
            groups.setdefault(part, []).append(param)
    if not groups:
        raise UserError("reasoner: the recipe selects no trainable parameters (language, vision and merger are "
                        "all frozen)")
    return [{"params": params, "lr": lrs.get(part) or cfg.train.lr, "name": part}
            for part, params in groups.items()]


def reasoner_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a reasoner checkpoint stores: every trainable tensor (LoRA A/B and fully trained weights) by name."""
    model = getattr(model, "module", model)
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_reasoner_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model = getattr(model, "module", model)
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise UserError(f"checkpoint does not match the recipe's reasoner setup (unknown parameters: {unknown[:3]})")
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise UserError(f"checkpoint does not match the recipe's reasoner setup (missing: {missing[:3]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base weight and put the plain layer back; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


def load_reasoner(cfg) -> Cosmos3Reasoner:
    """The reasoner adapter for a recipe (`model.pretrained`: hub id, local directory or `tiny`)."""
    m = cfg.model
    return Cosmos3Reasoner.from_pretrained(
        resolve_reasoner_pretrained(m.pretrained), dtype=m.dtype, revision=m.revision,
        local_files_only=m.local_files_only, trust_remote_code=m.trust_remote_code,
        attn_implementation=cfg.reasoner.attn_implementation,
    )
