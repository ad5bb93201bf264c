"""Held-out evaluation during training.

Generator runs (`GeneratorValidator`): the flow-matching loss on held-out clips (`validation.manifest`; action runs:
windows of the held-out episodes, `action.val_episodes`) at FIXED noise levels: one sigma per quantile of the recipe's
sigma density after the shift (`validation.sigma_quantiles`), with one fixed noise draw per held-out sample (seeded by
the sample's index), the recipe's own prompt form and no CFG dropout. Every call sees the same inputs, so the curve
moves only when the weights do. Keys: `val_loss` (mean over the quantiles), `val_loss_sigma_<q>` (e.g.
`val_loss_sigma_0.10`: at the 0.10 quantile; `sigmas` holds the sigma of each) and, for runs with several modalities,
`val_loss_<modality>`. `generate_samples(step, run_dir)` writes videos (MP4) or images (PNG, 1-frame recipes) from
`validation.prompts` (+ `validation.images`, i2v) with the stock pipeline around the transformer being trained (LoRA
active), one fixed seed per prompt, into RUN_DIR/samples/step-NNNNNNN/ (+ samples.json).

Reasoner runs (`ReasonerValidator`): the next-token loss (mean over every assistant target token) on the held-out
conversations of `validation.manifest`: `val_loss`, `val_tokens`.

Both run in eval mode under no_grad on the unwrapped model (never the DDP wrapper: validation runs on the main process
only), inside `torch.random.fork_rng`, and restore train mode: no random number of the training run is consumed, so a
run with validation trains exactly as one without.

Action runs (`ActionEvaluator`): the action error of policy and inverse dynamics on held-out episodes (`action.val_episodes`),
sampled the way a user samples the export (the stock pipeline's action call, `inference_action.generate_action`,
around the model being trained), as the mean absolute error of the DE-normalized actions against the stored
ones, so the number is in the dataset's own units and comparable across normalizations.

Loop integration (main process): `build_validation(cfg, model, objective, normalizer)` -> `Validation` or None;
`validation.due(step)`; `values, media = validation(step, run_dir)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from cosmos_train.errors import BadSampleError, UserError


class ActionEvaluator:
    """`action.eval_windows` held-out windows (spread evenly over the val split), sampled with
    `action.eval_steps` denoising steps and no CFG, one fixed seed per window."""

    MODES = ("policy", "inverse_dynamics")

    def __init__(self, cfg, model, normalizer):
        from cosmos_train.data.lerobot import LeRobotActionDataset

        self.cfg, self.model = cfg, model
        self.val = LeRobotActionDataset(cfg.action, split="val", normalizer=normalizer,
                                        skip_bad_samples=cfg.data.skip_bad_samples)
        n = min(int(cfg.action.eval_windows), len(self.val))
        self.indices = sorted({int(i) for i in np.linspace(0, len(self.val) - 1, n)}) if n else []
        from cosmos_train.data.action_data import action_record

        self.record = action_record(cfg, normalizer, model.embodiment(cfg), self.val.fps)
        self.modes = [m for m in self.MODES if getattr(cfg.action.modes, m) > 0]

    def __bool__(self) -> bool:
        return bool(self.indices and self.modes)

    @torch.no_grad()
    def __call__(self) -> dict:
        from PIL import Image

        from cosmos_train.inference_action import generate_action

        pipe = self.model.pipe
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        pipe.set_progress_bar_config(disable=True)  # no nested sampling bars in the training log
        use_system_prompt = self.cfg.generator.use_system_prompt
        errors: dict = {m: [] for m in self.modes}
        try:
            with _media_on_device(self.model):  # the pipeline encodes the conditioning and decodes
                for seed, index in enumerate(self.indices):
                    window = self.val[index]
                    if window is None:
                        continue
                    frames = ((window.pixels.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).numpy()  # [T, H, W, 3]
                    raw = window.raw_actions.numpy()
                    for mode in self.modes:
                        condition = ({"image": Image.fromarray((frames[0] * 255).round().astype(np.uint8))}
                                     if mode == "policy" else {"video": frames})
                        _, predicted = generate_action(pipe, self.record, mode, window.task, **condition,
                                                       steps=int(self.cfg.action.eval_steps), guidance=1.0, seed=seed,
                                                       use_system_prompt=use_system_prompt)
                        errors[mode].append(float(np.abs(np.asarray(predicted) - raw).mean()))
        finally:
            pipe.transformer.train(was_training)
        return {f"val_action_mae_{m}": float(np.mean(v)) for m, v in errors.items() if v}


# ---------------------------------------------------------------------------------------------------------------
# Fixed noise levels
# ---------------------------------------------------------------------------------------------------------------

VAL_NOISE_SEED = 20_251_121  # held-out sample i draws its noise from torch.Generator().manual_seed(VAL_NOISE_SEED + i)


def sigma_at_quantile(q: float, gen_cfg, shift: float) -> float:
    """The q-quantile of the training sigma density (`generator.sigma_sampling` + its parameters), after the shift:
    the inverse of `objectives.flow_matching.sample_sigma`'s transform (each step of it is monotone)."""
    from cosmos_train.objectives.flow_matching import shift_sigma

    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    method = gen_cfg.sigma_sampling
    if method == "logit_normal":
        z = statistics.NormalDist().inv_cdf(q)
        u = 1.0 / (1.0 + math.exp(-(gen_cfg.logit_mean + gen_cfg.logit_std * z)))
    elif method == "uniform":
        u = q
    elif method == "mode":
        # u = f(r), r uniform, f(r) = 1 - r - s (cos^2(pi r / 2) - 1 + r) is decreasing for the scales used
        # (s < ~1.75): the q-quantile of u is f(1 - q)
        r, s = 1.0 - q, gen_cfg.mode_scale
        u = 1.0 - r - s * (math.cos(math.pi * r / 2.0) ** 2 - 1.0 + r)
    else:
        raise ValueError(f"unknown sigma sampling method {method!r}")
    u = min(max(u, 1e-5), 1.0 - 1e-5)
    return float(shift_sigma(torch.tensor(u, dtype=torch.float64), shift))


