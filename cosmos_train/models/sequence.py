"""The joint token sequence of one Cosmos 3 generator sample: [text (und) | vision (gen)].

Built with diffusers' own mRoPE position functions and laid out exactly as
`Cosmos3OmniPipeline._prepare_text_segment` / `_prepare_vision_segment` lay it out at inference
(tests compare the two). Kept separate from the pipeline so that later packing can place several
samples in one sequence, each restarting its positions as the pipeline would start it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
    get_3d_mrope_ids_text_tokens,
    get_3d_mrope_ids_vae_tokens,
)


@dataclass(frozen=True)
class SequenceGeometry:
    """The transformer-config values that decide positions."""

    latent_patch_size: int
    enable_fps_modulation: bool
    base_fps: float
    temporal_modality_margin: int
    reset_spatial_ids: bool
    temporal_compression: int

    @classmethod
    def from_configs(cls, transformer_config, vae_config) -> "SequenceGeometry":
        return cls(
            latent_patch_size=int(transformer_config.latent_patch_size),
            enable_fps_modulation=bool(transformer_config.enable_fps_modulation),
            base_fps=float(transformer_config.base_fps),
            temporal_modality_margin=int(transformer_config.unified_3d_mrope_temporal_modality_margin),
            reset_spatial_ids=bool(transformer_config.unified_3d_mrope_reset_spatial_ids),
            temporal_compression=int(vae_config.scale_factor_temporal),
        )


def build_vision_sequence(
    input_ids: list[int],
    latent_shape: tuple[int, ...],
    clean_frames: list[int],
    fps: float,
    geometry: SequenceGeometry,
    device: torch.device | str = "cpu",
) -> dict:
    """Static transformer inputs for one text+vision sample (everything but tokens and timesteps).

    `latent_shape` is the latent's (..., T, H, W); `clean_frames` are conditioning latent frames (no
    timestep embedding, no loss). Returns the transformer kwargs plus `num_noisy_vision_tokens` and
    `noisy_frames`.
    """
    latent_t, latent_h, latent_w = (int(x) for x in latent_shape[-3:])
    und_len = len(input_ids)
    text_mrope, next_offset = get_3d_mrope_ids_text_tokens(
        num_tokens=und_len, temporal_offset=0, use_float_positions=geometry.enable_fps_modulation
    )
    vision_offset = next_offset + geometry.temporal_modality_margin

    p = geometry.latent_patch_size
    patch_h, patch_w = math.ceil(latent_h / p), math.ceil(latent_w / p)
    frame_tokens = patch_h * patch_w
    num_vision_tokens = latent_t * frame_tokens
    clean = {i for i in clean_frames if 0 <= i < latent_t}
    noisy_frames = [i for i in range(latent_t) if i not in clean]

    vision_mrope, _ = get_3d_mrope_ids_vae_tokens(
        grid_t=latent_t,
        grid_h=patch_h,
        grid_w=patch_w,
        temporal_offset=vision_offset,
        reset_spatial_indices=geometry.reset_spatial_ids,
        fps=fps if geometry.enable_fps_modulation else None,
        base_fps=geometry.base_fps,
        temporal_compression_factor=geometry.temporal_compression,
    )
    # Noisy frames' tokens, in sequence order: where the transformer reads its predictions.
    frame_starts = und_len + torch.tensor(noisy_frames, dtype=torch.long) * frame_tokens
    loss_indexes = (frame_starts[:, None] + torch.arange(frame_tokens)).flatten()
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "text_indexes": torch.arange(und_len, dtype=torch.long, device=device),
        "position_ids": torch.cat([text_mrope, vision_mrope.to(text_mrope.dtype)], dim=1).to(device),
        "und_len": und_len,
        "sequence_length": und_len + num_vision_tokens,
        "vision_token_shapes": [(latent_t, patch_h, patch_w)],
        "vision_sequence_indexes": torch.arange(und_len, und_len + num_vision_tokens, device=device),
        "vision_mse_loss_indexes": loss_indexes.to(device),
        "vision_noisy_frame_indexes": [torch.tensor(noisy_frames, dtype=torch.long, device=device)],
        "num_noisy_vision_tokens": len(noisy_frames) * frame_tokens,
        "noisy_frames": noisy_frames,
    }


TRANSFORMER_STATIC_KEYS = (
    "input_ids", "text_indexes", "position_ids", "und_len", "sequence_length", "vision_token_shapes",
    "vision_sequence_indexes", "vision_mse_loss_indexes", "vision_noisy_frame_indexes",
)
