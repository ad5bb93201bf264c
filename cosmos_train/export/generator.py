"""Export a generator run: the released-layout checkpoint (LoRA merged), or LoRA adapters only.

Merged (default): a copy of the base checkpoint in its released layout (cosmos_train/models/layout.py) whose
`transformer/` shards hold the trained weights, written once each in the stored dtype and file names; the root
index is rebuilt, so diffusers (generator), transformers and vLLM (reasoner) and vLLM-Omni all load it, and a
full finetune of the understanding pathway (`train.full_trainable: all`) changes the reasoner's language model
too (there is one). `model_index.json` records the trained prompt format's `default_use_system_prompt`.
LoRA only: the adapter for diffusers at OUT and a vLLM-Omni variant in OUT/vllm-omni (export/adapters.py).

The output is built in a temporary directory next to OUT_DIR and renamed into place only after it has
verified itself: the exported transformer (or base + exported adapter) is reloaded from disk and its
prediction on one fixed input must match the trained model's; for the merged form, transformers' view of
the same directory must read exactly the tensors in transformer/ (export/release.py). Every export carries a
model card (README.md) and cosmos_train_export.json, neither naming a local path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.export.adapters import ADAPTER_WEIGHTS, write_generator_adapters
from cosmos_train.models.action_heads import ACTION_HEADS_FILE
from cosmos_train.export.model_card import public_name, write_model_card
from cosmos_train.export.release import (changed_weights, set_default_use_system_prompt, verify_one_language_model,
                                         verify_written_tensors, write_export_record)
from cosmos_train.export.staging import load_saved_recipe_dict, normalize_permissions, open_run, staged_directory
from cosmos_train.models import load_model, local_checkpoint_dir
from cosmos_train.models.layout import is_release_layout, write_release_checkpoint
from cosmos_train.trainer.adapters import ADAPTER_NAME
# Relative tolerance on the fixed-input prediction: fp32 merges are exact up to summation order;
# bf16 merges round W + BA once more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _fixed_input(model) -> tuple[dict, torch.Tensor, float]:
    g = torch.Generator().manual_seed(1234)
    ids, _ = model.tokenize("A red ball rolls across a table.", num_frames=9, height=64, width=64, fps=24.0)
    channels = model.transformer.config.latent_channel
    latent = torch.randn(1, channels, 3, 4, 4, generator=g)
    return model.build_sequence(ids, latent.shape, [0], 24.0), latent, 400.0


@torch.no_grad()
def _predict(model, transformer=None) -> torch.Tensor:
    if transformer is not None:
        model.pipe.transformer = transformer
        model.forward_module = None
    model.transformer.eval()
    sequence, latent, timestep = _fixed_input(model)
    return model.predict_velocity(sequence, latent, timestep).float()


def _compare(reference: torch.Tensor, exported: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    rel = float((reference - exported).abs().max() / reference.abs().max().clamp_min(1e-12))
    if not rel <= TOLERANCE.get(dtype, 3e-2):
        raise RuntimeError(f"export verification failed: {what} differs from the trained model "
                           f"(max relative difference {rel:.3e}); the export was not written")
    return rel


def _dtype_of(transformer) -> torch.dtype:
    return transformer.embed_tokens.weight.dtype


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, lora_only: bool = False,
               ema: bool = False) -> dict:
    """Export RUN_DIR's checkpoint (latest, or `step`) to OUT_DIR: the released-layout checkpoint with the
    trained transformer put in (default), or the LoRA adapters (`lora_only`); see the module docstring."""
    from cosmos_train.models.prompt_format import resolve_prompt_format

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, checkpoint, weights, state = open_run(run_dir, out_dir, "generator", step, ema=ema)
    if lora_only and cfg.train.method != "lora":
        raise UserError("--lora-only needs a LoRA run; this run used full finetuning")
    # A run trained over a quantized base (model.quantize_base) exports over the unquantized checkpoint on disk:
    # the adapters merge into (and are verified against) the base in its stored precision.
    quantized_in_training = cfg.model.quantize_base
    cfg.model.quantize_base = "none"

    trained = load_model(cfg)
    trained.setup_trainable(cfg)
    trained.load_trainable_state_dict(cfg, weights)
    reference = _predict(trained)
    dtype = _dtype_of(trained.transformer)
    prompt_format = resolve_prompt_format(cfg.generator, trained.default_use_system_prompt).to_dict()
    base = public_name(cfg.model.pretrained)
    info = {"objective": "generator", "checkpoint": checkpoint.name, "step": state["step"],
            "method": cfg.train.method, "ema": ema, "full_trainable": cfg.train.full_trainable if cfg.train.method == "full"
            else None, "lora_only": lora_only, "base_model": base, "base_revision": cfg.model.revision,
            "prompt_format": prompt_format}
    if quantized_in_training != "none":
        info["trained_over_quantized_base"] = quantized_in_training
    if cfg.action is not None:
        from cosmos_train.data.action_data import action_export_record

        info["action"] = action_export_record(cfg, run_dir)

    with staged_directory(out_dir) as tmp:
        if lora_only:
            info["adapters"] = write_generator_adapters(trained.transformer, tmp, base, ADAPTER_NAME)
            fresh = load_model(cfg)
            fresh.transformer.load_lora_adapter(str(tmp), weight_name=ADAPTER_WEIGHTS, adapter_name=ADAPTER_NAME)
            if cfg.action is not None:  # PEFT cannot carry the action heads' tables: they travel beside it
                from safetensors.torch import save_file

                from cosmos_train.models.action_heads import action_state_dict, load_action_heads

                save_file(action_state_dict(trained.transformer), str(tmp / ACTION_HEADS_FILE))
                load_action_heads(fresh.transformer, tmp / ACTION_HEADS_FILE)
                info["adapters"]["action_heads"] = ACTION_HEADS_FILE
            info["verification_max_relative_difference"] = _compare(
                reference, _predict(fresh), dtype, "base model + exported LoRA adapter (diffusers)")
            kind = "generator-adapter"
        else:
            transformer = trained.transformer
            if cfg.train.method == "lora":
                transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
                transformer.unload_lora()
            state_dict = transformer.state_dict()
            new = {key: state_dict[key] for key in changed_weights(weights)}
            source = local_checkpoint_dir(cfg)
            if not is_release_layout(source):
                raise UserError(f"model.pretrained: {cfg.model.pretrained} is not in the released Cosmos 3 layout "
                                "(root model.safetensors.index.json over transformer/ + vision_encoder/); "
                                "a merged export rewrites that layout")
            info["tensors_replaced"] = write_release_checkpoint(source, tmp, transformer=new)
            set_default_use_system_prompt(tmp, prompt_format["use_system_prompt"])
            info["tensors_verified"] = verify_written_tensors(tmp, new, {})
            from diffusers import Cosmos3OmniTransformer

            reloaded = Cosmos3OmniTransformer.from_pretrained(str(tmp / "transformer"), torch_dtype=dtype)
            info["verification_max_relative_difference"] = _compare(
                reference, _predict(trained, reloaded), dtype, "exported transformer (diffusers)")
            del reloaded
            info.update(verify_one_language_model(tmp, dtype))
            kind = "generator-merged"
        write_export_record(tmp, info)
        write_model_card(tmp, kind=kind, cfg=cfg, recipe=load_saved_recipe_dict(run_dir), run_dir=run_dir,
                         info=info, prompt_format=prompt_format)
        normalize_permissions(tmp)
    return info
