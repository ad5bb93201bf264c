"""Export a generator run: a full pipeline directory (LoRA merged) or a LoRA-only adapter.

The output is built in a temporary directory next to OUT_DIR and renamed into place only after it
has verified itself: the exported transformer (or base + exported adapter) is reloaded from disk and
its predictions on one fixed input must match the trained model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.models import load_model, local_checkpoint_dir
from cosmos_train.export.staging import open_run, staged_directory
from cosmos_train.trainer.adapters import ADAPTER_NAME, load_trainable_state_dict, setup_trainable

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_adapter must be given
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


def save_diffusers_lora(transformer, path: Path) -> None:
    """The adapter as diffusers LoRA files are laid out: keys under `transformer.`, the LoRA config (rank,
    alpha, targets) in the safetensors metadata, so `load_lora_adapter(dir, weight_name=...)` rebuilds it."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    weights = {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}
    config = {k: sorted(v) if isinstance(v, set) else v
              for k, v in transformer.peft_config[ADAPTER_NAME].to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(
        {f"transformer.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    save_file(weights, str(path), metadata=metadata)


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, lora_only: bool = False) -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, checkpoint, weights, state = open_run(run_dir, out_dir, "generator", step)
    if lora_only and cfg.train.method != "lora":
        raise UserError("--lora-only needs a LoRA run; this run used full finetuning")

    trained = load_model(cfg)
    setup_trainable(trained.transformer, cfg.train)
    load_trainable_state_dict(trained.transformer, cfg.train.method, weights)
    reference = _predict(trained)
    dtype = trained.transformer.embed_tokens.weight.dtype

    with staged_directory(out_dir) as tmp:
        if lora_only:
            save_diffusers_lora(trained.transformer, tmp / LORA_WEIGHT_NAME)
            fresh = load_model(cfg)
            fresh.transformer.load_lora_adapter(str(tmp), weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER_NAME)
            rel = _compare(reference, _predict(fresh), dtype, "base model + exported LoRA adapter")
        else:
            transformer = trained.transformer
            if cfg.train.method == "lora":
                transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
                transformer.unload_lora()
            # fp32 trainable weights go back to the checkpoint's dtype (time_embedder stays fp32, as diffusers keeps it)
            for name, param in transformer.named_parameters():
                if param.dtype != dtype and not name.startswith("time_embedder."):
                    param.data = param.data.to(dtype)
            source = local_checkpoint_dir(cfg)
            for item in source.iterdir():
                if item.name in ("transformer",) or item.name.startswith("."):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
            from diffusers import Cosmos3OmniTransformer

            reloaded = Cosmos3OmniTransformer.from_pretrained(str(tmp / "transformer"), torch_dtype=dtype)
            rel = _compare(reference, _predict(trained, reloaded), dtype, "exported transformer")
        info = {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name, "step": state["step"],
                "method": cfg.train.method, "lora_only": lora_only, "base_model": cfg.model.pretrained,
                "verification_max_relative_difference": rel}
        (tmp / "cosmos_train_export.json").write_text(json.dumps(info, indent=2))
    return info
