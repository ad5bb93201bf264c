#!/usr/bin/env python
"""Generate the small bundled sample data set (clips, images and manifest.jsonl).

Usage::

    python data/make_samples.py [OUT_DIR]           # default: data/samples next to this script
    python data/make_samples.py --sound [OUT_DIR]   # only the clips with sound (clips_sound/, manifest_sound.jsonl)

Every scene is drawn with numpy from fixed parameters (random jitter comes from fixed seeds), so
re-running gives the same pixels. Clips are H.264 (libx264, yuv420p, 24 fps, single-threaded
encoder so the bitstream is reproducible with the same FFmpeg/x264 build); images are PNG.
Each caption says what moves and in which direction, so a finetune has a learnable signal.

``--sound`` writes the small sound set instead: 64x64 clips whose soundtrack follows the picture (AAC,
48 kHz stereo, muxed into the mp4), one clip without an audio stream, and ``manifest_sound.jsonl``.
The soundtracks are synthesized with numpy; see `SOUND_CLIPS`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image

FPS = 24

# --------------------------------------------------------------------------------------------
# drawing helpers (float RGB canvases in [0, 1], anti-aliased shapes via signed distances)
# --------------------------------------------------------------------------------------------


def _canvas(height: int, width: int, color: tuple[float, float, float]) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = np.asarray(color, dtype=np.float32)
    return img


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _blend(img: np.ndarray, coverage: np.ndarray, color: tuple[float, float, float]) -> None:
    a = np.clip(coverage, 0.0, 1.0)[..., None]
    img[:] = img * (1.0 - a) + np.asarray(color, dtype=np.float32) * a


def _circle(img, cy, cx, r, color):
    ys, xs = _grid(*img.shape[:2])
    dist = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
    _blend(img, r - dist + 0.5, color)


def _box(img, cy, cx, half_h, half_w, color, angle=0.0):
    """Filled rectangle centred at (cy, cx), rotated by `angle` radians (counter-clockwise on screen)."""
    ys, xs = _grid(*img.shape[:2])
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c - dy * s  # along the box's width axis
    v = dx * s + dy * c  # along the box's height axis
    cov_u = np.clip(half_w - np.abs(u) + 0.5, 0, 1)
    cov_v = np.clip(half_h - np.abs(v) + 0.5, 0, 1)
    _blend(img, cov_u * cov_v, color)


def _triangle(img, cy, cx, size, color):
    """Upward-pointing equilateral-ish triangle centred at (cy, cx)."""
    ys, xs = _grid(*img.shape[:2])
    top = (cy - size, cx)
    left = (cy + size * 0.6, cx - size)
    right = (cy + size * 0.6, cx + size)

    def edge(p, q):  # signed distance to line p->q, positive inside (clockwise winding on screen)
        (py, px), (qy, qx) = p, q
        ny, nx = qx - px, -(qy - py)
        norm = math.hypot(ny, nx)
        return ((ys - py) * ny + (xs - px) * nx) / norm

    d = np.minimum(np.minimum(edge(top, right), edge(right, left)), edge(left, top))
    _blend(img, d + 0.5, color)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------

DARK_BLUE = (0.05, 0.08, 0.30)
RED = (0.90, 0.10, 0.10)
GREEN = (0.10, 0.80, 0.20)
YELLOW = (0.98, 0.85, 0.10)
WHITE = (0.95, 0.95, 0.95)
SKY = (0.55, 0.75, 0.95)
GROUND = (0.35, 0.55, 0.25)
ORANGE = (1.00, 0.55, 0.05)
TEAL = (0.05, 0.45, 0.45)
MAGENTA = (0.85, 0.15, 0.75)
LIGHT_GRAY = (0.80, 0.80, 0.80)
CHARCOAL = (0.12, 0.12, 0.14)


def red_circle(t: int, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _canvas(h, w, DARK_BLUE)
    r = 28.0
    cx = r + 8 + (w - 2 * r - 16) * t / (n - 1)
    _circle(img, h / 2, cx, r, RED)
    return img


def green_square(t, n, h, w, rng):
    img = _canvas(h, w, CHARCOAL)
    half = 26.0
    cy = half + 8 + (h - 2 * half - 16) * t / (n - 1)
    _box(img, cy, w / 2, half, half, GREEN)
    return img


def yellow_ball_bounce(t, n, h, w, rng):
    img = _canvas(h, w, SKY)
    floor_y = h - 32
    img[floor_y:] = np.asarray(GROUND, dtype=np.float32)
    r = 18.0
    # two full bounces: |cos| gives a ball falling to the floor and rising again
    phase = t / (n - 1) * 2.0 * math.pi
    height_above = (h * 0.55) * abs(math.cos(phase))
    cy = floor_y - r - height_above
    cx = w / 2 - 56 + 112 * t / (n - 1)  # stays inside a centre square crop
    _circle(img, cy, cx, r, YELLOW)
    return img


def white_bar_rotating(t, n, h, w, rng):
    img = _canvas(h, w, (0.0, 0.0, 0.0))
    # clockwise on screen = decreasing angle in our (y-down) convention
    angle = -math.pi * t / (n - 1)
    _box(img, h / 2, w / 2, 8.0, h * 0.38, WHITE, angle=angle)
    return img


def orange_square_growing(t, n, h, w, rng):
    img = _canvas(h, w, TEAL)
    half = 10.0 + (h * 0.42 - 10.0) * t / (n - 1)
    _box(img, h / 2, w / 2, half, half, ORANGE)
    return img


def magenta_triangle_diagonal(t, n, h, w, rng):
    img = _canvas(h, w, LIGHT_GRAY)
    size = 22.0
    s = t / (n - 1)
    cx = 36 + (w - 72) * s
    cy = (h - 36) - (h - 72) * s
    _triangle(img, cy, cx, size, MAGENTA)
    return img


def still_red_circle(h, w, rng):
    img = _canvas(h, w, DARK_BLUE)
    _circle(img, h / 2, w / 2, 40.0, RED)
    return img


def still_green_square_corner(h, w, rng):
    img = _canvas(h, w, CHARCOAL)
    _box(img, 48, 48, 30, 30, GREEN)
    return img


def still_sun_over_field(h, w, rng):
    img = _canvas(h, w, SKY)
    img[int(h * 0.62):] = np.asarray(GROUND, dtype=np.float32)
    _circle(img, h * 0.28, w * 0.5, 26.0, YELLOW)
    # a few fixed-seed tufts of darker grass so the field is not flat
    for _ in range(12):
        y = rng.uniform(h * 0.68, h - 8)
        x = rng.uniform(8, w - 8)
        _box(img, y, x, 4.0, 1.5, (0.22, 0.40, 0.15))
    return img


@dataclass(frozen=True)
class Clip:
    name: str
    draw: Callable[..., np.ndarray]
    height: int
    width: int
    frames: int
    caption: str
    seed: int
    start_frame: int | None = None
    end_frame: int | None = None


@dataclass(frozen=True)
class Still:
    name: str
    draw: Callable[..., np.ndarray]
    height: int
    width: int
    caption: str
    seed: int


CLIPS = [
    Clip("red_circle", red_circle, 256, 256, 33,
         "A red circle moves from left to right across a dark blue background.", seed=1),
    Clip("green_square", green_square, 256, 256, 33,
         "A green square moves down from the top to the bottom of a dark gray background.", seed=2),
    Clip("yellow_ball_bounce", yellow_ball_bounce, 192, 320, 33,
         "A yellow ball bounces twice on green grass under a light blue sky while drifting to the right.",
         seed=3),
    Clip("white_bar_rotating", white_bar_rotating, 256, 256, 33,
         "A white bar rotates clockwise around the center of a black background.", seed=4),
    Clip("orange_square_growing", orange_square_growing, 192, 320, 33,
         "An orange square grows larger in the center of a teal background.", seed=5),
    # 41 frames on disk, the manifest uses the window [4, 37) -> 33 frames
    Clip("magenta_triangle_diagonal", magenta_triangle_diagonal, 256, 256, 41,
         "A magenta triangle moves diagonally from the bottom left to the top right of a light gray background.",
         seed=6, start_frame=4, end_frame=37),
]

STILLS = [
    Still("red_circle_still", still_red_circle, 256, 256,
          "A red circle in the center of a dark blue background.", seed=11),
    Still("green_square_corner", still_green_square_corner, 256, 256,
          "A green square in the top left corner of a dark gray background.", seed=12),
    Still("sun_over_field", still_sun_over_field, 192, 320,
          "A yellow sun in a light blue sky above a green grassy field.", seed=13),
]


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> planar yuv420p (BT.601, limited range) as the (H*3/2, W) array PyAV expects.

    Done in numpy instead of letting swscale convert, because swscale's SIMD paths made the
    encoded bytes depend on buffer alignment (i.e. differ from run to run).
    """
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128.0 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128.0 + 112.0 * r - 93.786 * g - 18.214 * b

    def sub(c):  # 2x2 box average (H and W are even)
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), sub(cb).reshape(-1), sub(cr).reshape(-1)]
    out = np.clip(np.round(np.concatenate(planes)), 0, 255).astype(np.uint8)
    return out.reshape(h * 3 // 2, w)


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Write uint8 HxWx3 RGB frames as H.264 / yuv420p MP4, reproducibly (single-threaded x264)."""
    write_mp4_with_audio(path, frames, None, fps)


def make_samples(out_dir: Path) -> list[dict]:
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for clip in CLIPS:
        rng = np.random.default_rng(clip.seed)
        frames = [_to_uint8(clip.draw(t, clip.frames, clip.height, clip.width, rng)) for t in range(clip.frames)]
        rel = f"clips/{clip.name}.mp4"
        write_mp4(out_dir / rel, frames)
        rec: dict = {"path": rel, "caption": clip.caption, "fps": FPS}
        if clip.start_frame is not None:
            rec["start_frame"] = clip.start_frame
        if clip.end_frame is not None:
            rec["end_frame"] = clip.end_frame
        records.append(rec)
    for still in STILLS:
        rng = np.random.default_rng(still.seed)
        rel = f"images/{still.name}.png"
        Image.fromarray(_to_uint8(still.draw(still.height, still.width, rng)), mode="RGB").save(
            out_dir / rel, optimize=True
        )
        records.append({"path": rel, "caption": still.caption})
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records


# --------------------------------------------------------------------------------------------
# clips with sound (--sound): the soundtrack follows the picture
# --------------------------------------------------------------------------------------------

SOUND_RATE = 48000
SOUND_SIZE = 64
FLASH_FRAMES = (4, 12, 20, 28)  # flashing_square_clicks: the square is lit on these frames (+1) with a click
CLICK_LEN = 240  # 5 ms
CLICK_HZ = 2000.0


def _n_samples(frames: int, fps: int = FPS) -> int:
    return int(frames / fps * SOUND_RATE)


def _disc_x(t: int, n: int, w: int) -> float:
    r = 10.0
    return r + 4 + (w - 2 * r - 8) * t / (n - 1)


def disc_moving(t, n, h, w, rng):
    img = _canvas(h, w, (0.0, 0.0, 0.0))
    _circle(img, h / 2, _disc_x(t, n, w), 10.0, WHITE)
    return img


def rising_panning_tone(frames: int, rng: np.random.Generator) -> np.ndarray:
    """A tone gliding up from 300 Hz to 1200 Hz whose stereo position follows the disc (left -> right)."""
    n = _n_samples(frames)
    s = np.arange(n) / n  # 0 -> 1 over the clip, like the disc's x
    freq = 300.0 * 4.0 ** s  # exponential glide, two octaves
    phase = 2 * np.pi * np.cumsum(freq) / SOUND_RATE
    tone = 0.5 * np.sin(phase)
    pan = s * (math.pi / 2)  # equal-power pan: left at the start, right at the end
    return np.stack([tone * np.cos(pan), tone * np.sin(pan)]).astype(np.float32)


def flashing_square(t, n, h, w, rng):
    img = _canvas(h, w, CHARCOAL)
    lit = any(f <= t < f + 2 for f in FLASH_FRAMES)
    _box(img, h / 2, w / 2, 14.0, 14.0, YELLOW if lit else (0.25, 0.25, 0.28))
    return img


def clicks_on_flashes(frames: int, rng: np.random.Generator) -> np.ndarray:
    """A 5 ms 2 kHz click at the first sample of each flash frame (both channels), silence elsewhere."""
    out = np.zeros((2, _n_samples(frames)), dtype=np.float32)
    tt = np.arange(CLICK_LEN) / SOUND_RATE
    click = 0.8 * np.sin(2 * np.pi * CLICK_HZ * tt) * np.exp(-tt * 800.0)
    for f in FLASH_FRAMES:
        at = _n_samples(f)
        out[:, at:at + CLICK_LEN] = click
    return out


def pulsing_circle(t, n, h, w, rng):
    img = _canvas(h, w, TEAL)
    _circle(img, h / 2, w / 2, 8.0 + 16.0 * _pulse(t / FPS, n / FPS), ORANGE)
    return img


def _pulse(seconds, duration):
    """0 -> 1 -> 0 once over the clip (a raised cosine)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.asarray(seconds) / duration)


