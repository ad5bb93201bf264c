"""Run metrics: one JSON line per optimizer step (and per validation) in RUN_DIR/metrics.jsonl, mirrored to the
recipe's trackers (`logging.trackers`, through Accelerate's tracker interface), plus the helpers that turn a step's
raw numbers into the metrics the report plots.

Keys the loop writes (README "Seeing the run"): `loss`, `lr`, `grad_norm`, `step_time_s`, `data_time_s`, `samples`,
`tokens`, `samples_per_s`, `tokens_per_s`, `modes`, `loss_<modality>`; with this module's helpers also
`loss_sigma_<lo>-<hi>` (`sigma_bins`), `mfu` (`mfu`), `peak_memory_gb` (`peak_memory_gb`), `data_wait` (
`data_wait_fraction`); validation rows: `val_loss`, `val_loss_sigma_<q>`, `val_action_mae_<mode>`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from cosmos_train.config.schema import LoggingConfig
from cosmos_train.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Step metrics
# ---------------------------------------------------------------------------------------------------------------

SIGMA_BIN_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def sigma_bins(sigmas, losses, edges=SIGMA_BIN_EDGES) -> dict[str, float]:
    """Mean per-sample loss in each sigma bin: {"loss_sigma_0.0-0.2": ..., ...} (bins without samples are left
    out). `sigmas` and `losses` are per sample, in the same order: the generator objective's `StepInfo.sigmas` and
    `StepInfo.sample_losses`, concatenated over the step's micro-batches. The last bin includes its upper edge."""
    sigmas, losses = list(sigmas), list(losses)
    if len(sigmas) != len(losses):
        raise ValueError(f"{len(sigmas)} sigmas for {len(losses)} losses")
    sums: dict[int, list] = {}
    for sigma, loss in zip(sigmas, losses):
        for b in range(len(edges) - 1):
            if edges[b] <= sigma < edges[b + 1] or (b == len(edges) - 2 and sigma == edges[-1]):
                sums.setdefault(b, []).append(float(loss))
                break
    return {f"loss_sigma_{edges[b]:.1f}-{edges[b + 1]:.1f}": sum(v) / len(v) for b, v in sorted(sums.items())}


# Dense bf16 tensor-core peak (FLOP/s) per GPU, from the vendors' data sheets (no sparsity). Matched by substring of
# torch.cuda.get_device_name(), first match wins (so the longer names come first).
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15),
    ("GH200", 989e12),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / NVL
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device=None) -> float | None:
    """The bf16 dense peak of `device`'s GPU (FLOP/s) from `PEAK_BF16_FLOPS`; None on CPU or an unknown GPU.
    `COSMOS_TRAIN_PEAK_TFLOPS` overrides it (e.g. for a GPU missing from the table)."""
    override = os.environ.get("COSMOS_TRAIN_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    import torch

    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def forward_params(module, select=None) -> int:
    """Parameters a token passes through (each counted once): the N of `flops_per_token`. `select(name)` keeps
    some parameters only. Cosmos 3's transformer holds two pathways and a token passes through one: for the
    generator (vision / sound / action tokens) pass `select=trainer.adapters.is_gen_param` (the generation pathway);
    counting everything overstates MFU about 2x. LoRA's own tensors are counted too (well under 1%)."""
    seen, total = set(), 0
    for name, p in module.named_parameters():
        if id(p) not in seen and (select is None or select(name)):
            seen.add(id(p))
            total += p.numel()
    return total


def flops_per_token(n_params: int, method: str = "full") -> float:
    """Training FLOPs per token, the usual dense-transformer estimate (attention's quadratic term left out):
    forward 2N, backward 4N (2N for activation gradients + 2N for weight gradients) -> 6N with full finetuning.
    With LoRA the frozen base needs no weight gradients: 2N + 2N = 4N (the adapters add well under 1%)."""
    return (4.0 if method == "lora" else 6.0) * float(n_params)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, num_processes: int = 1) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the peak of all `num_processes` GPUs (`tokens_per_s` of all
    of them, as the loop logs it). None without a known peak (CPU, an unknown GPU)."""
    if not peak_flops or not tokens_per_s or not math.isfinite(tokens_per_s):
        return None
    return float(tokens_per_s) * float(flops_per_token) / (float(peak_flops) * max(1, int(num_processes)))


def peak_memory_gb(device=None) -> float:
    """Peak memory in GiB: `torch.cuda.max_memory_allocated` on a CUDA device, else the process's maximum resident
    set size (`resource.getrusage`; Linux reports KiB, macOS bytes)."""
    import torch

    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def data_wait_fraction(data_time_s: float, step_time_s: float) -> float | None:
    """Share of the step spent waiting for data (0: the loader keeps up; near 1: the GPU starves)."""
    if not step_time_s or step_time_s <= 0:
        return None
    return min(1.0, max(0.0, float(data_time_s) / float(step_time_s)))


# ---------------------------------------------------------------------------------------------------------------
# Trackers (Accelerate's tracker interface)
# ---------------------------------------------------------------------------------------------------------------

TRACKER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # pip extras of cosmos-train


def tracker_names(logging_cfg: LoggingConfig) -> list[str]:
    """`logging.trackers`, with the older `logging.wandb: true` as "wandb"."""
    names = list(getattr(logging_cfg, "trackers", []) or [])
    if logging_cfg.wandb and "wandb" not in names:
        names.append("wandb")
    return names


def _flat(values: dict, prefix: str = "") -> dict:
    """Numbers (and strings) only, nested dicts as "outer/inner"; None, NaN and lists dropped."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = value
        elif isinstance(value, str):
            out[name] = value
    return out


