"""Video (PyAV) and image (PIL) decoding to model-ready tensors.

Every frame goes through diffusers' own ``_preprocess_conditioning_image`` (the function
``Cosmos3OmniPipeline`` uses for its conditioning image): resize to *cover* (H, W) with
``scale = max(W / w, H / h)`` and ceil'd sizes, bilinear + antialias interpolation, centre crop
with ``round()`` offsets, then ``round().clamp(0, 255) / 127.5 - 1``. So training pixels match
what inference feeds the model, bit for bit.

Frame sampling (videos): the clip is read from ``start_frame`` (inclusive) to ``end_frame``
(exclusive, default: end of file). Without a target ``fps`` (or one equal to the file's rate)
``num_frames`` consecutive frames are taken. With a different target ``fps`` frame ``k`` is the
source frame nearest to time ``k / fps`` (index ``start_frame + floor(k * src_fps / fps + 0.5)``,
assuming a constant frame rate); upsampling repeats frames. `load_video_clip` returns the indices
it used; a clip too short for the request raises ``BadSampleError(reason="too_short")``.
Anything that cannot be decoded raises ``BadSampleError(reason="undecodable")``, never a raw
PyAV/PIL exception.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosmos_train.errors import BadSampleError

logger = logging.getLogger(__name__)

_FPS_RTOL = 1e-3  # target fps within 0.1% of the source rate counts as "same rate"


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


def preprocess_frames(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 RGB frames [T, h, w, 3] -> float32 [3, T, height, width] in [-1, 1] (cover + centre crop)."""
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)
        if not frames.flags.writeable:  # e.g. np.asarray(PIL image)
            frames = frames.copy()
        frames = torch.from_numpy(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, h, w, 3], got {frames.dtype} {tuple(frames.shape)}")
    fn = _preprocess()
    out = [fn(f.permute(2, 0, 1), height=height, width=width) for f in frames]  # each [1, 3, H, W]
    return torch.cat(out, dim=0).permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """What `load_video_clip` returns: the pixels and exactly how they were sampled."""

    pixels: torch.Tensor  # float32 [3, T, H, W] in [-1, 1]
    source_fps: float  # the file's frame rate
    fps: float  # rate of the returned frames (the target fps, or source_fps when not resampled)
    frame_indices: list[int]  # source frame index of each returned frame
    resampled: bool  # True when frames were picked at a target fps != source fps


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BadSampleError(f"{path}: file not found", "missing_file")
    if not path.is_file():
        raise BadSampleError(f"{path}: not a regular file", "missing_file")
    if path.stat().st_size == 0:
        raise BadSampleError(f"{path}: cannot decode, file is empty (0 bytes)", "undecodable")


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    # FFmpegError covers InvalidDataError & co; PyAV also raises plain OSError/ValueError/
    # UnicodeDecodeError (bad metadata) on some broken files.
    return (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)


def _open_video(path: Path):
    import av

    _check_file(path)
    try:
        container = av.open(os.fspath(path), mode="r")
    except _av_errors() as e:
        raise BadSampleError(f"{path}: cannot decode video ({type(e).__name__}: {e})", "undecodable") from None
    if not container.streams.video:
        container.close()
        raise BadSampleError(f"{path}: cannot decode video (no video stream)", "undecodable")
    return container


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


def probe_video(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) of a video file, from container metadata when present
    (otherwise by counting packets, which does not decode)."""
    path = Path(path)
    container = _open_video(path)
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
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    start_frame: int = 0,
    end_frame: int | None = None,
) -> VideoClip:
    """Decode `num_frames` frames (see module docstring for sampling) into [3, T, H, W] in [-1, 1]."""
    path = Path(path)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        source_fps = _stream_fps(stream, path)
        indices, resampled = sample_frame_indices(num_frames, source_fps, fps, start_frame)
        how = (
            f"{num_frames} frames at {fps:g} fps (resampled from {source_fps:g} fps, "
            f"spanning source frames {indices[0]}..{indices[-1]})"
            if resampled
            else f"{num_frames} consecutive frames at {source_fps:g} fps"
        )
        last = indices[-1]
        if end_frame is not None and last >= end_frame:
            raise BadSampleError(
                f"{path}: too short: window [{start_frame}, {end_frame}) has {end_frame - start_frame} frames, "
                f"need {how}",
                "too_short",
            )
        wanted = set(indices)
        decoded: dict[int, np.ndarray] = {}
        count = 0
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                decoded[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
        if count <= last:
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

    if resampled:
        logger.debug("%s: %s", path, how)
    frames = np.stack([decoded[i] for i in indices])
    pixels = preprocess_frames(frames, height, width)
    return VideoClip(
        pixels=pixels,
        source_fps=source_fps,
        fps=float(fps) if resampled else source_fps,
        frame_indices=indices,
        resampled=resampled,
    )


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    start_frame: int = 0,
    end_frame: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(pixels float32 [3, T, H, W] in [-1, 1], source fps). See `load_video_clip` for the
    sampled indices / effective fps."""
    clip = load_video_clip(path, num_frames, height, width, fps=fps, start_frame=start_frame, end_frame=end_frame)
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


def load_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """Image file -> float32 [3, 1, H, W] in [-1, 1] (cover + centre crop, as inference does).
    Multi-frame images (animated GIF/WebP, multi-page TIFF) use their first frame."""
    from PIL import Image

    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            arr = _to_rgb_array(img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        # PIL.UnidentifiedImageError is an OSError; truncated files raise OSError on load()
        raise BadSampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})", "undecodable") from None
    return preprocess_frames(arr[None], height, width)
