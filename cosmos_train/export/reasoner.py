"""Export a reasoner run: a transformers directory (LoRA merged), or the whole unified checkpoint with its
language pathway replaced.

(a) default: `Cosmos3OmniForConditionalGeneration.from_pretrained(OUT_DIR)` loads it: config, weights (LoRA
    merged, base dtype), generation config, tokenizer + chat template, image processor settings and the
    video sampling settings (video_preprocessor_config.json).
(b) `unified=True`: a copy of the base unified checkpoint (root + diffusers components) in which the finetuned
    weights replace the originals: at the root (transformers' view: language model, and the vision tower /
    merger when they trained) and in `transformer/` (diffusers' view: the und pathway `layers.N.self_attn.
    to_q/...`, `mlp`, norms, `embed_tokens`, `lm_head`). The generation pathway (and VAE, sound tokenizer,
    ...) is untouched, bit for bit, so `Cosmos3OmniPipeline.from_pretrained(OUT_DIR)` generates with the
    finetuned understanding pathway.

Both verify themselves before the output is renamed into place: the exported model is reloaded from disk and
its logits on a fixed conversation (text + image) must match the trained model's (within the rounding of the
checkpoint's dtype) and the merged in-memory model's (1e-4); (b) also checks every replaced / untouched
tensor in `transformer/`. Output goes to a temporary directory next to OUT_DIR first, and
never into a non-empty directory.
"""

from __future__ import annotations

import json
import os
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


def load_trained_reasoner(cfg, weights: dict):
    """The recipe's base reasoner with its trainable setup and the checkpoint's trained weights."""
    from cosmos_train.models.reasoner import load_reasoner, load_reasoner_trainable_state_dict, setup_reasoner_trainable

    reasoner = load_reasoner(cfg)
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


def _safetensors_files(directory: Path) -> list[Path]:
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    return sorted(directory.glob("*.safetensors"))


def _replace_in_files(files: list[Path], new: dict[str, torch.Tensor]) -> set[str]:
    """Rewrite the safetensors `files`, giving every key in `new` its new value (in the stored dtype)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    replaced: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            metadata = fh.metadata() or {"format": "pt"}
        hits = keys & set(new)
        if not hits:
            continue
        tensors = load_file(str(path))
        for key in hits:
            if tuple(tensors[key].shape) != tuple(new[key].shape):
                raise RuntimeError(f"{path.name}: {key} has shape {tuple(tensors[key].shape)}, the finetuned "
                                   f"weight {tuple(new[key].shape)}")
            tensors[key] = new[key].to(tensors[key].dtype).contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        replaced |= hits
    return replaced


def _verify_diffusers_transformer(out: Path, source: Path, new: dict[str, torch.Tensor]) -> dict:
    """transformer/: replaced und keys hold the finetuned values, every other tensor is the source's, bitwise."""
    from safetensors.torch import load_file

    checked = {"replaced": 0, "untouched": 0}
    for path in _safetensors_files(source / "transformer"):
        original = load_file(str(path))
        written = load_file(str(out / "transformer" / path.name))
        if set(original) != set(written):
            raise RuntimeError(f"export verification failed: transformer/{path.name} changed its keys")
        for key, value in written.items():
            if key in new:
                if not torch.equal(value, new[key].to(value.dtype)):
                    raise RuntimeError(f"export verification failed: transformer/{path.name}: {key} is not the "
                                       "finetuned weight")
                checked["replaced"] += 1
            else:
                if not torch.equal(value, original[key]):
                    raise RuntimeError(f"export verification failed: transformer/{path.name}: {key} changed")
                checked["untouched"] += 1
    return checked


