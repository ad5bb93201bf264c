"""Video (PyAV) and image (PIL) decoding to model-ready tensors.

Every frame goes through diffusers' own ``_preprocess_conditioning_image`` (the function
``Cosmos3OmniPipeline`` uses for its conditioning image): resize to *cover* (H, W) with
``scale = max(W / w, H / h)`` and ceil'd sizes, bilinear + antialias interpolation, centre crop
with ``round()`` offsets, then ``round().clamp(0, 255) / 127.5 - 1``. So training pixels match
what inference feeds the model, bit for bit.

Decoded frames are kept as the uint8 values that function rounds to (`resize_frames`, `VideoClip.frames`,
`load_image_info`): the training dataset hands uint8 through the DataLoader (a quarter of float32's bytes) and
`to_model_pixels` (``x / 127.5 - 1``: the same float32 operations on the same integers) makes the model's
[-1, 1] floats on the device, inside the encode step. `load_video` / `load_image` return those floats.

Frame sampling (videos): the clip is read from ``start_frame`` (inclusive) to ``end_frame``
(exclusive, default: end of file). Without a target ``fps`` (or one equal to the file's rate)
``num_frames`` consecutive frames are taken. With a different target ``fps`` frame ``k`` is the
source frame nearest to time ``k / fps`` (index ``start_frame + floor(k * src_fps / fps + 0.5)``,
assuming a constant frame rate); upsampling repeats frames. `load_video_clip` returns the indices
it used; a clip too short for the request raises ``BadSampleError(reason="too_short")``.
Anything that cannot be decoded raises ``BadSampleError(reason="undecodable")``, never a raw
PyAV/PIL exception; a file that exists but cannot be opened (permission denied) raises
``reason="unreadable"``; an image whose pixel mode cannot be converted to RGB raises
``reason="bad_image_mode"`` (CMYK, 16-bit, palette and alpha images are converted, see
`_to_rgb_array`).

Time windows: ``start_time``/``end_time`` (seconds, end exclusive) select the source frames whose
timestamp ``i / source_fps`` lies in ``[start_time, end_time)``, i.e. ``start_frame =
ceil(start_time * source_fps)`` and ``end_frame = ceil(end_time * source_fps)``.

Short clips (fewer frames in the window than the request needs at the target fps): with
``short_clips="skip"`` (default) ``BadSampleError(reason="too_short")``; ``"loop"`` repeats the
sampled in-window frames from the start (``f0 f1 f2 f0 f1 ...``); ``"pad"`` repeats the last
in-window sampled frame (``f0 f1 f2 f2 f2 ...``). Neither changes the frame rate: frames are never
silently resampled to fit. What was done is in the returned `VideoClip` (see `describe_clip`).

Media can be a path or an in-memory object with ``name`` and ``read() -> bytes`` (e.g.
`InMemoryMedia`, or a Hugging Face dataset bytes cell); PyAV and PIL decode it from a BytesIO.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from cosmos_train.errors import BadSampleError

logger = logging.getLogger(__name__)

_FPS_RTOL = 1e-3  # target fps within 0.1% of the source rate counts as "same rate"
SHORT_CLIP_MODES = ("skip", "loop", "pad")


class InMemoryMedia:
    """Media bytes with a name for messages (``name`` is what errors and logs show)."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self._data = data

    def read(self) -> bytes:
        return self._data

    def __repr__(self) -> str:
        return f"InMemoryMedia({self.name!r}, {len(self._data)} bytes)"


MediaSource = Union[str, os.PathLike, InMemoryMedia]


def _is_in_memory(src) -> bool:
    return not isinstance(src, (str, os.PathLike)) and hasattr(src, "read") and hasattr(src, "name")


def _media_name(src) -> str:
    return str(src.name) if _is_in_memory(src) else os.fspath(src)


def time_to_frame(seconds: float, source_fps: float) -> int:
    """Index of the first source frame whose timestamp ``i / source_fps`` is >= `seconds`."""
    return max(0, math.ceil(seconds * source_fps - 1e-6))


