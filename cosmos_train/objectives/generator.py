"""The generator objective, as Cosmos 3 is trained, in three steps:

1. `encode`: decoded pixels -> `LatentSample` (normalized VAE latent + caption, fps and pixel shape).
   This is the expensive, deterministic part: what `cosmos-train prepare` caches.
2. `draw`: `LatentSample` -> `NoisedSample`: pick a conditioning mode (t2i / t2v / i2v / v2v) by recipe
   probability, the prompt's template form (`generator.template_dropout`), drop the text to the
   unconditional prompt (`generator.uncond_prompt`) with the CFG-dropout probability, draw sigma
   (density + shift) and noise the non-conditioning latent frames. Prompt ids come from the pipeline's own
   `tokenize_prompt` here, at draw time (lru-cached), so the prompt format never keys the latent cache.
3. `loss`: regress v = eps - x0 on the noisy frames only, one transformer forward per sample or several
   samples packed into one forward (each sample's loss is its own mean; the step loss is their mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cosmos_train.config.schema import GENERATION_MODES, GeneratorConfig
from cosmos_train.data.packing import sample_token_count
from cosmos_train.models.prompt_format import PromptFormat, resolve_prompt_format
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
    caption: str  # prompt ids are built from caption + shape + fps at draw time
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
    templates_on: bool = True  # the prompt's template form (PromptFormat.pipeline_kwargs)

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
        # what the exporter records and `generate` reproduces
        self.prompt_format: PromptFormat = resolve_prompt_format(cfg, model.default_use_system_prompt)
        self._tokenize = lru_cache(maxsize=4096)(self._tokenize_uncached)

    def _tokenize_uncached(self, caption, num_frames, height, width, fps, templates_on):
        """(cond ids, uncond ids) of a template form, both from the pipeline's own `tokenize_prompt`."""
        fmt = self.prompt_format
        shape = (num_frames, height, width, fps)
        cond, uncond = self.model.tokenize(caption, *shape, **fmt.pipeline_kwargs(templates_on))
        if fmt.uncond_kwargs(templates_on) != fmt.pipeline_kwargs(templates_on):
            uncond = self.model.tokenize(caption, *shape, **fmt.uncond_kwargs(templates_on))[1]
        return tuple(cond), tuple(uncond)

    def prompt_ids(self, caption: str, num_frames: int, height: int, width: int, fps: float,
                   templates_on: bool | None = None) -> tuple[list[int], list[int]]:
        """(cond, uncond) ids a sample of this shape trains on; `templates_on` None: the recipe's own form."""
        on = self.prompt_format.templates_on if templates_on is None else templates_on
        cond, uncond = self._tokenize(caption, num_frames, height, width, float(fps), on)
        return list(cond), list(uncond)

    # ---- 1. encode (deterministic, cacheable) -------------------------------------------------
    def encode(self, sample: dict) -> LatentSample:
        """`sample`: {"pixels": [3, T, H, W] in [-1, 1], "caption": str, "fps": float[, "source": str]}."""
        pixels = sample["pixels"]
        num_frames, height, width = (int(x) for x in pixels.shape[1:])
        fps = float(sample["fps"])
        latent = self.model.encode_pixels(pixels)[0].cpu()
        return LatentSample(latent=latent, caption=sample["caption"], fps=fps, num_frames=num_frames,
                            height=height, width=width, source=sample.get("source", ""))

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

    def choose_templates(self) -> bool:
        """The template form of one sample: the recipe's own, or the other with `template_dropout`.
        No random number is drawn when template_dropout is 0 (the stream stays as before the key existed)."""
        own = self.prompt_format.templates_on
        if self.prompt_format.template_dropout <= 0.0:
            return own
        return (not own) if self._uniform() < self.prompt_format.template_dropout else own

    def draw(self, item: LatentSample) -> NoisedSample:
        mode = self.choose_mode(item.num_frames)
        latent, num_frames = item.latent, item.num_frames
        if mode == "t2i" and item.num_frames > 1:
            # A clip trained as an image: its first frame. The VAE is causal in time, so latent frame 0 of
            # the clip is exactly the latent of pixel frame 0; the prompt becomes the image prompt.
            latent, num_frames = latent[:, :1], 1
        dropped = self._uniform() < self.cfg.text_dropout
        templates_on = self.choose_templates()
        cond_ids, uncond_ids = self.prompt_ids(item.caption, num_frames, item.height, item.width, item.fps,
                                               templates_on)
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
            mode=mode, dropped_text=dropped, source=item.source, templates_on=templates_on,
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
