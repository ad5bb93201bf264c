"""World-action data: LeRobot v3.0 / v2.1 datasets -> windows of chunk + 1 frames and chunk actions,
action normalization, the recipe's `action:` section and every bad-input error."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cosmos_train.config import load_recipe, load_saved_recipe, save_recipe
from cosmos_train.config import schema as S
from cosmos_train.data.action_norm import ActionNormalizer, compute_stats
from cosmos_train.data.lerobot import LeRobotActionDataset, LeRobotSource, split_episodes
from cosmos_train.errors import BadSampleError, UserError

from .conftest import REPO

TINY = REPO / "data" / "lerobot_tiny"
CAM = "observation.images.top"


def _cfg(dataset=TINY, **kw) -> S.ActionConfig:
    base = dict(dataset=str(dataset), cameras=[CAM], embodiment="pusht", state_key="observation.state")
    base.update(kw)
    return S.ActionConfig(**base)


def _copy_tiny(tmp_path) -> Path:
    out = tmp_path / "tiny_copy"
    shutil.copytree(TINY, out)
    return out


def _parquet_rows(root: Path, key: str) -> dict[int, np.ndarray]:
    """{episode: [L, D] rows of `key`}, read straight from the data parquet files."""
    out = {}
    for f in sorted((root / "data").rglob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        for ep in sorted(set(t["episode_index"])):
            idx = [i for i, e in enumerate(t["episode_index"]) if e == ep]
            vals = [t[key][i] for i in idx]
            out[ep] = np.asarray([v if isinstance(v, list) else [v] for v in vals], dtype=np.float32)
    return out


def _disc_centroids(pixels: torch.Tensor) -> np.ndarray:
    """(x, y) of the red disc in each frame of [3, T, H, W] pixels in [-1, 1] (weight: red over the rest)."""
    r, g, b = (pixels + 1) * 127.5
    w = torch.clamp(r - torch.maximum(g, b), min=0)
    h, wd = w.shape[1:]
    xs, ys = torch.arange(wd).float() + 0.5, torch.arange(h).float() + 0.5
    tot = w.sum((1, 2))
    return torch.stack([(w * xs).sum((1, 2)) / tot, (w * ys[:, None]).sum((1, 2)) / tot], 1).numpy()


# ---------------------------------------------------------------------------------------------------
# the bundled tiny dataset (H.264, LeRobot v3.0 layout)
# ---------------------------------------------------------------------------------------------------


def test_tiny_dataset_is_lerobot_v3_layout():
    info = json.loads((TINY / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["features"][CAM]["dtype"] == "video" and info["features"]["action"]["shape"] == [2]
    stats = json.loads((TINY / "meta" / "stats.json").read_text())
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(stats[CAM]["mean"]).shape == (3, 1, 1)
    videos = list((TINY / "videos").rglob("*.mp4"))
    assert [p.relative_to(TINY).as_posix() for p in videos] == [f"videos/{CAM}/chunk-000/file-000.mp4"]
    eps = pq.read_table(next((TINY / "meta" / "episodes").rglob("*.parquet"))).to_pydict()
    assert len(eps["episode_index"]) == 6 and len(set(t[0] for t in eps["tasks"])) == 2
    # one mp4 holds every episode, one after the other
    assert eps[f"videos/{CAM}/from_timestamp"][0] == 0.0
    assert eps[f"videos/{CAM}/from_timestamp"][1:] == eps[f"videos/{CAM}/to_timestamp"][:-1]
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size < 1_000_000


def test_windows_align_frames_actions_and_state():
    """The disc drawn in each decoded frame sits at that frame's observation.state, so frames t..t+chunk
    are the parquet rows t..t+chunk (and not one off); actions are rows t..t+chunk-1 as stored."""
    ds = LeRobotActionDataset(_cfg(window_stride=7))
    rows = _parquet_rows(TINY, "action")
    states = _parquet_rows(TINY, "observation.state")
    assert len({e for e, _ in ds.windows}) == 6 and any(t > 0 for _, t in ds.windows)
    for i in range(len(ds)):
        w = ds[i]
        e, t = ds.windows[i]
        assert w.source == f"lerobot_tiny:episode={e}:frame={t}" and w.episode == e
        assert w.pixels.shape == (3, 17, 64, 64) and w.pixels.dtype == torch.float32
        assert -1.0 <= float(w.pixels.min()) and float(w.pixels.max()) <= 1.0
        assert torch.equal(w.raw_actions, torch.from_numpy(rows[e][t:t + 16]))
        c = _disc_centroids(w.pixels)
        err = np.abs(c - states[e][t:t + 17]).max()
        assert err < 0.45, (w.source, err)
        for shift in (-1, 1):  # the neighbours' positions fit worse
            lo, hi = t + shift, t + shift + 17
            if 0 <= lo and hi <= len(states[e]):
                assert np.abs(c - states[e][lo:hi]).mean() > np.abs(c - states[e][t:t + 17]).mean()
        # the simulated robot: the action at frame i moves the disc to frame i + 1
        np.testing.assert_allclose(states[e][t + 1:t + 17], states[e][t:t + 16] + rows[e][t:t + 16], atol=1e-4)
        assert w.state is not None and torch.allclose(
            w.state, ds.state_normalizer.normalize(torch.from_numpy(states[e][t])))
        assert torch.allclose(w.actions, ds.normalizer.normalize(w.raw_actions))
        assert w.fps == 10.0 and w.task.startswith("Push the red disc")


def test_windows_never_cross_episode_edges_and_stride():
    src = LeRobotSource(TINY)
    lengths = {e: ep.length for e, ep in src.episodes.items()}
    ds = LeRobotActionDataset(_cfg(chunk_size=8, window_stride=None))
    assert ds.info["window_stride"] == 1
    assert len(ds) == sum(L - 8 for L in lengths.values())
    assert all(0 <= t and t + 8 <= lengths[e] - 1 for e, t in ds.windows)
    ds5 = LeRobotActionDataset(_cfg(chunk_size=8, window_stride=5))
    assert set(ds5.windows) == {(e, t) for e, L in lengths.items() for t in range(0, L - 8, 5)}
    last = max(ds5.windows, key=lambda w: (w[0], w[1]))
    assert last[1] + 8 < lengths[last[0]]


def test_held_out_split_is_disjoint_by_episode():
    train = LeRobotActionDataset(_cfg(val_episodes=2))
    val = LeRobotActionDataset(_cfg(val_episodes=2), split="val")
    assert train.info["episodes"] == {"train": 4, "val": 2} and val.info["val_episode_indices"] == [4, 5]
    assert {e for e, _ in train.windows} == {0, 1, 2, 3}
    assert {e for e, _ in val.windows} == {4, 5}
    assert val[0].episode in (4, 5)
    # the val split is normalized with the training split's statistics (computed: from train rows only)
    tr = LeRobotActionDataset(_cfg(val_episodes=2, stats="computed"))
    va = LeRobotActionDataset(_cfg(val_episodes=2, stats="computed"), split="val")
    assert tr.normalizer.to_dict()["stats"] == va.normalizer.to_dict()["stats"]
    assert split_episodes([0, 1, 2, 3], [1]) == ([0, 2, 3], [1])
    with pytest.raises(UserError, match="no training episode"):
        LeRobotActionDataset(_cfg(val_episodes=6))


# ---------------------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["none", "quantile", "mean_std", "min_max"])
def test_normalizer_round_trip_and_mapping(method):
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.normal(3, 2, size=(500, 2)), rng.uniform(-50, 10, size=(500, 1))], axis=1)
    norm = ActionNormalizer.compute({"a": x[:, :2], "b": x[:, 2:]}, ["a", "b"], method)
    assert norm.width == 3 and norm.widths == [2, 1]
    y = norm.normalize(torch.from_numpy(x).float())
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    back = norm.denormalize(y)
    np.testing.assert_allclose(back.numpy(), x, rtol=1e-5, atol=1e-4)
    yn = norm.normalize(x)
    assert isinstance(yn, np.ndarray)
    np.testing.assert_allclose(norm.denormalize(yn), x, rtol=1e-9, atol=1e-9)
    st = compute_stats(x)
    if method == "quantile":
        np.testing.assert_allclose(norm.normalize(np.asarray([st["q01"], st["q99"]])), [[-1] * 3, [1] * 3], atol=1e-9)
        assert (np.abs(yn) > 1).any()  # beyond the 1-99% range, unclamped
    elif method == "min_max":
        np.testing.assert_allclose(norm.normalize(np.asarray([st["min"], st["max"]])), [[-1] * 3, [1] * 3], atol=1e-9)
    elif method == "mean_std":
        np.testing.assert_allclose(yn.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(yn.std(0), 1, atol=1e-9)
    else:
        np.testing.assert_array_equal(yn, x)
    again = ActionNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(again.normalize(x), yn)


def test_normalizer_clamp_and_constant_channel():
    x = np.stack([np.linspace(0, 100, 101), np.full(101, 7.0)], 1)
    norm = ActionNormalizer.compute(x, ["a"], "quantile", clamp=1.0)
    y = norm.normalize(x)
    assert y.min() == -1.0 and y[:, 0].max() == 1.0 and np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, 1], 0.0)  # constant: centred, not divided by 0
    np.testing.assert_allclose(norm.denormalize(y)[5:96], x[5:96], atol=1e-9)  # exact where not clamped
    assert norm.denormalize(y)[0, 0] > x[0, 0]  # clamped values do not come back


def test_normalizer_from_dataset_stats_and_computed():
    stats = json.loads((TINY / "meta" / "stats.json").read_text())
    ds = LeRobotActionDataset(_cfg())
    norm = ds.normalizer
    assert norm.method == "quantile" and "meta/stats.json" in norm.source
    lo, hi = np.asarray(stats["action"]["q01"]), np.asarray(stats["action"]["q99"])
    np.testing.assert_allclose(norm.normalize(np.stack([lo, hi])), [[-1, -1], [1, 1]], atol=1e-6)
    comp = LeRobotActionDataset(_cfg(stats="computed", val_episodes=1)).normalizer
    train_rows = np.concatenate([r for e, r in _parquet_rows(TINY, "action").items() if e != 5])
    q = np.quantile(train_rows.astype(np.float64), [0.01, 0.99], axis=0)
    np.testing.assert_allclose(comp.normalize(q), [[-1, -1], [1, 1]], atol=1e-6)
    assert comp.stats["action"]["q01"] != norm.stats["action"]["q01"]
    # compute() straight from the directory, a subset of episodes
    direct = ActionNormalizer.compute(TINY, ["action"], "quantile", episodes=[0, 1, 2, 3, 4])
    np.testing.assert_allclose(direct.center, comp.center)
    mm = LeRobotActionDataset(_cfg(normalization="min_max")).normalizer
    np.testing.assert_allclose(mm.normalize(np.stack([stats["action"]["min"], stats["action"]["max"]])),
                               [[-1, -1], [1, 1]], atol=1e-6)
    assert ds.state_normalizer.keys == ["observation.state"]


def test_stats_quantiles_missing_say_use_computed():
    with pytest.raises(UserError, match="no q01, q99.*action.stats: computed"):
        ActionNormalizer.from_stats({"action": {"min": [0], "max": [1]}}, ["action"], "quantile", name="ds")
    with pytest.raises(UserError, match="ds: no statistics for 'act'"):
        ActionNormalizer.from_stats({"action": {}}, ["act"], "min_max", name="ds")


# ---------------------------------------------------------------------------------------------------
# a dataset written the way LeRobot's own writer writes (AV1, several files, scalar features, ...)
# ---------------------------------------------------------------------------------------------------
#
# Matched from huggingface/lerobot (src/lerobot/datasets/):
#  - feature_utils.get_hf_features_from_features: shape (1,) -> datasets.Value (a SCALAR column), shape (n,)
#    -> datasets.Sequence(length=n) (fixed_size_list), video features have no column;
#  - dataset_writer._save_episode_data: datasets.Dataset.from_dict(..., features) -> arrow table, one
#    pq.ParquetWriter(snappy, use_dictionary) per data file, one write_table per episode; data files roll
#    over by size (chunk/file index in the episode metadata); timestamps float32 frame_index / fps
#    (add_frame); `index` global, `task_index` per frame (one episode may have several tasks);
#  - dataset_metadata._flush_metadata_buffer: pa.Table.from_pydict of per-episode dicts: episode_index,
#    tasks (list), length, data/*, dataset_from/to_index, videos/<key>/{chunk_index, file_index,
#    from_timestamp, to_timestamp}, stats/<key>/<stat> (flatten_dict, nested lists for images),
#    meta/episodes/{chunk_index, file_index};
#  - dataset_writer._save_episode_video + video_utils.concatenate_video_files / get_video_duration_in_s:
#    each episode encoded alone, appended by the ffconcat demuxer (stream copy); from_timestamp = the
#    previous to_timestamp, 0 in a new file; video files roll over independently of data files;
#  - video_utils.encode_video_frames + configs/video.VideoEncoderConfig: libsvtav1, yuv420p, g=2, crf=30;
#    get_video_info: info {video.height, video.width, video.codec "av1", video.pix_fmt, video.fps,
#    video.channels, has_audio, is_depth_map};
#  - io_utils.write_tasks (pandas DataFrame indexed by "task"), write_stats (count as [n], (3,1,1) image
#    stats), utils.DatasetInfo.to_dict (plus keys older v3 writers added, e.g. total_chunks, total_videos).

FPS_Q = 10
BITS = 8


def _code_frame(index: int, invert: bool = False) -> np.ndarray:
    """64x64 RGB: the global frame index as 8 black/white 8x8 blocks in the top rows (LSB first)."""
    img = np.full((64, 64, 3), 90, np.uint8)
    for b in range(BITS):
        on = bool((index >> b) & 1) ^ invert
        img[0:16, b * 8:(b + 1) * 8] = 235 if on else 20
    return img


def _read_code(pixels: torch.Tensor, x0: int = 0, invert: bool = False) -> list[int]:
    """Decode the block code of every frame of [3, T, H, W] pixels (blocks start at column x0)."""
    vals = (pixels.mean(0) + 1) * 127.5  # [T, H, W]
    out = []
    for f in vals:
        bits = [bool(f[2:14, x0 + b * 8 + 2:x0 + b * 8 + 6].mean() > 128) ^ invert for b in range(BITS)]
        out.append(sum(1 << b for b, on in enumerate(bits) if on))
    return out


def _encode(frames, path: Path, codec: str) -> None:
    opts = ({"g": "2", "crf": "30", "preset": "12", "svtav1-params": "fast-decode=0"} if codec == "libsvtav1"
            else {"g": "2", "crf": "18"})
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, FPS_Q, options=opts)
        s.pix_fmt = "yuv420p"
        s.width = s.height = 64
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _writer():
    """data/make_tiny_lerobot.py (a script, not a package): its LeRobot-writer helpers (video duration,
    concat demuxer + stream copy), which the AV1 fixture below reuses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_lerobot", REPO / "data" / "make_tiny_lerobot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _duration(path: Path) -> float:
    return _writer().video_duration(path)


