#!/usr/bin/env python
"""Generate the tiny bundled LeRobot v3.0 dataset of a simulated 2-D point robot (pusht-like).

Usage::

    python data/make_tiny_lerobot.py [OUT_DIR]      # default: data/lerobot_tiny next to this script

A red disc (the robot) moves on a 64x64 table toward a green target. ``observation.state`` is the
disc's (x, y) position in pixels at a frame, ``action`` the (dx, dy) velocity in pixels per frame
taken at that frame, so ``state[t + 1] = state[t] + action[t]`` and frame t + 1 shows the disc moved
by ``action[t]``: the relation between frames and actions is exact and learnable. Two tasks (two
target corners), 6 episodes of 36-44 frames at 10 fps, one camera ``observation.images.top``.

The files follow the LeRobot v3.0 writer (huggingface/lerobot, src/lerobot/datasets/:
dataset_writer.py, dataset_metadata.py, io_utils.py, feature_utils.py, compute_stats.py,
video_utils.py) step by step:

- each episode's frames are encoded to their own mp4, then appended to ONE file per camera with
  FFmpeg's concat demuxer and a stream copy (``concatenate_video_files``); the episode's
  ``videos/<key>/from_timestamp`` is the summed stream duration of the episodes before it
  (``get_video_duration_in_s``), ``to_timestamp`` adds its own;
- data rows go through ``datasets.Dataset.from_dict(..., features=get_hf_features_from_features(...))``
  (shape-[1] features become scalar columns, shape-[n] fixed-size lists) and one ``ParquetWriter``
  (snappy, dictionary) with one ``write_table`` per episode; timestamps are float32 ``frame_index / fps``;
- episode metadata is ``pa.Table.from_pydict`` of per-episode dicts (tasks list, length,
  dataset_from/to_index, data/*, videos/*, stats/<key>/<stat> lists, meta/episodes/*);
- tasks.parquet is a pandas DataFrame indexed by the task string (index name "task") with a
  task_index column; stats.json aggregates the per-episode statistics as ``aggregate_stats`` does
  (count-weighted mean / pooled std, min / max, and q01/q10/q50 = min and q90/q99 = max of the
  per-episode quantiles), image statistics in (3, 1, 1) nested lists of [0, 1] values;
- info.json is ``DatasetInfo.to_dict()``: codebase_version "v3.0", int fps, features (ours, then the
  default timestamp / frame_index / episode_index / index / task_index), the video feature's ``info``
  dict from ``get_video_info`` (+ the encoder settings), counters, size limits, path templates, splits.

Video: H.264 (libx264, yuv420p, crf 18; one thread, no SIMD and a numpy RGB -> YUV conversion so the
bitstream is reproducible with the same FFmpeg/x264 build); LeRobot's own default is AV1 (libsvtav1), which
the reader decodes as well.
Everything else is computed from fixed seeds: re-running gives the same files.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_samples import rgb_to_yuv420p  # noqa: E402

FPS = 10
SIZE = 64
CAMERA = "observation.images.top"
LENGTHS = [40, 44, 36, 42, 38, 40]
TASKS = ["Push the red disc to the green target in the top left corner.",
         "Push the red disc to the green target in the bottom right corner."]
GOALS = [(14.0, 14.0), (50.0, 50.0)]  # (x, y) pixels, per task
RADIUS = 5.0
CODEC = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": 18}


# --------------------------------------------------------------------------------------------
# simulation + rendering
# --------------------------------------------------------------------------------------------


def simulate(episode: int, length: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(task_index, state [L, 2], action [L, 2]); state[t + 1] = state[t] + action[t]."""
    rng = np.random.RandomState(1000 + episode)
    task = episode % 2
    goal = np.asarray(GOALS[task])
    pos = np.asarray(GOALS[1 - task]) + rng.uniform(-6, 6, size=2)  # start near the other corner
    phase, omega = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6)
    states, actions = [], []
    for t in range(length):
        pull = np.clip(0.1 * (goal - pos), -2.5, 2.5)
        wander = 0.9 * np.array([np.sin(omega * t + phase), np.cos(omega * t + phase)])
        act = np.round(pull + wander + rng.normal(0, 0.2, size=2), 3)
        act = np.clip(act, RADIUS + 2 - pos, SIZE - RADIUS - 2 - pos)  # stay on the table
        states.append(pos.copy())
        actions.append(act)
        pos = pos + act
    return task, np.asarray(states, np.float32), np.asarray(actions, np.float32)


