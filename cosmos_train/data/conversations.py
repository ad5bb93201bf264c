"""Conversations for reasoner SFT: JSONL -> tokenized, label-masked, pixel-processed samples.

One JSON object per line (blank lines are ignored), in either form:

OpenAI / Qwen3-VL messages::

    {"messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": [{"type": "video", "video": "clips/red_circle.mp4", "fps": 4},
                                   {"type": "text", "text": "When does the circle cross the center?"}]},
      {"role": "assistant", "content": "Between 0.5 and 0.8 seconds."}]}

ShareGPT (converted on load; ``<image>`` / ``<video>`` tags take the top-level ``images`` / ``videos``
(or ``image`` / ``video``) paths in order)::

    {"conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A red circle."}],
     "images": ["images/red_circle_still.png"]}

- roles: ``system`` (first message only), ``user``, ``assistant`` (ShareGPT: ``system``, ``human``, ``gpt``);
  the conversation ends with an assistant turn; assistant turns are text (a ``reasoning_content`` string
  next to ``content`` becomes the ``<think>`` block in the reasoning format).
- image parts: ``{"type": "image", "image": PATH}`` (also ``path``, or ``image_url`` with a file path),
  optional ``min_pixels`` / ``max_pixels``. Video parts: ``{"type": "video", "video": PATH}``, optional
  ``fps`` or ``num_frames`` (alias ``nframes``), ``video_start`` / ``video_end`` (seconds), ``min_pixels``
  / ``max_pixels`` (totals over the sampled frames). Paths are relative to the JSONL file (or absolute).

Processing follows Qwen3-VL: images through the PIL image processor (`Qwen2VLImageProcessorPil`, smart
resize to multiples of patch*merge within the pixel budget); videos decoded with PyAV, frames sampled by
fps (clamped to min/max frames) or count, evenly spaced (``linspace(0, n-1, k).round()``), resized with
Qwen3-VL's video smart_resize and patchified 2 frames at a time; each 2-frame group is written in the
prompt as ``<{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>`` with t the mean time of the
group's two frames (Qwen3-VL's processor convention; it replaces the chat template's whole
``<|vision_start|><|video_pad|><|vision_end|>``). Labels are the assistant tokens (content and the closing
``<|im_end|>``) of all assistant turns or only the last (``reasoner.loss_on``); everything else is -100.

Bad input raises `BadSampleError` naming ``file:line`` with a reason: ``bad_json``, ``bad_format``,
``bad_role``, ``no_assistant``, ``missing_file``, ``remote_media``, ``undecodable``, ``too_short`` (a video
with fewer than 2 frames in its window), ``too_long`` (over ``reasoner.max_seq_len`` tokens, without
``reasoner.truncate``), ``no_reasoning`` (reasoning format on, a trained answer without reasoning).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cosmos_train.data.manifest import decode_line
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
_IMAGE_OPTIONS = ("min_pixels", "max_pixels")
_VIDEO_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames", "nframes", "video_start", "video_end")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationRecord:
    """One validated conversation. `messages`: [{"role", "content": [part, ...], "reasoning"?}], parts
    {"type": "text", "text"} | {"type": "image"|"video", "path": absolute Path, **options}."""

    messages: tuple
    source: str  # "<file>:<line>"

    @property
    def media(self) -> list[dict]:
        return [p for m in self.messages for p in m["content"] if p["type"] in ("image", "video")]


def _bad(source: str, message: str, reason: str) -> BadSampleError:
    return BadSampleError(f"{source}: {message}", reason)


def _media_path(value: Any, base_dir: Path, source: str, kind: str) -> Path:
    if isinstance(value, dict):  # {"url": ...} as OpenAI's image_url
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise _bad(source, f"{kind} part needs a file path", "bad_format")
    if value.startswith(("http://", "https://", "data:")):
        raise _bad(source, f"{kind} '{value[:60]}' is not a local file (download media first)", "remote_media")
    if value.startswith("file://"):
        value = value[len("file://"):]
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.is_file():
        raise _bad(source, f"{kind} file not found: {path}", "missing_file")
    return path


def _parse_part(part: Any, base_dir: Path, source: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise _bad(source, f"a content part must be an object, got {type(part).__name__}", "bad_format")
    kind = part.get("type")
    if kind is None:  # Qwen-style parts without "type"
        kind = next((k for k in ("image", "video", "text", "image_url") if k in part), None)
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(source, "text part needs a string 'text'", "bad_format")
        return {"type": "text", "text": text}
    if kind in ("image", "image_url"):
        value = part.get("image", part.get("path", part.get("image_url")))
        out = {"type": "image", "path": _media_path(value, base_dir, source, "image")}
        options = _IMAGE_OPTIONS
    elif kind == "video":
        value = part.get("video", part.get("path"))
        if isinstance(value, list):
            raise _bad(source, "videos given as frame lists are not supported; give a video file", "bad_format")
        out = {"type": "video", "path": _media_path(value, base_dir, source, "video")}
        options = _VIDEO_OPTIONS
    else:
        raise _bad(source, f"unknown content part type {kind!r} (text, image or video)", "bad_format")
    for key in options:
        if part.get(key) is not None:
            value = part[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    key not in ("video_start",) and value == 0):
                raise _bad(source, f"{kind} option {key} must be a positive number, got {value!r}", "bad_format")
            out["num_frames" if key == "nframes" else key] = value
    if "fps" in out and "num_frames" in out:
        raise _bad(source, "a video part takes fps or num_frames, not both", "bad_format")
    return out


def _sharegpt_to_messages(obj: dict, source: str) -> tuple[list[dict], list]:
    """ShareGPT turns -> OpenAI-form messages (content parts from <image>/<video> tags)."""
    media = {}
    for kind in ("image", "video"):
        values = obj.get(kind + "s", obj.get(kind))
        if values is None:
            values = []
        elif isinstance(values, str):
            values = [values]
        if not isinstance(values, list):
            raise _bad(source, f"'{kind}s' must be a list of paths", "bad_format")
        media[kind] = list(values)
    used = {"image": 0, "video": 0}
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"]})
    for turn in obj["conversations"]:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _bad(source, "a ShareGPT turn needs 'from' and 'value'", "bad_format")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise _bad(source, f"role '{turn['from']}' is not allowed (system, human, gpt)", "bad_role")
        value = turn["value"]
        if not isinstance(value, str):
            raise _bad(source, "a ShareGPT 'value' must be a string", "bad_format")
        parts: list = []
        rest = value
        while True:
            cut = [(rest.find(tag), kind) for tag, kind in (("<image>", "image"), ("<video>", "video"))
                   if rest.find(tag) >= 0]
            if not cut:
                break
            pos, kind = min(cut)
            if rest[:pos]:
                parts.append({"type": "text", "text": rest[:pos]})
            if used[kind] >= len(media[kind]):
                raise _bad(source, f"more <{kind}> tags than {kind}s listed", "bad_format")
            parts.append({"type": kind, kind: media[kind][used[kind]]})
            used[kind] += 1
            rest = rest[pos + len(kind) + 2:]
            if rest.startswith("\n"):  # LLaVA-style "<image>\nQuestion": the newline only separated the tag
                rest = rest[1:]
        if rest:
            parts.append({"type": "text", "text": rest})
        messages.append({"role": role, "content": parts if any(p["type"] != "text" for p in parts) else value})
    for kind in ("image", "video"):
        if used[kind] != len(media[kind]):
            raise _bad(source, f"{len(media[kind])} {kind}s listed but {used[kind]} <{kind}> tags", "bad_format")
    return messages


def parse_conversation(obj: Any, base_dir: Path, source: str) -> ConversationRecord:
    """One JSON object -> a validated `ConversationRecord` (raises BadSampleError)."""
    if not isinstance(obj, dict):
        raise _bad(source, f"expected a JSON object, got {type(obj).__name__}", "bad_format")
    turns = obj.get("conversations")
    if "messages" in obj:
        raw = obj["messages"]
    elif isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        raw = _sharegpt_to_messages(obj, source)
    elif isinstance(turns, list):
        raw = turns
    else:
        raise _bad(source, "no 'messages' (OpenAI form) or 'conversations' (ShareGPT form)", "bad_format")
    if not isinstance(raw, list) or not raw:
        raise _bad(source, "the conversation is empty", "bad_format")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _bad(source, f"message {i} needs 'role' and 'content'", "bad_format")
        role = msg["role"]
        if role not in ROLES:
            raise _bad(source, f"role '{role}' is not allowed (system, user, assistant)", "bad_role")
        if role == "system" and i != 0:
            raise _bad(source, "a system message may only come first", "bad_format")
        content = msg["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [_parse_part(p, base_dir, source) for p in content]
        else:
            raise _bad(source, f"message {i}: content must be a string or a list of parts", "bad_format")
        out = {"role": role, "content": tuple(parts)}
        if role == "assistant":
            if any(p["type"] != "text" for p in parts):
                raise _bad(source, f"message {i}: an assistant turn must be text only", "bad_format")
            if not "".join(p["text"] for p in parts).strip():
                raise _bad(source, f"message {i}: empty assistant turn", "bad_format")
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise _bad(source, f"message {i}: reasoning_content must be a string", "bad_format")
                out["reasoning"] = reasoning
        messages.append(out)
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad(source, "no assistant turn: nothing to train on", "no_assistant")
    if messages[-1]["role"] != "assistant":
        raise _bad(source, "the conversation must end with an assistant turn", "bad_format")
    return ConversationRecord(messages=tuple(messages), source=source)


def read_conversations(path: str | os.PathLike, skip_bad: bool = False,
                       counter: SkipCounter | None = None) -> list[ConversationRecord]:
    """Read and validate a conversations JSONL file (media files must exist; they are decoded later)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.manifest: conversations file not found: {path}")
    base_dir = path.resolve().parent
    records = []
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"data.manifest: cannot read conversations file {path}: {err}") from None
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            try:
                line = decode_line(raw, source, first=lineno == 1)
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad(source, f"not valid JSON ({err.msg})", "bad_json") from None
            records.append(parse_conversation(obj, base_dir, source))
        except BadSampleError as err:
            if not skip_bad:
                raise
            if counter is not None:
                counter.add(err.reason, source, str(err))
    return records


