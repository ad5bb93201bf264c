"""An action recipe's data, as the trainer consumes every objective's data: a dataset read through
`load(key)` (so `MarkBadSamples` and loader workers treat it like the others), a seeded resumable rank-sharded
`BucketSampler`, and an info object the trainer prints and saves.

The action normalization is part of the run: it is written to OUTPUT_DIR/action_normalization.json when the
run starts, a resumed run must find the same one (a changed dataset or recipe would silently change what the
actions mean), and every export carries it (`action_export_record`), since diffusers never normalizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

NORMALIZATION_FILE = "action_normalization.json"


@dataclass(frozen=True)
class _Record:
    source: str


class ActionWindows:
    """`LeRobotActionDataset` behind the `load(key)` / `source_of(key)` interface of the trainer's datasets."""

    seed = 0  # no captions to draw per epoch

    def __init__(self, windows):
        self.windows = windows
        self.records = [_Record(f"{windows.name}:episode={e}:frame={t}") for e, t in windows.windows]

    def __len__(self) -> int:
        return len(self.windows)

    def source_of(self, key) -> str:
        return self.records[key.index].source

    def load(self, key):
        window = self.windows[key.index]
        if window is None:  # skipped inside (skip_bad_samples): give MarkBadSamples the usual error to count
            raise BadSampleError(f"{self.source_of(key)}: undecodable window", "undecodable")
        return window

    def __getitem__(self, key):
        return self.load(key)


@dataclass
class ActionDataInfo:
    info: dict
    skips: SkipCounter

    def summary(self) -> str:
        i = self.info
        lines = [f"data: {i['windows']} windows of {i['window_frames']} frames from {i['name']} "
                 f"(LeRobot {i['codebase_version']}, {i['episodes']['train']} training / {i['episodes']['val']} "
                 f"held-out episodes, {i['fps']:g} fps)",
                 f"  actions: {', '.join(f'{k} ({w})' for k, w in i['action_keys'].items())} -> embodiment "
                 f"{i['embodiment']} (domain {i['domain_id']}), normalization {i['normalization'].get('method')}",
                 f"  cameras: {', '.join(i['cameras'])}"]
        if self.skips.total:
            lines.append("  " + self.skips.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**self.info, "skipped": dict(self.skips.by_reason)}


class ActionData(NamedTuple):
    dataset: ActionWindows
    sampler: object
    info: ActionDataInfo


def _check_saved_normalization(run_dir: Path, normalizer) -> None:
    path = run_dir / NORMALIZATION_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(normalizer.to_dict())):
            raise UserError(f"{path}: this run started with other action statistics than the dataset and recipe "
                            "give now (the dataset or action.normalization / stats / clamp changed); resume with "
                            "what the run started with, or start a new output_dir")


def build_action_data(cfg, skips: SkipCounter | None = None, rank: int = 0, world_size: int = 1,
                      split: str = "train") -> ActionData:
    from cosmos_train.data.buckets import BucketSampler
    from cosmos_train.data.lerobot import LeRobotActionDataset

    skips = skips if skips is not None else SkipCounter()
    windows = LeRobotActionDataset(cfg.action, split=split, skip_bad_samples=cfg.data.skip_bad_samples)
    skips.merge(windows.counter)
    if not len(windows):
        raise UserError(f"{windows.name}: no {split} window of {windows.chunk + 1} frames (action.chunk_size "
                        f"{windows.chunk} + 1) in its {len(windows.episode_ids)} {split} episode(s)")
    run_dir = Path(cfg.output_dir)
    if split == "train":
        _check_saved_normalization(run_dir, windows.normalizer)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / NORMALIZATION_FILE).write_text(json.dumps(windows.normalizer.to_dict(), indent=2) + "\n")
    dataset = ActionWindows(windows)
    sampler = BucketSampler([0] * len(dataset), group_size=1, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                            rank=rank, world_size=world_size)
    return ActionData(dataset, sampler, ActionDataInfo(windows.info, skips))


def action_record(cfg, normalizer, embodiment, fps: float) -> dict:
    """What serving an action finetune needs (`inference_action`): embodiment, window, prompt and canvas settings,
    and the normalization."""
    return {"embodiment": embodiment.name, "domain_id": embodiment.domain_id,
            "raw_action_dim": embodiment.raw_action_dim or normalizer.width, "new_embodiment": embodiment.new,
            "chunk_size": int(cfg.action.chunk_size), "fps": float(fps), "view_point": cfg.action.view_point,
            "resolution_tier": int(cfg.action.resolution_tier), "action_keys": list(cfg.action.action_keys),
            "cameras": list(cfg.action.cameras), "normalization": normalizer.to_dict(),
            # the same map in one line for other tools: raw = normalized * scale + center (per channel)
            "denormalize": {"scale": [float(v) for v in normalizer.scale],
                            "center": [float(v) for v in normalizer.center]}}


def action_export_record(cfg, run_dir: Path, geometry_fps: float | None = None) -> dict:
    """What an export needs to serve the finetune: the embodiment (registered with diffusers at generate time),
    the action normalization and its statistics, and the window / prompt settings it was trained with."""
    from cosmos_train.data.embodiment import resolve_embodiment

    path = Path(run_dir) / NORMALIZATION_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {NORMALIZATION_FILE}: an action run writes it when it starts")
    info_path = Path(run_dir) / "data_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    from cosmos_train.data.action_norm import ActionNormalizer

    normalizer = ActionNormalizer.from_dict(json.loads(path.read_text()))
    fps = float(info.get("fps") or cfg.action.fps or geometry_fps or 0.0)
    return {**action_record(cfg, normalizer, resolve_embodiment(cfg.action), fps),
            "dataset": {"name": info.get("name"), "codebase_version": info.get("codebase_version"),
                        "episodes": info.get("episodes"), "windows": info.get("windows")}}
