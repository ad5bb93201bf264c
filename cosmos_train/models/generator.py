"""Cosmos 3 generator adapter: the one place that knows the concrete diffusers classes.

Components are loaded with diffusers' own classes and assembled into a real `Cosmos3OmniPipeline`
(no weights are copied) so that prompt tokenization and VAE normalization are the pipeline's own
code: a finetuned model is prompted and encoded exactly as it will be at inference.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.models.prompt_format import default_use_system_prompt_of, read_model_index
from cosmos_train.models.sequence import (MODALITIES, SequenceGeometry, build_sample_sequence, build_vision_sequence,
                                          transformer_kwargs)

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


def _load_sound_tokenizer(pretrained: str, dtype: str, common: dict):
    """The checkpoint's `Cosmos3AVAEAudioTokenizer`, refused with a clear message when it cannot encode."""
    import warnings

    from diffusers import Cosmos3AVAEAudioTokenizer

    from cosmos_train.models.sound import check_sound_encoder

    with warnings.catch_warnings():  # torch.nn.utils.weight_norm deprecation inside diffusers
        warnings.simplefilter("ignore", FutureWarning)
        try:
            tokenizer = Cosmos3AVAEAudioTokenizer.from_pretrained(pretrained, subfolder="sound_tokenizer",
                                                                  torch_dtype=DTYPES[dtype], **common)
        except (OSError, ValueError) as err:
            raise UserError(f"generator.sound: {pretrained} has no usable sound_tokenizer/ ({str(err).splitlines()[0]}); "
                            "set generator.sound: off to train without sound") from None
    check_sound_encoder(tokenizer, pretrained)
    return tokenizer.eval()


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
        load_sound: bool = False,
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
            sound_tokenizer = _load_sound_tokenizer(pretrained, vae_dtype, common) if load_sound else None
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
            sound_tokenizer=sound_tokenizer,
        )
        return cls(pipe, transformer_config)

    @property
    def transformer(self):
        return self.pipe.transformer

    # ---- what trains (the interface the trainer uses for every model family) -------------------
    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def setup_trainable(self, cfg) -> list:
        """Optimizer parameter groups for the recipe: LoRA adapters or selected full parameters, and for action
        runs the action heads' rows of the embodiment's domain in their own group (models/action_heads.py)."""
        from cosmos_train.models.quantize import quantized_base
        from cosmos_train.trainer.adapters import setup_trainable

        with quantized_base(self.transformer, cfg):  # model.quantize_base: the frozen base quantized before LoRA
            params = setup_trainable(self.transformer, cfg.train)
        if getattr(cfg, "action", None) is None:
            return [{"params": params}]
        from cosmos_train.models.action_heads import enable_action_heads, init_domain_rows

        embodiment = self.embodiment(cfg)
        if embodiment.new:
            copy_from = self.embodiment_domain(embodiment.init_from) if embodiment.init_from else None
            init_domain_rows(self.transformer, embodiment.domain_id, copy_from,
                             torch.Generator().manual_seed(cfg.train.seed))
        heads = enable_action_heads(self.transformer, [embodiment.domain_id])
        ids = {id(p) for p in heads}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": heads, "lr": cfg.train.lr * cfg.action.head_lr_multiplier, "weight_decay": 0.0,
                   "name": "action_heads"}]
        return ([{"params": rest, "name": "transformer"}] if rest else []) + groups

    def embodiment(self, cfg):
        """The recipe's embodiment (data/embodiment.py), its domain checked against the model's heads."""
        from cosmos_train.data.embodiment import check_domain_id, resolve_embodiment

        embodiment = resolve_embodiment(cfg.action)
        check_domain_id(embodiment, int(self.transformer_config.num_embodiment_domains))
        return embodiment

    @staticmethod
    def embodiment_domain(name: str) -> int:
        from cosmos_train.data.embodiment import known_embodiments

        known = known_embodiments()
        if name not in known:
            raise UserError(f"invalid value for 'action.new_embodiment.init_from': unknown embodiment {name!r} "
                            f"(known: {', '.join(sorted(known))})")
        return int(known[name])

    def trainable_state_dict(self, cfg) -> dict:
        from cosmos_train.trainer.adapters import trainable_state_dict

        state = trainable_state_dict(self.transformer, cfg.train.method)
        if getattr(cfg, "action", None) is not None:
            from cosmos_train.models.action_heads import action_state_dict

            state.update(action_state_dict(self.transformer))
        return state

    def load_trainable_state_dict(self, cfg, weights: dict) -> None:
        from cosmos_train.models.action_heads import is_action_param
        from cosmos_train.trainer.adapters import load_trainable_state_dict

        heads = {k: v for k, v in weights.items() if is_action_param(k)}
        if cfg.train.method == "lora" and heads:
            own = dict(self.transformer.named_parameters())
            with torch.no_grad():
                for name, value in heads.items():
                    own[name].copy_(value.to(own[name].dtype))
            weights = {k: v for k, v in weights.items() if k not in heads}
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
        if getattr(self.pipe, "sound_tokenizer", None) is not None:
            self.pipe.sound_tokenizer.to(device)
        return self

    # ---- what sits on the accelerator while training (models/placement.py) ------------------------
    def training_placement(self, *, encodes_online: bool) -> dict[str, bool]:
        """Each part's place while training: True = the accelerator, False = CPU.

        - the transformer, except `lm_head` while it is frozen: `Cosmos3OmniTransformer.forward` never calls it
          (the velocity heads are proj_out / audio_proj_out / action_proj_out) and neither does the pipeline.
          A recipe that makes it trainable (`train.full_trainable: all`) keeps it with the trained weights: fused
          AdamW and the distributed wrappers need every trained parameter on the device (it gets no gradient).
        - the VAE encoder (+ quant_conv) and the sound tokenizer's encoder only when clips are encoded online
          (no latent cache); their decoders never: only validation sampling decodes (`media_on_device`)."""
        lm_head_trains = any(p.requires_grad for p in self.transformer.lm_head.parameters())
        plan = {"transformer": True, "transformer.lm_head": lm_head_trains,
                "vae.encoder": encodes_online, "vae.quant_conv": encodes_online,
                "vae.decoder": False, "vae.post_quant_conv": False}
        if getattr(self.pipe, "sound_tokenizer", None) is not None:
            plan.update({"sound_tokenizer.encoder": encodes_online, "sound_tokenizer.decoder": False})
        return plan

    def _part(self, name: str):
        obj = self.pipe
        for attr in name.split("."):
            obj = getattr(obj, attr, None)
        return obj

    def place_for_training(self, device, *, encodes_online: bool) -> "Cosmos3Generator":
        """Carry out `training_placement` on `device`; a frozen lm_head is parked (out of the transformer's module
        tree, on the CPU) so that wrapping the transformer for training cannot move it to the device."""
        from cosmos_train.models.placement import apply_plan, park

        plan = self.training_placement(encodes_online=encodes_online)
        if not plan.pop("transformer.lm_head"):
            park(self.transformer, "lm_head").to("cpu")
        apply_plan(plan, self._part, device)
        return self

    def anchor_trained_heads(self) -> None:
        """Every trained parameter outside the decoder layers (modality heads, embeddings) enters every forward's
        graph, with weight 0 when its modality is absent (a batch without sound skips `audio_proj_*`): all ranks
        then produce the same set of gradients each step, which sharded back-ends reduce tensor by tensor (FSDP2
        aborts, DeepSpeed hangs otherwise) and which spares DDP its unused-parameter search.

        A forward hook, registered before the back-end wraps the transformer: it reads the parameters by name at
        call time, when FSDP2 has them gathered."""
        names = [n for n, p in self.transformer.named_parameters() if p.requires_grad and not n.startswith("layers.")]
        if not names:
            return

        def hook(module, args, output):
            anchor = sum(module.get_parameter(n).sum() for n in names) * 0.0
            preds = output[0] if isinstance(output, tuple) else output.sample
            first = next((i for i, t in enumerate(preds) if torch.is_tensor(t)), None)
            if first is not None:
                preds[first] = preds[first] + anchor.to(preds[first].dtype)
            return output

        self.transformer.register_forward_hook(hook)

    def media_on_device(self):
        """Context: the whole VAE and sound tokenizer on the transformer's device, each back where it was after
        (validation encodes held-out clips and samples with the pipeline, which encodes i2v images and decodes)."""
        from cosmos_train.models.placement import brought_to

        device = next(self.transformer.parameters()).device
        components = [self.pipe.vae, getattr(self.pipe, "sound_tokenizer", None)]
        # per child: the encoder and decoder may sit on different devices and each goes back to its own
        return brought_to([child for c in components if c is not None for child in c.children()], device)

    @torch.no_grad()
    def encode_sound(self, waveform: torch.Tensor) -> torch.Tensor:
        """A clip's [2, n] 48 kHz waveform -> its sound latent [sound_dim, T] (one clip at a time: the tokenizer
        peak-normalizes over its whole input)."""
        from cosmos_train.models.sound import encode_sound

        return encode_sound(self.pipe.sound_tokenizer, waveform)

    # ---- inputs, as the pipeline builds them -----------------------------------------------
    def tokenize(self, caption: str, num_frames: int, height: int, width: int, fps: float,
                 use_system_prompt: bool | None = True, *, add_duration_template: bool = True,
                 add_resolution_template: bool = True, action_mode: str | None = None,
                 action_view_point: str | None = None) -> tuple[list[int], list[int]]:
        """(conditional, unconditional) token ids, built by the pipeline's own `tokenize_prompt` (empty negative
        prompt); `use_system_prompt=None` is the checkpoint's `default_use_system_prompt`. With `action_mode` the
        caption becomes the pipeline's action JSON prompt (templates do not apply)."""
        return self.pipe.tokenize_prompt(
            caption, None, num_frames=num_frames, height=height, width=width, fps=fps,
            use_system_prompt=use_system_prompt, add_duration_template=add_duration_template,
            add_resolution_template=add_resolution_template, action_mode=action_mode,
            action_view_point=action_view_point,
        )

    @property
    def default_use_system_prompt(self) -> bool:
        """The checkpoint's `default_use_system_prompt` (model_index.json; True when absent)."""
        return bool(self.pipe.config.default_use_system_prompt)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, T, H, W] or [B, 3, T, H, W], uint8 (0..255) or float in [-1, 1] -> normalized latent [B, C, T', H', W']
        (pipeline's encoder). uint8 frames go to the device as they are and become floats there."""
        from cosmos_train.data.media import to_model_pixels

        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(0)
        device = next(self.vae.parameters()).device
        return self.pipe._encode_video(to_model_pixels(pixels.to(device))).float()

    @torch.no_grad()
    def encode_action_clip(self, pixels: torch.Tensor, resolution_tier: int) -> tuple[torch.Tensor, int, int]:
        """An action window's frames [3, T, H, W] in [-1, 1] -> (latent [1, C, T', h, w], canvas H, canvas W),
        through the pipeline's own `_prepare_action_video_conditioning` (fit into the tier's action canvas,
        downscale only, right/bottom padding), encoder, and `_remove_action_video_padding_from_latent` (latent
        cropped back to the content), exactly as an action call conditions on a clip."""
        device = next(self.vae.parameters()).device
        clip = ((pixels.permute(1, 2, 3, 0).float().cpu() + 1.0) / 2.0).clamp(0, 1).numpy()  # [T, H, W, 3] in [0, 1]
        frames, image_size, canvas_h, canvas_w = self.pipe._prepare_action_video_conditioning(
            clip, resolution_tier, int(pixels.shape[1]), device=device, dtype=torch.float32)
        latent = self.pipe._encode_video(frames).contiguous().float()
        latent = self.pipe._remove_action_video_padding_from_latent(latent, image_size)
        return latent, int(canvas_h), int(canvas_w)

    @property
    def action_dim(self) -> int:
        """The model's (padded) action width."""
        return int(self.transformer_config.action_dim)

    def build_sequence(self, input_ids: list[int], latent_shape, clean_frames: list[int], fps: float) -> dict:
        device = next(self.transformer.parameters()).device
        return build_vision_sequence(input_ids, latent_shape, clean_frames, fps, self.geometry, device=device)

    def sample_sequence(self, sample) -> dict:
        """The static sequence of a drawn sample (`NoisedSample`): its text and every segment it has."""
        device = next(self.transformer.parameters()).device
        return build_sample_sequence(sample.input_ids, sample.segments(self.geometry), sample.fps, self.geometry,
                                     device=device)

    # ---- forward -------------------------------------------------------------------------
    def predict_velocity(self, sequence: dict, noisy_latent: torch.Tensor, timestep: float) -> torch.Tensor:
        """Vision velocity for one text + vision sample; `timestep` is sigma * 1000. Clean frames come back as
        zeros."""
        dtype = self.compute_dtype
        kwargs = transformer_kwargs(sequence)
        device = kwargs["input_ids"].device
        timesteps = torch.full((sequence["num_noisy_vision_tokens"],), float(timestep), device=device)
        preds, _, _ = (self.forward_module or self.transformer)(
            **kwargs, vision_tokens=[noisy_latent.to(device=device, dtype=dtype)], vision_timesteps=timesteps,
            return_dict=False,
        )
        return preds[0]

    def _modality_inputs(self, samples, seq: dict, device) -> dict:
        """Noisy tokens and per-token timesteps of every modality, for samples laid out as `seq`."""
        dtype = self.compute_dtype
        inputs = {}
        for modality in MODALITIES:
            having = [(s, t) for s in samples if (t := s.tokens(modality)) is not None]
            if not having:
                continue
            inputs[f"{modality}_tokens"] = [t.to(device=device, dtype=dtype) for _, t in having]
            counts = [seq_i[f"num_noisy_{modality}_tokens"] for seq_i in seq["sequences"]
                      if f"num_noisy_{modality}_tokens" in seq_i]
            inputs[f"{modality}_timesteps"] = torch.cat(
                [torch.full((n,), float(s.timestep), device=device) for (s, _), n in zip(having, counts)])
        return inputs

    def predict(self, batch, packed: bool = False) -> list[dict]:
        """Velocity predictions of drawn samples, one dict per sample ({"vision": [1, C, T, H, W], "sound":
        [sound_dim, T] or None, "action": [chunk, action_dim] or None}; clean frames / rows come back as zeros).
        `packed`: one transformer call for the whole batch (samples kept apart by the packed attention
        processor), equal to one call per sample."""
        from cosmos_train.models.packing import pack_sequences, packing_layout

        device = next(self.transformer.parameters()).device
        module = self.forward_module or self.transformer
        groups = [batch] if packed and len(batch) > 1 else [[s] for s in batch]
        out = []
        for group in groups:
            seqs = [self.sample_sequence(s) for s in group]
            if len(group) > 1:
                self.install_packed_attention()
                seq = pack_sequences(seqs, device=device)
                context = packing_layout(self.transformer, seq["und_lens"], seq["gen_lens"])
            else:
                seq = {**seqs[0], "sequences": seqs}
                context = contextlib.nullcontext()
            with context:
                preds = module(**transformer_kwargs(seq), **self._modality_inputs(group, seq, device),
                               return_dict=False)
            iters = {m: iter(p) if p is not None else iter(()) for m, p in zip(MODALITIES, preds)}
            for s in group:  # each modality's predictions come in the order of the samples that have it
                out.append({m: (next(iters[m]) if m == "vision" or getattr(s, f"{m}_x0") is not None else None)
                            for m in MODALITIES})
        return out

    # ---- packed forward: several samples in one transformer call --------------------------
    def install_packed_attention(self, backend: str = "auto") -> None:
        """Swap in `PackedCosmos3AttnProcessor` (identical to the stock processor while no pack is set)."""
        from cosmos_train.models.packing import install_packed_attention

        install_packed_attention(self.transformer, backend=backend)

    def predict_velocity_packed(self, batch) -> list[torch.Tensor]:
        """Vision predictions of several text + vision samples in one forward (`predict(batch, packed=True)`)."""
        return [p["vision"] for p in self.predict(batch, packed=True)]