def hum_with_pulse(frames: int, rng: np.random.Generator) -> np.ndarray:
    """A 220 Hz hum (centred) that swells and fades with the circle's size, with a little noise."""
    n = _n_samples(frames)
    tt = np.arange(n) / SOUND_RATE
    hum = np.sin(2 * np.pi * 220.0 * tt) + 0.3 * np.sin(2 * np.pi * 440.0 * tt)
    env = 0.05 + 0.5 * _pulse(tt, frames / FPS)
    mono = env * hum / 1.3 + 0.01 * rng.standard_normal(n)
    return np.stack([mono, mono]).astype(np.float32)


def bar_falling(t, n, h, w, rng):
    img = _canvas(h, w, LIGHT_GRAY)
    _box(img, 8 + (h - 16) * t / (n - 1), w / 2, 4.0, 24.0, MAGENTA)
    return img


@dataclass(frozen=True)
class SoundClip:
    name: str
    draw: Callable[..., np.ndarray]
    sound: Callable[[int, np.random.Generator], np.ndarray] | None  # (frames, rng) -> [2, n]; None: no audio
    frames: int
    caption: str
    seed: int


SOUND_CLIPS = [
    SoundClip("disc_rising_tone", disc_moving, rising_panning_tone, 33,
              "A white disc moves from left to right across a black background while a rising tone moves "
              "from the left speaker to the right.", seed=21),
    SoundClip("flashing_square_clicks", flashing_square, clicks_on_flashes, 33,
              "A gray square flashes yellow four times on a dark background, with a click on every flash.",
              seed=22),
    SoundClip("pulsing_circle_hum", pulsing_circle, hum_with_pulse, 17,
              "An orange circle grows and shrinks on a teal background while a low hum swells and fades.",
              seed=23),
    SoundClip("falling_bar_silent", bar_falling, None, 17,
              "A magenta bar falls from the top to the bottom of a light gray background, in silence.", seed=24),
]


