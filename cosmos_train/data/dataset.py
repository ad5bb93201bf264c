"""`GeneratorDataset`: manifest records -> decoded training samples, plus the per-sample decode log."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch.utils.data import Dataset

from cosmos_train.data.manifest import ManifestRecord, caption_for
from cosmos_train.data.media import SHORT_CLIP_MODES, describe_clip, load_image_info, load_video_clip
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

# fps reported for image samples that do not set one (the Cosmos3 pipeline's default; the model
# ignores fps when there is a single latent frame).
DEFAULT_IMAGE_FPS = 24.0
_PAST = {"loop": "looped", "pad": "padded"}


def _split_key(key) -> tuple[int, int]:
    """A dataset key -> (index, epoch): an int (epoch 0) or an (index, epoch) pair (`SampleKey`)."""
    if isinstance(key, tuple):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


def _short_name(rec: ManifestRecord) -> str:
    return rec.media.name if rec.media is not None else rec.path.name


class GeneratorDataset(Dataset):
    """Map-style dataset of ``{"pixels", "caption", "fps", "source", "is_image", "decode"}`` dicts.

    - ``pixels``: uint8 [3, T, H, W] (0..255: a quarter of float32's bytes through the DataLoader; the encode
      step makes the model's [-1, 1] floats on the device, `media.to_model_pixels`); videos give
      ``T = num_frames`` frames sampled from the record's window (``[start_frame, end_frame)`` or
      ``[start_time, end_time)``) at the record's ``fps`` (nearest source frame) or, without one, at the
      dataset's ``fps`` (the recipe's ``data.fps``), or else consecutive frames at the file's own rate. Images give
      ``T = 1``. ``(H, W)`` is ``sizes[index]`` (aspect buckets) or the fixed ``(height, width)``.
    - ``caption``: `caption_for(record, epoch, seed)`; the epoch comes from the key (see below).
    - ``fps``: frame rate of the returned frames (record fps, else the file's rate; for images the
      record fps or 24).
    - ``source``: the record's ``manifest:line`` (or ``dataset:row N``).
    - ``decode``: what was done to the media (a JSON-able dict, see `decode_entry`); the first
      entry per index in this process is also kept in ``self.decode_report``.

    Keys: an int index (epoch 0), or an ``(index, epoch)`` pair such as the `SampleKey`s the
    bucket sampler yields.

    Short windows follow ``short_clips`` ("skip" -> too_short, "loop", "pad"; see `load_video_clip`).

    Bad samples (undecodable, too short, vanished file): with ``skip_bad_samples=False`` the
    `BadSampleError` propagates. With ``skip_bad_samples=True`` the sample is counted in
    ``self.counter`` (once per index per process; later hits return straight away) and
    ``__getitem__`` returns ``None``; use `collate_skip_none` (or `iter_samples`) to drop them.
    With DataLoader workers each worker counts in its own copy of the counter; wrap the dataset in
    `MarkBadSamples` to get the skips back to the main process instead.
    """

    def __init__(
        self,
        records: Sequence[ManifestRecord],
        num_frames: int,
        height: int | None = None,
        width: int | None = None,
        skip_bad_samples: bool = False,
        counter: SkipCounter | None = None,
        fps: float | None = None,
        *,
        sizes: Sequence[tuple[int, int]] | None = None,
        bucket_names: Sequence[str] | None = None,
        short_clips: str = "skip",
        seed: int = 0,
        sound: str = "off",
    ):
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
            raise UserError(
                f"num_frames must be of the form 4k+1 (1, 5, 9, ..., 17, ..., 33, ...), got {num_frames!r}: "
                "the video VAE compresses time 4x after the first frame"
            )
        if len(records) == 0:
            raise UserError("GeneratorDataset: no records (is the manifest empty?)")
        if sizes is None:
            for name, v in (("height", height), ("width", width)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise UserError(f"{name} must be a positive integer, got {v!r}")
        else:
            if len(sizes) != len(records):
                raise ValueError(f"{len(sizes)} sizes for {len(records)} records")
            sizes = [(int(h), int(w)) for h, w in sizes]
            if any(h < 1 or w < 1 for h, w in sizes):
                raise UserError("sizes must be positive (height, width) pairs")
        if short_clips not in SHORT_CLIP_MODES:
            raise UserError(f"short_clips must be one of {', '.join(SHORT_CLIP_MODES)}, got {short_clips!r}")
        self.records = list(records)
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.sizes = sizes  # per-index (H, W), or None for the fixed (height, width)
        self.bucket_names = list(bucket_names) if bucket_names is not None else None
        self.skip_bad_samples = skip_bad_samples
        self.fps = fps  # target rate for records that do not set their own (recipe `data.fps`)
        self.short_clips = short_clips
        self.seed = seed  # caption choice
        self.sound = sound  # generator.sound: off | auto | require
        self.counter = counter if counter is not None else SkipCounter()
        self.decode_report: dict[int, dict[str, Any]] = {}  # index -> first decode entry (this process)
        self._bad: dict[int, str] = {}  # index -> reason, for samples already counted as skipped

    def __len__(self) -> int:
        return len(self.records)

    def size_of(self, index: int) -> tuple[int, int]:
        """Target (height, width) of `index`."""
        if self.sizes is not None:
            return self.sizes[index]
        return (self.height, self.width)

    def bucket_name(self, index: int) -> str:
        if self.bucket_names is not None:
            return self.bucket_names[index]
        h, w = self.size_of(index)
        return f"fixed {h}x{w}"

    def source_of(self, key) -> str:
        return self.records[_split_key(key)[0]].source

    def load(self, key) -> dict[str, Any]:
        """Decode one sample; always raises `BadSampleError` on a bad sample."""
        index, epoch = _split_key(key)
        if index < 0:
            index += len(self.records)
        rec = self.records[index]
        height, width = self.size_of(index)
        media = rec.media if rec.media is not None else rec.path
        audio = None
        try:
            if rec.is_image:
                pixels, src_size, mode = load_image_info(media, height, width)
                fps = rec.fps or self.fps or DEFAULT_IMAGE_FPS
                decode = self._image_entry(index, rec, src_size, mode, fps)
            else:
                window = ({"start_time": rec.start_time, "end_time": rec.end_time}
                          if rec.start_time is not None or rec.end_time is not None
                          else {"start_frame": rec.start_frame or 0, "end_frame": rec.end_frame})
                clip = load_video_clip(media, self.num_frames, height, width, fps=rec.fps or self.fps,
                                       short_clips=self.short_clips, **window)
                pixels, fps = clip.frames, clip.fps
                decode = self._video_entry(index, rec, clip)
                if self.sound != "off":
                    from cosmos_train.data.audio import load_clip_audio

                    audio = load_clip_audio(media, clip)
                    if audio is None and self.sound == "require":
                        raise BadSampleError("the clip has no audio track (generator.sound: require)", "no_audio")
        except BadSampleError as e:
            raise BadSampleError(f"{rec.source}: {e}", e.reason) from None
        self.decode_report.setdefault(index, decode)
        return {
            "audio": audio,  # [2, n] at 48 kHz of the clip's own track (generator.sound), or None
            "pixels": pixels,
            "caption": caption_for(rec, epoch, self.seed),
            "fps": float(fps),
            "source": rec.source,
            "is_image": rec.is_image,
            "decode": decode,
        }

    # -- decode log ---------------------------------------------------------------------------

    def _common(self, index: int, rec: ManifestRecord, kind: str, src_size) -> dict[str, Any]:
        h, w = self.size_of(index)
        return {
            "source": rec.source,
            "dataset": rec.dataset,
            "media": rec.media.name if rec.media is not None else str(rec.path),
            "kind": kind,
            "source_size": [int(src_size[0]), int(src_size[1])],
            "size": [h, w],
            "bucket": self.bucket_name(index),
        }

    def _size_text(self, index: int, src_size) -> str:
        h, w = self.size_of(index)
        return f"{src_size[0]}x{src_size[1]} -> {h}x{w} (HxW, {self.bucket_name(index)})"

    def _image_entry(self, index, rec, src_size, mode, fps) -> dict[str, Any]:
        entry = self._common(index, rec, "image", src_size)
        entry.update({"mode": mode, "fps": float(fps), "frames": 1,
                      "text": f"{_short_name(rec)}: image ({mode}), {self._size_text(index, src_size)}"})
        return entry

    def _video_entry(self, index, rec, clip) -> dict[str, Any]:
        entry = self._common(index, rec, "video", clip.source_size)
        entry.update({
            "source_fps": float(clip.source_fps),
            "fps": float(clip.fps),
            "fps_change": "nearest-frame" if clip.resampled else "none",
            "window": [clip.window_start, clip.window_end],
            "window_frames": clip.window_frames,
            "frames": len(clip.frame_indices),
            "frame_span": [min(clip.frame_indices), max(clip.frame_indices)],
            "valid_frames": clip.valid_frames,
            "short_clip": clip.short_fill,
            "text": f"{describe_clip(_short_name(rec), clip)}, {self._size_text(index, clip.source_size)}",
        })
        if rec.start_time is not None or rec.end_time is not None:
            entry["window_time"] = [rec.start_time or 0.0, rec.end_time]
        return entry

    def __getitem__(self, key) -> dict[str, Any] | None:
        index, epoch = _split_key(key)
        if index < 0:
            index += len(self.records)
        if not self.skip_bad_samples:
            return self.load((index, epoch))
        if index in self._bad:
            return None
        try:
            return self.load((index, epoch))
        except BadSampleError as e:
            self._bad[index] = e.reason
            self.counter.add(e.reason, self.records[index].source, str(e))
            return None


def bad_sample_marker(err: Exception, source: str, skip: bool) -> dict[str, Any]:
    """The marker a dataset returns instead of raising (from a loader worker, an exception would reach the
    main process as a traceback): ``{"skipped": reason, "source": ..., "message": ..., "skip": bool}``.

    ``skip`` is whether the sample may be counted and skipped (``data.skip_bad_samples`` for a
    `BadSampleError`; always False for any other `UserError`, e.g. a damaged latent-cache shard, whose
    reason is then ``error`` unless it carries one). The main process hands it to `check_marker`."""
    reason = getattr(err, "reason", None) or "error"
    return {"skipped": reason, "source": source, "message": str(err),
            "skip": bool(skip) and isinstance(err, BadSampleError)}


def is_marker(sample) -> bool:
    return isinstance(sample, dict) and "skipped" in sample


def check_marker(marker: dict[str, Any]) -> None:
    """In the main process: raise the marker's error as the dataset would have raised it without workers
    (the same `BadSampleError` text), unless it may be skipped (then the caller counts it). Markers
    without ``skip`` (a latent cache's entries for samples `prepare` skipped) are counted."""
    if not marker.get("skip", True):
        raise BadSampleError(marker["message"], marker["skipped"])


def close_loader_workers(stream) -> None:
    """End a DataLoader iterator's worker processes now (before raising out of a loop over it), rather than
    whenever the iterator is collected: an iterator kept alive by the error's traceback would otherwise leave
    its workers to the interpreter's exit, where workers that ignore SIGTERM are never reaped."""
    shutdown = getattr(stream, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


class MarkBadSamples(Dataset):
    """Wraps a dataset with ``load(key)`` and ``source_of(key)`` (generator, reasoner, action) for the
    trainer and `prepare`, with or without DataLoader workers (which cannot share a counter nor raise
    cleanly): a bad sample, or any other `UserError` met while loading, becomes a `bad_sample_marker`
    that the main process counts or raises (`check_marker`), so both behave exactly alike."""

    def __init__(self, dataset: GeneratorDataset, skip_bad: bool):
        self.dataset, self.skip_bad = dataset, skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset.load(key)
        except UserError as err:
            return bad_sample_marker(err, self.dataset.source_of(key), self.skip_bad)


def collate_skip_none(batch: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """DataLoader ``collate_fn``: drop skipped (``None``) samples, return the rest as a list of dicts
    (no stacking: images (T = 1) and videos can share a batch). May return an empty list."""
    return [s for s in batch if s is not None]


def collate_list(batch: list) -> list:
    """DataLoader ``collate_fn`` for a ``batch_sampler``: the samples as a plain list (no stacking,
    nothing dropped; `MarkBadSamples` markers stay in for the trainer to count)."""
    return list(batch)


def iter_samples(dataset: GeneratorDataset, indices: Sequence[int] | None = None):
    """Yield the decoded samples of `dataset` (in `indices` order), skipping ``None``s."""
    for i in range(len(dataset)) if indices is None else indices:
        sample = dataset[i]
        if sample is not None:
            yield sample


class DecodeLog:
    """Collects per-source decode entries (the ``"decode"`` dict of samples), one per source.

    The trainer calls ``log.add(sample["decode"])`` for each sample it trains on, writes
    ``log.write(run_dir / "data_log.jsonl")`` and prints ``log.summary()``."""

    def __init__(self):
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, entry: dict[str, Any] | None) -> bool:
        """Record `entry` unless its source was seen; True when it was new."""
        if not entry or entry.get("source") in self.entries:
            return False
        self.entries[entry["source"]] = entry
        return True

    def extend(self, entries: Iterable[dict[str, Any]]) -> None:
        for e in entries:
            self.add(e)

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, path: str | os.PathLike) -> Path:
        """Write one JSON line per source (atomically replaced)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for entry in self.entries.values():
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, path)
        return path

    def summary(self, max_lines: int = 8) -> str:
        return summarize_decode_log(self.entries.values(), max_lines=max_lines)


def summarize_decode_log(entries: Iterable[dict[str, Any]], max_lines: int = 8) -> str:
    """A few lines: how many videos / images, fps changes, looped / padded clips, sizes used."""
    entries = list(entries)
    if not entries:
        return "data: nothing decoded"
    videos = [e for e in entries if e.get("kind") == "video"]
    images = [e for e in entries if e.get("kind") == "image"]
    lines = [f"data: decoded {len(entries)} source{'s' if len(entries) != 1 else ''} "
             f"({len(videos)} video{'s' if len(videos) != 1 else ''}, {len(images)} image{'s' if len(images) != 1 else ''})"]
    if videos:
        rates = Counter(
            (f"{e['source_fps']:g} -> {e['fps']:g} fps (nearest-frame)" if e["fps_change"] != "none"
             else f"{e['source_fps']:g} fps kept") for e in videos
        )
        lines.append("  fps: " + ", ".join(f"{k}: {n}" for k, n in rates.most_common(max_lines)))
        frames = videos[0]["frames"]
        short = Counter(e["short_clip"] for e in videos if e.get("short_clip"))
        if short:
            lines.append(f"  short windows (< {frames} frames at the target fps): "
                         + ", ".join(f"{n} {_PAST[mode]}" for mode, n in sorted(short.items())))
    sizes = Counter(f"{e['size'][0]}x{e['size'][1]} ({e['bucket']})" for e in entries)
    lines.append("  sizes (HxW): " + ", ".join(f"{k}: {n}" for k, n in sizes.most_common(max_lines)))
    examples = [e["text"] for e in entries if e.get("kind") == "video"][:2]
    lines += [f"  e.g. {t}" for t in examples]
    return "\n".join(lines)
