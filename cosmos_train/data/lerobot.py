"""LeRobot datasets (v3.0; v2.1 / v2.0 too) read from a local directory, and the world-action training
windows cut from them.

Layout read (as written by the LeRobot library; see docs/ARCHITECTURE.md and the notes on LeRobot v3):

v3.0::

    meta/info.json      codebase_version, fps, features {key: {dtype, shape, names, info}},
                        data_path / video_path templates
    meta/stats.json     per feature: min, max, mean, std, count, q01, q10, q50, q90, q99 (lists)
    meta/tasks.parquet  the task string (pandas index, stored as column "task") -> task_index
    meta/episodes/chunk-XXX/file-XXX.parquet
                        episode_index, tasks, length, dataset_from_index, dataset_to_index,
                        data/chunk_index, data/file_index,
                        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
    data/chunk-XXX/file-XXX.parquet      the features + timestamp, frame_index, episode_index, index, task_index
    videos/<key>/chunk-XXX/file-XXX.mp4  MANY episodes per file; a row's frame is at
                                         from_timestamp (of its episode) + its timestamp

v2.1 / v2.0: ``meta/tasks.jsonl``, ``meta/episodes.jsonl``, one parquet and one mp4 per episode
(``data/chunk-XXX/episode_XXXXXX.parquet``, ``videos/chunk-XXX/<key>/episode_XXXXXX.mp4``), frame time =
the row's timestamp; statistics in ``meta/stats.json`` (v2.0) or ``meta/episodes_stats.jsonl`` (v2.1,
aggregated here: min, max, mean, std; no quantiles). Any other ``codebase_version`` is a `UserError`.

Frames are decoded with PyAV (H.264, AV1 via libdav1d, anything FFmpeg reads): seek to the keyframe at
or before the first wanted time, decode forward, and take for each wanted time the frame whose
presentation time is nearest; a frame farther than a quarter frame period away is an error
(``undecodable``: the video and the parquet timestamps disagree), as LeRobot's own decoder refuses
frames outside its tolerance.

Feature columns may be scalars (LeRobot stores shape-[1] features as plain values), fixed-size or
variable lists, or nested lists (Array2D ...): each becomes float32 [N, D] (nested values flattened).

Windows (`LeRobotActionDataset`): ``chunk_size + 1`` consecutive frames ``t .. t + chunk`` and the
``chunk_size`` action rows ``t .. t + chunk - 1`` of the same episode (LeRobot convention: the action
in row i is the one taken at frame i, so row i is the transition from frame i to frame i + 1). Window
starts are ``0, stride, 2 stride, ...`` while the window fits in its episode (never crossing an edge);
the default stride is 1 (every frame starts a window, as LeRobot's own frame indexing does). An episode
shorter than one window is skipped and counted (``too_short``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cosmos_train.data.action_norm import ActionNormalizer
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v3.0", "v2.1", "v2.0")
# LeRobot's bookkeeping columns (never features to train on)
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
_NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
            "uint64", "bool")


# ----------------------------------------------------------------------------------------------------
# reading a dataset
# ----------------------------------------------------------------------------------------------------


@dataclass
class EpisodeInfo:
    index: int  # episode_index
    length: int  # frames
    tasks: list[str]
    data_file: Path  # the parquet holding its rows
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # camera -> (mp4, from_timestamp)


def _read_json(path: Path, name: str) -> dict:
    """A JSON object file (info.json, stats.json); a damaged one is a UserError naming the file and line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{name}: {path.name} not found ({path})") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read {path} ({type(e).__name__}: {e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{name}: {path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                        "the file is damaged") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise UserError(f"{name}: {where}: not valid JSON ({getattr(e, 'msg', e)}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise UserError(f"{name}: {path}: expected a JSON object, got {type(obj).__name__}; the file is damaged")
    return obj


def _read_jsonl(path: Path, name: str) -> list[dict]:
    from cosmos_train.data.manifest import decode_line

    if not path.is_file():
        raise UserError(f"{name}: {path.relative_to(path.parent.parent)} not found ({path})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{name}: cannot read {path} ({type(e).__name__}: {e})") from None
    rows = []
    for n, raw in enumerate(data.splitlines(), 1):
        if raw.strip():
            try:
                row = json.loads(decode_line(raw, f"{path}:{n}", first=n == 1))
            except BadSampleError as e:  # not UTF-8
                raise UserError(f"{name}: {e}") from None
            except ValueError as e:
                raise UserError(f"{name}: {path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"{name}: {path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_parquet(path: Path, name: str, columns: list[str] | None = None):
    """A parquet table; a damaged file (bad footer, pages, page checksums where written) is a UserError
    naming it. Damage that leaves a well-formed file of finite numbers is only caught by the reader's
    consistency checks (episode / frame indexes, lengths, timestamps against the video)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{name}: missing file {path}")
    try:
        if columns is not None:
            available = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in available]
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise UserError(f"{name}: cannot read {path}: the file is damaged or not parquet "
                        f"({type(e).__name__}: {str(e).strip()})") from None


def column_to_float32(column, n_rows: int | None = None, *, what: str = "column") -> np.ndarray:
    """A pyarrow column (scalars, fixed-size / variable lists, nested lists, extension arrays) -> float32
    [N, D]. Nulls become NaN. Rows of different widths are an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    per_row = 1
    while True:
        if isinstance(arr, pa.ExtensionArray):
            arr = arr.storage
            continue
        t = arr.type
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            if arr.null_count:
                raise UserError(f"{what}: {arr.null_count} null row(s)")
            if pa.types.is_fixed_size_list(t):
                width = t.list_size
                values = arr.flatten()
            else:
                lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
                if len(lengths) and (lengths != lengths[0]).any():
                    raise UserError(f"{what}: rows have different widths ({sorted(set(lengths.tolist()))[:5]})")
                width = int(lengths[0]) if len(lengths) else 0
                values = arr.flatten()
            per_row *= width
            arr = values
            continue
        break
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise UserError(f"{what}: values of type {arr.type} are not numbers")
    values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    return values.astype(np.float32).reshape(n, per_row)


def _frame_size(ft: dict) -> tuple[int, int] | None:
    info = ft.get("info") or ft.get("video_info") or {}
    if info.get("video.height") and info.get("video.width"):
        return int(info["video.height"]), int(info["video.width"])
    shape, names = list(ft.get("shape") or []), ft.get("names")
    if isinstance(names, list) and "height" in names and "width" in names and len(names) == len(shape):
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1])) if shape[-1] in (1, 3, 4) else (int(shape[1]), int(shape[2]))
    return None


