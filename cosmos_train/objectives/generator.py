"""The generator objective, as Cosmos 3 is trained, in three steps:

1. `encode`: decoded pixels -> `LatentSample` (normalized VAE latent + the pipeline's prompt token ids).
   This is the expensive, deterministic part: what `cosmos-train prepare` caches.
2. `draw`: `LatentSample` -> `NoisedSample`: pick a conditioning mode (t2i / t2v / i2v / v2v) by recipe
   probability, drop the text to the pipeline's unconditional prompt with the CFG-dropout probability,
   draw sigma (density + shift) and noise the non-conditioning latent frames.
3. `loss`: regress v = eps - x0 on the noisy frames only, one transformer forward per sample or several
   samples packed into one forward (each sample's loss is its own mean; the step loss is their mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cosmos_train.config.schema import GENERATION_MODES, GeneratorConfig
from cosmos_train.data.packing import sample_token_count
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
class LatentSample:
    """One encoded sample: everything a training step needs that does not depend on randomness."""

    latent: torch.Tensor  # [C, T, H, W] float32, normalized as the pipeline normalizes
    cond_ids: list[int]  # the pipeline's prompt for (caption, num_frames, height, width, fps)
    uncond_ids: list[int]  # the pipeline's unconditional (empty negative) prompt for the same shape
    caption: str
    fps: float
    num_frames: int  # pixel frames
    height: int
    width: int
    source: str = ""


@dataclass
class NoisedSample:
    """One sample ready for the transformer."""

    input_ids: list[int]
    x0: torch.Tensor  # [1, C, T, H, W]
    noise: torch.Tensor
    xt: torch.Tensor
    sigma: float
    clean_frames: list[int]
    fps: float
    mode: str
    dropped_text: bool
    source: str = ""

    @property
    def timestep(self) -> float:
        return float(sigma_to_timestep(self.sigma))

    @property
    def target(self) -> torch.Tensor:
        return flow_match_target(self.x0, self.noise)


@dataclass
class StepInfo:
    modes: dict
    sigmas: list
    num_samples: int


class GeneratorObjective:
    def __init__(self, model, cfg: GeneratorConfig, *, shift: float, seed: int = 0):
        self.model = model
        self.cfg = cfg
        self.shift = shift
        self.generator = torch.Generator().manual_seed(seed)
        self._tokenize = lru_cache(maxsize=4096)(self._tokenize_uncached)

    def _tokenize_uncached(self, caption, num_frames, height, width, fps):
        return self.model.tokenize(caption, num_frames, height, width, fps, self.cfg.use_system_prompt)

    # ---- 1. encode (deterministic, cacheable) -------------------------------------------------
    def encode(self, sample: dict) -> LatentSample:
        """`sample`: {"pixels": [3, T, H, W] in [-1, 1], "caption": str, "fps": float[, "source": str]}."""
        pixels = sample["pixels"]
        num_frames, height, width = (int(x) for x in pixels.shape[1:])
        fps = float(sample["fps"])
        cond_ids, uncond_ids = self._tokenize(sample["caption"], num_frames, height, width, fps)
        latent = self.model.encode_pixels(pixels)[0].cpu()
        return LatentSample(latent=latent, cond_ids=list(cond_ids), uncond_ids=list(uncond_ids),
                            caption=sample["caption"], fps=fps, num_frames=num_frames, height=height,
                            width=width, source=sample.get("source", ""))

    def prompt_ids(self, caption: str, item: LatentSample) -> list[int]:
        """The pipeline's prompt ids for another caption of the same sample (same shape and fps)."""
        return list(self._tokenize(caption, item.num_frames, item.height, item.width, item.fps)[0])

    # ---- 2. draw (random) -------------------------------------------------------------------------
    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def choose_mode(self, num_frames: int) -> str:
        if num_frames == 1:
            return "t2i"
        u, total = self._uniform(), 0.0
        for mode in GENERATION_MODES:
            total += getattr(self.cfg.modes, mode)
            if u < total:
                return mode
        return next(m for m in reversed(GENERATION_MODES) if getattr(self.cfg.modes, m) > 0)

    def draw(self, item: LatentSample) -> NoisedSample:
        mode = self.choose_mode(item.num_frames)
        latent, cond_ids, uncond_ids = item.latent, item.cond_ids, item.uncond_ids
        if mode == "t2i" and item.num_frames > 1:
            # A clip trained as an image: its first frame. The VAE is causal in time, so latent frame 0 of
            # the clip is exactly the latent of pixel frame 0; the prompt becomes the image prompt.
            latent = latent[:, :1]
            cond_ids, uncond_ids = self._tokenize(item.caption, 1, item.height, item.width, item.fps)
        dropped = self._uniform() < self.cfg.text_dropout
        x0 = latent.unsqueeze(0).float()
        clean = clean_frames_for_mode(mode, x0.shape[2], self.cfg.v2v_condition_frames)
        sigma = float(sample_sigma(
            1, method=self.cfg.sigma_sampling, logit_mean=self.cfg.logit_mean, logit_std=self.cfg.logit_std,
            mode_scale=self.cfg.mode_scale, shift=self.shift, generator=self.generator,
        ))
        noise = torch.randn(x0.shape, generator=self.generator)
        return NoisedSample(
            input_ids=list(uncond_ids if dropped else cond_ids), x0=x0, noise=noise,
            xt=noise_latent_frames(x0, noise, sigma, clean), sigma=sigma, clean_frames=clean, fps=item.fps,
            mode=mode, dropped_text=dropped, source=item.source,
        )

    @staticmethod
    def restore_item(saved: dict) -> NoisedSample:
        """A drawn sample from its checkpointed `dataclasses.asdict` form."""
        return NoisedSample(**saved)

    def token_count(self, item: NoisedSample) -> int:
        """Sequence length of a drawn sample (what packing budgets)."""
        return sample_token_count(len(item.input_ids), item.x0.shape, self.model.geometry.latent_patch_size)

    # ---- 3. loss ----------------------------------------------------------------------------------
    def loss(self, batch: list[NoisedSample], packed: bool = False) -> tuple[torch.Tensor, StepInfo]:
        """Mean over samples of each sample's flow-matching loss on its noisy frames."""
        if packed and len(batch) > 1:
            preds = self.model.predict_velocity_packed(batch)
        else:
            preds = []
            for s in batch:
                sequence = self.model.build_sequence(s.input_ids, s.x0.shape, s.clean_frames, s.fps)
                preds.append(self.model.predict_velocity(sequence, s.xt, s.timestep))
        losses = []
        for s, pred in zip(batch, preds):
            noisy = [i for i in range(s.x0.shape[2]) if i not in set(s.clean_frames)]
            losses.append(masked_mse(pred, s.target.to(pred.device), noisy))
        modes: dict = {}
        for s in batch:
            modes[s.mode] = modes.get(s.mode, 0) + 1
        return torch.stack(losses).mean(), StepInfo(modes=modes, sigmas=[s.sigma for s in batch],
                                                    num_samples=len(batch))

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