def fixed_sigmas(cfg) -> dict[str, float]:
    """{"0.10": sigma, ...}: the validation noise level of each `validation.sigma_quantiles` entry."""
    return {f"{q:.2f}": sigma_at_quantile(float(q), cfg.generator, cfg.flow_shift())
            for q in cfg.validation.sigma_quantiles}


@contextlib.contextmanager
def evaluating(model):
    """Eval mode, no_grad, the unwrapped module (not DDP: validation runs on one process), the training run's RNG
    streams untouched (`fork_rng`); train mode and the wrapper come back afterwards."""
    module = model.transformer
    was_training = module.training
    wrapper = getattr(model, "forward_module", None)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        module.eval()
        model.forward_module = None
        try:
            with torch.no_grad():
                yield
        finally:
            module.train(was_training)
            model.forward_module = wrapper


def _media_on_device(model):
    """The VAE / sound tokenizer on the model's device for the block: training keeps their decoders (and, with a
    latent cache, their encoders) on the CPU (`Cosmos3Generator.place_for_training`)."""
    bring = getattr(model, "media_on_device", None)
    return bring() if bring is not None else contextlib.nullcontext()


def _most_likely(probabilities: dict) -> str:
    return max(probabilities, key=lambda m: probabilities[m])  # ties: the first in order


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