# --------------------------------------------------------------------------------------------
# resize-to-cover + centre crop (diffusers' own function)
# --------------------------------------------------------------------------------------------

_preprocess_fn = None


def _preprocess():
    """diffusers' `_preprocess_conditioning_image` (imported lazily: the pipeline module is slow to import)."""
    global _preprocess_fn
    if _preprocess_fn is None:
        from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image

        _preprocess_fn = _preprocess_conditioning_image
    return _preprocess_fn


def to_model_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [3, T, H, W] (0..255) -> float32 in [-1, 1] as `_preprocess_conditioning_image` ends: ``x / 127.5 - 1``
    in float32 (the same operations on the same integer values, so bit for bit its output). Float input is taken
    as already in [-1, 1] and returned unchanged. Call it where the pixels are used (on the device)."""
    if pixels.is_floating_point():
        return pixels
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected uint8 or float pixels, got {pixels.dtype}")
    return pixels.to(torch.float32) / 127.5 - 1.0


def resize_frames(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 RGB frames [T, h, w, 3] -> uint8 [3, T, height, width] (cover + centre crop), exactly the integers
    diffusers' function rounds to before it normalizes."""
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)
        if not frames.flags.writeable:  # e.g. np.asarray(PIL image)
            frames = frames.copy()
        frames = torch.from_numpy(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, h, w, 3], got {frames.dtype} {tuple(frames.shape)}")
    fn = _preprocess()
    # diffusers' output is round().clamp(0, 255) / 127.5 - 1: mapped back, its integers are recovered exactly (the
    # float error is ~1e-5, far from 0.5), so nothing of the reference function is re-implemented
    out = [((fn(f.permute(2, 0, 1), height=height, width=width) + 1.0) * 127.5).round().to(torch.uint8)
           for f in frames]  # each [1, 3, H, W]
    return torch.cat(out, dim=0).permute(1, 0, 2, 3).contiguous()


