"""Export a reasoner run: the released-layout checkpoint (default), a plain transformers directory, or LoRA
adapters.

(a) default (`form="release"`): a copy of the base checkpoint in its released layout (models/layout.py) with the
    finetuned weights put back where the release keeps them: the language model (the understanding pathway,
    `layers.N.self_attn.to_q/...`, `mlp`, norms, `embed_tokens`, `lm_head`) in the `transformer/` shards, the
    vision tower and merger in `vision_encoder/`; the root index is rebuilt. The generation pathway, VAE, sound
    tokenizer, ... are untouched, bit for bit. transformers, vLLM's Cosmos 3 class and diffusers all load it,
    and there is one language model (no root weights).
(b) `form="transformers"`: `Cosmos3OmniForConditionalGeneration.save_pretrained` output (LoRA merged, base
    dtype) with the generation config, tokenizer + chat template, image and video processor settings.
(c) `lora_only`: the PEFT adapter for transformers at OUT and the vLLM variant in OUT/vllm (export/adapters.py).

Each verifies itself before the output is renamed into place: the exported model is reloaded from disk and its
logits on a fixed conversation (text + image) must match the trained model's (within the rounding of the
checkpoint's dtype) and the merged in-memory model's (1e-4); (a) also checks that transformers reads exactly
the tensors in transformer/ + vision_encoder/ and that every generation-pathway tensor is the base's; (c) loads
the adapter with PEFT onto the base. Output goes to a temporary directory next to OUT_DIR first, and never
into a non-empty directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.export.staging import open_run, staged_directory

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
FIXED_QUESTION = "Describe the image in one sentence."
FIXED_ANSWER = "A red square on a striped background."
FIXED_REASONING = "The center of the image is a red block; the rest is a colored gradient."


def _fixed_image(path: Path) -> Path:
    """A deterministic 96x64 RGB test image (written once per export)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:96]
    img = np.stack([(x * 2) % 256, (y * 4) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    img[20:44, 36:60] = (220, 30, 30)
    Image.fromarray(img).save(path)
    return path


def fixed_conversation(image_path: Path):
    from cosmos_train.data.conversations import ConversationRecord

    return ConversationRecord(messages=(
        {"role": "user", "content": ({"type": "image", "path": image_path}, {"type": "text", "text": FIXED_QUESTION})},
        {"role": "assistant", "content": ({"type": "text", "text": FIXED_ANSWER},), "reasoning": FIXED_REASONING},
    ), source="export:fixed")


@torch.no_grad()
def reasoner_logits(reasoner, record, cfg) -> torch.Tensor:
    """Logits [L, V] (float32) of `reasoner` on `record`, one unpacked forward."""
    from cosmos_train.data.conversations import encode_conversation
    from cosmos_train.objectives.reasoner import ReasonerObjective

    was_training = reasoner.model.training
    reasoner.model.eval()
    enc = encode_conversation(record, reasoner.tokenizer, reasoner.image_processor, reasoner.video, cfg.reasoner)
    objective = ReasonerObjective(reasoner, cfg.reasoner)
    logits = objective.logits([objective.encode(enc)], packed=False)[0].float().cpu()
    reasoner.model.train(was_training)
    return logits


def _compare(reference: torch.Tensor, exported: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    rel = float((reference - exported).abs().max() / reference.abs().max().clamp_min(1e-12))
    if not rel <= TOLERANCE.get(dtype, 3e-2):
        raise RuntimeError(f"export verification failed: {what} differs from the trained model "
                           f"(max relative difference {rel:.3e}); the export was not written")
    return rel


def load_trained_reasoner(cfg, weights: dict | None):
    """The recipe's base reasoner with its trainable setup and the checkpoint's trained weights (None: the
    base alone)."""
    from cosmos_train.models.reasoner import load_reasoner, load_reasoner_trainable_state_dict, setup_reasoner_trainable

    reasoner = load_reasoner(cfg)
    if weights is not None:
        setup_reasoner_trainable(reasoner.model, cfg)
        load_reasoner_trainable_state_dict(reasoner.model, weights)
    return reasoner


def finalize_weights(reasoner, dtype: torch.dtype) -> int:
    """Merge LoRA into the base weights and give trained (fp32) weights the checkpoint's dtype back."""
    from cosmos_train.models.reasoner import merge_lora

    merged = merge_lora(reasoner.model)
    for param in reasoner.model.parameters():
        param.requires_grad_(False)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    if hasattr(reasoner.model, "peft_config"):
        del reasoner.model.peft_config
    return merged


def _save_processor_files(reasoner, out: Path, source: Path | None) -> None:
    from dataclasses import asdict

    reasoner.tokenizer.save_pretrained(out)
    reasoner.image_processor.save_pretrained(out)
    video = source / "video_preprocessor_config.json" if source is not None else None
    if video is not None and video.is_file():
        shutil.copy2(video, out / video.name)
    else:
        settings = asdict(reasoner.video)
        data = {"video_processor_type": "Qwen3VLVideoProcessor",
                **{k: settings[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                            "image_std", "fps", "min_frames", "max_frames")},
                "size": {"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]}}
        (out / "video_preprocessor_config.json").write_text(json.dumps(data, indent=2) + "\n")


def _verify_generation_pathway(out: Path, source: Path, und: dict[str, torch.Tensor]) -> dict:
    """diffusers' view: transformer/ loads as the generator, the understanding keys hold the finetuned values and
    every other tensor (the generation pathway, its heads) is the base's, bit for bit."""
    from safetensors import safe_open

    from cosmos_train.models.layout import TRANSFORMER_DIR, component_weight_map

    checked = {"replaced": 0, "untouched": 0}
    source_map = component_weight_map(source / TRANSFORMER_DIR)
    written_map = component_weight_map(out / TRANSFORMER_DIR)
    if source_map != written_map:
        raise RuntimeError("export verification failed: transformer/ changed its keys; the export was not written")
    for name in sorted(set(written_map.values())):
        # write_release_checkpoint keeps the base's shard names and key assignment
        with safe_open(str(source / TRANSFORMER_DIR / name), framework="pt") as original, \
                safe_open(str(out / TRANSFORMER_DIR / name), framework="pt") as fh:
            for key in fh.keys():
                value = fh.get_tensor(key)
                if key in und:
                    if not torch.equal(value, und[key].to(value.dtype)):
                        raise RuntimeError(f"export verification failed: transformer/{name}: {key} is not the "
                                           "finetuned weight; the export was not written")
                    checked["replaced"] += 1
                elif not torch.equal(value, original.get_tensor(key)):
                    raise RuntimeError(f"export verification failed: transformer/{name}: {key} changed; the "
                                       "export was not written")
                else:
                    checked["untouched"] += 1
    from diffusers import Cosmos3OmniTransformer

    Cosmos3OmniTransformer.from_pretrained(str(out / TRANSFORMER_DIR))  # diffusers loads it (strict keys)
    return checked


def export_reasoner_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                        form: str = "release", lora_only: bool = False, ema: bool = False) -> dict:
    """Export RUN_DIR's checkpoint (latest, or `step`) to OUT_DIR; see the module docstring.
    `form`: `release` (the base checkpoint with the finetuned weights put back) or `transformers`."""
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.export.adapters import write_reasoner_adapters
    from cosmos_train.export.model_card import public_name, write_model_card
    from cosmos_train.export.release import (changed_weights, verify_one_language_model, verify_written_tensors,
                                             write_export_record)
    from cosmos_train.export.staging import load_saved_recipe_dict
    from cosmos_train.export.staging import normalize_permissions
    from cosmos_train.models.layout import is_release_layout, write_release_checkpoint
    from cosmos_train.models.reasoner import (DTYPES, VISION_PREFIXES, Cosmos3Reasoner, hf_key_to_unified,
                                              is_generator_key, load_processor, resolve_reasoner_pretrained)

    if form not in ("release", "transformers"):
        raise ValueError(f"unknown reasoner export form {form!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, checkpoint, weights, state = open_run(run_dir, out_dir, "reasoner", step, ema=ema)
    dtype = DTYPES[cfg.model.dtype]
    if lora_only and any(".lora_" not in k for k in weights):
        raise UserError("--lora-only needs a run that trained only LoRA adapters; this run also trained whole "
                        "weights (reasoner.vision / merger / language: full): export it merged instead")
    pretrained = resolve_reasoner_pretrained(cfg.model.pretrained)
    source = None
    if form == "release" and not lora_only:
        from cosmos_train.models import local_checkpoint_dir

        source = local_checkpoint_dir(cfg)
        if not is_release_layout(source):
            raise UserError(f"model.pretrained: {cfg.model.pretrained} is not in the released Cosmos 3 layout (root "
                            "model.safetensors.index.json over transformer/ + vision_encoder/, as nvidia/Cosmos3-Nano); "
                            "export with --transformers for a plain transformers directory")
    elif Path(pretrained).is_dir():
        source = Path(pretrained)

    base = public_name(cfg.model.pretrained)
    reasoner = load_trained_reasoner(cfg, weights)
    info = {"objective": "reasoner", "checkpoint": checkpoint.name, "step": state["step"], "base_model": base,
            "base_revision": cfg.model.revision, "form": "lora-only" if lora_only else form, "ema": ema}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cosmos-train-export-") as scratch_dir, \
            staged_directory(out_dir) as tmp:
        scratch = Path(scratch_dir)
        record = fixed_conversation(_fixed_image(scratch / "fixed.png"))
        reference = reasoner_logits(reasoner, record, cfg)
        if lora_only:
            from peft import PeftModel

            info["adapters"] = write_reasoner_adapters(reasoner.model, weights, tmp, base)
            fresh = load_trained_reasoner(cfg, None)
            peft_model = PeftModel.from_pretrained(fresh.model, str(tmp))
            _check_adapter_loaded(peft_model, tmp)
            fresh.model = peft_model.merge_and_unload()
            info["verification_max_relative_difference"] = _compare(
                reference, reasoner_logits(fresh, record, cfg), dtype, "base model + exported adapter (PEFT)")
            kind = "reasoner-adapter"
        else:
            merged = finalize_weights(reasoner, dtype)
            final = reasoner_logits(reasoner, record, cfg)  # merged, in the checkpoint's dtype: what is written
            _compare(reference, final, dtype, "the merged model")
            finetuned = {k: v.detach().cpu() for k, v in reasoner.model.state_dict().items()}
            info["lora_layers_merged"] = merged
            if form == "transformers":
                from cosmos_train.models.tiny import REASONER_GENERATION_DEFAULTS

                # `generate` on the export samples with the documented Reasoner defaults (presence_penalty 1.5
                # has no GenerationConfig field: cosmos_train.chat applies it)
                for key, value in REASONER_GENERATION_DEFAULTS.items():
                    setattr(reasoner.model.generation_config, key, value)
                reasoner.model.config.architectures = ["Cosmos3OmniForConditionalGeneration"]
                reasoner.model.save_pretrained(str(tmp), safe_serialization=True)
                _save_processor_files(reasoner, tmp, source)
                kind = "reasoner-transformers"
            else:
                # only the weights that trained (a LoRA layer's base weight, or a fully trained parameter) are
                # replaced: everything else stays as stored, whatever dtype training loaded it in
                unified_new = {hf_key_to_unified(k): finetuned[k] for k in changed_weights(weights)}
                vision_new = {k: v for k, v in unified_new.items() if k.startswith(VISION_PREFIXES)}
                und_new = {k: v for k, v in unified_new.items()
                           if k not in vision_new and not is_generator_key(k)}
                info["tensors_replaced"] = write_release_checkpoint(source, tmp, transformer=und_new,
                                                                    vision=vision_new)
                info["tensors_verified"] = verify_written_tensors(tmp, und_new, vision_new)
                info["transformer_check"] = _verify_generation_pathway(tmp, source, und_new)
                info.update(verify_one_language_model(tmp, dtype))
                kind = "reasoner-merged"
            reloaded = Cosmos3OmniForConditionalGeneration.from_pretrained(
                str(tmp), dtype=dtype, attn_implementation=cfg.reasoner.attn_implementation)
            tokenizer, image_processor, video = load_processor(str(tmp))
            exported = Cosmos3Reasoner(reloaded, tokenizer, image_processor, video)
            reloaded_logits = reasoner_logits(exported, record, cfg)
            info["reload_max_relative_difference"] = _compare(final, reloaded_logits, torch.float32,
                                                              "the reloaded export (transformers)")
            info["verification_max_relative_difference"] = _compare(reference, reloaded_logits, dtype,
                                                                     "the exported reasoner (transformers)")
        write_export_record(tmp, info)
        write_model_card(tmp, kind=kind, cfg=cfg, recipe=load_saved_recipe_dict(run_dir), run_dir=run_dir, info=info)
        normalize_permissions(tmp)
    return info


def _check_adapter_loaded(peft_model, adapter_dir: Path) -> None:
    """Every tensor of the adapter file landed in the PEFT model (PEFT only warns about names it skips)."""
    from safetensors.torch import load_file

    from cosmos_train.export.adapters import ADAPTER_WEIGHTS

    params = dict(peft_model.named_parameters())
    for key, value in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params or not torch.equal(params[name].detach().float().cpu(), value.float()):
            raise RuntimeError(f"export verification failed: PEFT did not load {key} from the adapter; the export "
                               "was not written")
