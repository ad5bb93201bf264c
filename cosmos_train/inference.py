"""Generate with an exported (or any) Cosmos 3 pipeline directory and write an MP4."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from cosmos_train.errors import UserError
from cosmos_train.models.prompt_format import PromptFormat

EXPORT_INFO = "cosmos_train_export.json"  # written by `cosmos-train export` next to the weights
SOUND_SAMPLE_RATE = 48000


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """frames: [T, H, W, 3] uint8 (or float in [0, 1])."""
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if frame.shape[0] != stream.height or frame.shape[1] != stream.width:
                frame = np.pad(frame, ((0, stream.height - height), (0, stream.width - width), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def load_pipeline(pipeline_dir: str | Path, device: str | None = None, lora: str | Path | None = None):
    from diffusers import Cosmos3OmniPipeline

    from cosmos_train.models import TINY, resolve_pretrained

    if str(pipeline_dir) == TINY:  # the built-in tiny checkpoint, as recipes name it
        pipeline_dir = resolve_pretrained(TINY)
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise UserError(f"{pipeline_dir} is not a pipeline directory (no model_index.json)")
    if lora is not None:
        _check_adapter_record(Path(lora))
    pipe = Cosmos3OmniPipeline.from_pretrained(str(pipeline_dir), enable_safety_checker=False)
    if lora is not None:
        from cosmos_train.export.adapters import ADAPTER_WEIGHTS

        # exports before the PEFT-directory form wrote diffusers' default file name
        names = [n for n in (ADAPTER_WEIGHTS, "pytorch_lora_weights.safetensors") if (Path(lora) / n).is_file()]
        if not names:
            raise UserError(f"--lora {lora}: no {ADAPTER_WEIGHTS} there (a `cosmos-train export --lora-only` "
                            "directory of a generator run)")
        pipe.transformer.load_lora_adapter(str(lora), weight_name=names[0])
        # diffusers only logs "No LoRA keys associated ..." when none of the adapter's names match
        if not any("lora_" in name for name, _ in pipe.transformer.named_parameters()):
            raise UserError(f"--lora {lora}: none of its LoRA weights matched the pipeline's transformer (not a "
                            "generator adapter of this base?); nothing was loaded")
        from cosmos_train.models.action_heads import ACTION_HEADS_FILE, load_action_heads

        if (Path(lora) / ACTION_HEADS_FILE).is_file():  # an action run's heads travel beside its adapter
            load_action_heads(pipe.transformer, Path(lora) / ACTION_HEADS_FILE)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def _check_adapter_record(lora: Path) -> None:
    """A cosmos_train export record beside `--lora` must be a generator adapter (LoRA-only) export."""
    path = lora / EXPORT_INFO
    if not path.is_file():
        return
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--lora {lora}: unreadable {EXPORT_INFO} ({err})") from None
    if not isinstance(info, dict):
        raise UserError(f"--lora {lora}: {EXPORT_INFO} is not a JSON object")
    if info.get("objective") != "generator":
        raise UserError(f"--lora {lora}: its {EXPORT_INFO} records a {info.get('objective')} export; --lora takes "
                        "a generator adapter (`cosmos-train export --lora-only` of a generator run)")
    if info.get("lora_only") is False:
        raise UserError(f"--lora {lora}: a merged generator export, not an adapter (`cosmos-train export "
                        "--lora-only`): pass it as the pipeline directory instead")


def export_prompt_format(*dirs) -> tuple[PromptFormat, Path] | None:
    """The prompt format a finetune was trained with: `prompt_format` of the first `cosmos_train_export.json`
    found in `dirs` (a LoRA-only export, then the pipeline directory), with the file it came from."""
    for d in dirs:
        if d is None or not (Path(d) / EXPORT_INFO).is_file():
            continue
        path = Path(d) / EXPORT_INFO
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict) and "prompt_format" in info:
                return PromptFormat.from_dict(info["prompt_format"]), path
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise UserError(f"{path}: unreadable prompt_format ({err})") from None
    return None


@dataclass
class PromptChoice:
    """How `generate` prompts: keyword arguments for the pipeline call and a one-line description."""

    kwargs: dict
    bare_uncond: bool  # unconditional prompt without templates although the prompt has them (uncond_prompt: empty)
    description: str


def choose_prompt(fmt: PromptFormat | None, *, templates: bool | None = None,
                  system_prompt: bool | None = None, source: str = EXPORT_INFO) -> PromptChoice:
    """The pipeline's prompt options for a finetune trained with `fmt` (None: not a cosmos_train export with a
    recorded format: the pipeline's defaults), with the `--[no-]templates` / `--[no-]system-prompt` overrides."""
    if fmt is None:
        kwargs: dict = {}
        if templates is not None:
            kwargs.update(add_duration_template=templates, add_resolution_template=templates)
        if system_prompt is not None:
            kwargs["use_system_prompt"] = system_prompt
        parts = [f"templates {'on' if templates else 'off'}" if templates is not None else "",
                 f"system prompt {'on' if system_prompt else 'off'}" if system_prompt is not None else ""]
        told = ", ".join(p for p in parts if p)
        return PromptChoice(kwargs, False, f"prompt format: pipeline defaults{' with ' + told if told else ''} "
                                           f"(no prompt_format recorded)")
    templates_on = fmt.templates_on if templates is None else templates
    kwargs = fmt.pipeline_kwargs(templates_on)
    if system_prompt is not None:
        kwargs["use_system_prompt"] = system_prompt
    kwargs["negative_prompt"] = ""  # what training's unconditional prompt was built from
    shown = PromptFormat(**{**fmt.to_dict(), "use_system_prompt": kwargs["use_system_prompt"]})
    if kwargs["use_system_prompt"] != fmt.use_system_prompt:
        trained = "NOT a form this finetune was trained on"
    elif templates_on == fmt.templates_on:
        trained = "as trained"
    elif fmt.template_dropout > 0:
        trained = f"the other template form, trained on {fmt.template_dropout:.0%} of samples"
    else:
        trained = "NOT a form this finetune was trained on"
    bare = fmt.uncond_prompt == "empty" and (kwargs["add_duration_template"] or kwargs["add_resolution_template"])
    return PromptChoice(kwargs, bare, f"prompt format: {shown.describe(templates_on)}, negative prompt \"\""
                                      f"{' (bare)' if bare else ''} ({trained}; {source})")


