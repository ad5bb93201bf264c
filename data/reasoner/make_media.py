#!/usr/bin/env python
"""Generate the two physically implausible clips of the bundled reasoner examples.

Usage::

    python data/reasoner/make_media.py      # writes data/reasoner/media/*.mp4

The other reasoner examples reuse data/samples/ (clips and stills) by relative path. Scenes are drawn
with the same helpers and encoder settings as data/make_samples.py (24 fps, 33 frames, reproducible H.264).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from make_samples import DARK_BLUE, GROUND, RED, SKY, YELLOW, _canvas, _circle, _to_uint8, write_mp4  # noqa: E402

FRAMES = 33


def ball_through_ground(t: int, n: int, h: int = 192, w: int = 320) -> np.ndarray:
    """A yellow ball falls and keeps going *through* the grass instead of bouncing (implausible)."""
    img = _canvas(h, w, SKY)
    floor_y = h - 32
    r = 18.0
    cy = 30 + (h + 40 - 30) * (t / (n - 1)) ** 2  # accelerates downwards, past the floor and out of view
    _circle(img, cy, w / 2, r, YELLOW)
    img[floor_y:] = np.asarray(GROUND, dtype=np.float32)
    if cy - r < floor_y < cy + r or cy > floor_y:  # drawn in front of the grass: it passes through
        _circle(img, cy, w / 2, r, YELLOW)
    return img


def circle_teleports(t: int, n: int, h: int = 256, w: int = 256) -> np.ndarray:
    """A red circle moves right, vanishes halfway and reappears at the left edge (implausible)."""
    img = _canvas(h, w, DARK_BLUE)
    r = 28.0
    s = t / (n - 1)
    cx = r + 8 + (w - 2 * r - 16) * (s if s < 0.5 else s - 0.5)
    _circle(img, h / 2, cx, r, RED)
    return img


def main() -> int:
    out = HERE / "media"
    out.mkdir(exist_ok=True)
    for name, draw in (("ball_through_ground", ball_through_ground), ("circle_teleports", circle_teleports)):
        frames = [_to_uint8(draw(t, FRAMES)) for t in range(FRAMES)]
        write_mp4(out / f"{name}.mp4", frames)
        print(f"{(out / f'{name}.mp4').stat().st_size:8d}  media/{name}.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