def render(state: np.ndarray, task: int) -> np.ndarray:
    """uint8 [H, W, 3]: dark table, green target square, anti-aliased red disc centred at state (x, y)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = (0.12, 0.14, 0.2)
    gx, gy = GOALS[task]
    target = (np.abs(xs - gx) <= 4) & (np.abs(ys - gy) <= 4)
    img[target] = (0.15, 0.7, 0.25)
    cover = np.clip(RADIUS - np.sqrt((xs - state[0]) ** 2 + (ys - state[1]) ** 2) + 0.5, 0, 1)[..., None]
    img = img * (1 - cover) + np.asarray((0.9, 0.15, 0.1), np.float32) * cover
    return np.round(img * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# LeRobot writer steps
# --------------------------------------------------------------------------------------------


def feature_stats(x: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """compute_stats.get_feature_stats: min, max, mean, std, count, q01..q99 (images: per channel,
    values / 255, kept as (3, 1, 1))."""
    if image:  # [T, H, W, 3] -> per channel over everything
        x = (x.astype(np.float64) / 255.0).reshape(-1, 3)
    x = x.astype(np.float64).reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q in (0.01, 0.10, 0.50, 0.90, 0.99):
        out[f"q{int(q * 100):02d}"] = np.quantile(x, q, axis=0)
    if image:
        out = {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in out.items()}
    return out


def aggregate(stats_list: list[dict]) -> dict:
    """compute_stats.aggregate_feature_stats."""
    means = np.stack([s["mean"] for s in stats_list])
    variances = np.stack([s["std"] ** 2 for s in stats_list])
    counts = np.stack([s["count"] for s in stats_list])
    total = counts.sum(axis=0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, -1)
    mean = (means * counts).sum(0) / total
    var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
    out = {"min": np.min(np.stack([s["min"] for s in stats_list]), 0),
           "max": np.max(np.stack([s["max"] for s in stats_list]), 0),
           "mean": mean, "std": np.sqrt(var), "count": total}
    for q in ("q01", "q10", "q50", "q90", "q99"):
        vals = np.stack([s[q] for s in stats_list])
        out[q] = vals.min(0) if int(q[1:]) <= 50 else vals.max(0)
    return out


def encode_episode(frames: np.ndarray, path: Path) -> None:
    """video_utils.encode_video_frames: add_stream(vcodec, fps), frames without explicit pts."""
    with av.open(str(path), "w") as out:
        # one thread and no SIMD: x264's assembly paths made the bytes differ between runs (even in one process)
        stream = out.add_stream(CODEC["vcodec"], FPS,
                                options={"crf": str(CODEC["crf"]), "threads": "1", "x264-params": "asm=0"})
        stream.pix_fmt = CODEC["pix_fmt"]
        stream.width, stream.height = SIZE, SIZE
        stream.codec_context.thread_count = 1  # reproducible bitstream
        for f in frames:
            # RGB -> yuv420p in numpy (make_samples.rgb_to_yuv420p): swscale's SIMD conversion made the
            # bytes differ from run to run
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def video_duration(path: Path) -> float:
    """video_utils.get_video_duration_in_s."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base) if s.duration is not None else float(c.duration / av.time_base)


def concatenate(inputs: list[Path], output: Path) -> None:
    """video_utils.concatenate_video_files: ffconcat demuxer, stream copy, faststart."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.ffconcat"
        listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p.resolve()}'\n" for p in inputs))
        tmp_out = Path(tmp) / "out.mp4"
        src = av.open(str(listing), mode="r", format="concat", options={"safe": "0"})
        dst = av.open(str(tmp_out), mode="w", options={"movflags": "faststart"})
        stream_map = {}
        for s in src.streams:
            if s.type in ("video", "audio", "subtitle"):
                stream_map[s.index] = dst.add_stream_from_template(template=s, opaque=True)
                stream_map[s.index].time_base = s.time_base
        for packet in src.demux():
            if packet.stream.index not in stream_map or packet.dts is None:
                continue
            packet.stream = stream_map[packet.stream.index]
            dst.mux(packet)
        src.close()
        dst.close()
        shutil.move(str(tmp_out), output)


def video_info(path: Path) -> dict:
    """video_utils.get_video_info (+ the encoder settings, as update_video_info records them)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        info = {"video.height": s.height, "video.width": s.width, "video.codec": s.codec.canonical_name,
                "video.pix_fmt": s.pix_fmt, "video.fps": int(s.base_rate), "video.channels": 3}
    info["has_audio"] = False
    info.update({"video.g": None, "video.crf": CODEC["crf"], "video.preset": None, "video.fast_decode": 0})
    info["is_depth_map"] = False
    return info