def _concat(inputs: list[Path], output: Path) -> None:
    _writer().concatenate(inputs, output)


def _stats(x: np.ndarray, image=False) -> dict:
    x = x.astype(np.float64)
    if image:
        x = (x / 255.0).reshape(-1, 3)
    x = x.reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q in (1, 10, 50, 90, 99):
        out[f"q{q:02d}"] = np.quantile(x, q / 100, axis=0)
    if image:
        out = {k: v if k == "count" else v.reshape(3, 1, 1) for k, v in out.items()}
    return out


LENGTHS_Q = [14, 11, 13, 12, 15]
CAM2 = "observation.images.wrist"


def write_lerobot_like(root: Path, codec: str = "libsvtav1") -> Path:
    """Five episodes, two cameras, action [3] + a scalar gripper feature, written as LeRobot writes."""
    import datasets
    import pandas as pd

    tasks = ["pick the cube", "place the cube"]
    hf = datasets.Features({
        "action": datasets.Sequence(length=3, feature=datasets.Value("float32")),
        "observation.gripper": datasets.Value("float32"),  # shape (1,) -> scalar column
        "observation.state": datasets.Sequence(length=4, feature=datasets.Value("float64")),
        "timestamp": datasets.Value("float32"), "frame_index": datasets.Value("int64"),
        "episode_index": datasets.Value("int64"), "index": datasets.Value("int64"),
        "task_index": datasets.Value("int64"),
    })
    data_file_of = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}  # data files roll over after episode 2
    cam2_file_of = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}  # the wrist videos after episode 1
    writers, ep_rows, all_stats = {}, [], []
    videos: dict[tuple[str, int], list[Path]] = {}
    ends: dict[tuple[str, int], float] = {}
    total = 0
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.RandomState(3)
    for ep, length in enumerate(LENGTHS_Q):
        fi = np.arange(length)
        task_index = np.zeros(length, np.int64) if ep != 1 else (fi >= 2).astype(np.int64)
        if ep in (3, 4):
            task_index[:] = 1
        gidx = np.arange(total, total + length)
        ep_dict = {
            "action": np.stack([gidx * 1.0, gidx * 0.5 - 3, rng.normal(size=length)], 1).astype(np.float32),
            "observation.gripper": (gidx % 2).astype(np.float32),
            "observation.state": rng.normal(size=(length, 4)),
            "timestamp": (fi / FPS_Q).astype(np.float32), "frame_index": fi,
            "episode_index": np.full(length, ep), "index": gidx, "task_index": task_index,
        }
        table = datasets.Dataset.from_dict(ep_dict, features=hf, split="train").with_format("arrow")[:]
        f = data_file_of[ep]
        if f not in writers:
            path = root / f"data/chunk-000/file-{f:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[f] = pq.ParquetWriter(path, schema=table.schema, compression="snappy", use_dictionary=True)
        writers[f].write_table(table)
        frames = {CAM: np.stack([_code_frame(int(i)) for i in gidx]),
                  CAM2: np.stack([_code_frame(int(i), invert=True) for i in gidx])}
        st = {k: _stats(np.asarray(v)) for k, v in ep_dict.items()}
        st.update({k: _stats(v, image=True) for k, v in frames.items()})
        all_stats.append(st)
        row = {"episode_index": ep, "tasks": sorted({tasks[i] for i in task_index}), "length": length,
               "data/chunk_index": 0, "data/file_index": f,
               "dataset_from_index": total, "dataset_to_index": total + length}
        for cam, fr in frames.items():
            vf = 0 if cam == CAM else cam2_file_of[ep]
            p = tmp / f"{cam}_{ep:03d}.mp4"
            _encode(fr, p, codec)
            start = ends.get((cam, vf), 0.0)
            videos.setdefault((cam, vf), []).append(p)
            ends[(cam, vf)] = start + _duration(p)
            row.update({f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": vf,
                        f"videos/{cam}/from_timestamp": start, f"videos/{cam}/to_timestamp": ends[(cam, vf)]})
        row.update({f"stats/{k}/{n}": v.tolist() for k, s in st.items() for n, v in s.items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0 if ep < 3 else 1})
        ep_rows.append(row)
        total += length
    for w in writers.values():
        w.close()
    for (cam, vf), parts in videos.items():
        _concat(parts, root / f"videos/{cam}/chunk-000/file-{vf:03d}.mp4")
    shutil.rmtree(tmp)
    for mf, rows in ((0, ep_rows[:3]), (1, ep_rows[3:])):
        path = root / f"meta/episodes/chunk-000/file-{mf:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pydict({k: [r[k] for r in rows] for k in rows[0]}), path)
    pd.DataFrame({"task_index": range(2)}, index=pd.Index(tasks, name="task")).to_parquet(root / "meta/tasks.parquet")
    agg = {}
    for k in all_stats[0]:
        ss = [s[k] for s in all_stats]
        counts = np.stack([s["count"] for s in ss])
        means = np.stack([s["mean"] for s in ss])
        c = counts.reshape(counts.shape + (1,) * (means.ndim - counts.ndim))
        mean = (means * c).sum(0) / counts.sum(0)
        var = ((np.stack([s["std"] ** 2 for s in ss]) + (means - mean) ** 2) * c).sum(0) / counts.sum(0)
        agg[k] = {"min": np.min([s["min"] for s in ss], 0), "max": np.max([s["max"] for s in ss], 0), "mean": mean,
                  "std": np.sqrt(var), "count": counts.sum(0)}
        for q in ("q01", "q10", "q50"):
            agg[k][q] = np.min([s[q] for s in ss], 0)
        for q in ("q90", "q99"):
            agg[k][q] = np.max([s[q] for s in ss], 0)
    (root / "meta/stats.json").write_text(json.dumps(
        {k: {n: v.tolist() for n, v in s.items()} for k, s in agg.items()}, indent=4))

    def vfeat():
        with av.open(str(root / f"videos/{CAM}/chunk-000/file-000.mp4")) as c:
            s = c.streams.video[0]
            vinfo = {"video.height": s.height, "video.width": s.width, "video.codec": s.codec.canonical_name,
                     "video.pix_fmt": s.pix_fmt, "video.fps": int(s.base_rate), "video.channels": 3}
        return {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channels"],
                "info": {**vinfo, "has_audio": False, "is_depth_map": False}}

    info = {"codebase_version": "v3.0", "fps": FPS_Q, "features": {
        CAM: vfeat(), CAM2: vfeat(),
        "action": {"dtype": "float32", "shape": [3], "names": ["dx", "dy", "dz"]},
        "observation.gripper": {"dtype": "float32", "shape": [1], "names": None},
        "observation.state": {"dtype": "float64", "shape": [4], "names": {"motors": ["a", "b", "c", "d"]}},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None}},
        "total_episodes": 5, "total_frames": total, "total_tasks": 2, "total_chunks": 1, "total_videos": 10,
        "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "robot_type": "toy", "splits": {"train": "0:5"}}
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return root


