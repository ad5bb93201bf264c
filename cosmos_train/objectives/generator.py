"""The generator objective: one decoded sample -> flow-matching loss, as Cosmos 3 is trained.

Per sample: pick a conditioning mode (t2i / t2v / i2v / v2v) by recipe probability, drop the text to
the pipeline's unconditional prompt with the CFG-dropout probability, draw sigma (density + shift),
noise the non-conditioning latent frames and regress v = eps - x0 on those frames only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cosmos_train.config.schema import GENERATION_MODES, GeneratorConfig
from cosmos_train.objectives.flow_matching import (
    flow_match_target,
    masked_mse,
    noise_latent_frames,
    sample_sigma,
    sigma_to_timestep,
)


def clean_frames_for_mode(mode: str, latent_frames: int, v2v_condition_frames: int) -> list[int]:
    """Latent frames kept clean (conditioning) for a mode, as the pipeline conditions them."""
    if mode in ("t2i", "t2v"):
        return []
    if mode == "i2v":
        return [0]
    if mode == "v2v":
        return list(range(min(v2v_condition_frames, latent_frames - 1)))
    raise ValueError(f"unknown generation mode {mode!r}")


@dataclass
class StepInfo:
    mode: str
    sigma: float
    dropped_text: bool


class GeneratorObjective:
    def __init__(self, model, cfg: GeneratorConfig, *, shift: float, seed: int = 0):
        self.model = model
        self.cfg = cfg
        self.shift = shift
        self.generator = torch.Generator().manual_seed(seed)
        self._tokenize = lru_cache(maxsize=4096)(self._tokenize_uncached)

    def _tokenize_uncached(self, caption, num_frames, height, width, fps):
        return self.model.tokenize(caption, num_frames, height, width, fps, self.cfg.use_system_prompt)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def choose_mode(self, num_frames: int) -> str:
        if num_frames == 1:
            return "t2i"
        probs = [getattr(self.cfg.modes, m) for m in GENERATION_MODES]
        return GENERATION_MODES[int(torch.multinomial(torch.tensor(probs), 1, generator=self.generator))]

    def loss(self, sample: dict) -> tuple[torch.Tensor, StepInfo]:
        """`sample`: {"pixels": [3, T, H, W] in [-1, 1], "caption": str, "fps": float}."""
        pixels = sample["pixels"]
        mode = self.choose_mode(pixels.shape[1])
        if mode == "t2i":
            pixels = pixels[:, :1]  # the VAE is causal in time: latent frame 0 only sees pixel frame 0
        num_frames, height, width = pixels.shape[1], pixels.shape[2], pixels.shape[3]
        fps = float(sample["fps"])

        cond_ids, uncond_ids = self._tokenize(sample["caption"], num_frames, height, width, fps)
        dropped = self._uniform() < self.cfg.text_dropout
        input_ids = uncond_ids if dropped else cond_ids

        x0 = self.model.encode_pixels(pixels)
        clean = clean_frames_for_mode(mode, x0.shape[2], self.cfg.v2v_condition_frames)
        sequence = self.model.build_sequence(input_ids, x0.shape, clean, fps)
        x0 = x0.to(sequence["input_ids"].device)

        sigma = float(sample_sigma(
            1, method=self.cfg.sigma_sampling, logit_mean=self.cfg.logit_mean, logit_std=self.cfg.logit_std,
            mode_scale=self.cfg.mode_scale, shift=self.shift, generator=self.generator,
        ))
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        xt = noise_latent_frames(x0, noise, sigma, clean)
        pred = self.model.predict_velocity(sequence, xt, sigma_to_timestep(sigma))
        loss = masked_mse(pred, flow_match_target(x0, noise), sequence["noisy_frames"])
        return loss, StepInfo(mode=mode, sigma=sigma, dropped_text=dropped)

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
