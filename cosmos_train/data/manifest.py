"""JSONL manifest -> `ManifestRecord` list.

One JSON object per line; blank lines are ignored::

    {"path": "clips/red_circle.mp4", "caption": "A red circle moves ...", "fps": 24}
    {"path": "clips/long.mp4", "caption": "...", "start_frame": 10, "end_frame": 43}
    {"path": "images/still.png", "caption": "..."}

Keys:
  path         (required) media file; relative paths are relative to the manifest's folder.
  caption      (required) non-empty text.
  fps          (optional, > 0) frame rate to *sample the clip at* for training. When it differs from
               the file's own rate, frames are picked at this rate (nearest source frame); when absent
               the clip is used at its own rate. For images it is only reported back.
  start_frame  (optional, videos only, >= 0) first usable source frame (inclusive, 0-based).
  end_frame    (optional, videos only, > start_frame) end of the usable window (exclusive).

Every problem is reported as `BadSampleError(message, reason)` whose message starts with
``<manifest>:<line>``; reasons: ``bad_json``, ``bad_record``, ``empty_caption``, ``missing_file``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cosmos_train.errors import BadSampleError, UserError
from cosmos_train.data.skips import SkipCounter

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".ts"})
ALLOWED_KEYS = ("path", "caption", "fps", "start_frame", "end_frame")


@dataclass(frozen=True)
class ManifestRecord:
    path: Path  # absolute
    caption: str
    fps: float | None
    start_frame: int | None
    end_frame: int | None
    source: str  # "<manifest path>:<line>"
    is_image: bool


def is_image_path(path: str | os.PathLike) -> bool:
    """True for image extensions, False for video extensions; UserError for anything else."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return True
    if ext in VIDEO_EXTENSIONS:
        return False
    raise UserError(
        f"unknown media extension {ext or '(none)'!r} for {os.fspath(path)!r}; images: "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}; videos: {', '.join(sorted(VIDEO_EXTENSIONS))}"
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(obj, manifest_dir: Path, source: str) -> ManifestRecord:
    """Validate one decoded JSON value; raises BadSampleError whose message starts with `source`."""

    def bad(msg: str, reason: str = "bad_record") -> BadSampleError:
        return BadSampleError(f"{source}: {msg}", reason)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object like {{\"path\": ..., \"caption\": ...}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ALLOWED_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(ALLOWED_KEYS)}")

    if "path" not in obj:
        raise bad("missing required key 'path'")
    raw_path = obj["path"]
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise bad(f"'path' must be a non-empty string, got {raw_path!r}")

    caption = obj.get("caption")
    if caption is None:
        raise bad("missing caption (key 'caption')", "empty_caption")
    if not isinstance(caption, str):
        raise bad(f"'caption' must be a string, got {type(caption).__name__}")
    caption = caption.strip()
    if not caption:
        raise bad("caption is empty", "empty_caption")

    fps = obj.get("fps")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise bad(f"'fps' must be a positive number, got {fps!r}")
        fps = float(fps)

    start_frame = obj.get("start_frame")
    end_frame = obj.get("end_frame")
    if start_frame is not None and (not _is_int(start_frame) or start_frame < 0):
        raise bad(f"'start_frame' must be an integer >= 0, got {start_frame!r}")
    if end_frame is not None:
        if not _is_int(end_frame) or end_frame <= 0:
            raise bad(f"'end_frame' must be an integer > 0 (exclusive end), got {end_frame!r}")
        if end_frame <= (start_frame or 0):
            raise bad(f"'end_frame' ({end_frame}) must be greater than 'start_frame' ({start_frame or 0})")

    try:
        is_image = is_image_path(raw_path)
    except UserError as e:
        raise bad(str(e)) from None
    if is_image and (start_frame is not None or end_frame is not None):
        raise bad("'start_frame'/'end_frame' are only valid for videos, not images")

    media = Path(os.path.expanduser(raw_path))
    if not media.is_absolute():
        media = manifest_dir / media
    media = Path(os.path.abspath(media))
    try:
        ok = media.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        where = "" if Path(raw_path).is_absolute() else " (relative paths are relative to the manifest's folder)"
        raise bad(f"media file not found: {media}{where}", "missing_file")

    return ManifestRecord(
        path=media,
        caption=caption,
        fps=fps,
        start_frame=start_frame,
        end_frame=end_frame,
        source=source,
        is_image=is_image,
    )


def read_manifest(
    path: str | os.PathLike, skip_bad: bool = False, counter: SkipCounter | None = None
) -> list[ManifestRecord]:
    """Read a JSONL manifest.

    With ``skip_bad=False`` the first bad line raises `BadSampleError` (message ``file:line: ...``).
    With ``skip_bad=True`` bad lines are dropped and counted in `counter` (pass one in to read the
    counts; ``counter.summary()`` describes them). A missing/unreadable manifest, one without any
    records, or one whose records were all skipped raises `UserError`.
    """
    manifest = Path(path)
    name = os.fspath(path)
    if not manifest.exists():
        raise UserError(f"manifest not found: {name}")
    if not manifest.is_file():
        raise UserError(f"manifest is not a file: {name}")
    try:
        data = manifest.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read manifest {name}: {e}") from None
    if counter is None:
        counter = SkipCounter()
    manifest_dir = Path(os.path.abspath(manifest)).parent

    records: list[ManifestRecord] = []
    n_lines = 0
    for lineno, raw in enumerate(data.splitlines(), start=1):
        source = f"{name}:{lineno}"
        try:
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise BadSampleError(f"{source}: line is not valid UTF-8 ({e.reason})", "bad_json") from None
            if not text.strip():
                continue
            n_lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadSampleError(f"{source}: not valid JSON: {e.msg} (column {e.colno})", "bad_json") from None
            records.append(parse_record(obj, manifest_dir, source))
        except BadSampleError as e:
            if not skip_bad:
                raise
            counter.add(e.reason, source, str(e))

    if n_lines == 0:
        raise UserError(f"manifest {name} has no records (it is empty or only blank lines)")
    if not records:
        raise UserError(f"manifest {name}: all {n_lines} records are bad\n{counter.summary()}")
    return records