def _q_cfg(root, **kw):
    base = dict(dataset=str(root), cameras=[CAM], embodiment="toy4", action_keys=["action", "observation.gripper"],
                state_key="observation.state", chunk_size=8,
                new_embodiment=S.NewEmbodimentConfig(name="toy4", raw_action_dim=4, domain_id=24))
    base.update(kw)
    return S.ActionConfig(**base)


@pytest.fixture(scope="module")
def lerobot_av1(tmp_path_factory):
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build cannot encode AV1 (no libsvtav1)")
    import os

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    return write_lerobot_like(tmp_path_factory.mktemp("lerobot_av1") / "toy_av1")


def test_lerobot_writer_dataset_av1_frames_are_the_indexed_rows(lerobot_av1):
    info = json.loads((lerobot_av1 / "meta/info.json").read_text())
    assert info["features"][CAM]["info"]["video.codec"] == "av1"
    ds = LeRobotActionDataset(_q_cfg(lerobot_av1, cameras=[CAM, CAM2], window_stride=2))
    index = _parquet_rows(lerobot_av1, "index")
    action = _parquet_rows(lerobot_av1, "action")
    grip = _parquet_rows(lerobot_av1, "observation.gripper")
    assert ds.action_width == 4 and ds.info["frame_size"] == [64, 128]
    seen = set()
    for i in range(len(ds)):
        w = ds[i]
        e, t = w.episode, int(w.source.rsplit("=", 1)[1])
        seen.add(e)
        want = index[e][t:t + 9, 0].astype(int).tolist()
        assert w.pixels.shape == (3, 9, 64, 128)
        assert _read_code(w.pixels, 0) == want, w.source  # left: the first camera
        assert _read_code(w.pixels, 64, invert=True) == want, w.source  # right: the second one
        np.testing.assert_array_equal(w.raw_actions.numpy(),
                                      np.concatenate([action[e], grip[e]], 1)[t:t + 8])
        assert w.state.shape == (4,)
    assert seen == {0, 1, 2, 3, 4}
    # the task of the window's first frame (episode 1 changes task at frame 2)
    by_src = {w: i for i, w in enumerate(ds.windows)}
    assert ds[by_src[(1, 0)]].task == "pick the cube" and ds[by_src[(1, 2)]].task == "place the cube"


