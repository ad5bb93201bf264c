"""Sound latents with Cosmos 3's own sound tokenizer (diffusers' ``Cosmos3AVAEAudioTokenizer``).

- `sound_token_count`: tokens of a clip, exactly as ``Cosmos3OmniPipeline.prepare_latents`` counts them
  (``T_sound = ceil(int(num_frames / fps * sampling_rate) / hop)``; hop 1920 at 48 kHz = 25 tokens/s).
- `check_sound_encoder`: a checkpoint whose ``sound_tokenizer/`` has no ``encoder.*`` weights loads as a
  decoder-only tokenizer (diffusers disables the encoder in ``_fix_state_dict_keys_on_load``); such a
  checkpoint can generate sound but cannot encode it, so sound cannot be trained -> `UserError`.
- `encode_sound`: ONE waveform ``[2, n]`` -> latent ``[sound_dim, T]`` (the posterior's mode, float32 on
  CPU). The tokenizer's ``encode`` peak-normalizes with a single maximum over the whole input tensor, so a
  batch of clips would be scaled by the loudest one: always encode clips one at a time. Cosmos 3 applies
  no latent normalization to sound (the tokenizer refuses ``latent_mean``/``latent_std``), so the mode is
  the training target as it is.
"""

from __future__ import annotations

import torch

from cosmos_train.errors import UserError

SOUND_SAMPLE_RATE = 48000
SOUND_HOP = 1920


def sound_token_count(num_frames: int, fps: float, sample_rate: int = SOUND_SAMPLE_RATE, hop: int = SOUND_HOP) -> int:
    """Sound tokens for ``num_frames`` frames at ``fps``: ``ceil(int(num_frames / fps * sample_rate) / hop)``."""
    if num_frames < 1 or not fps > 0 or hop < 1:
        raise ValueError(f"need num_frames >= 1, fps > 0, hop >= 1; got {num_frames}, {fps}, {hop}")
    n = int(num_frames / fps * sample_rate)
    return (n + hop - 1) // hop


def has_sound_encoder(sound_tokenizer) -> bool:
    """Whether the loaded tokenizer can encode (diffusers drops the encoder for decoder-only weights)."""
    return (
        sound_tokenizer is not None
        and getattr(sound_tokenizer, "encoder", None) is not None
        and bool(getattr(sound_tokenizer, "_encoder_available", False))
    )


def check_sound_encoder(sound_tokenizer, checkpoint: str) -> None:
    """Raise `UserError` unless `sound_tokenizer` (loaded from `checkpoint`) can encode audio."""
    where = f"{str(checkpoint).rstrip('/')}/sound_tokenizer/"
    if sound_tokenizer is None:
        raise UserError(
            f"{checkpoint}: the checkpoint has no sound tokenizer ({where} is missing), so sound cannot be "
            "trained; set `generator.sound: off` to train without sound"
        )
    if not has_sound_encoder(sound_tokenizer):
        raise UserError(
            f"{where}: this sound tokenizer has no encoder weights (no `encoder.*` tensors; diffusers loads "
            "it decoder-only), so it cannot encode clips' audio and sound cannot be trained from this "
            "checkpoint; set `generator.sound: off`, or use a checkpoint whose sound_tokenizer/ includes "
            "the encoder"
        )


def _tokenizer_device_dtype(sound_tokenizer) -> tuple[torch.device, torch.dtype]:
    p = next(sound_tokenizer.encoder.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_sound(sound_tokenizer, waveform: torch.Tensor) -> torch.Tensor:
    """One clip's waveform float [2, n] (48 kHz stereo in [-1, 1]) -> latent float32 [sound_dim, T] on CPU,
    T = ceil(n / hop) (the tokenizer right-pads to a whole hop), the mode of the posterior."""
    if waveform.ndim != 2 or waveform.shape[0] != 2:
        raise ValueError(
            f"encode_sound takes one stereo clip [2, n]; got shape {tuple(waveform.shape)} "
            "(encode clips one at a time: the tokenizer peak-normalizes over the whole tensor)"
        )
    if waveform.shape[1] < 1:
        raise ValueError("encode_sound: empty waveform")
    if not has_sound_encoder(sound_tokenizer):
        raise ValueError("this sound tokenizer has no encoder (see check_sound_encoder)")
    device, dtype = _tokenizer_device_dtype(sound_tokenizer)
    x = waveform.detach().to(device=device, dtype=dtype).unsqueeze(0)  # [1, 2, n]
    # force_pad: pad to a whole hop even if the module was left in train mode (encode only pads in eval)
    posterior = sound_tokenizer.encode(x, force_pad=True).latent_dist
    latent = posterior.mode()[0]  # [sound_dim, T]
    hop = int(sound_tokenizer._hop_size)
    expected = -(-waveform.shape[1] // hop)
    if latent.shape[-1] != expected:
        raise RuntimeError(f"sound tokenizer returned {latent.shape[-1]} latent frames for {waveform.shape[1]} "
                           f"samples, expected ceil(n / {hop}) = {expected}")
    return latent.float().cpu()