class GeneratorValidator:
    """Held-out loss at fixed sigmas + samples from fixed prompts (see the module docstring).

    `normalizer`: an action run's `ActionNormalizer` (the training data's, `data.dataset.windows.normalizer`); None
    builds the same one from the recipe. The held-out samples are decoded and encoded (the objective's own
    `encode`) once, here: bad held-out data fail before training starts."""

    def __init__(self, cfg, model, objective, normalizer=None):
        self.cfg, self.model, self.objective = cfg, model, objective
        v = cfg.validation
        self.sigmas = fixed_sigmas(cfg)
        self.packed = bool(cfg.train.packing.enabled)
        self.max_tokens = int(cfg.train.packing.max_tokens)
        self.items: list = []  # (LatentSample, noise dict) per held-out sample
        self.sources: list[str] = []
        if cfg.action is not None:
            if cfg.action.val_episodes > 0:
                self._load_action(normalizer)
        elif v.manifest is not None:
            self._load_manifest(v.manifest)
        self.prompts = list(v.prompts)
        self.images = [v.images[i] if i < len(v.images) and v.images[i] else None for i in range(len(self.prompts))]
        for i, image in enumerate(self.images):
            if image is not None and not Path(image).is_file():
                raise UserError(f"validation.images[{i}]: image not found: {image}")
        self.sample_frames = int(v.sample_frames or cfg.data.num_frames)
        self.sample_size = cfg.pixel_size()

    # ---- held-out data -------------------------------------------------------------------------------------------
    def _load_manifest(self, manifest: str) -> None:
        from cosmos_train.data import GeneratorDataset, read_manifest
        from cosmos_train.data.buckets import assign_bucket
        from cosmos_train.data.build import probe_size

        cfg, d = self.cfg, self.cfg.data
        if not Path(manifest).is_file():
            raise UserError(f"validation.manifest: file not found: {manifest}")
        records = read_manifest(manifest, skip_bad=d.skip_bad_samples)[: cfg.validation.max_samples]
        if d.use_buckets():
            sizes = [assign_bucket(*probe_size(r), d.resolution).size for r in records]
            dataset = GeneratorDataset(records, d.num_frames, fps=d.fps, sizes=sizes, short_clips=d.short_clips,
                                       seed=cfg.train.seed, sound=cfg.generator.sound)
        else:
            h, w = cfg.pixel_size()
            dataset = GeneratorDataset(records, d.num_frames, h, w, fps=d.fps, short_clips=d.short_clips,
                                       seed=cfg.train.seed, sound=cfg.generator.sound)
        self._encode_all(dataset.load, range(len(records)))

    def _load_action(self, normalizer) -> None:
        from cosmos_train.data.lerobot import LeRobotActionDataset

        val = LeRobotActionDataset(self.cfg.action, split="val", normalizer=normalizer, skip_bad_samples=False)
        n = min(int(self.cfg.validation.max_samples), len(val))
        indices = sorted({int(i) for i in np.linspace(0, len(val) - 1, n)}) if n else []
        self._encode_all(val.__getitem__, indices)

    def _encode_all(self, load, keys) -> None:
        skip_bad = self.cfg.data.skip_bad_samples
        # the encoder stays on the CPU while training from the latent cache: brought over for this
        with torch.no_grad(), _media_on_device(self.model):
            for key in keys:
                try:
                    sample = load(key)
                except BadSampleError as err:
                    if not skip_bad:
                        raise UserError(f"validation: held-out sample unusable: {err}") from None
                    print(f"validation: skipping held-out sample ({err})")
                    continue
                item = self.objective.encode(sample)
                self.items.append((item, self._fixed_noise(item, len(self.items))))
                self.sources.append(item.source)

    def _fixed_noise(self, item, index: int) -> dict:
        g = torch.Generator().manual_seed(VAL_NOISE_SEED + index)
        noise = {"vision": torch.randn((1, *item.latent.shape), generator=g)}
        if item.sound is not None:
            noise["sound"] = torch.randn(item.sound.shape, generator=g)
        if item.actions is not None:
            noise["action"] = torch.randn(item.actions.shape[0], self.model.action_dim, generator=g)
        return noise

    def __bool__(self) -> bool:
        return bool(self.items or self.prompts)

    # ---- fixed draws -------------------------------------------------------------------------------------------
    def noised(self, index: int, sigma: float):
        """Held-out sample `index` at noise level `sigma`: the objective's `draw` with every random choice fixed
        (the recipe's most likely mode, the recipe's template form, the conditional prompt, the fixed noise)."""
        from cosmos_train.objectives.flow_matching import noise_latent_frames
        from cosmos_train.objectives.generator import NoisedSample, action_clean_frames, clean_frames_for_mode

        item, noise = self.items[index]
        obj = self.objective
        if item.actions is not None:
            mode = _most_likely({m: getattr(self.cfg.action.modes, m) for m in ("policy", "forward_dynamics",
                                                                                "inverse_dynamics")})
            cond, _ = obj._tokenize_action(item.caption, item.num_frames, item.height, item.width, item.fps, mode)
            x0 = item.latent.unsqueeze(0).float()
            chunk, width = item.actions.shape
            clean, action_clean = action_clean_frames(mode, x0.shape[2], chunk)
            action_x0 = torch.zeros(chunk, self.model.action_dim)
            action_x0[:, :width] = item.actions
            sound_x0 = item.sound.float() if item.sound is not None else None
            return NoisedSample(
                input_ids=list(cond), x0=x0, noise=noise["vision"], xt=noise_latent_frames(x0, noise["vision"], sigma,
                                                                                          clean),
                sigma=sigma, clean_frames=clean, fps=item.fps, mode=mode, dropped_text=False, source=item.source,
                templates_on=False, sound_x0=sound_x0, sound_noise=noise.get("sound"), action_x0=action_x0,
                action_noise=noise["action"], action_clean=action_clean, action_width=width, domain_id=item.domain_id)
        from cosmos_train.config.schema import GENERATION_MODES

        latent, num_frames, vision_noise = item.latent, item.num_frames, noise["vision"]
        mode = "t2i" if num_frames == 1 else _most_likely({m: getattr(obj.cfg.modes, m) for m in GENERATION_MODES})
        if mode == "t2i" and num_frames > 1:  # the clip's first frame, as `draw` trains a clip as an image
            latent, num_frames, vision_noise = latent[:, :1], 1, vision_noise[:, :, :1]
        templates_on = obj.prompt_format.templates_on
        cond, _ = obj.prompt_ids(item.caption, num_frames, item.height, item.width, item.fps, templates_on)
        x0 = latent.unsqueeze(0).float()
        clean = clean_frames_for_mode(mode, x0.shape[2], obj.cfg.v2v_condition_frames)
        with_sound = item.sound is not None and num_frames > 1
        return NoisedSample(
            input_ids=list(cond), x0=x0, noise=vision_noise, xt=noise_latent_frames(x0, vision_noise, sigma, clean),
            sigma=sigma, clean_frames=clean, fps=item.fps, mode=mode, dropped_text=False, source=item.source,
            templates_on=templates_on, sound_x0=item.sound.float() if with_sound else None,
            sound_noise=noise.get("sound") if with_sound else None)

    def _groups(self, batch: list) -> list[list]:
        if not self.packed:
            return [[s] for s in batch]
        groups, used = [[]], 0
        for s in batch:
            n = self.objective.token_count(s)
            if groups[-1] and used + n > self.max_tokens:
                groups.append([])
                used = 0
            groups[-1].append(s)
            used += n
        return groups

    def sample_losses(self, sigma: float) -> list[dict]:
        """Each held-out sample's per-modality losses at `sigma` (call inside `evaluating`)."""
        out = []
        batch = [self.noised(i, sigma) for i in range(len(self.items))]
        for group in self._groups(batch):
            preds = self.model.predict(group, packed=self.packed and len(group) > 1)
            for s, pred in zip(group, preds):
                out.append({m: float(v) for m, v in self.objective.sample_losses(s, pred).items()})
        return out

    def __call__(self) -> dict:
        """{"val_loss", "val_loss_sigma_<q>", ...}; {} without held-out data."""
        if not self.items:
            return {}
        weights = getattr(self.objective.cfg, "loss_weights", None)
        per_sigma, by_modality = {}, {}
        with evaluating(self.model):
            for key, sigma in self.sigmas.items():
                losses = self.sample_losses(sigma)
                totals = [sum((getattr(weights, m, 1.0) if weights is not None else 1.0) * v for m, v in ls.items())
                          for ls in losses]
                per_sigma[key] = sum(totals) / len(totals)
                for ls in losses:
                    for m, v in ls.items():
                        by_modality.setdefault(m, []).append(v)
        values = {"val_loss": sum(per_sigma.values()) / len(per_sigma)}
        values.update({f"val_loss_sigma_{k}": v for k, v in per_sigma.items()})
        if len(by_modality) > 1 or set(by_modality) - {"vision"}:
            values.update({f"val_loss_{m}": sum(v) / len(v) for m, v in by_modality.items()})
        return values

    # ---- samples ------------------------------------------------------------------------------------------------
    def generate_samples(self, step: int, run_dir) -> list[Path]:
        """One video (MP4; PNG when `sample_frames` is 1) per `validation.prompts` entry, with the pipeline around
        the transformer being trained, into RUN_DIR/samples/step-NNNNNNN/; seed i for prompt i."""
        if not self.prompts:
            return []
        from PIL import Image

        from cosmos_train.inference import choose_prompt, generate_clip, write_mp4, write_mp4_with_sound

        v = self.cfg.validation
        write = getattr(self, "write", True)
        out_dir = Path(run_dir) / "samples" / f"step-{step:07d}"
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
        pipe = self.model.pipe
        choice = choose_prompt(self.objective.prompt_format)
        sound = (self.cfg.generator.sound != "off" and self.sample_frames > 1
                 and getattr(pipe, "sound_tokenizer", None) is not None)
        height, width = self.sample_size
        fps = float(self.cfg.data.fps)
        paths, records = [], []
        with evaluating(self.model), _media_on_device(self.model):  # decoding (and i2v encoding) on the device
            for i, prompt in enumerate(self.prompts):
                image = None
                if self.images[i] is not None:
                    try:
                        image = Image.open(self.images[i]).convert("RGB")
                    except OSError as err:
                        raise UserError(f"validation.images[{i}]: unreadable image {self.images[i]} ({err})") from None
                clip = generate_clip(pipe, prompt, num_frames=self.sample_frames, height=height, width=width, fps=fps,
                                     steps=int(v.sample_steps), guidance=float(v.sample_guidance), seed=i, image=image,
                                     prompt_choice=choice, enable_sound=sound)
                if not write:
                    continue
                if self.sample_frames == 1:
                    path = out_dir / f"{i:02d}.png"
                    Image.fromarray((np.clip(clip.frames[0], 0, 1) * 255).round().astype(np.uint8)).save(path)
                elif clip.sound is not None:
                    path = write_mp4_with_sound(clip.frames, clip.sound, out_dir / f"{i:02d}.mp4", fps=fps)
                else:
                    path = write_mp4(clip.frames, out_dir / f"{i:02d}.mp4", fps=fps)
                paths.append(Path(path))
                records.append({"file": Path(path).name, "prompt": prompt, "image": self.images[i], "seed": i,
                                "frames": self.sample_frames, "height": height, "width": width, "fps": fps,
                                "steps": int(v.sample_steps), "guidance": float(v.sample_guidance)})
        if write:
            (out_dir / "samples.json").write_text(json.dumps({"step": step, "samples": records}, indent=1) + "\n")
        return paths


