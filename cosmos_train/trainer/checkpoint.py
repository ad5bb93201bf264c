"""Atomic checkpoints: a step directory is written under a temporary name and renamed into place,
so a crash mid-write never leaves a half checkpoint where `latest` would find it.

Layout: RUN_DIR/checkpoints/step-000100/{trainable.safetensors, optimizer.pt, state.json}
Weights are safetensors; optimizer/RNG state is loaded with `weights_only=True` (no unpickling).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cosmos_train.errors import UserError
from cosmos_train.export.staging import normalize_permissions

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"no checkpoints in {checkpoint_dir(run_dir)}")
    if step is None:
        return checkpoints[-1]
    for path in checkpoints:
        if int(path.name.split("-")[1]) == step:
            return path
    steps = ", ".join(p.name.split("-")[1].lstrip("0") or "0" for p in checkpoints)
    raise UserError(f"no checkpoint for step {step} in {run_dir} (available steps: {steps})")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], extra_state: dict,
                    torch_state: dict, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_name(step)}.", dir=root))
    try:
        save_file(weights, str(tmp / WEIGHTS))
        torch.save(torch_state, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, **extra_state}, indent=2))
        normalize_permissions(tmp)  # safetensors writes 0600: others who read the run should read this too
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, json state, torch state). Torch state is read without unpickling code."""
    path = Path(path)
    try:
        weights = load_file(str(path / WEIGHTS))
        state = json.loads((path / STATE).read_text())
        torch_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} is unreadable: {err}") from None
    return weights, state, torch_state