def write_mp4_with_audio(path: Path, frames: list[np.ndarray], audio: np.ndarray | None, fps: int = FPS,
                         sample_rate: int = SOUND_RATE, bit_rate: int = 128000) -> None:
    """`write_mp4` plus an AAC stereo track (float [2, n] in [-1, 1]) muxed in; `audio=None`: video only."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "20", "preset": "medium", "threads": "1"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "stereo"
            astream.bit_rate = bit_rate
            astream.codec_context.thread_count = 1
        chunk = 1024
        sent = 0
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(arr), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
            if astream is None:
                continue
            # audio up to the end of this frame, in whole encoder frames (interleaved with the video)
            until = audio.shape[1] if i == len(frames) - 1 else int((i + 1) / fps * sample_rate) // chunk * chunk
            while sent < until:
                part = np.ascontiguousarray(audio[:, sent:min(sent + chunk, until)], dtype=np.float32)
                aframe = av.AudioFrame.from_ndarray(part, format="fltp", layout="stereo")
                aframe.sample_rate = sample_rate
                aframe.pts = sent
                for packet in astream.encode(aframe):
                    container.mux(packet)
                sent += part.shape[1]
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            for packet in astream.encode():
                container.mux(packet)


def make_sound_samples(out_dir: Path) -> list[dict]:
    """Write clips_sound/*.mp4 and manifest_sound.jsonl under `out_dir` (nothing else)."""
    out_dir = Path(out_dir)
    (out_dir / "clips_sound").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for clip in SOUND_CLIPS:
        rng = np.random.default_rng(clip.seed)
        frames = [_to_uint8(clip.draw(t, clip.frames, SOUND_SIZE, SOUND_SIZE, rng)) for t in range(clip.frames)]
        audio = None
        if clip.sound is not None:
            audio = np.clip(clip.sound(clip.frames, rng), -1.0, 1.0)
        rel = f"clips_sound/{clip.name}.mp4"
        write_mp4_with_audio(out_dir / rel, frames, audio)
        records.append({"path": rel, "caption": clip.caption, "fps": FPS})
    with open(out_dir / "manifest_sound.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sound = "--sound" in argv
    argv = [a for a in argv if a != "--sound"]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent / "samples"
    records = make_sound_samples(out_dir) if sound else make_samples(out_dir)
    total = 0
    for rec in records:
        size = (out_dir / rec["path"]).stat().st_size
        total += size
        print(f"{size:8d}  {rec['path']}")
    manifest = "manifest_sound.jsonl" if sound else "manifest.jsonl"
    print(f"{total:8d}  total ({len(records)} samples) -> {out_dir / manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
