"""Run metrics: one JSON line per optimizer step in RUN_DIR/metrics.jsonl, and optionally wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cosmos_train.config.schema import LoggingConfig


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, recipe: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._wandb = None
        if enabled and cfg.wandb:
            try:
                import wandb
            except ImportError:
                from cosmos_train.errors import UserError

                raise UserError("logging.wandb is true but wandb is not installed: pip install 'cosmos-train[wandb]'")
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, dir=str(run_dir), config=recipe)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
