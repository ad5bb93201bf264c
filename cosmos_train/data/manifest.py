"""JSONL manifest -> `ManifestRecord` list.

One JSON object per line; blank lines are ignored::

    {"path": "clips/red_circle.mp4", "caption": "A red circle moves ...", "fps": 24}
    {"path": "clips/long.mp4", "caption": "...", "start_frame": 10, "end_frame": 43}
    {"path": "images/still.png", "caption": "..."}

Keys:
  path         (required) media file; relative paths are relative to the manifest's folder.
  caption      (required unless ``captions`` is given) non-empty text.
  captions     (optional) a list of non-empty alternative captions; with ``caption`` too, ``caption``
               is the first candidate. One candidate is used per epoch: see `caption_for`.
  fps          (optional, > 0) frame rate to *sample the clip at* for training. When it differs from
               the file's own rate, frames are picked at this rate (nearest source frame); when absent
               the clip is used at the recipe's ``data.fps``. For images it is only reported back.
  start_frame  (optional, videos only, >= 0) first usable source frame (inclusive, 0-based).
  end_frame    (optional, videos only, > start_frame) end of the usable window (exclusive).
  start_time   (optional, videos only, seconds >= 0) the window in time instead of frames: the
  end_time     window holds the source frames whose timestamp ``i / source_fps`` lies in
               ``[start_time, end_time)`` (end exclusive). Frame and time keys cannot be mixed.
  width        (optional, > 0, both or neither) the media's own pixel size. Only a hint that lets
  height       aspect-ratio bucketing skip probing the file; decoding always uses the real size.

Every problem is reported as `BadSampleError(message, reason)` whose message starts with
``<manifest>:<line>``; reasons: ``bad_json`` (also: not UTF-8), ``bad_record``, ``empty_caption``, ``missing_file``,
``unreadable`` (the file exists but cannot be opened, e.g. permission denied).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosmos_train.errors import BadSampleError, UserError
from cosmos_train.data.skips import SkipCounter

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".ts"})
ALLOWED_KEYS = ("path", "caption", "captions", "fps", "start_frame", "end_frame", "start_time", "end_time",
                "width", "height")


@dataclass(frozen=True)
class ManifestRecord:
    path: Path  # absolute (for in-memory media: a descriptive pseudo path, see `media`)
    caption: str  # the first caption candidate
    fps: float | None
    start_frame: int | None
    end_frame: int | None
    source: str  # "<manifest path>:<line>" or "<dataset>:row <i>"
    is_image: bool
    captions: tuple[str, ...] = ()  # all caption candidates (caption first); () means (caption,)
    start_time: float | None = None  # window in seconds (end exclusive); never set with start/end_frame
    end_time: float | None = None
    width: int | None = None  # the media's own size, when the source says so (a probing shortcut)
    height: int | None = None
    dataset: str = ""  # the source (manifest path or dataset) this record came from
    # In-memory media (HF datasets bytes columns): an object with ``name`` and ``read() -> bytes``;
    # None for files on disk.
    media: Any = field(default=None, compare=False, repr=False)

    @property
    def caption_candidates(self) -> tuple[str, ...]:
        return self.captions or (self.caption,)


def caption_for(record: ManifestRecord, epoch: int, seed: int = 0) -> str:
    """The caption of `record` for `epoch` (its pass number over the data).

    Deterministic in (seed, epoch, record.source); ``record.source`` (``file:line`` or
    ``dataset:row N``) is the record's stable identity, so the choice does not change when other
    records are added, skipped or reordered. Within each block of ``k = len(captions)`` consecutive
    epochs every candidate is used exactly once, in a seeded random order.
    """
    caps = record.caption_candidates
    k = len(caps)
    if k == 1:
        return caps[0]
    cycle, pos = divmod(int(epoch), k)
    digest = hashlib.blake2b(f"{seed}|{cycle}|{record.source}".encode(), digest_size=8).digest()
    order = list(range(k))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return caps[order[pos]]


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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_readable(path: Path) -> str | None:
    """None when `path` is a regular file we can open for reading, else the reason (``missing_file``
    or ``unreadable``) -- used before decoding so a permission problem is named as such."""
    try:
        st = os.stat(path)
    except PermissionError:  # a folder on the way cannot be searched
        return "unreadable"
    except (OSError, ValueError):
        return "missing_file"
    if not stat.S_ISREG(st.st_mode):
        return "missing_file"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing_file"
    except OSError:
        return "unreadable"
    os.close(fd)
    return None


def parse_record(
    obj,
    manifest_dir: Path,
    source: str,
    *,
    dataset: str = "",
    media=None,
    media_is_image: bool | None = None,
    allowed_keys: tuple[str, ...] = ALLOWED_KEYS,
) -> ManifestRecord:
    """Validate one decoded JSON value; raises BadSampleError whose message starts with `source`.

    `media` (in-memory media with ``name`` and ``read()``) replaces the file named by ``path``; its
    kind is then `media_is_image` (``path`` is only used in messages).
    """

    def bad(msg: str, reason: str = "bad_record") -> BadSampleError:
        return BadSampleError(f"{source}: {msg}", reason)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object like {{\"path\": ..., \"caption\": ...}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed_keys))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed_keys)}")

    if "path" not in obj:
        raise bad("missing required key 'path'")
    raw_path = obj["path"]
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise bad(f"'path' must be a non-empty string, got {raw_path!r}")

    # captions: `caption` (a string) and/or `captions` (a list of strings)
    candidates: list[str] = []
    caption = obj.get("caption")
    if caption is not None:
        if not isinstance(caption, str):
            raise bad(f"'caption' must be a string, got {type(caption).__name__}")
        if not caption.strip():
            raise bad("caption is empty", "empty_caption")
        candidates.append(caption.strip())
    extra = obj.get("captions")
    if extra is not None:
        if not isinstance(extra, list) or not all(isinstance(c, str) for c in extra):
            raise bad(f"'captions' must be a list of strings, got {extra!r}"[:300])
        for i, c in enumerate(extra):
            if not c.strip():
                raise bad(f"captions[{i}] is empty", "empty_caption")
            if c.strip() not in candidates:
                candidates.append(c.strip())
    if not candidates:
        if extra is not None:
            raise bad("'captions' is an empty list and there is no 'caption'", "empty_caption")
        raise bad("missing caption (key 'caption')", "empty_caption")

    fps = obj.get("fps")
    if fps is not None:
        if not _is_number(fps) or fps <= 0:
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

    start_time = obj.get("start_time")
    end_time = obj.get("end_time")
    if start_time is not None:
        if not _is_number(start_time) or start_time < 0:
            raise bad(f"'start_time' must be a number of seconds >= 0, got {start_time!r}")
        start_time = float(start_time)
    if end_time is not None:
        if not _is_number(end_time) or end_time <= 0:
            raise bad(f"'end_time' must be a number of seconds > 0 (exclusive end), got {end_time!r}")
        end_time = float(end_time)
        if end_time <= (start_time or 0.0):
            raise bad(f"'end_time' ({end_time:g}) must be greater than 'start_time' ({start_time or 0:g})")
    frame_keys = [k for k in ("start_frame", "end_frame") if obj.get(k) is not None]
    time_keys = [k for k in ("start_time", "end_time") if obj.get(k) is not None]
    if frame_keys and time_keys:
        raise bad(f"give the window in frames or in seconds, not both ({', '.join(frame_keys + time_keys)})")

    width, height = obj.get("width"), obj.get("height")
    if (width is None) != (height is None):
        raise bad("'width' and 'height' (the media's own size) go together: give both or neither")
    for key, v in (("width", width), ("height", height)):
        if v is not None and (not _is_int(v) or v <= 0):
            raise bad(f"'{key}' must be a positive integer (the media's own size in pixels), got {v!r}")

    if media is not None:
        is_image = bool(media_is_image)
    else:
        try:
            is_image = is_image_path(raw_path)
        except UserError as e:
            raise bad(str(e)) from None
    if is_image and (frame_keys or time_keys):
        raise bad(f"'{(frame_keys + time_keys)[0]}' is only valid for videos, not images")

    if media is not None:
        path = Path(raw_path)
    else:
        path = Path(os.path.expanduser(raw_path))
        if not path.is_absolute():
            path = manifest_dir / path
        path = Path(os.path.abspath(path))
        problem = check_readable(path)
        if problem == "missing_file":
            where = "" if Path(raw_path).is_absolute() else " (relative paths are relative to the manifest's folder)"
            raise bad(f"media file not found: {path}{where}", "missing_file")
        if problem == "unreadable":
            raise bad(f"cannot read media file {path}: permission denied", "unreadable")

    return ManifestRecord(
        path=path,
        caption=candidates[0],
        fps=fps,
        start_frame=start_frame,
        end_frame=end_frame,
        source=source,
        is_image=is_image,
        captions=tuple(candidates) if len(candidates) > 1 else (),
        start_time=start_time,
        end_time=end_time,
        width=width,
        height=height,
        dataset=dataset,
        media=media,
    )


def decode_line(raw: bytes, source: str, first: bool = False) -> str:
    """One line of a JSONL file as text; `BadSampleError` (``bad_json``) naming the byte and its column
    (1-based, in bytes) when it is not valid UTF-8. `first`: a UTF-8 byte-order mark is allowed."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{source}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8", "bad_json") from None


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
            text = decode_line(raw, source, first=lineno == 1)
            if not text.strip():
                continue
            n_lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadSampleError(f"{source}: not valid JSON: {e.msg} (column {e.colno})", "bad_json") from None
            records.append(parse_record(obj, manifest_dir, source, dataset=name))
        except BadSampleError as e:
            if not skip_bad:
                raise
            counter.add(e.reason, source, str(e))

    if n_lines == 0:
        raise UserError(f"manifest {name} has no records (it is empty or only blank lines)")
    if not records:
        raise UserError(f"manifest {name}: all {n_lines} records are bad\n{counter.summary()}")
    return records