def _hparams(recipe: dict | None) -> dict:
    """The recipe as flat scalar hyperparameters (lists as strings), what every tracker accepts."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value
            elif value is None:
                flat[name] = "null"
            else:
                flat[name] = json.dumps(value, default=str)

    walk(recipe or {}, "")
    return flat


def _make_tracker(name: str, logging_cfg: LoggingConfig, run_dir: Path, recipe: dict | None):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(t) for t in get_available_trackers()}
    if name not in LOGGER_TYPE_TO_CLASS:
        raise UserError(f"logging.trackers: unknown tracker {name!r} (Accelerate offers "
                        f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
    if name in {str(t) for t in LoggerType} and name not in available:
        extra = TRACKER_EXTRAS.get(name)
        hint = f"pip install 'cosmos-train[{extra}]'" if extra else f"pip install {name}"
        raise UserError(f"logging.trackers: {name} is not installed: {hint}")
    cls = LOGGER_TYPE_TO_CLASS[name]
    run_name = logging_cfg.run_name or Path(run_dir).name
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", logging_cfg.wandb_mode)
        return cls(logging_cfg.wandb_project, name=run_name, dir=str(run_dir), config=recipe)
    if name == "tensorboard":
        return cls("tensorboard", str(run_dir))  # RUN_DIR/tensorboard: `tensorboard --logdir RUN_DIR/tensorboard`
    if cls.requires_logging_directory:
        return cls(run_name, str(run_dir / "trackers"))
    return cls(run_name)


class Trackers:
    """Accelerate `GeneralTracker`s with one `log(values, step)` / `log_media(paths, step)` / `finish()`."""

    def __init__(self, trackers: list, hparams: dict | None = None):
        self.trackers = list(trackers)
        for t in self.trackers:
            t.start()
            if hparams and t.name != "wandb":  # wandb got the nested recipe as its config in init
                try:
                    t.store_init_configuration(hparams)
                except Exception as err:  # a tracker that refuses some hyperparameter must not stop the run
                    print(f"logging: {t.name} did not take the recipe as hyperparameters ({err})", file=sys.stderr)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict, step: int) -> None:
        flat = _flat(values)
        if not flat:
            return
        for t in self.trackers:
            t.log(flat, step=step)

    def log_media(self, paths, step: int, key: str = "samples") -> None:
        """Validation samples: wandb gets the videos / images themselves; trackers with `log_images` (TensorBoard,
        Aim, ClearML, ...) get a PNG, or for a video a strip of its first, middle and last frames."""
        paths = [Path(p) for p in paths]
        if not paths or not self.trackers:
            return
        images = None
        for t in self.trackers:
            if t.name == "wandb":
                import wandb

                t.log({key: [wandb.Video(str(p)) if p.suffix == ".mp4" else wandb.Image(str(p)) for p in paths]},
                      step=step)
            elif hasattr(t, "log_images"):
                if images is None:
                    images = [_preview(p) for p in paths]
                if t.name == "tensorboard":
                    for i, image in enumerate(images):  # add_images wants one shape per call
                        t.log_images({f"{key}/{i:02d}": image[None]}, step=step, dataformats="NHWC")
                else:
                    t.log_images({key: list(images)}, step=step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def _preview(path: Path):
    """[H, W, 3] uint8: the image, or first | middle | last frame of a video side by side."""
    import numpy as np

    if path.suffix.lower() != ".mp4":
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = [frames[0], frames[len(frames) // 2], frames[-1]] if len(frames) > 2 else frames
    return np.concatenate(picks, axis=1)


def init_trackers(accelerator, cfg, run_dir, recipe: dict | None = None) -> Trackers:
    """The recipe's trackers (`logging.trackers`; `logging.wandb: true` = ["wandb"]), started on the main process
    (none elsewhere). `cfg`: the RecipeConfig (or its LoggingConfig); `recipe`: the resolved recipe as a plain dict,
    stored as the run's hyperparameters. An Accelerator built with `log_with=` already holds started trackers:
    those are used as they are. Missing packages are a UserError naming the pip extra."""
    logging_cfg = getattr(cfg, "logging", cfg)
    if accelerator is not None:
        if not accelerator.is_main_process:
            return Trackers([])
        if getattr(accelerator, "trackers", None):
            return Trackers([t for t in accelerator.trackers])
    run_dir = Path(run_dir)
    return Trackers([_make_tracker(n, logging_cfg, run_dir, recipe) for n in tracker_names(logging_cfg)],
                    hparams=_hparams(recipe))


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------


class MetricsLogger:
    """metrics.jsonl + trackers. `enabled=False` (other ranks): does nothing."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, recipe: dict, enabled: bool = True, trackers=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self.trackers = Trackers([])
        if not enabled:
            return
        self.trackers = trackers if trackers is not None else init_trackers(None, cfg, run_dir, recipe)
        self._file = open(self.path, "a")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled or not values:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        self.trackers.log(values, step)

    def log_media(self, step: int, paths, key: str = "samples") -> None:
        """Validation samples (files) to the trackers that show media."""
        if self.enabled:
            self.trackers.log_media(paths, step, key=key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.trackers.finish()


def metric_lines(run_dir: Path) -> list[tuple[str, dict | None]]:
    """Each non-empty line of RUN_DIR/metrics.jsonl with its row (None: a torn or unparseable line)."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        out.append((line, row if isinstance(row, dict) else None))
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (a torn, unparseable line is skipped)."""
    return [row for _, row in metric_lines(run_dir) if row is not None]