def write(out: Path) -> None:
    import datasets
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.exists():
        shutil.rmtree(out)
    (out / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (out / "data" / "chunk-000").mkdir(parents=True)
    video_dir = out / "videos" / CAMERA / "chunk-000"
    video_dir.mkdir(parents=True)

    features = {
        CAMERA: {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"], "info": None},
        "observation.state": {"dtype": "float32", "shape": [2], "names": {"motors": ["x", "y"]}},
        "action": {"dtype": "float32", "shape": [2], "names": {"motors": ["x", "y"]}},
        # utils/constants.py DEFAULT_FEATURES, appended after the user's features
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    # feature_utils.get_hf_features_from_features (video features have no column)
    hf_features = datasets.Features({
        "observation.state": datasets.Sequence(length=2, feature=datasets.Value("float32")),
        "action": datasets.Sequence(length=2, feature=datasets.Value("float32")),
        "timestamp": datasets.Value("float32"),
        "frame_index": datasets.Value("int64"),
        "episode_index": datasets.Value("int64"),
        "index": datasets.Value("int64"),
        "task_index": datasets.Value("int64"),
    })

    tasks_df = pd.DataFrame({"task_index": range(len(TASKS))}, index=pd.Index(TASKS, name="task"))
    tasks_df.to_parquet(out / "meta" / "tasks.parquet")

    data_path = out / "data" / "chunk-000" / "file-000.parquet"
    writer = None
    episode_rows, all_stats, ep_videos = [], [], []
    total = 0
    video_end = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for ep, length in enumerate(LENGTHS):
            task, state, action = simulate(ep, length)
            frames = np.stack([render(s, task) for s in state])
            frame_index = np.arange(length)
            ep_dict = {
                "observation.state": state, "action": action,
                "timestamp": (frame_index / FPS).astype(np.float32),
                "frame_index": frame_index, "episode_index": np.full(length, ep),
                "index": np.arange(total, total + length), "task_index": np.full(length, task),
            }
            ds = datasets.Dataset.from_dict(ep_dict, features=hf_features, split="train")
            table = ds.with_format("arrow")[:]
            if writer is None:
                writer = pq.ParquetWriter(data_path, schema=table.schema, compression="snappy", use_dictionary=True)
            writer.write_table(table)

            ep_stats = {k: feature_stats(np.asarray(v)) for k, v in ep_dict.items()}
            ep_stats[CAMERA] = feature_stats(frames, image=True)
            all_stats.append(ep_stats)

            ep_mp4 = Path(tmp) / f"{CAMERA}_{ep:03d}.mp4"
            encode_episode(frames, ep_mp4)
            duration = video_duration(ep_mp4)
            ep_videos.append(ep_mp4)

            row = {"episode_index": ep, "tasks": [TASKS[task]], "length": length,
                   "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": total, "dataset_to_index": total + length,
                   f"videos/{CAMERA}/chunk_index": 0, f"videos/{CAMERA}/file_index": 0,
                   f"videos/{CAMERA}/from_timestamp": video_end,
                   f"videos/{CAMERA}/to_timestamp": video_end + duration}
            for key, st in ep_stats.items():  # flatten_dict({"stats": ...})
                for name, value in st.items():
                    row[f"stats/{key}/{name}"] = value.tolist()
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            episode_rows.append(row)
            total += length
            video_end += duration
        writer.close()
        concatenate(ep_videos, video_dir / "file-000.mp4")

    table = pa.Table.from_pydict({k: [r[k] for r in episode_rows] for k in episode_rows[0]})
    with pq.ParquetWriter(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet", schema=table.schema,
                          compression="snappy", use_dictionary=True) as w:
        w.write_table(table)

    stats = {k: aggregate([s[k] for s in all_stats]) for k in all_stats[0]}
    stats = {k: {n: v.tolist() for n, v in st.items()} for k, st in stats.items()}
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=4, ensure_ascii=False))

    features[CAMERA]["info"] = video_info(video_dir / "file-000.mp4")
    info = {
        "codebase_version": "v3.0", "fps": FPS, "features": features,
        "total_episodes": len(LENGTHS), "total_frames": total, "total_tasks": len(TASKS),
        "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "robot_type": "point2d", "splits": {"train": f"0:{len(LENGTHS)}"},
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False))


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "lerobot_tiny"
    write(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({len(LENGTHS)} episodes, {sum(LENGTHS)} frames, {size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv)