def preprocess_frames(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 RGB frames [T, h, w, 3] -> float32 [3, T, height, width] in [-1, 1] (cover + centre crop)."""
    return to_model_pixels(resize_frames(frames, height, width))


# --------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """What `load_video_clip` returns: the pixels and exactly how they were sampled."""

    frames: torch.Tensor  # uint8 [3, T, H, W] (`pixels`: the model's float32 in [-1, 1])
    source_fps: float  # the file's frame rate
    fps: float  # rate of the returned frames (the target fps, or source_fps when not resampled)
    frame_indices: list[int]  # source frame index of each returned frame
    resampled: bool  # True when frames were picked at a target fps != source fps
    window_start: int = 0  # first source frame of the window
    window_end: int | None = None  # exclusive end of the window, clamped to the file's length (None: unknown)
    window_frames: int | None = None  # source frames in the window (None: unknown)
    valid_frames: int = 0  # sampled frames inside the window (< len(frame_indices) when looped/padded)
    short_fill: str | None = None  # "loop" or "pad" when the window was too short, else None
    source_size: tuple[int, int] = (0, 0)  # the file's (height, width)

    @property
    def pixels(self) -> torch.Tensor:
        """float32 [3, T, H, W] in [-1, 1], as the model takes them."""
        return to_model_pixels(self.frames)


def _check_file(path: Path) -> None:
    from cosmos_train.data.manifest import check_readable

    problem = check_readable(path)
    if problem == "missing_file":
        if path.exists():
            raise BadSampleError(f"{path}: not a regular file", "missing_file")
        raise BadSampleError(f"{path}: file not found", "missing_file")
    if problem == "unreadable":
        raise BadSampleError(f"{path}: cannot read the file: permission denied", "unreadable")
    if path.stat().st_size == 0:
        raise BadSampleError(f"{path}: cannot decode, file is empty (0 bytes)", "undecodable")


def _source_handle(src) -> tuple[str, object]:
    """(name for messages, something PyAV / PIL can open: a path string or a BytesIO)."""
    if _is_in_memory(src):
        name = str(src.name)
        try:
            data = src.read()
        except BadSampleError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken dataset cell is a bad sample
            raise BadSampleError(f"{name}: cannot read the media bytes ({type(e).__name__}: {e})",
                                 "undecodable") from None
        if data is None or len(data) == 0:
            raise BadSampleError(f"{name}: cannot decode, media is empty (0 bytes)", "undecodable")
        return name, io.BytesIO(bytes(data))
    path = Path(src)
    _check_file(path)
    return os.fspath(path), os.fspath(path)


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    # FFmpegError covers InvalidDataError & co; PyAV also raises plain OSError/ValueError/
    # UnicodeDecodeError (bad metadata) on some broken files.
    return (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)


def open_container(handle, name: str, what: str = "video"):
    """`av.open` for reading; an unreadable or undecodable file is a `BadSampleError` naming it."""
    import av

    try:
        return av.open(handle, mode="r")
    except PermissionError:
        raise BadSampleError(f"{name}: cannot read the file: permission denied", "unreadable") from None
    except _av_errors() as e:
        raise BadSampleError(f"{name}: cannot decode {what} ({type(e).__name__}: {e})", "undecodable") from None


def _open_video(src):
    """-> (name, container) for a path or in-memory media."""
    name, handle = _source_handle(src)
    container = open_container(handle, name, "video")
    if not container.streams.video:
        container.close()
        raise BadSampleError(f"{name}: cannot decode video (no video stream)", "undecodable")
    return name, container


def _stream_fps(stream, path: Path) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    raise BadSampleError(f"{path}: cannot determine the video's frame rate", "undecodable")


def _count_frames(container, stream) -> int:
    n = 0
    for packet in container.demux(stream):
        if packet.size > 0:
            n += 1
    return n


def probe_video(path: MediaSource) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) of a video file, from container metadata when present
    (otherwise by counting packets, which does not decode)."""
    path, container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        height, width = stream.codec_context.height, stream.codec_context.width
        n = int(stream.frames or 0)
        if n <= 0:
            n = _count_frames(container, stream)
        if n <= 0 or height <= 0 or width <= 0:
            raise BadSampleError(f"{path}: cannot decode video (no frames)", "undecodable")
        return n, fps, height, width
    except _av_errors() as e:
        raise BadSampleError(f"{path}: cannot decode video ({type(e).__name__}: {e})", "undecodable") from None
    finally:
        container.close()


def sample_frame_indices(
    num_frames: int, source_fps: float, fps: float | None = None, start_frame: int = 0
) -> tuple[list[int], bool]:
    """Source frame indices for `num_frames` output frames, and whether that is a resampling.

    Same rate (``fps`` None or within 0.1% of ``source_fps``): consecutive frames from ``start_frame``.
    Otherwise output frame k is the source frame nearest to time k / fps:
    ``start_frame + floor(k * source_fps / fps + 0.5)`` (ties go to the later frame).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if fps is None or abs(fps - source_fps) <= _FPS_RTOL * source_fps:
        return [start_frame + k for k in range(num_frames)], False
    step = source_fps / fps
    return [start_frame + int(math.floor(k * step + 0.5 + 1e-9)) for k in range(num_frames)], True


def load_video_clip(
    path: MediaSource,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    start_frame: int = 0,
    end_frame: int | None = None,
    *,
    start_time: float | None = None,
    end_time: float | None = None,
    short_clips: str = "skip",
) -> VideoClip:
    """Decode `num_frames` frames (see module docstring for sampling, time windows and short clips)
    into [3, T, H, W] in [-1, 1]."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if short_clips not in SHORT_CLIP_MODES:
        raise ValueError(f"short_clips must be one of {', '.join(SHORT_CLIP_MODES)}, got {short_clips!r}")
    use_time = start_time is not None or end_time is not None
    if use_time and (start_frame or end_frame is not None):
        raise ValueError("give the window in frames or in seconds, not both")
    path, container = _open_video(path)
    try:
        stream = container.streams.video[0]
        source_fps = _stream_fps(stream, path)
        source_size = (int(stream.codec_context.height), int(stream.codec_context.width))
        window_desc = None
        if use_time:
            start_frame = time_to_frame(start_time or 0.0, source_fps)
            end_frame = time_to_frame(end_time, source_fps) if end_time is not None else None
            window_desc = (f"[{start_time or 0:g} s, " + (f"{end_time:g} s)" if end_time is not None else "end)")
                           + f" = frames [{start_frame}, {end_frame if end_frame is not None else 'end'})"
                           + f" at {source_fps:g} fps")
        indices, resampled = sample_frame_indices(num_frames, source_fps, fps, start_frame)
        how = (
            f"{num_frames} frames at {fps:g} fps (resampled from {source_fps:g} fps, "
            f"spanning source frames {indices[0]}..{indices[-1]})"
            if resampled
            else f"{num_frames} consecutive frames at {source_fps:g} fps"
        )
        meta_frames = int(stream.frames or 0) or None
        window = f"window {window_desc}" if window_desc else f"window [{start_frame}, {end_frame})"
        if end_frame is not None and end_frame <= start_frame:
            raise BadSampleError(f"{path}: too short: {window} holds no frame", "too_short")
        if short_clips == "skip" and end_frame is not None and indices[-1] >= end_frame:
            raise BadSampleError(
                f"{path}: too short: {window} has {end_frame - start_frame} frames, need {how}", "too_short"
            )
        # decode up to the last sampled frame that can lie in the window
        last = indices[-1] if end_frame is None else min(indices[-1], end_frame - 1)
        wanted = {i for i in indices if i <= last}
        decoded: dict[int, np.ndarray] = {}
        count = 0
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                decoded[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
        eof = count <= last
        if eof and short_clips == "skip":
            avail = max(count - start_frame, 0)
            raise BadSampleError(
                f"{path}: too short: {count} decodable frames, {avail} from start_frame {start_frame}; "
                f"need {how}",
                "too_short",
            )
    except _av_errors() as e:
        raise BadSampleError(f"{path}: cannot decode video ({type(e).__name__}: {e})", "undecodable") from None
    finally:
        container.close()

    # the window actually available: [start_frame, avail_end)
    avail_end = end_frame
    if eof:
        avail_end = count if end_frame is None else min(count, end_frame)
    valid = [i for i in indices if avail_end is None or i < avail_end]
    # for the report: without reaching the end of the file, the container's frame count bounds the window
    report_end = avail_end
    if not eof and meta_frames is not None:
        file_end = max(meta_frames, count)
        report_end = file_end if avail_end is None else min(avail_end, file_end)
    window_frames = max(report_end - start_frame, 0) if report_end is not None else None
    short_fill = None
    if len(valid) < num_frames:
        if not valid:
            raise BadSampleError(
                f"{path}: too short: {window} has no frame to {short_clips} "
                f"({count} decodable frames, start_frame {start_frame}); need {how}",
                "too_short",
            )
        short_fill = short_clips
        if short_clips == "loop":
            indices = [valid[k % len(valid)] for k in range(num_frames)]
        else:  # pad: repeat the last frame
            indices = valid + [valid[-1]] * (num_frames - len(valid))
    if resampled:
        logger.debug("%s: %s", path, how)
    return VideoClip(
        frames=resize_frames(np.stack([decoded[i] for i in indices]), height, width),
        source_fps=source_fps,
        fps=float(fps) if resampled else source_fps,
        frame_indices=indices,
        resampled=resampled,
        window_start=start_frame,
        window_end=report_end,
        window_frames=window_frames,
        valid_frames=len(valid),
        short_fill=short_fill,
        source_size=source_size,
    )


def describe_clip(name: str, clip: VideoClip) -> str:
    """One line saying what was done to a clip's rate and length, e.g.
    ``red_circle.mp4: 30 fps -> 24 fps (nearest-frame), 45 frames window -> 17 frames``."""
    n = len(clip.frame_indices)
    rate = (f"{clip.source_fps:g} fps -> {clip.fps:g} fps (nearest-frame)" if clip.resampled
            else f"{clip.source_fps:g} fps (kept)")
    window = f"{clip.window_frames} frames window" if clip.window_frames is not None else "window to end of file"
    text = f"{name}: {rate}, {window} -> {n} frames"
    if clip.short_fill:
        text += f" ({clip.valid_frames} in window, {'looped' if clip.short_fill == 'loop' else 'padded'} to {n})"
    return text


def load_video(
    path: MediaSource,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    start_frame: int = 0,
    end_frame: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """(pixels float32 [3, T, H, W] in [-1, 1], source fps). See `load_video_clip` for the
    sampled indices / effective fps and the keyword options."""
    clip = load_video_clip(path, num_frames, height, width, fps=fps, start_frame=start_frame, end_frame=end_frame,
                           **kwargs)
    return clip.pixels, clip.source_fps


# --------------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------------


def _to_rgb_array(img, path: Path) -> np.ndarray:
    """Any PIL image -> uint8 [h, w, 3] RGB.

    - EXIF orientation is applied.
    - Transparency (RGBA, LA, P/L/RGB with a transparency key) is composited onto white.
    - 16/32-bit integer modes (I;16*, I) are scaled to 8 bit (x / 257 for 16-bit data) instead of
      being clipped the way ``Image.convert("RGB")`` does; float mode F is taken as [0, 1] when
      its max <= 1, else [0, 255].
    - Images with an embedded ICC profile (e.g. CMYK JPEGs) are converted to sRGB through it
      when Pillow has LittleCMS; otherwise Pillow's plain conversion is used.
    """
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode

    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
        else:
            arr = arr.astype(np.float64)
            if mode.startswith("I;16") or arr.max() > 255:
                arr = arr / 257.0
        gray = np.clip(np.round(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)

    icc = img.info.get("icc_profile")
    if icc and mode in ("CMYK", "RGB", "RGBA"):
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(img, src, dst, outputMode="RGBA" if mode == "RGBA" else "RGB")
            if converted is not None:
                img, mode = converted, converted.mode
        except Exception as e:  # bad/unsupported profile: fall back to Pillow's plain conversion
            logger.debug("%s: ignoring ICC profile (%s)", path, e)

    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _open_image(src):
    """-> (name, loaded PIL image, its original mode). Caller closes the image."""
    from PIL import Image

    name, handle = _source_handle(src)
    try:
        img = Image.open(handle)
        img.load()
    except PermissionError:
        raise BadSampleError(f"{name}: cannot read the file: permission denied", "unreadable") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        # PIL.UnidentifiedImageError is an OSError; truncated files raise OSError on load()
        raise BadSampleError(f"{name}: cannot decode image ({type(e).__name__}: {e})", "undecodable") from None
    return name, img


def load_image_info(src: MediaSource, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int], str]:
    """(uint8 frames [3, 1, H, W], the image's own (height, width), its pixel mode)."""
    name, img = _open_image(src)
    with img:
        mode, size = img.mode, (img.height, img.width)
        try:
            arr = _to_rgb_array(img, Path(name))
        except (OSError, ValueError, EOFError) as e:
            raise BadSampleError(f"{name}: cannot convert image mode {mode!r} to RGB ({type(e).__name__}: {e})",
                                 "bad_image_mode") from None
    return resize_frames(arr[None], height, width), size, mode


def probe_image(src: MediaSource) -> tuple[int, int]:
    """(height, width) of an image, from its header (EXIF rotation applied)."""
    from PIL import Image

    name, handle = _source_handle(src)
    try:
        with Image.open(handle) as img:
            h, w = img.height, img.width
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - unreadable EXIF: no rotation
                orientation = 1
    except PermissionError:
        raise BadSampleError(f"{name}: cannot read the file: permission denied", "unreadable") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise BadSampleError(f"{name}: cannot decode image ({type(e).__name__}: {e})", "undecodable") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_image(path: MediaSource, height: int, width: int) -> torch.Tensor:
    """Image file -> float32 [3, 1, H, W] in [-1, 1] (cover + centre crop, as inference does).
    Multi-frame images (animated GIF/WebP, multi-page TIFF) use their first frame."""
    return to_model_pixels(load_image_info(path, height, width)[0])
