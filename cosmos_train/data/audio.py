"""A clip's own soundtrack (PyAV) for exactly the window its frames cover, as the sound tokenizer wants it.

Output: float32 ``[2, n]`` in [-1, 1] at ``sample_rate`` (48 kHz, the rate of Cosmos 3's
``Cosmos3AVAEAudioTokenizer``), ``n = int(num_frames / fps * sample_rate)`` -- the length
``Cosmos3OmniPipeline.prepare_latents`` gives a clip of ``num_frames`` frames at ``fps``. Resampling is
PyAV's ``AudioResampler`` (libswresample). Mono is duplicated to both channels (not the -3 dB
upmix libswresample would do); more than two channels are downmixed by libswresample's standard matrix.
Audio missing at either end of the window (the track starts late or ends early) is zeros.

Window convention (matches `cosmos_train.data.media`): source video frame ``i`` is at time
``i / source_fps`` measured from the video stream's first frame, so a video window starting at source
frame ``start_frame`` starts at ``start_time = start_frame / source_fps``, and ``num_frames`` frames at
``fps`` (the rate of the returned frames, i.e. ``VideoClip.fps``) last ``num_frames / fps`` seconds.
Audio timestamps are taken relative to the video stream's start time (files without video: to 0), so
an mp4 whose audio and video start at different times stays in sync. `audio_window_for(clip)` turns the
`VideoClip` that `load_video_clip` returned into these arguments (plus ``end_time``: the window's
exclusive end, after which nothing is taken, so a manifest ``end_frame`` is honoured); `load_clip_audio`
does both. When the video was looped or padded (``short_clips``) the audio is NOT looped: past the
window's end it is silence.

A file without an audio stream gives ``None``; an audio stream that cannot be decoded raises
``BadSampleError(reason="undecodable")`` naming the file.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from cosmos_train.data.media import MediaSource, VideoClip, _av_errors, _source_handle, open_container
from cosmos_train.errors import BadSampleError

SAMPLE_RATE = 48000
_SEEK_MIN_S = 5.0  # windows starting later than this seek instead of decoding from the start
_SEEK_PREROLL_S = 1.0  # seek this far before the window (decoder pre-roll, keyframe granularity)
_DECODE_MARGIN_S = 0.1  # stop decoding this far past the window's end


def audio_num_samples(num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples of audio for ``num_frames`` frames at ``fps``: ``int(num_frames / fps * sample_rate)``
    (the pipeline's ``prepare_latents`` formula)."""
    return int(num_frames / fps * sample_rate)


class AudioWindow(NamedTuple):
    """The audio window matching a video window (arguments of `load_audio`)."""

    start_time: float  # seconds from the video's first frame: start_frame / source_fps
    num_frames: int  # frames returned by the video loader
    fps: float  # their rate (the target fps, or the source fps when not resampled)
    end_time: float | None  # exclusive end of the video window in seconds (None: end of file)


def audio_window_for(clip: VideoClip) -> AudioWindow:
    """The audio window of a `VideoClip` from `load_video_clip` (same start, same duration)."""
    end_time = clip.window_end / clip.source_fps if clip.window_end is not None else None
    return AudioWindow(clip.window_start / clip.source_fps, len(clip.frame_indices), clip.fps, end_time)


def load_clip_audio(path: MediaSource, clip: VideoClip, sample_rate: int = SAMPLE_RATE) -> torch.Tensor | None:
    """`load_audio` for exactly the window `clip` (from `load_video_clip` on the same file) covers."""
    w = audio_window_for(clip)
    return load_audio(path, w.start_time, w.num_frames, w.fps, sample_rate, end_time=w.end_time)


def _stream_start(stream) -> float | None:
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def _decode(name: str, handle, t_from: float, t_to: float, sample_rate: int, seek: bool):
    """Decode the first audio stream around [t_from, t_to) (seconds relative to the video start).

    -> None (no audio stream), or (waveform float32 [2, m] at sample_rate, time of its sample 0).
    Returns (..., None) for the time when the decoded frames carry no timestamps."""
    import av

    if hasattr(handle, "seek"):
        handle.seek(0)
    container = open_container(handle, name, "audio")
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        video_t0 = _stream_start(container.streams.video[0]) if container.streams.video else None
        video_t0 = video_t0 or 0.0
        channels = stream.codec_context.channels
        if channels < 1:
            raise BadSampleError(f"{name}: cannot decode audio (stream has no channels)", "undecodable")
        resampler = av.AudioResampler(format="fltp", layout="mono" if channels == 1 else "stereo", rate=sample_rate)
        if seek:
            target = t_from + video_t0 - _SEEK_PREROLL_S
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        stop_at = t_to + video_t0 + _DECODE_MARGIN_S
        decoded_any = False
        for frame in container.decode(stream):
            decoded_any = True
            if first_time is None:
                first_time = float(frame.pts * frame.time_base) if frame.pts is not None else math.nan
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
            if frame.pts is not None and float(frame.pts * frame.time_base) > stop_at:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    except BadSampleError:
        raise
    except _av_errors() as e:
        raise BadSampleError(f"{name}: cannot decode audio ({type(e).__name__}: {e})", "undecodable") from None
    finally:
        container.close()
    if not decoded_any or not chunks:
        raise BadSampleError(f"{name}: cannot decode audio (the audio stream has no decodable samples)",
                             "undecodable")
    wave = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if wave.shape[0] == 1:
        wave = np.repeat(wave, 2, axis=0)
    t0 = None if first_time is None or math.isnan(first_time) else first_time - video_t0
    return wave, t0


def load_audio(
    path: MediaSource,
    start_time: float,
    num_frames: int,
    fps: float,
    sample_rate: int = SAMPLE_RATE,
    *,
    end_time: float | None = None,
) -> torch.Tensor | None:
    """The file's first audio stream for [start_time, start_time + num_frames / fps) as float32
    [2, int(num_frames / fps * sample_rate)] in [-1, 1], or None when the file has no audio stream.

    ``start_time`` is seconds from the video's first frame (``start_frame / source_fps``, see the
    module docstring); samples at or after ``end_time`` (when given) are zeros."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if start_time < 0 or not math.isfinite(start_time):
        raise ValueError(f"start_time must be >= 0, got {start_time!r}")
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    n = audio_num_samples(num_frames, fps, sample_rate)
    t_to = start_time + n / sample_rate
    name, handle = _source_handle(path)
    seek = start_time > _SEEK_MIN_S
    got = _decode(name, handle, start_time, t_to, sample_rate, seek)
    if got is None:
        return None
    wave, t0 = got
    if seek and (t0 is None or t0 > start_time):  # the seek landed past the window: decode from the start
        wave, t0 = _decode(name, handle, start_time, t_to, sample_rate, False)
    if t0 is None:  # no timestamps: the decoded stream starts at the video's start
        t0 = 0.0
    offset = int(round((start_time - t0) * sample_rate))  # index in `wave` of the window's first sample
    out = np.zeros((2, n), dtype=np.float32)
    lo, hi = max(offset, 0), min(offset + n, wave.shape[1])
    if hi > lo:
        out[:, lo - offset:hi - offset] = wave[:, lo:hi]
    if end_time is not None:
        keep = max(0, math.ceil((end_time - start_time) * sample_rate - 1e-6))
        out[:, keep:] = 0.0
    np.clip(out, -1.0, 1.0, out=out)
    return torch.from_numpy(out)
