"""Cosmos 3 generator adapter: the one place that knows the concrete diffusers classes.

Components are loaded with diffusers' own classes and assembled into a real `Cosmos3OmniPipeline`
(no weights are copied) so that prompt tokenization and VAE normalization are the pipeline's own
code: a finetuned model is prompted and encoded exactly as it will be at inference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.models.prompt_format import default_use_system_prompt_of, read_model_index
from cosmos_train.models.sequence import TRANSFORMER_STATIC_KEYS, SequenceGeometry, build_vision_sequence

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
COMPONENTS = ("transformer", "vae", "text_tokenizer", "scheduler")


def _check_source(pretrained: str, local_files_only: bool) -> None:
    path = Path(pretrained)
    looks_local = path.is_absolute() or pretrained.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise UserError(f"model.pretrained: checkpoint directory not found: {pretrained}")
        missing = [c for c in ("model_index.json", *COMPONENTS) if not (path / c).exists()]
        if missing:
            raise UserError(
                f"model.pretrained: {pretrained} is not a Cosmos 3 diffusers checkpoint "
                f"(missing {', '.join(missing)}); expected the layout of nvidia/Cosmos3-Nano"
            )
    elif pretrained.count("/") != 1:
        raise UserError(f"model.pretrained: '{pretrained}' is neither a local directory nor a hub id (org/name)")


@dataclass
class GeneratorSample:
    """One prepared training sample: clean latent + the static sequence around it."""

    x0: torch.Tensor  # [1, C, T, H, W], normalized as the pipeline normalizes
    sequence: dict
    noisy_frames: list[int]


class Cosmos3Generator:
    def __init__(self, pipe, transformer_config=None):
        self.pipe = pipe
        self.transformer_config = transformer_config or pipe.transformer.config
        self.geometry = SequenceGeometry.from_configs(self.transformer_config, pipe.vae.config)
        # What training calls forward on: the transformer itself, or its DDP/DeepSpeed wrapper.
        self.forward_module = None

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        dtype: str = "bfloat16",
        vae_dtype: str = "float32",
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        load_transformer: bool = True,
    ) -> "Cosmos3Generator":
        """`load_transformer=False` loads only what encoding needs (VAE, tokenizer, configs): `prepare`."""
        from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler
        from transformers import AutoTokenizer

        _check_source(pretrained, local_files_only)
        # HF_HUB_OFFLINE set after huggingface_hub was imported is otherwise ignored (30 s of retries)
        local_files_only = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        common = {"revision": revision, "local_files_only": local_files_only}
        try:
            if load_transformer:
                transformer = Cosmos3OmniTransformer.from_pretrained(
                    pretrained, subfolder="transformer", torch_dtype=DTYPES[dtype], **common
                )
                transformer_config = transformer.config
            else:
                transformer = None
                transformer_config = SimpleNamespace(
                    **Cosmos3OmniTransformer.load_config(pretrained, subfolder="transformer", **common))
            vae = AutoencoderKLWan.from_pretrained(pretrained, subfolder="vae", torch_dtype=DTYPES[vae_dtype], **common)
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained, subfolder="text_tokenizer", trust_remote_code=trust_remote_code, **common
            )
            scheduler = UniPCMultistepScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
            # The checkpoint's prompt default (Edge: no system prompt), as Cosmos3OmniPipeline.from_pretrained reads it
            default_use_system_prompt = default_use_system_prompt_of(read_model_index(pretrained, **common))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            raise UserError(
                f"model.pretrained: could not load Cosmos 3 checkpoint '{pretrained}': {first}. "
                "A hub id needs network access (or a filled Hugging Face cache); a local directory needs the "
                "diffusers layout (model_index.json, transformer/, vae/, text_tokenizer/, scheduler/)."
            ) from None
        pipe = Cosmos3OmniPipeline(
            transformer=transformer, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler,
            enable_safety_checker=False, default_use_system_prompt=default_use_system_prompt,
        )
        return cls(pipe, transformer_config)

    @property
    def transformer(self):
        return self.pipe.transformer

    # ---- what trains (the interface the trainer uses for every model family) -------------------
    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def setup_trainable(self, cfg) -> list:
        """Optimizer parameter groups for the recipe (LoRA adapters or selected full parameters)."""
        from cosmos_train.trainer.adapters import setup_trainable

        return [{"params": setup_trainable(self.transformer, cfg.train)}]

    def trainable_state_dict(self, cfg) -> dict:
        from cosmos_train.trainer.adapters import trainable_state_dict

        return trainable_state_dict(self.transformer, cfg.train.method)

    def load_trainable_state_dict(self, cfg, weights: dict) -> None:
        from cosmos_train.trainer.adapters import load_trainable_state_dict

        load_trainable_state_dict(self.transformer, cfg.train.method, weights)

    @staticmethod
    def ddp_find_unused_parameters(cfg) -> bool:
        # lm_head and the understanding pathway's last outputs do not feed the generator loss.
        return cfg.train.method == "full"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The frozen base's dtype: what latents enter the transformer as (trainable fp32 parts cast around
        themselves; `transformer.dtype` may report their fp32 instead)."""
        return self.transformer.embed_tokens.weight.dtype

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def tokenizer(self):
        return self.pipe.text_tokenizer

    def to(self, device) -> "Cosmos3Generator":
        if self.pipe.transformer is not None:
            self.pipe.transformer.to(device)
        self.pipe.vae.to(device)
        return self

    # ---- inputs, as the pipeline builds them -----------------------------------------------
    def tokenize(self, caption: str, num_frames: int, height: int, width: int, fps: float,
                 use_system_prompt: bool | None = True, *, add_duration_template: bool = True,
                 add_resolution_template: bool = True) -> tuple[list[int], list[int]]:
        """(conditional, unconditional) token ids, built by the pipeline's own `tokenize_prompt` (empty negative
        prompt); `use_system_prompt=None` is the checkpoint's `default_use_system_prompt`."""
        return self.pipe.tokenize_prompt(
            caption, None, num_frames=num_frames, height=height, width=width, fps=fps,
            use_system_prompt=use_system_prompt, add_duration_template=add_duration_template,
            add_resolution_template=add_resolution_template,
        )

    @property
    def default_use_system_prompt(self) -> bool:
        """The checkpoint's `default_use_system_prompt` (model_index.json; True when absent)."""
        return bool(self.pipe.config.default_use_system_prompt)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, T, H, W] or [B, 3, T, H, W] in [-1, 1] -> normalized latent [B, C, T', H', W'] (pipeline's encoder)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(0)
        device = next(self.vae.parameters()).device
        return self.pipe._encode_video(pixels.to(device)).float()

    def build_sequence(self, input_ids: list[int], latent_shape, clean_frames: list[int], fps: float) -> dict:
        device = next(self.transformer.parameters()).device
        return build_vision_sequence(input_ids, latent_shape, clean_frames, fps, self.geometry, device=device)

    # ---- forward -------------------------------------------------------------------------
    def predict_velocity(self, sequence: dict, noisy_latent: torch.Tensor, timestep: float) -> torch.Tensor:
        """Vision velocity for one sample; `timestep` is sigma * 1000. Clean frames come back as zeros."""
        dtype = self.compute_dtype
        kwargs = {k: sequence[k] for k in TRANSFORMER_STATIC_KEYS}
        device = kwargs["input_ids"].device
        timesteps = torch.full((sequence["num_noisy_vision_tokens"],), float(timestep), device=device)
        preds, _, _ = (self.forward_module or self.transformer)(
            **kwargs, vision_tokens=[noisy_latent.to(device=device, dtype=dtype)], vision_timesteps=timesteps,
            return_dict=False,
        )
        return preds[0]

    # ---- packed forward: several samples in one transformer call --------------------------
    def install_packed_attention(self, backend: str = "auto") -> None:
        """Swap in `PackedCosmos3AttnProcessor` (identical to the stock processor while no pack is set)."""
        from cosmos_train.models.packing import install_packed_attention

        install_packed_attention(self.transformer, backend=backend)

    def predict_velocity_packed(self, batch) -> list[torch.Tensor]:
        """One forward for several `NoisedSample`s: [text_1..text_N | vision_1..vision_N], samples kept apart
        by the packed attention processor. Returns one [1, C, T, H, W] prediction per sample (clean frames
        zero), equal to `predict_velocity` on each sample alone."""
        from cosmos_train.models.packing import build_packed_sequence, packed_timesteps, packing_layout

        self.install_packed_attention()
        dtype = self.compute_dtype
        device = next(self.transformer.parameters()).device
        packed = build_packed_sequence(
            [(s.input_ids, s.x0.shape, s.clean_frames, s.fps) for s in batch], self.geometry, device=device)
        kwargs = {k: packed[k] for k in TRANSFORMER_STATIC_KEYS}
        timesteps = packed_timesteps(packed, [s.timestep for s in batch], device=device)
        with packing_layout(self.transformer, packed["und_lens"], packed["gen_lens"]):
            preds, _, _ = (self.forward_module or self.transformer)(
                **kwargs, vision_tokens=[s.xt.to(device=device, dtype=dtype) for s in batch],
                vision_timesteps=timesteps, return_dict=False,
            )
        return list(preds)
