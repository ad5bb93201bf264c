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

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from cosmos_train.config.schema import GENERATION_MODES, GeneratorConfig
from cosmos_train.models.prompt_format import PromptFormat, resolve_prompt_format
from cosmos_train.models.sequence import action_segment, sound_segment, vision_segment
from cosmos_train.objectives.flow_matching import (
    flow_match_target,
    flow_match_xt,
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
    caption: str  # prompt ids are built from caption + shape + fps at draw time (action: the task text)
    fps: float
    num_frames: int  # pixel frames
    height: int  # pixel size the prompt states (action: the pipeline's conditioning canvas)
    width: int
    source: str = ""
    sound: torch.Tensor | None = None  # [sound_dim, T] sound latent of the clip's own track
    actions: torch.Tensor | None = None  # [chunk, raw width] normalized actions of an action window
    domain_id: int | None = None  # action: the embodiment's domain


ACTION_MODES = ("policy", "forward_dynamics", "inverse_dynamics")


def sample_seed(seed: int, key) -> int:
    """A 63-bit generator seed for one draw of one sample: (recipe seed, dataset index, epoch)."""
    import hashlib

    index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
    digest = hashlib.sha256(f"{seed}:{index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def action_clean_frames(mode: str, latent_frames: int, chunk: int) -> tuple[list[int], list[int]]:
    """(clean vision latent frames, clean action rows) of an action mode, as `prepare_latents` sets them."""
    if mode == "policy":
        return [0], []
    if mode == "forward_dynamics":
        return [0], list(range(chunk))
    if mode == "inverse_dynamics":
        return list(range(latent_frames)), []
    raise ValueError(f"unknown action mode {mode!r}")


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
    # other segments of the same sequence (same sigma): sound [sound_dim, T] (always noisy, as at inference)
    # and action [chunk, action_dim] (zero-padded past `action_width`, `action_clean` rows given)
    sound_x0: torch.Tensor | None = None
    sound_noise: torch.Tensor | None = None
    action_x0: torch.Tensor | None = None
    action_noise: torch.Tensor | None = None
    action_clean: list = field(default_factory=list)
    action_width: int = 0
    domain_id: int | None = None

    @property
    def timestep(self) -> float:
        return float(sigma_to_timestep(self.sigma))

    @property
    def target(self) -> torch.Tensor:
        return flow_match_target(self.x0, self.noise)

    @property
    def action_noisy(self) -> list[int]:
        clean = set(self.action_clean)
        return [i for i in range(self.action_x0.shape[0]) if i not in clean]

    def tokens(self, modality: str) -> torch.Tensor | None:
        """The noisy tokens the transformer gets for a modality (None: not in this sample)."""
        if modality == "vision":
            return self.xt
        if modality == "sound":
            return None if self.sound_x0 is None else flow_match_xt(self.sound_x0, self.sound_noise, self.sigma)
        if self.action_x0 is None:
            return None
        xt = flow_match_xt(self.action_x0, self.action_noise, self.sigma)
        xt[self.action_clean] = self.action_x0[self.action_clean]
        xt[:, self.action_width:] = 0  # padded channels carry nothing, as the pipeline re-zeroes them
        return xt

    def segments(self, geometry) -> list:
        segs = [vision_segment(self.x0.shape, self.clean_frames, geometry)]
        if self.sound_x0 is not None:
            segs.append(sound_segment(self.sound_x0.shape[1]))
        if self.action_x0 is not None:
            segs.append(action_segment(self.action_x0.shape[0], self.action_clean, self.domain_id))
        return segs


@dataclass
class StepInfo:
    modes: dict
    sigmas: list
    num_samples: int
    modality_losses: dict = field(default_factory=dict)  # mean loss per modality over the batch
    sample_losses: list = field(default_factory=list)  # each sample's weighted loss, in batch order (with sigmas)


class GeneratorObjective:
    def __init__(self, model, cfg: GeneratorConfig, *, shift: float, seed: int = 0, action_cfg=None,
                 domain_id: int | None = None):
        self.model = model
        self.cfg = cfg
        self.shift = shift
        self.seed = seed
        self.action_cfg = action_cfg  # the recipe's `action:` section (None: not an action run)
        self.domain_id = domain_id  # the embodiment's domain id (action runs)
        self.generator = torch.Generator().manual_seed(seed)
        # what the exporter records and `generate` reproduces
        self.prompt_format: PromptFormat = resolve_prompt_format(cfg, model.default_use_system_prompt)
        self._tokenize = lru_cache(maxsize=4096)(self._tokenize_uncached)
        self._tokenize_action = lru_cache(maxsize=4096)(self._tokenize_action_uncached)

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
    def encode(self, sample) -> LatentSample:
        """`sample`: {"pixels": [3, T, H, W] uint8 (or float in [-1, 1]), "caption": str, "fps": float[, "source":
        str]}, or an action window (`data.lerobot.ActionWindow`)."""
        if not isinstance(sample, dict):
            return self.encode_action(sample)
        pixels = sample["pixels"]
        num_frames, height, width = (int(x) for x in pixels.shape[1:])
        fps = float(sample["fps"])
        latent = self.model.encode_pixels(pixels)[0].cpu()
        audio = sample.get("audio")
        sound = self.model.encode_sound(audio).cpu() if audio is not None and num_frames > 1 else None
        return LatentSample(latent=latent, caption=sample["caption"], fps=fps, num_frames=num_frames,
                            height=height, width=width, source=sample.get("source", ""), sound=sound)

    def encode_action(self, window) -> LatentSample:
        """An action window: its clip through the pipeline's action conditioning canvas (the prompt states the
        canvas size, the latent is cropped back to the content), its normalized actions, the task text."""
        latent, canvas_h, canvas_w = self.model.encode_action_clip(window.pixels, self.action_cfg.resolution_tier)
        return LatentSample(latent=latent[0].cpu(), caption=window.task, fps=float(window.fps),
                            num_frames=int(window.pixels.shape[1]), height=canvas_h, width=canvas_w,
                            source=window.source, actions=window.actions.float().cpu(), domain_id=self.domain_id)

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

    def _sigma(self) -> float:
        return float(sample_sigma(
            1, method=self.cfg.sigma_sampling, logit_mean=self.cfg.logit_mean, logit_std=self.cfg.logit_std,
            mode_scale=self.cfg.mode_scale, shift=self.shift, generator=self.generator,
        ))

    def choose_action_mode(self) -> str:
        u, total = self._uniform(), 0.0
        modes = self.action_cfg.modes
        for mode in ACTION_MODES:
            total += getattr(modes, mode)
            if u < total:
                return mode
        return next(m for m in reversed(ACTION_MODES) if getattr(modes, m) > 0)

    def draw_action(self, item: LatentSample) -> NoisedSample:
        """An action window as policy / forward dynamics / inverse dynamics: the pipeline's action JSON prompt
        (its own builder), its clean / noisy masks, one sigma for vision and action."""
        mode = self.choose_action_mode()
        dropped = self._uniform() < self.cfg.text_dropout
        cond_ids, uncond_ids = self._tokenize_action(item.caption, item.num_frames, item.height, item.width,
                                                     item.fps, mode)
        x0 = item.latent.unsqueeze(0).float()
        chunk, width = item.actions.shape
        clean, action_clean = action_clean_frames(mode, x0.shape[2], chunk)
        action_x0 = torch.zeros(chunk, self.model.action_dim)
        action_x0[:, :width] = item.actions
        sigma = self._sigma()
        noise = torch.randn(x0.shape, generator=self.generator)
        action_noise = torch.randn(action_x0.shape, generator=self.generator)
        sound_x0 = item.sound.float() if item.sound is not None else None
        sound_noise = torch.randn(sound_x0.shape, generator=self.generator) if sound_x0 is not None else None
        return NoisedSample(
            input_ids=list(uncond_ids if dropped else cond_ids), x0=x0, noise=noise,
            xt=noise_latent_frames(x0, noise, sigma, clean), sigma=sigma, clean_frames=clean, fps=item.fps,
            mode=mode, dropped_text=dropped, source=item.source, templates_on=False,
            sound_x0=sound_x0, sound_noise=sound_noise, action_x0=action_x0, action_noise=action_noise,
            action_clean=action_clean, action_width=width, domain_id=item.domain_id,
        )

    def _tokenize_action_uncached(self, task, num_frames, height, width, fps, mode):
        """(cond ids, uncond ids) of the pipeline's action JSON prompt (templates do not apply to it)."""
        return self.model.tokenize(task, num_frames, height, width, float(fps), self.prompt_format.use_system_prompt,
                                   action_mode=mode, action_view_point=self.action_cfg.view_point)

    def draw(self, item: LatentSample, key=None) -> NoisedSample:
        """A random draw of `item`. `key` (the sampler's SampleKey): the randomness comes from (seed, key) alone,
        so a sample is drawn the same whichever rank or accumulation step reads it, and again the same after a
        resume; without a key, from this objective's running generator."""
        if key is not None:
            self.generator = torch.Generator().manual_seed(sample_seed(self.seed, key))
        if item.actions is not None:
            return self.draw_action(item)
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
        sigma = self._sigma()
        noise = torch.randn(x0.shape, generator=self.generator)
        sound_x0 = item.sound.float() if item.sound is not None and num_frames > 1 else None
        sound_noise = torch.randn(sound_x0.shape, generator=self.generator) if sound_x0 is not None else None
        return NoisedSample(
            input_ids=list(uncond_ids if dropped else cond_ids), x0=x0, noise=noise,
            xt=noise_latent_frames(x0, noise, sigma, clean), sigma=sigma, clean_frames=clean, fps=item.fps,
            mode=mode, dropped_text=dropped, source=item.source, templates_on=templates_on,
            sound_x0=sound_x0, sound_noise=sound_noise,
        )

    @staticmethod
    def restore_item(saved: dict) -> NoisedSample:
        """A drawn sample from its checkpointed `dataclasses.asdict` form."""
        return NoisedSample(**saved)

    def token_count(self, item: NoisedSample) -> int:
        """Sequence length of a drawn sample (what packing budgets): text + every segment's tokens."""
        return len(item.input_ids) + sum(seg.num_tokens for seg in item.segments(self.model.geometry))

    # ---- 3. loss ----------------------------------------------------------------------------------
    def sample_losses(self, s: NoisedSample, pred: dict) -> dict:
        """Per-modality flow-matching losses of one sample on its noisy tokens: vision on its noisy latent
        frames, sound on every token, action on its noisy rows and real channels (padding carries no loss)."""
        losses = {}
        noisy = [i for i in range(s.x0.shape[2]) if i not in set(s.clean_frames)]
        if noisy:
            losses["vision"] = masked_mse(pred["vision"], s.target.to(pred["vision"].device), noisy)
        if s.sound_x0 is not None:
            target = flow_match_target(s.sound_x0, s.sound_noise).to(pred["sound"].device)
            losses["sound"] = (pred["sound"].float() - target).pow(2).mean()
        if s.action_x0 is not None and s.action_noisy:
            rows, width = s.action_noisy, s.action_width
            target = flow_match_target(s.action_x0, s.action_noise).to(pred["action"].device)
            losses["action"] = (pred["action"].float()[rows, :width] - target[rows, :width]).pow(2).mean()
        return losses

    def loss(self, batch: list[NoisedSample], packed: bool = False) -> tuple[torch.Tensor, StepInfo]:
        """Mean over samples of each sample's weighted sum of per-modality losses
        (`generator.loss_weights`); a modality's mean loss over the batch is reported in StepInfo."""
        preds = self.model.predict(batch, packed=packed)
        weights = getattr(self.cfg, "loss_weights", None)
        totals, by_modality = [], {}
        for s, pred in zip(batch, preds):
            losses = self.sample_losses(s, pred)
            totals.append(sum((getattr(weights, m, 1.0) if weights is not None else 1.0) * v
                              for m, v in losses.items()))
            for m, v in losses.items():
                by_modality.setdefault(m, []).append(float(v.detach()))
        modes: dict = {}
        for s in batch:
            modes[s.mode] = modes.get(s.mode, 0) + 1
        info = StepInfo(modes=modes, sigmas=[s.sigma for s in batch], num_samples=len(batch),
                        modality_losses={m: sum(v) / len(v) for m, v in by_modality.items()},
                        sample_losses=[float(t.detach()) for t in totals])
        return torch.stack(totals).mean(), info

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