def test_camera_order_is_left_to_right(lerobot_av1):
    ds = LeRobotActionDataset(_q_cfg(lerobot_av1, cameras=[CAM2, CAM], window_stride=50))
    w = ds[0]
    assert _read_code(w.pixels, 0, invert=True) == _read_code(w.pixels, 64)


def test_h264_with_b_frames_and_long_gop_seeks_correctly(tmp_path):
    """A window in the middle of an episode of a file with a 250-frame GOP and B-frames."""
    root = _copy_tiny(tmp_path)
    ds = LeRobotActionDataset(_cfg(root))
    with av.open(str(root / f"videos/{CAM}/chunk-000/file-000.mp4")) as c:
        keys = sum(1 for p in c.demux(c.streams.video[0]) if p.is_keyframe)
    assert keys == 6  # one keyframe per episode: decoding must start there
    states = _parquet_rows(root, "observation.state")
    for e, t in [(3, 20), (5, 23), (1, 27)]:
        w = ds[ds.windows.index((e, t))]
        assert np.abs(_disc_centroids(w.pixels) - states[e][t:t + 17]).max() < 0.45


# ---------------------------------------------------------------------------------------------------
# v2.1 (one parquet and one mp4 per episode, jsonl metadata)
# ---------------------------------------------------------------------------------------------------