# ---------------------------------------------------------------------------------------------
# Media -> patches (Qwen3-VL processing without torchvision)
# ---------------------------------------------------------------------------------------------


@dataclass
class ProcessedMedia:
    kind: str  # "image" | "video"
    pixel_values: np.ndarray  # [patches, C * temporal_patch * patch * patch] float32
    grid_thw: tuple[int, int, int]
    num_tokens: int  # placeholder tokens in the prompt (all frames)
    timestamps: list[float] = field(default_factory=list)  # videos: mean time of each 2-frame group
    merge_size: int = 2

    def placeholder(self) -> str:
        """The prompt text of this image / video (Qwen3-VL's processor expansion)."""
        if self.kind == "image":
            return "<|vision_start|>" + "<|image_pad|>" * self.num_tokens + "<|vision_end|>"
        per_frame = self.grid_thw[1] * self.grid_thw[2] // self.merge_size**2
        return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                       for t in self.timestamps)


def _rgb(img) -> np.ndarray:
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def process_image(path: Path, image_processor, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> ProcessedMedia:
    from PIL import Image

    if not Path(path).is_file():
        raise BadSampleError(f"{path}: file not found", "missing_file")
    try:
        with Image.open(path) as img:
            img.load()
            arr = _rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise BadSampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})", "undecodable") from None
    size = {"shortest_edge": int(min_pixels or image_processor.size["shortest_edge"]),
            "longest_edge": int(max_pixels or image_processor.size["longest_edge"])}
    if size["shortest_edge"] > size["longest_edge"]:
        raise UserError(f"image min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    try:
        out = image_processor(images=[arr], size=size, return_tensors="np")
    except ValueError as e:  # e.g. extreme aspect ratio
        raise BadSampleError(f"{path}: cannot process image ({e})", "undecodable") from None
    grid = tuple(int(x) for x in out["image_grid_thw"][0])
    return ProcessedMedia("image", out["pixel_values"].astype(np.float32), grid,
                          grid[0] * grid[1] * grid[2] // image_processor.merge_size**2,
                          merge_size=image_processor.merge_size)


def _decode_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    import av

    wanted = sorted(set(indices))
    last = wanted[-1]
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(os.fspath(path), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError, IndexError) as e:
        raise BadSampleError(f"{path}: cannot decode video ({type(e).__name__}: {e})", "undecodable") from None
    if last not in frames:
        raise BadSampleError(f"{path}: cannot decode video (only {len(frames)} of the frames up to {last} decoded)",
                             "undecodable")
    return [frames[i] for i in indices]


def video_frame_indices(total: int, source_fps: float, *, fps: float | None, num_frames: int | None,
                        min_frames: int, max_frames: int, start: int = 0) -> list[int]:
    """Qwen3VLVideoProcessor.sample_frames: evenly spaced indices over the window [start, start + total)."""
    if num_frames is None:
        num_frames = int(total / source_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total)
    num_frames = min(int(num_frames), total)
    return [start + int(i) for i in np.linspace(0, total - 1, num_frames).round().astype(int)]


def frame_timestamps(indices: list[int], source_fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3VLProcessor._calculate_timestamps: the mean time of each group of `temporal_patch_size` frames."""
    indices = list(indices)
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    times = [i / source_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def process_video(path: Path, video, image_processor, *, fps: float | None = None, num_frames: int | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None, min_frames: int | None = None,
                  max_frames: int | None = None, video_start: float | None = None,
                  video_end: float | None = None) -> ProcessedMedia:
    """Decode, sample and patchify one video as Qwen3VLVideoProcessor does (`video`: VideoSettings)."""
    from PIL import Image
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    from cosmos_train.data.media import probe_video

    total, source_fps, height, width = probe_video(path)
    start = 0 if video_start is None else max(0, math.ceil(video_start * source_fps - 1e-6))
    end = total if video_end is None else min(total, math.ceil(video_end * source_fps - 1e-6))
    window = end - start
    tp = video.temporal_patch_size
    if window < tp:
        raise BadSampleError(f"{path}: too short: {max(window, 0)} frame(s) in the window, a video needs at least "
                             f"{tp}", "too_short")
    indices = video_frame_indices(window, source_fps, fps=fps or video.fps if num_frames is None else None,
                                  num_frames=num_frames, min_frames=min_frames or video.min_frames,
                                  max_frames=max_frames or video.max_frames, start=start)
    if len(indices) < tp:
        indices = video_frame_indices(window, source_fps, fps=None, num_frames=tp, min_frames=tp, max_frames=tp,
                                      start=start)
    frames = _decode_frames(path, indices)
    factor = video.patch_size * video.merge_size
    lo, hi = int(min_pixels or video.min_pixels), int(max_pixels or video.max_pixels)
    if lo > hi:
        raise UserError(f"video min_pixels {lo} > max_pixels {hi}")
    h, w = smart_resize(num_frames=len(frames), height=frames[0].shape[0], width=frames[0].shape[1],
                        temporal_factor=tp, factor=factor, min_pixels=lo, max_pixels=hi)
    mean = np.asarray(video.image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(video.image_std, dtype=np.float32).reshape(1, 3, 1, 1)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])
    x = (resized.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 - mean) / std  # [T, C, H, W]
    pixel_values, (gt, gh, gw) = patchify_video(x, tp, video.patch_size, video.merge_size)
    m = video.merge_size
    return ProcessedMedia("video", pixel_values, (gt, gh, gw), gt * gh * gw // m**2,
                          frame_timestamps(indices, source_fps, tp), merge_size=m)


def patchify_video(x: np.ndarray, temporal_patch_size: int, patch_size: int,
                   merge_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] -> ([gt * gh * gw, C * tp * p * p], (gt, gh, gw)), Qwen3VLVideoProcessor.patchify's layout
    (odd frame counts are padded with the last frame)."""
    tp, p, m = temporal_patch_size, patch_size, merge_size
    if pad := -x.shape[0] % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    t, c, h, w = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    patches = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------
# Conversation -> tokens + labels
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedConversation:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long: token id on trained assistant tokens, -100 elsewhere (not shifted)
    pixel_values: torch.Tensor | None  # images, concatenated in prompt order
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None  # [n_videos, 3]
    source: str = ""
    truncated: bool = False
    text: str = ""  # the rendered prompt (placeholders unexpanded), for debugging

    @property
    def kinds(self) -> str:
        kinds = [k for k, g in (("image", self.image_grid_thw), ("video", self.video_grid_thw)) if g is not None]
        return "+".join(kinds) or "text"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("input_ids", "labels", "pixel_values", "image_grid_thw",
                                               "pixel_values_videos", "video_grid_thw", "source", "truncated")}


def _template_messages(messages: Sequence[dict], *, reasoning: bool, reasoning_prompt: str,
                       system_prompt: str | None, source: str, trained: set[int]) -> list[dict]:
    """Canonical messages -> what the chat template renders (media parts as bare {"type": ...})."""
    out = []
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        out.append({"role": "system", "content": system_prompt})
    for i, msg in enumerate(messages):
        parts = [dict(p) if p["type"] == "text" else {"type": p["type"]} for p in msg["content"]]
        if msg["role"] == "assistant":
            text = "".join(p["text"] for p in parts)
            if msg.get("reasoning") is not None:
                text = f"<think>\n{msg['reasoning'].strip()}\n</think>\n\n{text.lstrip()}"
            if reasoning and i in trained and "<think>" not in text:
                raise _bad(source, "reasoner.reasoning is on but this answer has no <think>...</think> "
                                   "(or reasoning_content)", "no_reasoning")
            out.append({"role": "assistant", "content": text})
            continue
        if reasoning and msg["role"] == "user":
            texts = [k for k, p in enumerate(parts) if p["type"] == "text"]
            if texts:
                parts[texts[-1]] = {"type": "text", "text": parts[texts[-1]]["text"] + reasoning_prompt}
            else:
                parts.append({"type": "text", "text": reasoning_prompt.lstrip()})
        if all(p["type"] == "text" for p in parts):
            out.append({"role": msg["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": msg["role"], "content": parts})
    return out


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer, tmessages: list[dict], full: str, which: list[int]) -> list[tuple[int, int]]:
    """Character spans of the chosen assistant turns' content + end-of-turn token in `full`.

    Rendering the conversation up to each assistant turn gives its span exactly (ChatML templates render
    prefix by prefix). Templates that rewrite earlier turns (e.g. drop old <think> blocks) are handled by
    finding each assistant content, in order, after its turn header.
    """
    eos = tokenizer.eos_token or "<|im_end|>"
    spans = []
    for i in which:
        prefix = _render(tokenizer, tmessages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, tmessages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            return _assistant_spans_by_search(tmessages, full, which, eos)
        end = len(upto)
        while end > len(prefix) and upto[end - 1] in "\n":  # the newline after <|im_end|> belongs to the template
            end -= 1
        if not upto[:end].endswith(eos):
            end = len(upto)
        spans.append((len(prefix), end))
    return spans


def _assistant_spans_by_search(tmessages: list[dict], full: str, which: list[int], eos: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for i, msg in enumerate(tmessages):
        if msg["role"] != "assistant":
            continue
        content = msg["content"]
        start = full.find(content, pos)
        if start < 0:
            if i in which:
                raise UserError("cannot locate an assistant turn in the chat template's rendering (the template "
                                "rewrites it); the loss mask cannot be built")
            continue
        end = start + len(content)
        if full.startswith(eos, end):
            end += len(eos)
        if i in which:
            spans.append((start, end))
        pos = end
    return spans


def encode_conversation(record: ConversationRecord, tokenizer, image_processor, video, cfg, *,
                        add_generation_prompt: bool = False, for_training: bool = True) -> EncodedConversation:
    """Tokenize one conversation (media processed, placeholders expanded, labels masked).

    `cfg` is the ReasonerConfig (loss_on, reasoning, reasoning_prompt, system_prompt, max_seq_len, truncate,
    media budgets); `video` the checkpoint's VideoSettings. For inference (`for_training=False`) the
    conversation may end with a user turn and no labels are made.
    """
    source = record.source
    messages = list(record.messages)
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(assistant_idx if cfg.loss_on == "all_turns" else assistant_idx[-1:]) if for_training else set()
    tmessages = _template_messages(messages, reasoning=cfg.reasoning, reasoning_prompt=cfg.reasoning_prompt,
                                   system_prompt=cfg.system_prompt, source=source, trained=trained)
    offset = len(tmessages) - len(messages)
    full = _render(tokenizer, tmessages, add_generation_prompt=add_generation_prompt)

    # media, in prompt order
    mcfg = cfg.media
    processed: list[ProcessedMedia] = []
    try:
        for part in record.media:
            if part["type"] == "image":
                processed.append(process_image(part["path"], image_processor,
                                               part.get("min_pixels") or mcfg.image_min_pixels,
                                               part.get("max_pixels") or mcfg.image_max_pixels))
            else:
                num_frames = part.get("num_frames") or (None if part.get("fps") else mcfg.video_num_frames)
                processed.append(process_video(
                    part["path"], video, image_processor, fps=part.get("fps") or mcfg.video_fps,
                    num_frames=num_frames, min_pixels=part.get("min_pixels") or mcfg.video_min_pixels,
                    max_pixels=part.get("max_pixels") or mcfg.video_max_pixels,
                    min_frames=mcfg.video_min_frames, max_frames=mcfg.video_max_frames,
                    video_start=part.get("video_start"), video_end=part.get("video_end")))
    except BadSampleError as err:
        raise BadSampleError(f"{source}: {err}", err.reason) from None
    n_placeholders = full.count(IMAGE_PLACEHOLDER) + full.count(VIDEO_PLACEHOLDER)
    if n_placeholders != len(processed):
        raise UserError(f"{source}: the chat template wrote {n_placeholders} image/video placeholders for "
                        f"{len(processed)} media parts")

    # segments: (text, trained?)
    spans = _assistant_spans(tokenizer, tmessages, full, [i + offset for i in sorted(trained)])
    segments, pos = [], 0
    for a, b in spans:
        segments.append((full[pos:a], False))
        segments.append((full[a:b], True))
        pos = b
    segments.append((full[pos:], False))

    ids: list[int] = []
    labels: list[int] = []
    blocks: list[tuple[int, int]] = []  # token ranges of each media block (never cut)
    media_iter = iter(processed)
    for text, is_target in segments:
        if not text:
            continue
        expanded, char_blocks, cursor = [], [], 0
        while True:
            hits = [(text.find(ph, cursor), ph) for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)]
            hits = [(h, ph) for h, ph in hits if h >= 0]
            if not hits:
                expanded.append(text[cursor:])
                break
            h, ph = min(hits)
            expanded.append(text[cursor:h])
            start = sum(len(s) for s in expanded)
            block = next(media_iter).placeholder()
            expanded.append(block)
            char_blocks.append((start, start + len(block)))
            cursor = h + len(ph)
        expanded_text = "".join(expanded)
        enc = tokenizer(expanded_text, add_special_tokens=False, return_offsets_mapping=True)
        seg_ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for cs, ce in char_blocks:
            inside = [k for k, (s, e) in enumerate(offsets) if e > cs and s < ce]
            blocks.append((len(ids) + inside[0], len(ids) + inside[-1] + 1))
        ids.extend(seg_ids)
        labels.extend(seg_ids if is_target else [IGNORE_INDEX] * len(seg_ids))

    # truncation: never inside an image/video block
    truncated = False
    keep_media = len(processed)
    if len(ids) > cfg.max_seq_len:
        if not cfg.truncate:
            raise _bad(source, f"conversation is {len(ids)} tokens, longer than reasoner.max_seq_len "
                               f"{cfg.max_seq_len} (set reasoner.truncate: true to cut it)", "too_long")
        cut = cfg.max_seq_len
        for a, b in blocks:
            if a < cut < b:
                logger.warning("%s: truncation at token %d would cut an image/video block; cutting before it "
                               "at token %d", source, cut, a)
                cut = a
        keep_media = sum(1 for a, _ in blocks if a < cut)
        ids, labels, truncated = ids[:cut], labels[:cut], True
        if for_training and all(lbl == IGNORE_INDEX for lbl in labels):
            raise _bad(source, f"conversation is longer than reasoner.max_seq_len {cfg.max_seq_len} and no "
                               "assistant token is left after truncation", "too_long")
        logger.warning("%s: truncated to %d tokens (reasoner.max_seq_len %d)", source, cut, cfg.max_seq_len)
    if for_training and not any(lbl != IGNORE_INDEX for lbl in labels):
        raise _bad(source, "no assistant token to train on", "no_assistant")

    kept = processed[:keep_media]
    images = [m for m in kept if m.kind == "image"]
    videos = [m for m in kept if m.kind == "video"]

    def cat(items):
        if not items:
            return None, None
        return (torch.from_numpy(np.concatenate([m.pixel_values for m in items], axis=0)),
                torch.tensor([m.grid_thw for m in items], dtype=torch.long))

    pixel_values, image_grid_thw = cat(images)
    pixel_values_videos, video_grid_thw = cat(videos)
    return EncodedConversation(
        input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
        pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw, source=source, truncated=truncated, text=full)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class ConversationDataset(Dataset):
    """Map-style dataset of encoded conversations (`EncodedConversation.as_dict()` dicts).

    Keys are dataset indices or the samplers' `SampleKey`s. `load(key)` always raises `BadSampleError`
    (message starting with ``file:line``) on a bad sample; `__getitem__` is `load` (the trainer's
    `MarkBadSamples` wrapper counts and skips bad samples, by `source_of(key)`).
    """

    def __init__(self, records: Sequence[ConversationRecord], tokenizer, image_processor, video, cfg):
        if len(records) == 0:
            raise UserError("ConversationDataset: no records (is the conversations file empty?)")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video = video
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _index(key) -> int:
        return int(key.index) if hasattr(key, "index") else int(key)

    def source_of(self, key) -> str:
        return self.records[self._index(key)].source

    def load(self, key) -> dict:
        enc = encode_conversation(self.records[self._index(key)], self.tokenizer, self.image_processor, self.video,
                                  self.cfg)
        return enc.as_dict()

    def __getitem__(self, key) -> dict:
        return self.load(key)


@dataclass
class ConversationDataInfo:
    """What `build_conversation_data` read (the trainer prints `summary()` and writes `to_json()`)."""

    path: str
    records: int
    kinds: dict  # "text" / "image" / "video" / "image+video" -> conversations
    skips: SkipCounter

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds.items(), key=lambda kv: -kv[1]))
        lines = [f"data: {self.records} conversations from {self.path} ({kinds})"]
        if self.skips.total:
            lines.append("  " + self.skips.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"path": self.path, "records": self.records, "kinds": dict(self.kinds),
                "skipped": dict(self.skips.by_reason)}


