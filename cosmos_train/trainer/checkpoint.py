"""Atomic, checksummed checkpoints: a step directory is written under a temporary name and renamed into
place, so a crash mid-write never leaves a half checkpoint where `latest` would find it; the sha256 of
every file is recorded at write time and checked at read time, so a damaged one is named, never used.

Layout: RUN_DIR/checkpoints/step-000100/{trainable.safetensors, optimizer.pt, state.json, checksums.json}, plus
optimizer/ on sharded back-ends (fsdp2, zero2, zero3): the optimizer state, one part written by each rank into the
staged directory (`stage`) before rank 0 finishes and renames it.
`checksums.json` is written last (before the rename); checkpoints written before it existed load unchecked.
Weights are safetensors; optimizer/RNG state is loaded with `weights_only=True` (no unpickling).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cosmos_train.errors import UserError
from cosmos_train.export.staging import normalize_permissions

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CHECKSUMS = "checksums.json"
TEMP_PREFIX = ".step-"  # interrupted saves leave RUN_DIR/checkpoints/.step-NNNNNNN.xxxx behind
DAMAGED_PREFIX = "damaged-"  # damaged checkpoints set aside by `train --resume`


class CheckpointDamaged(UserError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum."""

    def __init__(self, path: Path, file: str, problem: str):
        self.path, self.file, self.problem = Path(path), file, problem
        super().__init__(
            f"checkpoint {path} is damaged: {file} {problem}. Use an earlier checkpoint: `train --resume` falls "
            f"back to the newest intact one by itself (`export --step N` picks one); or delete {path}")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int:
    return int(Path(path).name.split("-")[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name.split("-")[1].isdigit() and ((p / STATE).is_file() or (p / CHECKSUMS).is_file())]
    return sorted(found, key=step_of)


def remove_temporary(run_dir: Path) -> list[Path]:
    """Delete the temporary directories of saves that were interrupted (killed mid-write)."""
    root = checkpoint_dir(run_dir)
    leftovers = sorted(p for p in root.glob(TEMP_PREFIX + "*") if p.is_dir()) if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"no checkpoints in {checkpoint_dir(run_dir)}")
    if step is None:
        return checkpoints[-1]
    for path in checkpoints:
        if step_of(path) == step:
            return path
    steps = ", ".join(str(step_of(p)) for p in checkpoints)
    raise UserError(f"no checkpoint for step {step} in {run_dir} (available steps: {steps})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage(run_dir: Path, step: int) -> Path:
    """The temporary directory a save of `step` is written into (renamed into place by save_checkpoint)."""
    root = checkpoint_dir(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{step_name(step)}.", dir=root))
    except OSError as err:
        raise UserError(f"could not write checkpoint {root / step_name(step)}: {_write_problem(err, root)}. Free "
                        "space or fix the permissions, then continue with `train ... --resume`") from None


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], extra_state: dict,
                    torch_state: dict, keep: int, extra_tensors: dict[str, dict] | None = None,
                    staged: Path | None = None) -> Path:
    """Write step `step` atomically; an OSError (full disk, permissions) is a UserError naming the path, and
    the checkpoints already there are left as they were. `staged`: a directory from `stage` that already holds
    the parts every rank wrote."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = staged
    try:
        if tmp is None:
            tmp = stage(run_dir, step)
        save_file(weights, str(tmp / WEIGHTS))
        for name, tensors in (extra_tensors or {}).items():  # e.g. ema.safetensors: checksummed like the rest
            save_file(tensors, str(tmp / name))
        torch.save(torch_state, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, **extra_state}, indent=2))
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        sums = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}
        (tmp / CHECKSUMS).write_text(json.dumps({"format": 1, "algorithm": "sha256", "files": sums}, indent=2))
        normalize_permissions(tmp)  # safetensors writes 0600: others who read the run should read this too
        for f in [*files, tmp / CHECKSUMS]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for d in [p for p in tmp.rglob("*") if p.is_dir()]:
            _fsync_dir(d)
        aside = None
        if final.exists():  # the same step written again (a resumed run passing a damaged one's step)
            aside = root / f"{TEMP_PREFIX}{step:07d}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(err):
            earlier = [p for p in list_checkpoints(run_dir) if step_of(p) != step]
            kept = (f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists")
            raise UserError(f"could not write checkpoint {final}: {_write_problem(err, root)}; {kept}. "
                            "Free space or fix the permissions, then continue with `train ... --resume`") from None
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _is_write_error(err: BaseException) -> bool:
    # A full disk reaches us as OSError (json, mkdir), SafetensorError (safetensors) or RuntimeError
    # ("PytorchStreamWriter failed writing file", torch.save).
    return isinstance(err, (OSError, SafetensorError)) or (
        isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "file write failed" in str(err)))


def _write_problem(err: BaseException, root: Path) -> str:
    if isinstance(err, OSError):
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        return f"{reason} ({err.filename or root})"
    return f"{str(err).splitlines()[0]} ({root})"


def verify_checkpoint(path: Path) -> bool:
    """Check every file against `checksums.json`: True when verified, False for a checkpoint written before
    checksums existed. Raises CheckpointDamaged naming the file."""
    path = Path(path)
    record_path = path / CHECKSUMS
    if not record_path.is_file():
        for name in (WEIGHTS, OPTIMIZER, STATE):
            if not (path / name).is_file():
                raise CheckpointDamaged(path, name, "is missing")
        return False
    try:
        files = json.loads(record_path.read_text())["files"]
        files = {str(name): (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointDamaged(path, CHECKSUMS, f"is unreadable ({err})") from None
    for name in (WEIGHTS, OPTIMIZER, STATE):
        if name not in files:
            raise CheckpointDamaged(path, CHECKSUMS, f"does not list {name}")
    for name, (size, sha) in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(path, name, "is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointDamaged(path, name, f"has {actual} bytes, {size} were written (truncated or replaced)")
        try:
            digest = _sha256(file)
        except OSError as err:
            raise CheckpointDamaged(path, name, f"is unreadable ({err.strerror or err})") from None
        if digest != sha:
            raise CheckpointDamaged(path, name, "does not match the sha256 recorded when it was written")
    return True


def load_checkpoint(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, json state, torch state), after checking the recorded checksums. Torch state is
    read without unpickling code. Any damage is a CheckpointDamaged (a UserError) naming the file."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    name = WEIGHTS
    try:
        weights = load_file(str(path / WEIGHTS))
        name = STATE
        state = json.loads((path / STATE).read_text())
        name = OPTIMIZER
        torch_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointDamaged(path, name, "is missing") from None
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise CheckpointDamaged(path, name, f"is unreadable ({_first_sentence(err)})") from None
    return weights, state, torch_state


def _first_sentence(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.split(". ")[0][:200]


def load_latest_intact(run_dir: Path) -> tuple[Path, tuple, list[CheckpointDamaged]]:
    """The newest checkpoint that loads and verifies: (path, (weights, state, torch_state), the damaged newer
    ones). Raises a UserError naming every damaged file when none is intact."""
    damaged: list[CheckpointDamaged] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path), damaged
        except CheckpointDamaged as err:
            damaged.append(err)
    if not damaged:
        raise UserError(f"no checkpoints in {checkpoint_dir(run_dir)}")
    problems = "; ".join(f"{e.path.name}: {e.file} {e.problem}" for e in damaged)
    raise UserError(f"no intact checkpoint to resume from in {checkpoint_dir(run_dir)} ({problems}). Start a new "
                    "run in another output_dir, or delete the damaged checkpoints to start this one over")


def set_aside(damaged: CheckpointDamaged) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection): checkpoints/damaged-step-NNNNNNN."""
    target = damaged.path.parent / f"{DAMAGED_PREFIX}{damaged.path.name}"
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(damaged.path, target)
    return target
