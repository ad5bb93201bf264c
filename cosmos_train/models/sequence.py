"""The joint token sequence of one Cosmos 3 generator sample: [text (und) | vision | sound | action (gen)].

Text, vision, sound and action are SEGMENTS of one sequence: a `Segment` says what a modality contributes
(its token grid, which of its frames are clean conditioning, its action domain), and `build_sample_sequence`
lays a sample's segments out exactly as `Cosmos3OmniPipeline._prepare_text_segment` /
`_prepare_vision_segment` / `_prepare_sound_segment` / `_prepare_action_segment` lay them out at inference,
with diffusers' own mRoPE functions (tests compare the two). The packed path (models/packing.py) places
several samples' sequences side by side from the same per-sample results, so every modality packs through
one mechanism.

Positions: text 0..L-1 on all three axes; vision, sound and action all start at the same temporal offset
(L + margin): they are parallel in time. Vision latent frame k sits at offset + k * base_fps / fps (fps
modulation), sound token i at offset + i * base_fps / sound_latent_fps, action token i at
offset + (i + 1) * base_fps / (fps * temporal_compression) (aligned with pixel frame i + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
    get_3d_mrope_ids_text_tokens,
    get_3d_mrope_ids_vae_tokens,
)

MODALITIES = ("vision", "sound", "action")  # the pipeline's order in the generation pathway


@dataclass(frozen=True)
class SequenceGeometry:
    """The transformer-config values that decide positions."""

    latent_patch_size: int
    enable_fps_modulation: bool
    base_fps: float
    temporal_modality_margin: int
    reset_spatial_ids: bool
    temporal_compression: int
    sound_latent_fps: float = 25.0

    @classmethod
    def from_configs(cls, transformer_config, vae_config) -> "SequenceGeometry":
        return cls(
            latent_patch_size=int(transformer_config.latent_patch_size),
            enable_fps_modulation=bool(transformer_config.enable_fps_modulation),
            base_fps=float(transformer_config.base_fps),
            temporal_modality_margin=int(transformer_config.unified_3d_mrope_temporal_modality_margin),
            reset_spatial_ids=bool(transformer_config.unified_3d_mrope_reset_spatial_ids),
            temporal_compression=int(vae_config.scale_factor_temporal),
            sound_latent_fps=float(getattr(transformer_config, "sound_latent_fps", 25.0) or 25.0),
        )


@dataclass(frozen=True)
class Segment:
    """One generation-pathway segment of a sample.

    `grid` is the token grid (T, H, W): vision (latent frames, patches high, patches wide), sound and action
    (tokens, 1, 1). `clean_frames` are conditioning frames along T: no timestep embedding, no loss."""

    modality: str
    grid: tuple[int, int, int]
    clean_frames: tuple[int, ...] = ()
    domain_id: int | None = None  # action: the embodiment domain selecting the action head weights

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def noisy_frames(self) -> list[int]:
        clean = {i for i in self.clean_frames if 0 <= i < self.grid[0]}
        return [i for i in range(self.grid[0]) if i not in clean]

    @property
    def num_noisy_tokens(self) -> int:
        return len(self.noisy_frames) * self.frame_tokens


def vision_segment(latent_shape, clean_frames, geometry: SequenceGeometry) -> Segment:
    """The vision segment of a latent (..., T, H, W): patches of `latent_patch_size`, padded up as the
    transformer pads them."""
    t, h, w = (int(x) for x in latent_shape[-3:])
    p = geometry.latent_patch_size
    return Segment("vision", (t, math.ceil(h / p), math.ceil(w / p)), tuple(int(i) for i in clean_frames))


def sound_segment(num_tokens: int) -> Segment:
    """The sound segment: one token per sound latent step; at inference sound is always noisy."""
    return Segment("sound", (int(num_tokens), 1, 1))


def action_segment(num_tokens: int, clean_frames, domain_id: int) -> Segment:
    """The action segment: one token per action step (`chunk_size` of them)."""
    return Segment("action", (int(num_tokens), 1, 1), tuple(int(i) for i in clean_frames), int(domain_id))


def segment_positions(segment: Segment, offset: float, fps: float, geometry: SequenceGeometry) -> torch.Tensor:
    """[3, num_tokens] mRoPE ids of a segment starting at temporal `offset` (diffusers' own function, with the
    arguments each `_prepare_*_segment` of the pipeline passes)."""
    t, h, w = segment.grid
    common = {"grid_t": t, "grid_h": h, "grid_w": w, "temporal_offset": offset,
              "reset_spatial_indices": geometry.reset_spatial_ids, "base_fps": geometry.base_fps}
    modulate = geometry.enable_fps_modulation
    if segment.modality == "vision":
        ids, _ = get_3d_mrope_ids_vae_tokens(**common, fps=fps if modulate else None,
                                             temporal_compression_factor=geometry.temporal_compression)
    elif segment.modality == "sound":
        ids, _ = get_3d_mrope_ids_vae_tokens(**common, fps=geometry.sound_latent_fps if modulate else None,
                                             temporal_compression_factor=1)
    elif segment.modality == "action":
        ids, _ = get_3d_mrope_ids_vae_tokens(**common, fps=fps if modulate else None, temporal_compression_factor=1,
                                             base_temporal_compression_factor=geometry.temporal_compression,
                                             start_frame_offset=1)
    else:
        raise ValueError(f"unknown modality {segment.modality!r}")
    return ids


@dataclass
class SampleLayout:
    """Where one sample's segments sit in its own (unpacked) sequence."""

    und_len: int
    segments: dict = field(default_factory=dict)  # modality -> Segment
    starts: dict = field(default_factory=dict)  # modality -> first token index in the sequence

    @property
    def gen_len(self) -> int:
        return sum(s.num_tokens for s in self.segments.values())