# ---------------------------------------------------------------------------------------------------------------
# Reasoner
# ---------------------------------------------------------------------------------------------------------------


class ReasonerValidator:
    """Held-out next-token loss on the first `validation.max_samples` conversations of `validation.manifest`
    (encoded once, here, with the run's processor and `reasoner:` settings)."""

    def __init__(self, cfg, model, objective):
        from cosmos_train.data.conversations import ConversationDataset, read_conversations

        self.cfg, self.model, self.objective = cfg, model, objective
        self.packed = bool(cfg.train.packing.enabled)
        self.items: list = []
        manifest = cfg.validation.manifest
        if manifest is None:
            return
        if not Path(manifest).is_file():
            raise UserError(f"validation.manifest: conversations file not found: {manifest}")
        records = read_conversations(manifest, skip_bad=cfg.data.skip_bad_samples)[: cfg.validation.max_samples]
        if not records:
            raise UserError(f"validation.manifest: {manifest} has no usable conversations")
        dataset = ConversationDataset(records, model.tokenizer, model.image_processor, model.video, cfg.reasoner)
        for i in range(len(records)):
            try:
                item = objective.encode(dataset.load(i))
            except BadSampleError as err:
                if not cfg.data.skip_bad_samples:
                    raise UserError(f"validation: held-out conversation unusable: {err}") from None
                print(f"validation: skipping held-out conversation ({err})")
                continue
            if item.num_targets > 0:
                self.items.append(item)
        if not self.items:
            raise UserError(f"validation.manifest: {manifest}: no held-out conversation has an assistant token to "
                            "score")

    def __bool__(self) -> bool:
        return bool(self.items)

    def __call__(self) -> dict:
        """{"val_loss": mean next-token cross-entropy over every target token, "val_tokens": their number}."""
        if not self.items:
            return {}
        with evaluating(self.model):  # packed: split into packs of train.packing.max_tokens, as in training
            loss, info = self.objective.loss(self.items, packed=self.packed)
        return {"val_loss": float(loss), "val_tokens": int(info.num_target_tokens)}