def export_reasoner_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                        unified: bool = False) -> dict:
    """Export RUN_DIR's checkpoint (latest, or `step`) to OUT_DIR; see the module docstring."""
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.models.reasoner import DTYPES, hf_key_to_unified, is_generator_key, resolve_reasoner_pretrained

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, checkpoint, weights, state = open_run(run_dir, out_dir, "reasoner", step)
    dtype = DTYPES[cfg.model.dtype]

    source = None
    pretrained = resolve_reasoner_pretrained(cfg.model.pretrained)
    if Path(pretrained).is_dir():
        source = Path(pretrained)
    elif unified:
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(pretrained, revision=cfg.model.revision,
                                        local_files_only=cfg.model.local_files_only))
    if unified and not (source / "model_index.json").is_file():
        raise UserError(f"--unified needs a unified Cosmos 3 checkpoint as the base (model_index.json + "
                        f"transformer/ beside config.json); {cfg.model.pretrained} has no model_index.json")

    reasoner = load_trained_reasoner(cfg, weights)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cosmos-train-export-") as scratch_dir, \
            staged_directory(out_dir) as tmp:
        scratch = Path(scratch_dir)
        record = fixed_conversation(_fixed_image(scratch / "fixed.png"))
        reference = reasoner_logits(reasoner, record, cfg)
        merged = finalize_weights(reasoner, dtype)
        final = reasoner_logits(reasoner, record, cfg)  # merged, in the checkpoint's dtype: what is written
        _compare(reference, final, dtype, "the merged model")
        finetuned = {k: v.detach().cpu() for k, v in reasoner.model.state_dict().items()}
        info = {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name, "step": state["step"],
                "base_model": cfg.model.pretrained, "unified": unified, "lora_layers_merged": merged}
        if not unified:
            # `generate` on the export samples with the documented Reasoner defaults (presence_penalty 1.5
            # has no GenerationConfig field: cosmos_train.chat applies it)
            from cosmos_train.models.tiny import REASONER_GENERATION_DEFAULTS

            for key, value in REASONER_GENERATION_DEFAULTS.items():
                setattr(reasoner.model.generation_config, key, value)
            reasoner.model.save_pretrained(str(tmp), safe_serialization=True)
            _save_processor_files(reasoner, tmp, source)
        else:
            for item in source.iterdir():
                if item.name.startswith("."):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            # only the weights that trained (a LoRA layer's base weight, or a fully trained parameter) are
            # replaced: everything else stays as stored, whatever dtype training loaded it in
            unified_new = {hf_key_to_unified(k): finetuned[k] for k in changed_weights(weights)}
            root_replaced = _replace_in_files(_safetensors_files(tmp), unified_new)
            missing = sorted(set(unified_new) - root_replaced)
            if missing:
                raise RuntimeError(f"export: the base checkpoint's root weights lack {missing[:3]}")
            und_new = {k: v for k, v in unified_new.items() if not k.startswith(_VISION_UNIFIED)
                       and not is_generator_key(k)}
            _replace_in_files(_safetensors_files(tmp / "transformer"), und_new)
            info["transformer_check"] = _verify_diffusers_transformer(tmp, source, und_new)
            info["root_tensors_replaced"] = len(root_replaced)
        reloaded = Cosmos3OmniForConditionalGeneration.from_pretrained(
            str(tmp), dtype=dtype, attn_implementation=cfg.reasoner.attn_implementation)
        from cosmos_train.models.reasoner import Cosmos3Reasoner, load_processor

        tokenizer, image_processor, video = load_processor(str(tmp))
        exported = Cosmos3Reasoner(reloaded, tokenizer, image_processor, video)
        reloaded_logits = reasoner_logits(exported, record, cfg)
        info["reload_max_relative_difference"] = _compare(final, reloaded_logits, torch.float32,
                                                          "the reloaded export (transformers)")
        info["verification_max_relative_difference"] = _compare(reference, reloaded_logits, dtype,
                                                                 "the exported reasoner (transformers)")
        (tmp / "cosmos_train_export.json").write_text(json.dumps(info, indent=2))
    return info


_VISION_UNIFIED = ("blocks.", "merger.", "patch_embed.", "pos_embed.", "deepstack_merger_list.")


def changed_weights(trained: dict) -> list[str]:
    """Model state-dict keys a checkpoint changes: LoRA layers' base weights and fully trained parameters."""
    keys = set()
    for name in trained:
        if ".lora_" in name:
            keys.add(name.split(".lora_")[0] + ".weight")
        else:
            keys.add(name)
    return sorted(keys)