class ConversationData(NamedTuple):
    """What the trainer uses, as `GeneratorData`: the dataset, a resumable rank-sharded sampler of
    `SampleKey`s (``DataLoader(sampler=..., batch_size=None)``; ``sampler.start`` = keys consumed) and info."""

    dataset: ConversationDataset
    sampler: Any
    info: ConversationDataInfo


def build_conversation_dataset(cfg, counter: SkipCounter | None = None) -> ConversationDataset:
    """The reasoner dataset for a recipe: `data.manifest` read and validated (bad lines skipped and counted in
    `counter` with `data.skip_bad_samples`), with the checkpoint's tokenizer, image processor and video
    settings (loaded without the weights, so bad data fails before the model loads)."""
    from cosmos_train.models.reasoner import load_processor, resolve_reasoner_pretrained

    records = read_conversations(cfg.data.manifest, skip_bad=cfg.data.skip_bad_samples, counter=counter)
    if not records:
        raise UserError(f"data.manifest: {cfg.data.manifest} has no usable conversations")
    m = cfg.model
    tokenizer, image_processor, video = load_processor(
        resolve_reasoner_pretrained(m.pretrained), revision=m.revision, local_files_only=m.local_files_only,
        trust_remote_code=m.trust_remote_code)
    return ConversationDataset(records, tokenizer, image_processor, video, cfg.reasoner)


def build_conversation_data(cfg, skips: SkipCounter | None = None, rank: int = 0,
                            world_size: int = 1) -> ConversationData:
    """`build_generator_data`'s counterpart for reasoner recipes (one conversations JSONL, no buckets)."""
    from cosmos_train.data.buckets import BucketSampler

    skips = skips if skips is not None else SkipCounter()
    dataset = build_conversation_dataset(cfg, counter=skips)
    sampler = BucketSampler([0] * len(dataset), group_size=1, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                            rank=rank, world_size=world_size)
    kinds: dict = {}
    for rec in dataset.records:
        media = {p["type"] for p in rec.media}
        kind = "+".join(k for k in ("image", "video") if k in media) or "text"
        kinds[kind] = kinds.get(kind, 0) + 1
    info = ConversationDataInfo(path=str(cfg.data.manifest), records=len(dataset), kinds=kinds, skips=skips)
    return ConversationData(dataset, sampler, info)