def build_sample_sequence(input_ids: list[int], segments: list[Segment], fps: float, geometry: SequenceGeometry,
                          device: torch.device | str = "cpu") -> dict:
    """Static transformer inputs for one sample (everything but the modality tokens and timesteps).

    `segments`: at most one per modality; vision is required (the transformer always has a vision item).
    Returns the transformer kwargs for the modalities present (`transformer_kwargs(seq)` selects them) plus
    `layout` (a SampleLayout), `num_noisy_<modality>_tokens` and `noisy_frames` (vision's).
    """
    by_modality = {s.modality: s for s in segments}
    if len(by_modality) != len(segments) or "vision" not in by_modality:
        raise ValueError(f"one segment per modality and a vision segment, got {[s.modality for s in segments]}")
    und_len = len(input_ids)
    text_ids, next_offset = get_3d_mrope_ids_text_tokens(
        num_tokens=und_len, temporal_offset=0, use_float_positions=geometry.enable_fps_modulation)
    offset = next_offset + geometry.temporal_modality_margin  # shared by every gen modality: parallel in time
    out = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "text_indexes": torch.arange(und_len, dtype=torch.long, device=device),
        "und_len": und_len,
    }
    positions = [text_ids]
    layout = SampleLayout(und_len=und_len)
    curr = und_len
    for modality in MODALITIES:
        seg = by_modality.get(modality)
        if seg is None:
            continue
        ids = segment_positions(seg, offset, fps, geometry)
        positions.append(ids)
        noisy = seg.noisy_frames
        frame_starts = curr + torch.tensor(noisy, dtype=torch.long) * seg.frame_tokens
        loss_indexes = (frame_starts[:, None] + torch.arange(seg.frame_tokens)).flatten()
        out[f"{modality}_token_shapes"] = [seg.grid]
        out[f"{modality}_sequence_indexes"] = torch.arange(curr, curr + seg.num_tokens, device=device)
        out[f"{modality}_mse_loss_indexes"] = loss_indexes.to(device)
        out[f"{modality}_noisy_frame_indexes"] = [torch.tensor(noisy, dtype=torch.long, device=device)]
        out[f"num_noisy_{modality}_tokens"] = seg.num_noisy_tokens
        if modality == "action":
            out["action_domain_ids"] = [torch.tensor([seg.domain_id], dtype=torch.long, device=device)]
        layout.segments[modality] = seg
        layout.starts[modality] = curr
        curr += seg.num_tokens
    out["position_ids"] = torch.cat(positions, dim=1).to(device)  # as the pipeline concatenates them
    out["sequence_length"] = curr
    out["layout"] = layout
    out["noisy_frames"] = by_modality["vision"].noisy_frames
    return out


def build_vision_sequence(input_ids: list[int], latent_shape: tuple[int, ...], clean_frames: list[int], fps: float,
                          geometry: SequenceGeometry, device: torch.device | str = "cpu") -> dict:
    """A text + vision sample (t2i / t2v / i2v / v2v): `build_sample_sequence` with one vision segment."""
    return build_sample_sequence(input_ids, [vision_segment(latent_shape, clean_frames, geometry)], fps, geometry,
                                 device=device)


# What the transformer takes besides tokens and timesteps, per modality.
TEXT_KEYS = ("input_ids", "text_indexes", "position_ids", "und_len", "sequence_length")
MODALITY_KEYS = ("token_shapes", "sequence_indexes", "mse_loss_indexes", "noisy_frame_indexes")
TRANSFORMER_STATIC_KEYS = TEXT_KEYS + tuple(f"vision_{k}" for k in MODALITY_KEYS)


def transformer_kwargs(seq: dict) -> dict:
    """The transformer's static keyword arguments of a (sample or packed) sequence, for every modality in it."""
    kwargs = {k: seq[k] for k in TEXT_KEYS}
    for modality in MODALITIES:
        if f"{modality}_token_shapes" in seq:
            kwargs.update({f"{modality}_{k}": seq[f"{modality}_{k}"] for k in MODALITY_KEYS})
    if "action_domain_ids" in seq:
        kwargs["action_domain_ids"] = seq["action_domain_ids"]
    return kwargs