# ---------------------------------------------------------------------------------------------------------------
# What the loop calls
# ---------------------------------------------------------------------------------------------------------------


class Validation:
    """The run's validation: `due(step)`, then `values, media = validation(step, run_dir)` (held-out losses, sample
    files); `values` go to `MetricsLogger.log`, `media` to `MetricsLogger.log_media`."""

    def __init__(self, cfg, validator):
        self.every = int(cfg.validation.every)
        self.validator = validator

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, step: int, run_dir) -> tuple[dict, list[Path]]:
        values = self.validator()
        media = self.validator.generate_samples(step, run_dir) if hasattr(self.validator, "generate_samples") else []
        return values, media


def build_validation(cfg, model, objective, normalizer=None, write: bool = True) -> Validation | None:
    """The recipe's validation (None when `validation.every` is 0). Construct it on the main process after the model
    is on its device: held-out data are read, decoded and encoded here (bad ones fail now, not at step N)."""
    if cfg.validation.every <= 0:
        return None
    if cfg.objective == "reasoner":
        validator = ReasonerValidator(cfg, model, objective)
    else:
        validator = GeneratorValidator(cfg, model, objective, normalizer=normalizer)
        validator.write = write  # a sharded model samples on every rank; one of them writes the files
    return Validation(cfg, validator) if validator else None