def _to_v21(tmp_path) -> Path:
    """Rewrite the tiny dataset in the v2.1 layout (per-episode files, tasks/episodes/episodes_stats jsonl)."""
    out = tmp_path / "tiny_v21"
    (out / "meta").mkdir(parents=True)
    info = json.loads((TINY / "meta/info.json").read_text())
    info.update(codebase_version="v2.1", total_chunks=1, total_videos=6,
                data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    (out / "meta/info.json").write_text(json.dumps(info, indent=4))
    tasks = pq.read_table(TINY / "meta/tasks.parquet").to_pydict()
    (out / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                  for i, t in zip(tasks["task_index"], tasks["task"])))
    eps = pq.read_table(next((TINY / "meta/episodes").rglob("*.parquet"))).to_pydict()
    data = pq.read_table(TINY / "data/chunk-000/file-000.parquet")
    lines, stat_lines = [], []
    src_video = TINY / f"videos/{CAM}/chunk-000/file-000.mp4"
    for i, ep in enumerate(eps["episode_index"]):
        lines.append(json.dumps({"episode_index": ep, "tasks": eps["tasks"][i], "length": eps["length"][i]}))
        stat_lines.append(json.dumps({"episode_index": ep, "stats": {
            k: {n: eps[f"stats/{k}/{n}"][i] for n in ("min", "max", "mean", "std", "count")}
            for k in ("action", "observation.state")}}))
        rows = data.filter(pc.equal(data.column("episode_index"), ep))
        p = out / f"data/chunk-000/episode_{ep:06d}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, p)
        # the episode's own mp4: its frames re-encoded from the v3 file
        t0 = eps[f"videos/{CAM}/from_timestamp"][i]
        src = LeRobotSource(TINY)
        frames = src.decode_frames(CAM, ep, np.arange(eps["length"][i]) / 10.0, "v21")
        vp = out / f"videos/chunk-000/{CAM}/episode_{ep:06d}.mp4"
        vp.parent.mkdir(parents=True, exist_ok=True)
        _encode(frames, vp, "libx264")
        assert t0 >= 0 and src_video.is_file()
    (out / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    (out / "meta/episodes_stats.jsonl").write_text("\n".join(stat_lines) + "\n")
    return out


def test_v21_dataset_reads_with_aggregated_stats(tmp_path):
    root = _to_v21(tmp_path)
    with pytest.raises(UserError, match="no q01, q99.*action.stats: computed"):
        LeRobotActionDataset(_cfg(root))  # v2.1 statistics have no quantiles
    ds = LeRobotActionDataset(_cfg(root, normalization="mean_std", window_stride=9))
    assert ds.info["codebase_version"] == "v2.1" and len(ds) > 6
    v3 = LeRobotActionDataset(_cfg(normalization="mean_std", window_stride=9))
    assert ds.windows == v3.windows
    np.testing.assert_allclose(ds.normalizer.center, v3.normalizer.center, rtol=1e-5)
    np.testing.assert_allclose(ds.normalizer.scale, v3.normalizer.scale, rtol=1e-5)
    states = _parquet_rows(TINY, "observation.state")
    for i in (0, len(ds) // 2, len(ds) - 1):
        w = ds[i]
        e, t = ds.windows[i]
        assert torch.equal(w.raw_actions, v3[i].raw_actions)
        assert np.abs(_disc_centroids(w.pixels) - states[e][t:t + 17]).max() < 0.6
    assert ds[0].task == v3[0].task
    comp = LeRobotActionDataset(_cfg(root, stats="computed", window_stride=9))
    np.testing.assert_allclose(comp.normalizer.center,
                               LeRobotActionDataset(_cfg(stats="computed", window_stride=9)).normalizer.center)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


def _edit_info(root: Path, fn) -> None:
    p = root / "meta/info.json"
    info = json.loads(p.read_text())
    fn(info)
    p.write_text(json.dumps(info))


@pytest.mark.parametrize("version", ["v1.6", "v3.1", None])
def test_unsupported_codebase_version(tmp_path, version):
    root = _copy_tiny(tmp_path)
    _edit_info(root, lambda i: i.update(codebase_version=version) if version else i.pop("codebase_version"))
    with pytest.raises(UserError, match=rf"tiny_copy: LeRobot codebase_version '{version or 'unknown'}' is not "
                                        "supported"):
        LeRobotActionDataset(_cfg(root))


@pytest.mark.parametrize("kw,match", [
    ({"cameras": ["observation.images.front"]},
     r"lerobot_tiny: no camera 'observation.images.front' \(action.cameras\); the dataset's video features: "
     r"observation.images.top \(all features: .*action"),
    ({"cameras": ["action"]}, r"lerobot_tiny: feature 'action' \(action.cameras\) has dtype 'float32', not video"),
    ({"action_keys": ["actions"]},
     r"lerobot_tiny: no feature 'actions' \(action.action_keys\); the dataset's features: observation.images.top, "
     r"observation.state, action"),
    ({"state_key": "observation.pos"}, r"lerobot_tiny: no feature 'observation.pos' \(action.state_key\)"),
    ({"action_keys": [CAM]}, r"feature 'observation.images.top' \(action.action_keys\) has dtype 'video'"),
    ({"action_keys": ["action", "observation.state"]},
     r"lerobot_tiny: action width 4 \('action' 2 \+ 'observation.state' 2, action.action_keys\) does not match "
     r"embodiment 'pusht' width 2"),
    ({"embodiment": "droid_lerobot"}, r"action width 2 .* embodiment 'droid_lerobot' width 10"),
    ({"embodiment": "mine", "new_embodiment": S.NewEmbodimentConfig(name="mine", raw_action_dim=7, domain_id=25)},
     r"embodiment 'mine' width 7 \(action.new_embodiment.raw_action_dim\)"),
    ({"dataset": "/nonexistent/lerobot_x"}, r"LeRobot dataset not found: /nonexistent/lerobot_x"),
])
def test_bad_keys_and_widths_name_dataset_and_key(kw, match):
    with pytest.raises(UserError, match=match):
        LeRobotActionDataset(_cfg(**kw))


def _poison(root: Path, key: str, episode: int, frame: int, value=float("nan")) -> None:
    path = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    d = t.to_pydict()
    row = [i for i, (e, f) in enumerate(zip(d["episode_index"], d["frame_index"])) if e == episode and f == frame][0]
    d[key][row] = [value] * len(d[key][row])
    pq.write_table(pa.Table.from_pydict(d, schema=t.schema), path)


def test_non_finite_actions_error_or_skip(tmp_path):
    root = _copy_tiny(tmp_path)
    _poison(root, "action", episode=2, frame=10)
    with pytest.raises(UserError, match=r"tiny_copy: episode 2: 'action' has non-finite values \(NaN/inf\) at "
                                        r"frame\(s\) \[10\]"):
        LeRobotActionDataset(_cfg(root))
    ds = LeRobotActionDataset(_cfg(root, chunk_size=8), skip_bad_samples=True)
    clean = LeRobotActionDataset(_cfg(chunk_size=8))
    dropped = set(clean.windows) - set(ds.windows)
    assert dropped == {(2, t) for t in range(3, 11)}  # every window whose actions t..t+7 include frame 10
    assert ds.counter.by_reason == {"non_finite": 8} and ds.info["skipped"] == {"non_finite": 8}
    assert "episode=2" in ds.counter.examples["non_finite"][0][0]
    assert all(torch.isfinite(ds[i].actions).all() for i in range(0, len(ds), 17))


def test_non_finite_state_and_inf(tmp_path):
    root = _copy_tiny(tmp_path)
    _poison(root, "observation.state", episode=4, frame=0, value=float("inf"))
    with pytest.raises(UserError, match=r"episode 4: 'observation.state' has non-finite values"):
        LeRobotActionDataset(_cfg(root))
    ds = LeRobotActionDataset(_cfg(root), skip_bad_samples=True)
    assert ds.counter.by_reason == {"non_finite": 1} and (4, 0) not in ds.windows
    LeRobotActionDataset(_cfg(root, state_key=None))  # the state is not read: fine


def test_non_finite_stats_name_the_key(tmp_path):
    root = _copy_tiny(tmp_path)
    p = root / "meta/stats.json"
    stats = json.loads(p.read_text())
    stats["action"]["q99"][1] = float("nan")
    p.write_text(json.dumps(stats))
    with pytest.raises(UserError, match=r"tiny_copy: meta/stats.json: statistics of 'action' q99 are not finite at "
                                        r"channel\(s\) \[1\]"):
        LeRobotActionDataset(_cfg(root))
    LeRobotActionDataset(_cfg(root, stats="computed"))  # not read


def test_missing_stats_file_says_use_computed(tmp_path):
    root = _copy_tiny(tmp_path)
    (root / "meta/stats.json").unlink()
    with pytest.raises(UserError, match="tiny_copy: no meta/stats.json; set action.stats: computed"):
        LeRobotActionDataset(_cfg(root))
    assert len(LeRobotActionDataset(_cfg(root, stats="computed"))) > 0


def test_short_episodes_are_skipped_and_counted_never_an_error():
    ds = LeRobotActionDataset(_cfg(chunk_size=40))  # needs 41 frames: episodes of 40, 36, 38, 40 are too short
    assert {e for e, _ in ds.windows} == {1, 3}
    assert ds.counter.by_reason == {"too_short": 4}
    messages = [m for _, m in ds.counter.examples["too_short"]]
    assert "lerobot_tiny: episode 2 has 36 frames, a window needs 41 (action.chunk_size 40 + 1)" in messages
    assert "too_short: 4" in ds.counter.summary() and ds.info["skipped"] == {"too_short": 4}
    assert LeRobotActionDataset(_cfg(chunk_size=48)).counter.by_reason == {"too_short": 6}


def test_undecodable_video_is_a_bad_sample(tmp_path):
    root = _copy_tiny(tmp_path)
    (root / f"videos/{CAM}/chunk-000/file-000.mp4").write_bytes(b"not a video")
    ds = LeRobotActionDataset(_cfg(root))
    with pytest.raises(BadSampleError) as err:
        ds[0]
    assert err.value.reason == "undecodable" and "file-000.mp4" in str(err.value)
    skipping = LeRobotActionDataset(_cfg(root), skip_bad_samples=True)
    assert skipping[0] is None and skipping.counter.by_reason == {"undecodable": 1}


def test_timestamps_that_miss_the_video_are_reported(tmp_path):
    root = _copy_tiny(tmp_path)
    path = next((root / "meta/episodes").rglob("*.parquet"))
    t = pq.read_table(path).to_pydict()
    t[f"videos/{CAM}/from_timestamp"][3] += 0.05  # half a frame off
    pq.write_table(pa.Table.from_pydict(t), path)
    ds = LeRobotActionDataset(_cfg(root))
    with pytest.raises(BadSampleError, match=r"tiny_copy:episode=3:frame=0: .*no frame within 25.0 ms"):
        ds[ds.windows.index((3, 0))]


# ---------------------------------------------------------------------------------------------------
# the recipe's action section
# ---------------------------------------------------------------------------------------------------

RECIPE = {"output_dir": "runs/a", "model": {"pretrained": "tiny"},
          "action": {"dataset": "./lerobot_tiny", "cameras": [CAM], "embodiment": "pusht"}}


def _recipe(tmp_path, content=RECIPE) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(content))
    return p


def test_recipe_action_section_defaults_and_paths(tmp_path):
    cfg = load_recipe(_recipe(tmp_path))
    a = cfg.action
    assert a.dataset == str((tmp_path / "lerobot_tiny").resolve())
    assert (a.action_keys, a.chunk_size, a.normalization, a.stats, a.view_point, a.resolution_tier) == \
        (["action"], 16, "quantile", "dataset", "ego_view", 256)
    assert (a.modes.policy, a.modes.forward_dynamics, a.modes.inverse_dynamics) == (0.5, 0.25, 0.25)
    assert a.head_lr_multiplier == 5.0 and a.val_episodes == 0 and a.clamp is None
    lw = cfg.generator.loss_weights
    assert (lw.vision, lw.sound, lw.action) == (1.0, 1.0, 1.0)
    save_recipe(cfg, tmp_path / "saved.yaml")
    assert load_saved_recipe(tmp_path / "saved.yaml").action == a
    plain = {k: v for k, v in RECIPE.items() if k != "action"}
    plain["data"] = {"manifest": "m.jsonl"}
    assert load_recipe(_recipe(tmp_path, plain)).action is None
    # an override opens the section
    over = load_recipe(_recipe(tmp_path, plain), [f"action.dataset={TINY}", f"action.cameras=[{CAM}]",
                                                  "action.embodiment=pusht", "action.chunk_size=8"])
    assert over.action.chunk_size == 8 and over.action.dataset == str(TINY)


@pytest.mark.parametrize("override,expected", [
    ("action.chunk_size=10", "invalid value for 'action.chunk_size': 10 (a multiple of 4"),
    ("action.chunk_size=0", "'action.chunk_size'"),
    ("action.embodiment=robotx", "invalid value for 'action.embodiment': unknown embodiment 'robotx' (known: av, "
                                 "camera_pose, hand_pose, pusht, libero"),
    ("action.normalization=zscore", "'action.normalization'"),
    ("action.stats=hub", "'action.stats'"),
    ("action.view_point=top", "'action.view_point'"),
    ("action.resolution_tier=512", "'action.resolution_tier'"),
    ("action.modes.policy=0.9", "'action.modes'"),
    ("action.clamp=0", "'action.clamp'"),
    ("action.window_stride=0", "'action.window_stride'"),
    ("action.val_episodes=-1", "'action.val_episodes'"),
    ("action.head_lr_multiplier=0", "'action.head_lr_multiplier'"),
    ("action.fps=0", "'action.fps'"),
    ("action.cameras=[]", "'action.cameras'"),
    ("generator.loss_weights.action=-1", "'generator.loss_weights.action'"),
    ("action.chunk_sise=8", "unknown key 'action.chunk_sise' (not a field of 'action'); did you mean "
                            "'action.chunk_size'?"),
    ("objective=reasoner", "'action' section applies to objective: generator"),
])
def test_recipe_action_errors_name_the_key(tmp_path, override, expected):
    with pytest.raises(UserError) as err:
        load_recipe(_recipe(tmp_path), [override])
    assert expected in str(err.value) and "recipe.yaml" in str(err.value)


@pytest.mark.parametrize("new,embodiment,expected", [
    ({"name": "arm7", "raw_action_dim": 7, "domain_id": 8}, "arm7", "'action.new_embodiment.domain_id'"),
    ({"name": "arm7", "raw_action_dim": 7, "domain_id": 40}, "arm7", "'action.new_embodiment.domain_id'"),
    ({"name": "arm7", "raw_action_dim": 0, "domain_id": 24}, "arm7", "'action.new_embodiment.raw_action_dim'"),
    ({"name": "pusht", "raw_action_dim": 2, "domain_id": 24}, "pusht", "already an embodiment"),
    ({"name": "arm7", "raw_action_dim": 7, "domain_id": 24, "init_from": "robox"}, "arm7",
     "'action.new_embodiment.init_from': 'robox' is not a known embodiment"),
    ({"name": "arm7", "raw_action_dim": 7, "domain_id": 24}, "pusht", "must be its name ('arm7')"),
    ({"name": "arm7"}, "arm7", "missing required value(s): action.new_embodiment.domain_id, "
                               "action.new_embodiment.raw_action_dim"),
])
def test_recipe_new_embodiment_checks(tmp_path, new, embodiment, expected):
    content = json.loads(json.dumps(RECIPE))
    content["action"].update(new_embodiment=new, embodiment=embodiment)
    with pytest.raises(UserError) as err:
        load_recipe(_recipe(tmp_path, content))
    assert expected in str(err.value)


def test_recipe_new_embodiment_ok_and_dataset_open_from_recipe(tmp_path):
    content = json.loads(json.dumps(RECIPE))
    content["action"].update(dataset=str(TINY), embodiment="point2d", chunk_size=8,
                             new_embodiment={"name": "point2d", "raw_action_dim": 2, "domain_id": 24,
                                             "init_from": "pusht"})
    cfg = load_recipe(_recipe(tmp_path, content))
    ds = LeRobotActionDataset(cfg.action)
    assert ds.info["embodiment"] == "point2d" and ds.info["domain_id"] == 24 and ds.embodiment.init_from == "pusht"