@contextmanager
def _bare_unconditional_prompt(pipe, enabled: bool):
    """The pipeline's own `tokenize_prompt`, with the unconditional ids of the template-free form."""
    if not enabled:
        yield
        return
    original = pipe.tokenize_prompt

    def tokenize_prompt(prompt, negative_prompt=None, **kwargs):
        cond, _ = original(prompt, negative_prompt, **kwargs)
        _, uncond = original(prompt, negative_prompt,
                             **{**kwargs, "add_duration_template": False, "add_resolution_template": False})
        return cond, uncond

    pipe.tokenize_prompt = tokenize_prompt
    try:
        yield
    finally:
        del pipe.tokenize_prompt


@dataclass
class GeneratedClip:
    frames: np.ndarray  # [T, H, W, 3] float in [0, 1]
    sound: torch.Tensor | None = None  # [2, N] waveform at 48 kHz (enable_sound)


def generate_clip(pipe, prompt: str, *, num_frames: int, height: int, width: int, fps: float = 24.0,
                  steps: int = 35, guidance: float = 6.0, seed: int = 0, image=None, video=None,
                  prompt_choice: PromptChoice | None = None, enable_sound: bool = False) -> GeneratedClip:
    """Frames (and with `enable_sound` the generated stereo soundtrack). `prompt_choice` (`choose_prompt`): how
    to prompt (default: the pipeline's defaults)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    choice = prompt_choice or PromptChoice({}, False, "")
    with _bare_unconditional_prompt(pipe, choice.bare_uncond):
        extra = {"video": video} if video is not None else {}  # v2v: its leading frames condition the clip
        out = pipe(prompt=prompt, num_frames=num_frames, height=height, width=width, fps=fps, image=image,
                   num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
                   enable_safety_check=False, enable_sound=enable_sound, **extra, **choice.kwargs)
    video = np.asarray(out.video)
    sound = out.sound.detach().float().cpu() if enable_sound and out.sound is not None else None
    if sound is not None:  # the decoder returns whole hops: keep the clip's own length
        sound = sound[..., : int(num_frames / fps * SOUND_SAMPLE_RATE)]
    return GeneratedClip(video[None] if video.ndim == 3 else video, sound)


def generate_video(pipe, prompt: str, **kwargs) -> np.ndarray:
    """[T, H, W, 3] float frames in [0, 1] (`generate_clip` without sound)."""
    return generate_clip(pipe, prompt, **kwargs).frames


def write_mp4_with_sound(frames: np.ndarray, sound: torch.Tensor, path: str | Path, fps: float) -> Path:
    """MP4 with H.264 video and AAC 48 kHz stereo sound (diffusers' own muxer)."""
    from diffusers.utils import encode_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(frames, fps=int(round(fps)), output_path=str(path), audio=sound.clamp(-1, 1),
                 audio_sample_rate=SOUND_SAMPLE_RATE)
    return path