class LeRobotSource:
    """A LeRobot dataset directory: its metadata, feature columns per episode, statistics and frames.

    ``name`` (the directory's name) starts every message. ``version`` is the info.json
    ``codebase_version``; ``fps``; ``features`` (info.json's); ``camera_keys`` (dtype video, info.json
    order); ``episodes`` ({episode_index: EpisodeInfo}, sorted); ``tasks`` ({task_index: text}).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.name = self.root.name or str(self.root)
        if not self.root.is_dir():
            raise UserError(f"LeRobot dataset not found: {self.root} (action.dataset)")
        self.info = _read_json(self.root / "meta" / "info.json", self.name)
        self.version = str(self.info.get("codebase_version", "unknown"))
        if self.version not in SUPPORTED_VERSIONS:
            raise UserError(f"{self.name}: LeRobot codebase_version {self.version!r} is not supported (this reader "
                            f"reads {', '.join(SUPPORTED_VERSIONS)}; {self.root / 'meta' / 'info.json'})")
        self.v3 = self.version.startswith("v3")
        try:
            self.fps = float(self.info["fps"])
            self.features: dict[str, dict] = dict(self.info["features"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.name}: meta/info.json lacks a valid {e} entry") from None
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise UserError(f"{self.name}: meta/info.json fps is {self.info['fps']!r}")
        self.camera_keys = [k for k, ft in self.features.items() if ft.get("dtype") == "video"]
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes()

    # ---- metadata ----------------------------------------------------------------------------

    def _read_tasks(self) -> dict[int, str]:
        if self.v3:
            path = self.root / "meta" / "tasks.parquet"
            if not path.is_file():
                return {}
            table = _read_parquet(path, self.name).to_pydict()
            # pandas writes the index (the task string, named "task") as a column; unnamed: __index_level_0__
            text_col = next((c for c in ("task", "__index_level_0__") if c in table), None)
            if text_col is None or "task_index" not in table:
                raise UserError(f"{self.name}: meta/tasks.parquet has columns {list(table)}; expected the task "
                                "string (index 'task') and 'task_index'")
            return {int(i): str(t) for i, t in zip(table["task_index"], table[text_col])}
        path = self.root / "meta" / "tasks.jsonl"
        if not path.is_file():
            return {}
        return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path, self.name)}

    def _read_episodes(self) -> dict[int, EpisodeInfo]:
        return self._read_episodes_v3() if self.v3 else self._read_episodes_v2()

    def _read_episodes_v3(self) -> dict[int, EpisodeInfo]:
        import pyarrow as pa

        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise UserError(f"{self.name}: no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
        wanted = ["episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index",
                  "data/chunk_index", "data/file_index"]
        for cam in self.camera_keys:
            wanted += [f"videos/{cam}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
        tables = [_read_parquet(f, self.name, wanted) for f in files]
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, TypeError) as e:
            raise UserError(f"{self.name}: episode metadata files disagree ({e})") from None
        rows = table.to_pydict()
        for col in ("episode_index", "length", "data/chunk_index", "data/file_index"):
            if col not in rows:
                raise UserError(f"{self.name}: episode metadata has no '{col}' column ({files[0]})")
        data_tpl = self.info.get("data_path", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet")
        video_tpl = self.info.get("video_path",
                                  "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
        out = {}
        for i, ep in enumerate(rows["episode_index"]):
            ep = int(ep)
            data_file = self.root / data_tpl.format(chunk_index=int(rows["data/chunk_index"][i]),
                                                    file_index=int(rows["data/file_index"][i]))
            videos = {}
            for cam in self.camera_keys:
                keys = [f"videos/{cam}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
                if any(k not in rows or rows[k][i] is None for k in keys):
                    continue  # reported when the camera is asked for
                videos[cam] = (self.root / video_tpl.format(video_key=cam, chunk_index=int(rows[keys[0]][i]),
                                                            file_index=int(rows[keys[1]][i])),
                               float(rows[keys[2]][i]))
            tasks = rows.get("tasks", [None] * len(rows["episode_index"]))[i] or []
            out[ep] = EpisodeInfo(ep, int(rows["length"][i]), [str(t) for t in tasks], data_file, videos)
        return dict(sorted(out.items()))

    def _read_episodes_v2(self) -> dict[int, EpisodeInfo]:
        rows = _read_jsonl(self.root / "meta" / "episodes.jsonl", self.name)
        chunks = int(self.info.get("chunks_size", 1000))
        data_tpl = self.info.get("data_path", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
        video_tpl = self.info.get("video_path") or \
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        out = {}
        for r in rows:
            ep = int(r["episode_index"])
            fmt = {"episode_chunk": ep // chunks, "episode_index": ep}
            videos = {cam: (self.root / video_tpl.format(video_key=cam, **fmt), 0.0) for cam in self.camera_keys}
            out[ep] = EpisodeInfo(ep, int(r["length"]), [str(t) for t in r.get("tasks", [])],
                                  self.root / data_tpl.format(**fmt), videos)
        return dict(sorted(out.items()))

    # ---- features ----------------------------------------------------------------------------

    def _available(self) -> str:
        return ", ".join(self.features)

    def check_numeric(self, key: str, role: str) -> None:
        """`key` must be a numeric (non-video, non-image) feature; `role` names the recipe key."""
        if key not in self.features:
            raise UserError(f"{self.name}: no feature '{key}' ({role}); the dataset's features: {self._available()}")
        dtype = self.features[key].get("dtype")
        if dtype not in _NUMERIC:
            raise UserError(f"{self.name}: feature '{key}' ({role}) has dtype {dtype!r}, not numbers; "
                            f"features: {self._available()}")

    def check_camera(self, key: str) -> None:
        if key not in self.features:
            raise UserError(f"{self.name}: no camera '{key}' (action.cameras); the dataset's video features: "
                            f"{', '.join(self.camera_keys) or 'none'} (all features: {self._available()})")
        dtype = self.features[key].get("dtype")
        if dtype == "image":
            raise UserError(f"{self.name}: camera '{key}' (action.cameras) is stored as images in the parquet files "
                            "(dtype image); only video features (dtype video, mp4 files) are read")
        if dtype != "video":
            raise UserError(f"{self.name}: feature '{key}' (action.cameras) has dtype {dtype!r}, not video; "
                            f"video features: {', '.join(self.camera_keys) or 'none'}")

    def width(self, key: str) -> int:
        """Channels of a numeric feature (product of its info.json shape)."""
        shape = self.features[key].get("shape") or [1]
        return int(np.prod([int(s) for s in shape]))

    def frame_size(self, camera: str) -> tuple[int, int] | None:
        return _frame_size(self.features[camera])

    def read_columns(self, keys: Sequence[str], episodes: Sequence[int] | None = None,
                     extra: Sequence[str] = ("timestamp", "task_index")) -> dict[int, dict[str, np.ndarray]]:
        """{episode: {key: float32 [length, D], "timestamp": float64 [length], "task_index": int64 [length]
        (when present)}}, rows in frame order, for ``episodes`` (default: all)."""
        import pyarrow.compute as pc

        eps = list(self.episodes) if episodes is None else [int(e) for e in episodes]
        for e in eps:
            if e not in self.episodes:
                raise UserError(f"{self.name}: no episode {e}")
        by_file: dict[Path, list[int]] = {}
        for e in eps:
            by_file.setdefault(self.episodes[e].data_file, []).append(e)
        columns = list(dict.fromkeys([*keys, *extra, "episode_index", "frame_index"]))
        out: dict[int, dict[str, np.ndarray]] = {}
        for path, file_eps in by_file.items():
            table = _read_parquet(path, self.name, columns)
            for k in keys:
                if k not in table.column_names:
                    raise UserError(f"{self.name}: {path.relative_to(self.root)} has no column '{k}' although "
                                    "meta/info.json lists the feature")
            if "episode_index" in table.column_names and self.v3:
                ep_col = table.column("episode_index").to_numpy()
            else:  # v2: one episode per file
                ep_col = np.full(table.num_rows, file_eps[0])
            frame_col = (table.column("frame_index").to_numpy() if "frame_index" in table.column_names
                         else np.arange(table.num_rows))
            for e in file_eps:
                idx = np.flatnonzero(ep_col == e)
                idx = idx[np.argsort(frame_col[idx], kind="stable")]
                if len(idx) != self.episodes[e].length:
                    raise UserError(f"{self.name}: episode {e}: the metadata says {self.episodes[e].length} frames, "
                                    f"{path.relative_to(self.root)} has {len(idx)} rows")
                sub = table.take(idx)
                cols = {}
                for k in keys:
                    arr = column_to_float32(sub.column(k), what=f"{self.name}: episode {e}: '{k}'")
                    if arr.shape[1] != self.width(k):
                        raise UserError(f"{self.name}: '{k}' rows have {arr.shape[1]} values, meta/info.json "
                                        f"shape {self.features[k].get('shape')} says {self.width(k)}")
                    cols[k] = arr
                if "timestamp" in extra:
                    if "timestamp" in sub.column_names:
                        cols["timestamp"] = pc.cast(sub.column("timestamp"), "float64").to_numpy()
                    else:
                        cols["timestamp"] = frame_col[idx].astype(np.float64) / self.fps
                if "task_index" in extra and "task_index" in sub.column_names:
                    cols["task_index"] = sub.column("task_index").to_numpy().astype(np.int64)
                out[e] = cols
        return {e: out[e] for e in eps}

    # ---- statistics --------------------------------------------------------------------------

    def stats(self) -> dict:
        """meta/stats.json ({key: {stat: list}}), or (v2.1 without it) episodes_stats.jsonl aggregated:
        min, max, count-weighted mean and pooled std (no quantiles)."""
        path = self.root / "meta" / "stats.json"
        if path.is_file():
            return _read_json(path, self.name)
        per_ep = self.root / "meta" / "episodes_stats.jsonl"
        if not self.v3 and per_ep.is_file():
            return _aggregate_stats([r.get("stats", {}) for r in _read_jsonl(per_ep, self.name)])
        raise UserError(f"{self.name}: no meta/stats.json; set action.stats: computed to compute statistics "
                        "from the training episodes")

    # ---- frames ------------------------------------------------------------------------------

    def decode_frames(self, camera: str, episode: int, timestamps: Sequence[float], source: str) -> np.ndarray:
        """uint8 [T, H, W, 3]: for each timestamp (seconds from the episode's start) the frame of
        `camera` shown then. Problems raise BadSampleError (``missing_file``, ``undecodable``)."""
        from cosmos_train.data.media import _av_errors, _open_video

        ep = self.episodes[episode]
        if camera not in ep.videos:
            raise UserError(f"{self.name}: episode {episode} has no video metadata for camera '{camera}' "
                            f"(videos/{camera}/* columns of meta/episodes)")
        path, offset = ep.videos[camera]
        wanted = np.asarray(timestamps, dtype=np.float64) + offset
        tol = 0.25 / self.fps
        name, container = _open_video(path)
        best: list[np.ndarray | None] = [None] * len(wanted)
        dist = np.full(len(wanted), np.inf)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = float(stream.time_base)
            start = float(wanted.min()) - tol
            if start > 0:
                container.seek(max(int(math.floor(start / tb)) - 1, 0), stream=stream, backward=True,
                               any_frame=False)
            last = float(wanted.max())
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * tb
                d = np.abs(wanted - t)
                hit = np.flatnonzero((d <= tol) & (d < dist))
                if hit.size:
                    arr = frame.to_ndarray(format="rgb24")
                    for j in hit:
                        best[j], dist[j] = arr, d[j]
                if t > last + tol:
                    break
        except _av_errors() as e:
            raise BadSampleError(f"{source}: {name}: cannot decode video ({type(e).__name__}: {e})",
                                 "undecodable") from None
        finally:
            container.close()
        missing = [float(w) for w, b in zip(wanted, best) if b is None]
        if missing:
            raise BadSampleError(
                f"{source}: {name}: no frame within {tol * 1000:.1f} ms of t = "
                f"{', '.join(f'{m:.4f}' for m in missing[:4])}{' ...' if len(missing) > 4 else ''} s (episode "
                f"{episode} starts at {offset:.4f} s in this file); the video and the parquet timestamps disagree",
                "undecodable")
        return np.stack(best)


def _aggregate_stats(per_episode: list[dict]) -> dict:
    out: dict[str, dict[str, list]] = {}
    keys = {k for s in per_episode for k in s}
    for k in keys:
        entries = [s[k] for s in per_episode if k in s]
        try:
            counts = np.array([float(np.asarray(e["count"]).reshape(-1)[0]) for e in entries])
            means = np.stack([np.asarray(e["mean"], dtype=np.float64).reshape(-1) for e in entries])
            stds = np.stack([np.asarray(e["std"], dtype=np.float64).reshape(-1) for e in entries])
            mins = np.stack([np.asarray(e["min"], dtype=np.float64).reshape(-1) for e in entries])
            maxs = np.stack([np.asarray(e["max"], dtype=np.float64).reshape(-1) for e in entries])
        except (KeyError, ValueError):
            continue  # e.g. image features with other shapes: not needed here
        total = counts.sum()
        w = (counts / total)[:, None]
        mean = (w * means).sum(0)
        var = (w * (stds ** 2 + (means - mean) ** 2)).sum(0)
        out[k] = {"min": mins.min(0).tolist(), "max": maxs.max(0).tolist(), "mean": mean.tolist(),
                  "std": np.sqrt(var).tolist(), "count": [int(total)]}
    return out


# ----------------------------------------------------------------------------------------------------
# training windows
# ----------------------------------------------------------------------------------------------------


@dataclass
class ActionWindow:
    """One world-action training sample."""

    pixels: torch.Tensor  # [3, chunk + 1, H, W] float32 in [-1, 1]; several cameras side by side (recipe order)
    actions: torch.Tensor  # [chunk, D] float32, normalized per the recipe
    raw_actions: torch.Tensor  # [chunk, D] float32, as stored
    state: torch.Tensor | None  # [D_state] at the first frame, normalized (action.state_key), else None
    task: str  # the task text of the window's first frame (its episode's task)
    fps: float  # the dataset's fps, or action.fps
    source: str  # "dataset_name:episode=E:frame=F"
    episode: int


def split_episodes(episodes: Sequence[int], val_episodes) -> tuple[list[int], list[int]]:
    """(train, val) episode indices: ``val_episodes`` is a count N (the last N episodes by index) or a
    list of episode indices."""
    eps = sorted(int(e) for e in episodes)
    if isinstance(val_episodes, (list, tuple)):
        val = sorted({int(e) for e in val_episodes})
        unknown = [e for e in val if e not in set(eps)]
        if unknown:
            raise UserError(f"invalid value for 'action.val_episodes': no episode(s) {unknown} in the dataset")
    else:
        n = int(val_episodes)
        if n < 0:
            raise UserError(f"invalid value for 'action.val_episodes': {n} (must be >= 0)")
        val = eps[len(eps) - n:] if n else []
    val_set = set(val)
    return [e for e in eps if e not in val_set], val


class LeRobotActionDataset(Dataset):
    """Map-style dataset of `ActionWindow`s from the LeRobot dataset of a recipe's ``action`` section.

    ``split``: "train" or "val" (held out by episode, ``action.val_episodes``). ``normalizer``: the
    action normalizer to use (default: built from ``action.normalization`` / ``action.stats`` /
    ``action.clamp``; computed statistics come from the TRAIN episodes even for the val split). The state
    (``action.state_key``) gets its own normalizer, same method (``self.state_normalizer``).

    Opening checks (`UserError`, naming the dataset and key): codebase version, cameras / action / state
    keys (listing the dataset's features), the action width against the embodiment's (diffusers'
    ``_EMBODIMENT_TO_RAW_ACTION_DIM`` or ``action.new_embodiment.raw_action_dim``), non-finite values in
    the action / state columns (naming the episode) and in the statistics. With ``skip_bad_samples`` the
    windows touching a non-finite row are dropped and counted (``non_finite``) instead. Episodes shorter
    than one window are always skipped and counted (``too_short``). ``self.counter`` holds the counts.

    ``__getitem__`` decodes the frames; a video that cannot be decoded raises `BadSampleError`, or with
    ``skip_bad_samples`` is counted and gives ``None`` (drop it in the collate function).
    """

    def __init__(self, cfg_action, split: str = "train", normalizer: ActionNormalizer | None = None,
                 skip_bad_samples: bool = False):
        from cosmos_train.data.embodiment import resolve_embodiment

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        a = cfg_action
        self.cfg = a
        self.split = split
        self.skip_bad_samples = skip_bad_samples
        self.counter = SkipCounter()
        self.chunk = int(a.chunk_size)
        if self.chunk < 1:
            raise UserError(f"invalid value for 'action.chunk_size': {self.chunk}")
        self.stride = int(a.window_stride or 1)
        self.src = src = LeRobotSource(a.dataset)
        self.name = src.name

        # keys
        self.cameras = list(a.cameras)
        for cam in self.cameras:
            src.check_camera(cam)
        self.action_keys = list(a.action_keys)
        for k in self.action_keys:
            src.check_numeric(k, "action.action_keys")
        self.state_key = a.state_key
        if self.state_key is not None:
            src.check_numeric(self.state_key, "action.state_key")
        widths = [src.width(k) for k in self.action_keys]
        self.action_width = sum(widths)
        self.embodiment = resolve_embodiment(a)
        want = self.embodiment.raw_action_dim
        if want is not None and want != self.action_width:
            parts = " + ".join(f"'{k}' {w}" for k, w in zip(self.action_keys, widths))
            where = ("action.new_embodiment.raw_action_dim" if self.embodiment.new
                     else "diffusers' _EMBODIMENT_TO_RAW_ACTION_DIM")
            raise UserError(f"{self.name}: action width {self.action_width} ({parts}, action.action_keys) does not "
                            f"match embodiment '{self.embodiment.name}' width {want} ({where})")

        # split
        self.train_episodes, self.val_episodes = split_episodes(src.episodes, a.val_episodes)
        if not self.train_episodes:
            raise UserError(f"invalid value for 'action.val_episodes': {a.val_episodes} leaves no training episode "
                            f"({self.name} has {len(src.episodes)})")
        self.episode_ids = self.train_episodes if split == "train" else self.val_episodes
        for e in self.episode_ids:
            for cam in self.cameras:
                if cam not in src.episodes[e].videos:
                    raise UserError(f"{self.name}: episode {e} has no video metadata for camera '{cam}' "
                                    f"(videos/{cam}/chunk_index, file_index, from_timestamp in meta/episodes)")
        self.fps = float(a.fps) if a.fps is not None else src.fps

        # rows
        keys = self.action_keys + ([self.state_key] if self.state_key and self.state_key not in self.action_keys
                                   else [])
        self.rows = src.read_columns(keys, episodes=sorted(set(self.episode_ids) | set(self.train_episodes)))
        bad_rows = self._find_non_finite(keys)

        # normalization
        if normalizer is None:
            normalizer = self._make_normalizer(self.action_keys, widths)
        elif normalizer.width != self.action_width:
            raise UserError(f"{self.name}: the given action normalizer has {normalizer.width} channels "
                            f"({normalizer.keys}), the actions have {self.action_width}")
        self.normalizer = normalizer
        self.state_normalizer = (self._make_normalizer([self.state_key], [src.width(self.state_key)])
                                 if self.state_key else None)

        # windows
        self.windows: list[tuple[int, int]] = []
        for e in self.episode_ids:
            length = src.episodes[e].length
            if length < self.chunk + 1:
                self.counter.add("too_short", f"{self.name}:episode={e}",
                                 f"{self.name}: episode {e} has {length} frames, a window needs {self.chunk + 1} "
                                 f"(action.chunk_size {self.chunk} + 1)")
                continue
            bad = bad_rows.get(e)
            for t in range(0, length - self.chunk, self.stride):
                if bad is not None and (bad["action"][t:t + self.chunk].any() or bad["state"][t]):
                    self.counter.add("non_finite", f"{self.name}:episode={e}:frame={t}",
                                     f"{self.name}: episode {e}: window at frame {t} has non-finite actions/state")
                    continue
                self.windows.append((e, t))
        self._counted: set[int] = set()

        sizes = {}
        for cam in self.cameras:
            sizes[cam] = src.frame_size(cam)
        self.camera_sizes = sizes
        h0 = next(iter(sizes.values()))
        frame_size = None
        if all(s is not None for s in sizes.values()):
            height = h0[0]
            frame_size = (height, sum(round(s[1] * height / s[0]) for s in sizes.values()))
        self.info = {
            "dataset": str(src.root),
            "name": self.name,
            "codebase_version": src.version,
            "split": split,
            "fps": self.fps,
            "dataset_fps": src.fps,
            "episodes": {"train": len(self.train_episodes), "val": len(self.val_episodes)},
            "val_episode_indices": list(self.val_episodes),
            "action_keys": dict(zip(self.action_keys, widths)),
            "action_width": self.action_width,
            "state_key": self.state_key,
            "state_width": src.width(self.state_key) if self.state_key else None,
            "cameras": list(self.cameras),
            "camera_sizes": {k: list(v) if v else None for k, v in sizes.items()},
            "frame_size": list(frame_size) if frame_size else None,
            "chunk_size": self.chunk,
            "window_frames": self.chunk + 1,
            "window_stride": self.stride,
            "windows": len(self.windows),
            "embodiment": self.embodiment.name,
            "domain_id": self.embodiment.domain_id,
            "normalization": self.normalizer.to_dict(),
            "state_normalization": self.state_normalizer.to_dict() if self.state_normalizer else None,
            "skipped": dict(self.counter.by_reason),
        }

    # ---- helpers -----------------------------------------------------------------------------

    def _find_non_finite(self, keys: list[str]) -> dict[int, dict[str, np.ndarray]]:
        """{episode: {"action": bool [L], "state": bool [L]}} for episodes with non-finite rows; without
        skip_bad_samples the first one is an error naming the episode and key."""
        out = {}
        for e, cols in self.rows.items():
            length = self.src.episodes[e].length
            bad_a, bad_s = np.zeros(length, bool), np.zeros(length, bool)
            for k in keys:
                bad = ~np.isfinite(cols[k]).all(axis=1)
                if not bad.any():
                    continue
                if not self.skip_bad_samples:
                    frames = np.flatnonzero(bad)
                    raise UserError(f"{self.name}: episode {e}: '{k}' has non-finite values (NaN/inf) at frame(s) "
                                    f"{frames[:5].tolist()}{' ...' if len(frames) > 5 else ''} (set "
                                    "data.skip_bad_samples: true to skip the windows that touch them)")
                if k in self.action_keys:
                    bad_a |= bad
                if k == self.state_key:
                    bad_s |= bad
            if bad_a.any() or bad_s.any():
                out[e] = {"action": bad_a, "state": bad_s}
        return out

    def _make_normalizer(self, keys: list[str], widths: list[int]) -> ActionNormalizer:
        a = self.cfg
        if a.normalization == "none":
            return ActionNormalizer("none", keys, widths, clamp=a.clamp, source="none")
        if a.stats == "computed":
            arrays = {k: np.concatenate([self.rows[e][k] for e in self.train_episodes]) for k in keys}
            n = len(self.train_episodes)
            return ActionNormalizer.compute(arrays, keys, a.normalization, a.clamp,
                                            name=f"{self.name} (training split, {n} episode{'s' if n != 1 else ''})")
        return ActionNormalizer.from_stats(self.src.stats(), keys, a.normalization, a.clamp, widths=widths,
                                           name=f"{self.name}: meta/stats.json")

    # ---- Dataset -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> ActionWindow | None:
        e, t = self.windows[int(i)]
        source = f"{self.name}:episode={e}:frame={t}"
        try:
            return self._load(e, t, source)
        except BadSampleError as err:
            if not self.skip_bad_samples:
                raise
            if int(i) not in self._counted:
                self._counted.add(int(i))
                self.counter.add(err.reason, source, str(err))
            return None

    def _load(self, e: int, t: int, source: str) -> ActionWindow:
        cols = self.rows[e]
        raw = np.concatenate([cols[k][t:t + self.chunk] for k in self.action_keys], axis=1)
        raw_t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        actions = self.normalizer.normalize(raw_t).float()
        state = None
        if self.state_key is not None:
            state = self.state_normalizer.normalize(torch.from_numpy(cols[self.state_key][t].astype(np.float32)))
        timestamps = cols["timestamp"][t:t + self.chunk + 1]
        views = []
        for cam in self.cameras:
            frames = torch.from_numpy(self.src.decode_frames(cam, e, timestamps, source))  # [T, H, W, 3]
            views.append(frames.permute(3, 0, 1, 2).float())  # [3, T, H, W] in 0..255
        height = views[0].shape[2]
        for j, v in enumerate(views):
            if v.shape[2] != height:  # another height: scale to the first camera's, keeping the aspect
                w = round(v.shape[3] * height / v.shape[2])
                v = torch.nn.functional.interpolate(v.permute(1, 0, 2, 3), size=(height, w), mode="bilinear",
                                                    antialias=True, align_corners=False)
                views[j] = v.round().clamp(0, 255).permute(1, 0, 2, 3)
        pixels = torch.cat(views, dim=3) / 127.5 - 1.0
        task = self._task(e, t)
        return ActionWindow(pixels=pixels.contiguous(), actions=actions, raw_actions=raw_t, state=state, task=task,
                            fps=self.fps, source=source, episode=e)

    def _task(self, e: int, t: int) -> str:
        cols = self.rows[e]
        if "task_index" in cols and int(cols["task_index"][t]) in self.src.tasks:
            return self.src.tasks[int(cols["task_index"][t])]
        tasks = self.src.episodes[e].tasks
        return tasks[0] if tasks else ""
