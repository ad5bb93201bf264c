"""Exports are built in a hidden directory beside the target and renamed into place only when
complete and verified: a failed or interrupted export leaves nothing behind, and never touches
anything a user already had there."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from cosmos_train.errors import UserError


def open_run(run_dir: Path, out_dir: Path, objective: str, step: int | None, ema: bool = False):
    """A run directory's recipe and checkpoint (latest, or `step`), after the checks every export makes:
    it is a run of `objective`, and `out_dir` would not overwrite anything. -> (cfg, checkpoint, weights, state)"""
    from cosmos_train.config import load_saved_recipe
    from cosmos_train.trainer import checkpoint as ckpt

    recipe_path = Path(run_dir) / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{run_dir} is not a cosmos_train run directory (no recipe.yaml)")
    refuse_nonempty(Path(out_dir))
    cfg = load_saved_recipe(recipe_path)
    if cfg.objective != objective:
        raise UserError(f"this exporter handles {objective} runs; {run_dir} is a '{cfg.objective}' run")
    checkpoint = ckpt.find_checkpoint(Path(run_dir), step)
    weights, state, _ = ckpt.load_checkpoint(checkpoint)
    if ema:  # the exponential moving average of the trainable weights (train.ema_decay), same keys
        from cosmos_train.trainer.ema import ema_weights_for_export

        weights = ema_weights_for_export(checkpoint)
    return cfg, checkpoint, weights, state


def refuse_nonempty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"export target {out_dir} exists and is not empty; choose a new directory")


def readable_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; an export or checkpoint should get the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def normalize_permissions(root: Path) -> None:
    """Ordinary permissions for a written tree: mkdtemp and safetensors create owner-only entries, and an
    export or checkpoint should be readable by whoever may read the user's other files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [Path(root), *Path(root).rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_directory(out_dir: Path):
    """Yields a temporary directory; on success it becomes `out_dir` (which must be absent or empty)."""
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    readable_like_mkdir(tmp)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_saved_recipe_dict(run_dir: Path) -> dict:
    """A run's saved recipe.yaml as plain data (for the model card)."""
    import yaml

    return yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
