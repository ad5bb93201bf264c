"""The training loop, top to bottom: setup -> data -> trainable weights -> loop -> save.

Runs one process or many (torchrun / accelerate launch) through Accelerate. A micro-step is one pack
of samples sharing a transformer forward (`train.packing`), or `train.batch_size` single-sample forwards;
`train.grad_accum_steps` micro-steps make an optimizer step.

Durability (README "Interruptions and resuming"): SIGTERM / SIGINT finish the current optimizer step, save a
checkpoint and exit 143 / 130; a step with a non-finite loss or gradient is skipped (no update) and counted;
`--resume` falls back past damaged checkpoints and refuses a recipe that changed the schedule or data order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cosmos_train.config import RecipeConfig, save_recipe
from cosmos_train.config.load import recipe_to_yaml
from cosmos_train.data import MarkBadSamples, SkipCounter
from cosmos_train.data.dataset import check_marker, is_marker
from cosmos_train.data.latent_cache import LatentCacheDataset
from cosmos_train.errors import UserError
from cosmos_train.models import adapter_class, load_model, local_checkpoint_dir
from cosmos_train.objectives import build_objective
from cosmos_train.trainer import checkpoint as ckpt
from cosmos_train.trainer.backends import SHARDED_OPTIMIZER, check_supported, make_backend
from cosmos_train.trainer.batching import MicroBatcher
from cosmos_train.trainer.launch_check import check_process_count
from cosmos_train.trainer.inputs import build_data, cache_location, open_cache
from cosmos_train.trainer import metrics as M
from cosmos_train.trainer.adapters import is_gen_param
from cosmos_train.trainer.ema import EMA, EMA_WEIGHTS, load_warm_start
from cosmos_train.trainer.metrics import MetricsLogger
from cosmos_train.trainer.validation import build_validation
from cosmos_train.trainer.optim import lr_multiplier

# Recipe keys a resumed run must share with the run it continues: they set the learning-rate schedule, the
# data order (and the noise drawn for it) or the shape of the trained weights. train.max_steps is handled
# on its own (see _check_schedule), train.grad_accum_steps with the process count (_check_global_batch: a run may
# resume on another number of processes when the global batch stays the same); anything else (logging,
# checkpoint_every, num_workers, ...) may change.
RESUME_KEYS = (
    "objective", "train.lr", "train.lr_schedule", "train.warmup_steps", "train.min_lr_ratio", "train.seed",
    "train.batch_size", "train.packing", "train.method", "train.lora",
    "train.full_trainable", "data.manifest", "data.sources", "data.shuffle", "data.resolution", "data.height",
    "data.width", "data.aspect_buckets", "data.num_frames", "action.dataset", "action.cameras",
    "action.chunk_size", "action.window_stride", "action.val_episodes",
)


class Interrupted(SystemExit):
    """The run stopped on SIGTERM / SIGINT; `code` is 128 + the signal number (143, 130)."""


class GracefulStop:
    """SIGTERM / SIGINT handlers for the training loop: the first signal asks the loop to stop after the
    current optimizer step (with a checkpoint); a second one ends the run at once (no checkpoint).

    The same stop often arrives twice within milliseconds (a terminal's Ctrl-C reaches torchrun and its
    ranks, and torchrun forwards it again; Slurm signals every process of a step): a repeat within
    `REPEAT_GRACE_S` seconds of the first counts as the same request."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_GRACE_S = 1.0

    def __init__(self):
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _say(self, text: str) -> None:
        # os.write, not print: a handler may run while the main thread is inside a buffered write
        try:
            os.write(2, f"\ncosmos-train: {text}\n".encode())
        except OSError:
            pass

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            self._say(f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                      "(send it again to stop at once, without one)")
            return
        if now - self._first < self.REPEAT_GRACE_S:
            return
        self._say(f"second signal ({signal.Signals(signum).name}): stopping now, without a checkpoint")
        self.restore()
        raise Interrupted(128 + signum)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stopping to the main process (a Ctrl-C or a scheduler's SIGTERM reaches
    them too, and a dead worker would fail the step the main process is finishing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _accelerator(cfg: RecipeConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=adapter_class(cfg).ddp_find_unused_parameters(cfg))
    return Accelerator(cpu=cfg.train.device == "cpu", kwargs_handlers=[ddp])


def _on_main(accelerator, fn):
    """Run `fn` on the main process and hand its result to every rank; a UserError there is raised on every rank
    (not a hang in the next collective)."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as err:
            error = err
    if accelerator.num_processes > 1:
        shared = [None if error is None else str(error), result]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            error = UserError(shared[0])
        result = shared[1]
    if error is not None:
        raise error
    return result


class EncodedWindows:
    """`encode` that keeps what it encoded by sample source, up to `max_bytes` of tensors (then encodes again):
    encoding is deterministic, so a window drawn again (a new mode, sigma, noise) reuses its latent."""

    def __init__(self, encode, max_bytes: int = 4 << 30):
        self.encode, self.max_bytes, self.used, self.items = encode, max_bytes, 0, {}

    def __call__(self, sample):
        key = getattr(sample, "source", None)
        if key is not None and key in self.items:
            return self.items[key]
        item = self.encode(sample)
        size = sum(t.numel() * t.element_size() for t in (item.latent, item.actions, item.sound) if t is not None)
        if key is not None and self.used + size <= self.max_bytes:
            self.items[key] = item
            self.used += size
        return item


# ---- the run directory and what --resume may continue -----------------------------------------------------

def _resume_mode(resume) -> str:
    """False/None: a new run; True / "latest": continue (an error with nothing to continue); "auto": continue
    when there is a checkpoint, else start."""
    if resume in (False, None, "off"):
        return "off"
    if resume in (True, "latest"):
        return "latest"
    if resume == "auto":
        return "auto"
    raise UserError(f"--resume: unknown mode {resume!r} (--resume or --resume=auto)")


def _check_output_dir(run_dir: Path) -> None:
    """output_dir must be (or be creatable as) a writable directory; checked on every rank, before a barrier."""
    for path in (run_dir, *run_dir.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            what = "is a file" if path == run_dir else f"cannot be created: {path} is a file"
            raise UserError(f"output_dir {run_dir} {what}, not a directory; choose another output_dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"output_dir {run_dir}: {path} is not writable (permission denied); choose another "
                            "output_dir or fix its permissions")
        break
    root = ckpt.checkpoint_dir(run_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a directory; move it away or choose another output_dir")


def _get(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _check_global_batch(cfg: RecipeConfig, saved: dict, state: dict, processes: int) -> list[str]:
    """The global batch (processes x train.batch_size x train.grad_accum_steps) sets what one optimizer step sees:
    a resumed run keeps it, so a run may move to another number of processes by changing grad_accum_steps."""
    before_procs = int(state.get("num_processes") or len(state.get("samples_consumed") or [1]))
    before_accum = _get(saved, "train.grad_accum_steps")
    before_accum = int(before_accum) if before_accum is not _MISSING else cfg.train.grad_accum_steps
    before, now = before_procs * before_accum, processes * cfg.train.grad_accum_steps
    if before == now:
        return ([f"resuming a run of {before_procs} process(es) on {processes}: train.grad_accum_steps "
                 f"{before_accum} -> {cfg.train.grad_accum_steps} keeps the global batch"]
                if before_procs != processes else [])
    hint = (f"set train.grad_accum_steps={before // processes}" if before % processes == 0 else
            f"use a number of processes that divides {before}")
    raise UserError(
        f"cannot resume: the run trained with a global batch of {before} (processes {before_procs} x "
        f"train.grad_accum_steps {before_accum} x train.batch_size {cfg.train.batch_size}) and this launch gives "
        f"{now} ({processes} x {cfg.train.grad_accum_steps}); {hint} to keep it")


def _check_resume_recipe(cfg: RecipeConfig, run_dir: Path, latest: Path, processes: int = 1) -> list[str]:
    """Refuse a recipe whose schedule / data-order keys differ from the run's saved recipe.yaml; handle a
    changed train.max_steps (_check_schedule). Returns lines to print."""
    import yaml

    saved = None
    if (run_dir / "recipe.yaml").is_file():
        try:
            saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError):
            saved = None
    saved = saved if isinstance(saved, dict) else {}
    current = _plain(cfg)
    changed = []
    for key in RESUME_KEYS:
        before, now = _get(saved, key), _get(current, key)
        if before is not _MISSING and before != (None if now is _MISSING else now):
            changed.append(f"{key}: {before!r} -> {None if now is _MISSING else now!r}")
    if changed:
        raise UserError(
            f"cannot resume {run_dir}: the recipe changed keys that set the learning-rate schedule, the data "
            f"order or the trained weights ({'; '.join(changed)}). Resume with the run's values (its "
            f"{run_dir / 'recipe.yaml'}), or start a new run in another output_dir")
    state = _read_json(latest / ckpt.STATE)
    backend = state.get("backend", "ddp")  # each back-end stores the optimizer state its own way
    if backend != cfg.train.distributed.backend:
        raise UserError(f"cannot resume {run_dir}: its checkpoints were written by train.distributed.backend="
                        f"{backend} and the recipe asks for {cfg.train.distributed.backend}; resume with "
                        f"train.distributed.backend={backend}")
    notes = _check_global_batch(cfg, saved, state, processes)
    saved_steps = _get(saved, "train.max_steps")
    schedule_steps = int(state.get("schedule_steps") or (saved_steps if saved_steps is not _MISSING else 0)
                         or cfg.train.max_steps)
    return notes + _check_schedule(cfg, int(state.get("step", 0)), schedule_steps)



def _check_schedule(cfg: RecipeConfig, step: int, schedule_steps: int) -> list[str]:
    """A resumed run with another train.max_steps than the schedule was built for: the lr schedule (built from
    max_steps) would silently change, so this needs train.extend_schedule=true unless the learning rate of the
    steps left is the same either way (a constant schedule, or still in warmup)."""
    t = cfg.train
    if t.max_steps < step:
        raise UserError(f"train.max_steps={t.max_steps} is below the step of the checkpoint to resume ({step}); "
                        f"set train.max_steps >= {step}")
    if t.max_steps == schedule_steps:
        return []

    def lr_at(max_steps):
        return t.lr * multiplier(step, max_steps)

    def multiplier(s, max_steps):
        return lr_multiplier(s, warmup_steps=t.warmup_steps, max_steps=max_steps, schedule=t.lr_schedule,
                             min_ratio=t.min_lr_ratio)

    # the lr of the steps left to train (0-based step indexes step .. max_steps-1) under either length
    if all(math.isclose(multiplier(s, schedule_steps), multiplier(s, t.max_steps), rel_tol=1e-12)
           for s in range(step, t.max_steps)):
        return [f"train.max_steps {schedule_steps} -> {t.max_steps} (the learning rate of the steps left is the same "
                f"either way: {'a constant schedule' if t.lr_schedule == 'constant' else 'still warming up'})"]
    if t.extend_schedule:
        return [f"train.max_steps {schedule_steps} -> {t.max_steps}: the {t.lr_schedule} learning-rate schedule is "
                f"recomputed over {t.max_steps} steps (train.extend_schedule=true); lr at step {step + 1}: "
                f"{lr_at(schedule_steps):.3g} -> {lr_at(t.max_steps):.3g}"]
    raise UserError(
        f"train.max_steps changed from {schedule_steps} to {t.max_steps}, and this run's {t.lr_schedule} learning-"
        f"rate schedule is {schedule_steps} steps long. Set train.extend_schedule=true to recompute the schedule "
        f"over {t.max_steps} steps (the lr at step {step + 1} becomes {lr_at(t.max_steps):.3g} instead of "
        f"{lr_at(schedule_steps):.3g}), or resume with train.max_steps={schedule_steps}")


def _plan_run(cfg: RecipeConfig, mode: str, processes: int = 1) -> tuple[bool, list[str]]:
    """Every rank, before any barrier: is this a resume, and may it be one? -> (resuming, lines to print)."""
    run_dir = Path(cfg.output_dir)
    _check_output_dir(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if mode == "off":
        if found:
            raise UserError(
                f"output_dir {run_dir} already holds checkpoints; pass --resume to continue that run "
                "or choose another output_dir (nothing is overwritten)"
            )
        return False, []
    if not found:
        if mode == "latest":
            raise UserError(
                f"--resume: nothing to resume in {run_dir} (no checkpoint in {ckpt.checkpoint_dir(run_dir)}); "
                "drop --resume to start a new run there, or pass --resume=auto (continue when there is a "
                "checkpoint, start otherwise)")
        return False, [f"--resume=auto: no checkpoint in {ckpt.checkpoint_dir(run_dir)}; starting a new run"]
    return True, _check_resume_recipe(cfg, run_dir, found[-1], processes)


def _write_run_dir(cfg: RecipeConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(cfg, run_dir / "recipe.yaml")
    except OSError as err:
        raise UserError(f"output_dir {run_dir}: cannot write there ({err.strerror or err}: "
                        f"{err.filename or run_dir}); choose another output_dir") from None
    removed = ckpt.remove_temporary(run_dir)
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint save(s) left by an interrupted run: "
              + ", ".join(p.name for p in removed))
    return run_dir


def _trim_metrics(run_dir: Path, step: int) -> int:
    """metrics.jsonl holds each step once: rows past the step a run (re)starts from are dropped, as is a
    line cut short by a kill. Returns the number of rows dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line, row in M.metric_lines(run_dir):
        if row is None or (isinstance(row.get("step"), (int, float)) and row["step"] > step):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped


def train(cfg: RecipeConfig, resume: bool | str = False, recipe_path: str = "RECIPE") -> Path:
    """Train `cfg`. `resume`: False (a new run), True / "latest" (continue the run in output_dir; an error
    when it has no checkpoint) or "auto" (continue when there is a checkpoint, start otherwise).

    Raises `Interrupted` (a SystemExit with status 143 / 130) after a SIGTERM / SIGINT stop."""
    mode = _resume_mode(resume)
    # ---- setup ---------------------------------------------------------------------------
    check_supported(cfg)
    accelerator = _accelerator(cfg)
    check_process_count(accelerator.num_processes)  # a launcher that started another number than asked for
    backend = make_backend(cfg, accelerator)  # ddp | fsdp2 | zero2 | zero3 (train.distributed.backend)
    is_main = accelerator.is_main_process
    # Every rank checks, before any barrier, so all of them stop with the message (checked on rank 0
    # alone, the other ranks crash in the barrier with a "connection closed by peer" traceback).
    resuming, notes = _plan_run(cfg, mode, accelerator.num_processes)
    run_dir = _on_main(accelerator, lambda: _write_run_dir(cfg))
    if is_main:
        for line in notes:
            print(line)
    accelerator.wait_for_everyone()
    torch.manual_seed(cfg.train.seed + accelerator.process_index)

    # ---- data (read before the model: bad manifests fail fast) --------------------------------
    skips = SkipCounter()
    data = build_data(cfg, skips, accelerator.process_index, accelerator.num_processes)
    if is_main:
        print(data.info.summary())
        (run_dir / "data_info.json").write_text(json.dumps(data.info.to_json(), indent=2, default=str))

    # ---- model and trainable weights --------------------------------------------------------
    model = load_model(cfg)
    if is_main and cfg.train.method == "full" and backend.name == "ddp" and model.compute_dtype != torch.float32:
        print(f"note: full finetuning with train.distributed.backend=ddp runs the trained modules in fp32 over the "
              f"{str(model.compute_dtype).replace('torch.', '')} base; backend fsdp2 (also on one GPU) computes them in "
              "bf16 over fp32 master weights: faster, less memory")
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    groups = model.setup_trainable(cfg)  # optimizer parameter groups (each may carry its own lr)
    params = [p for group in groups for p in group["params"]]
    # A prepared latent cache replaces decoding and VAE encoding; without one, samples are encoded online.
    cache_index = (open_cache(cfg, data.dataset, local_checkpoint_dir(cfg), recipe_path)
                   if cfg.objective == "generator" and cfg.action is None else None)
    # only what training uses goes to the accelerator (no decoder, no unused lm_head; the encoder only online)
    model.place_for_training(accelerator.device, encodes_online=cache_index is None)
    if accelerator.device.type == "cuda":  # TF32 where fp32 matmuls remain (trainable fp32 modules, heads)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Noise, sigma, mode and dropouts are drawn per sample from (train.seed, its sampler key), not per rank:
    # N processes and 1 process with N accumulation steps over the same global batch draw the same.
    objective = build_objective(cfg, model, seed=cfg.train.seed)

    if cache_index is not None:
        dataset = LatentCacheDataset(cache_location(cfg), cache_index, caption_seed=data.dataset.seed)
        encode = lambda item: item  # noqa: E731
        if is_main:
            print(f"using latent cache {cache_location(cfg)} ({len(dataset)} samples)")
        if len(dataset) != len(data.dataset):
            raise UserError(f"latent cache at {cache_location(cfg)} does not match the data; re-run prepare")
    else:
        dataset, encode = MarkBadSamples(data.dataset, cfg.data.skip_bad_samples), objective.encode
        if cfg.action is not None and cfg.data.cache != "off":
            # action windows have no `prepare` cache yet: each window is encoded once and kept in memory
            encode = EncodedWindows(objective.encode)

    # ---- warm start / resume ---------------------------------------------------------------------
    if cfg.train.init_from and not resuming:  # another run's trained weights, nothing else
        model.load_trainable_state_dict(cfg, load_warm_start(cfg.train.init_from, method=cfg.train.method))
        if is_main:
            print(f"warm start from {cfg.train.init_from} (weights only)")
    step, resumed, state, found = 0, None, {}, None
    if resuming:
        # The newest checkpoint whose files match their checksums; damaged newer ones are set aside.
        found, (weights, state, torch_state), damaged = ckpt.load_latest_intact(run_dir)
        if damaged:
            accelerator.wait_for_everyone()  # every rank has read what it needs before anything moves
            if is_main:
                for err in damaged:
                    moved = ckpt.set_aside(err)
                    print(f"checkpoint {err.path.name} is damaged ({err.file} {err.problem}); set aside as "
                          f"{moved.name}, resuming from the previous intact checkpoint {found.name}")
        ranks = torch_state["ranks"]
        model.load_trainable_state_dict(cfg, weights)  # before the back-end wraps (and maybe shards) them
        # a run continuing on another number of processes: the data position is dealt out again (sampler.reshard)
        resharded = len(ranks) != accelerator.num_processes
        resumed = ranks[min(accelerator.process_index, len(ranks) - 1)]
        objective.load_state_dict(resumed["objective"])
        step = state["step"]
        skips.load_state_dict(state.get("skips", {}))
        if is_main:
            done = " (train.max_steps reached: nothing left to train)" if step >= cfg.train.max_steps else ""
            print(f"resuming from {found} (step {step}){done}")
    skipped_steps = int(state.get("skipped_steps", 0))  # steps skipped for a non-finite loss / gradient
    consecutive = int(state.get("nonfinite_consecutive", 0))
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema is not None and found is not None and (found / EMA_WEIGHTS).is_file():
        ema.load_export_state(model, cfg, load_file(str(found / EMA_WEIGHTS)), state.get("ema_updates"))

    # The back-end wraps the transformer and builds the optimizer over what it trains; the schedule is built over
    # train.max_steps (a resumed run may only change that as _check_schedule allows).
    optimizer, lr_scheduler = backend.prepare(model, groups)
    if ema is not None:  # the parameters the back-end trains (fsdp2: shards), in the order EMA tracked them
        ema.rebind(backend.ema_parameters(params))
    if resuming:
        backend.load_optimizer(found, torch_state)
        lr_scheduler.load_state_dict(torch_state["lr_scheduler"])
        # The lr of the next step from THIS run's schedule (train.extend_schedule may have changed its length):
        # the stored optimizer / scheduler hold the value the old schedule gave it.
        lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs
    if cfg.train.packing.enabled:
        model.install_packed_attention()
    sampler = data.sampler
    if resumed and resharded:
        if any("key" not in e for r in ranks for e in r["batcher"]["pending"]):
            raise UserError(f"{found} was written by an older version that stored drawn samples, not their keys: "
                            f"resume it on {len(ranks)} process(es)")
        sampler.restore(sampler.reshard([{**r["batcher"], "pending": [e["key"] for e in r["batcher"]["pending"]]}
                                         for r in ranks]))
    elif resumed:
        sampler.restore(resumed["batcher"])
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if cfg.data.num_workers > 0 else None,
    )
    # Sources this rank can ever be given (all when shuffling, a fixed shard otherwise): once all of them
    # proved unusable, stop rather than loop forever.
    sources = [e["source"] for e in cache_index["samples"]] if cache_index else [r.source for r in data.dataset.records]
    reachable = ({sources[k.index] for k in [*sampler.epoch_order(0), *sampler.prefix]} if not cfg.data.shuffle
                 else set(sources))
    # Without workers the DataLoader only adds per-sample overhead on the hot path: index directly.
    stream = iter(loader) if cfg.data.num_workers > 0 else (dataset[key] for key in sampler)
    def redraw(key):  # a sample waiting in the packer at the checkpoint, drawn again from its key
        sample = dataset[key]
        if is_marker(sample):
            check_marker(sample)  # raises: it was good when drawn, so something changed on disk
            raise UserError(f"{sample.get('source')}: waiting to be trained at the checkpoint, now unusable "
                            f"({sample.get('message')})")
        return objective.draw(encode(sample), key)

    batcher = MicroBatcher(stream, encode, objective, cfg, skips, reachable, keys=iter(sampler), redraw=redraw,
                           skipped_sources=set(state.get("skipped_sources", [])) if resumed else None,
                           position=sampler.position)
    if resumed and not resharded:  # resharded: the waiting samples were dealt out as prefix keys
        batcher.load_rank_state(resumed["batcher"])
    if is_main:
        _trim_metrics(run_dir, step)  # each step once: rows a killed run logged past its last checkpoint go
    metrics = MetricsLogger(run_dir, cfg.logging, json.loads(json.dumps(_plain(cfg))), enabled=is_main)
    evaluator = None
    # the main process evaluates; on a sharded model (fsdp2) every rank takes part and the main one reports
    evaluates = is_main or backend.evaluates_on_every_rank
    if evaluates and cfg.action is not None and cfg.action.val_episodes > 0 and cfg.action.eval_windows > 0:
        from cosmos_train.trainer.validation import ActionEvaluator

        evaluator = ActionEvaluator(cfg, model, data.dataset.windows.normalizer)
    # held-out loss / samples (README "Seeing the run"), on the main process; bad held-out data fail here
    validation = build_validation(cfg, model, objective, normalizer=data.dataset.windows.normalizer
                                  if cfg.action is not None else None, write=is_main) if evaluates else None
    flops_per_token = M.flops_per_token(M.forward_params(
        model.transformer, is_gen_param if cfg.objective == "generator" else None), cfg.train.method)
    peak_flops = M.peak_flops(accelerator.device)

    def save(at_step: int) -> Path:
        _save(accelerator, backend, run_dir, at_step, model, cfg, lr_scheduler,
              rank_state={"objective": objective.state_dict(), "batcher": batcher.rank_state()},
              json_state={"skips": skips.state_dict(), "skipped_sources": sorted(batcher.skipped_sources),
                          "skipped_steps": skipped_steps, "nonfinite_consecutive": consecutive,
                          "schedule_steps": cfg.train.max_steps,
                          **({"ema_updates": ema.num_updates} if ema is not None else {})},
              extra_tensors={EMA_WEIGHTS: ema.export_state(model, cfg, backend.module_state_dict)}
              if ema is not None else None)
        return ckpt.checkpoint_dir(run_dir) / ckpt.step_name(at_step)

    # ---- loop ----------------------------------------------------------------------------------
    model.transformer.train()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    first_loss = None
    accum = cfg.train.grad_accum_steps
    stop = GracefulStop().install()  # SIGTERM / SIGINT: finish this step, save, exit 143 / 130
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            total_loss, modes, data_time, samples, tokens = 0.0, {}, 0.0, 0, 0
            modality_losses: dict = {}
            sigmas, sample_losses = [], []
            for micro in range(accum):
                t_data = time.perf_counter()
                batch = batcher.next()
                data_time += time.perf_counter() - t_data
                with backend.accumulating(last_micro=micro == accum - 1):
                    loss, info = objective.loss(batch, packed=cfg.train.packing.enabled)
                    backend.backward(loss / accum)
                total_loss += float(loss.detach())
                samples += len(batch)
                tokens += MicroBatcher.tokens(batch, objective)
                for mode_name, n in info.modes.items():
                    modes[mode_name] = modes.get(mode_name, 0) + n
                for name, value in getattr(info, "modality_losses", {}).items():
                    modality_losses.setdefault(name, []).append(value)
                sigmas += list(getattr(info, "sigmas", []))
                sample_losses += list(getattr(info, "sample_losses", []))
            grad_norm = backend.grad_norm(params, cfg.train.max_grad_norm)
            mean_loss = total_loss / accum
            bad_loss, bad_grad, stop_now = not math.isfinite(mean_loss), not math.isfinite(grad_norm), stop.requested
            if accelerator.num_processes > 1:
                # One reduction a step: the global batch's loss, and every rank learns whether any rank saw a
                # non-finite loss / gradient or was asked to stop, so all of them skip / stop at the same step.
                flags = torch.tensor([mean_loss, bad_loss, bad_grad, stop_now, samples, tokens], dtype=torch.float64,
                                     device=accelerator.device)
                flags = accelerator.reduce(flags, "sum")
                mean_loss = float(flags[0]) / accelerator.num_processes
                bad_loss, bad_grad, stop_now = bool(flags[1] > 0), bool(flags[2] > 0), bool(flags[3] > 0)
                samples, tokens = int(flags[4]), int(flags[5])  # the global batch's (modes, sigma bins: rank 0's)
            skip = bad_loss or bad_grad
            lr = lr_scheduler.get_last_lr()[0]  # the lr this step's update uses (logged with the step)
            if skip:
                # No update: gradients dropped, Adam's moments and step count untouched. The lr schedule still
                # advances (it follows the step count, which counts the data this step consumed).
                backend.skip()
                with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
                    warnings.simplefilter("ignore")
                    lr_scheduler.step()
                skipped_steps += 1
                consecutive += 1
            else:
                backend.step()
                lr_scheduler.step()
                consecutive = 0
                if ema is not None:
                    ema.update()
            step += 1

            dt = time.perf_counter() - t0
            if skip:
                what = "loss" if bad_loss else "gradients"
                if is_main:
                    tqdm.write(f"step {step}: non-finite {what} (loss {mean_loss}, grad norm {grad_norm}); skipped "
                               f"without an update ({consecutive} in a row, {skipped_steps} in all)")
            else:
                first_loss = mean_loss if first_loss is None else first_loss
            metrics.log(step, {"loss": mean_loss if math.isfinite(mean_loss) else None, "lr": lr,
                               "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "step_time_s": dt,
                               "data_time_s": data_time, "samples": samples, "tokens": tokens,
                               "samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "modes": modes,
                               "skipped_steps": skipped_steps, **({"skipped": what} if skip else {}),
                               **{f"loss_{m}": sum(v) / len(v) for m, v in modality_losses.items()
                                  if len(modality_losses) > 1 or m != "vision"},
                               **(M.sigma_bins(sigmas, sample_losses) if sample_losses and not skip else {}),
                               "mfu": M.mfu(tokens / dt, flops_per_token, peak_flops, accelerator.num_processes),
                               "peak_memory_gb": M.peak_memory_gb(accelerator.device),
                               "data_wait": M.data_wait_fraction(data_time, dt)})
            if validation is not None and validation.due(step):
                values, media = validation(step, run_dir)
                metrics.log(step, values)
                metrics.log_media(step, media)
                if is_main:
                    tqdm.write(f"step {step} validation: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float) and k.count("_") <= 1)
                        + (f"  ({len(media)} samples in {run_dir / 'samples'})" if media else ""))
            if step % cfg.train.log_every == 0 or step == 1:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", it_s=f"{1 / dt:.1f}")
            bar.update(1)
            if consecutive >= cfg.train.max_nonfinite_steps:
                found = ckpt.list_checkpoints(run_dir)
                if is_main:
                    _write_summary(run_dir, step, first_loss, skips, skipped_steps, stopped="max_nonfinite_steps")
                raise UserError(
                    f"{consecutive} steps in a row (steps {step - consecutive + 1}-{step}) had a non-finite loss or "
                    f"gradients and were skipped (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                    f"stopping. The weights last changed at step {step - consecutive}"
                    + (f"; the latest checkpoint is {found[-1]}" if found else "")
                    + ". Lower train.lr (or raise train.warmup_steps), check the data for damaged samples, or "
                    "raise train.max_nonfinite_steps")

            saved = False
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                if evaluator:
                    values = evaluator()
                    metrics.log(step, values)
                    if is_main:
                        tqdm.write(f"step {step} held-out action error: "
                                   + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
                save(step)
                saved = True
            if accelerator.num_processes == 1:
                stop_now = stop.requested  # one process: a signal that came during this step's save counts too
            if stop_now and step < cfg.train.max_steps:
                path = save(step) if not saved else ckpt.checkpoint_dir(run_dir) / ckpt.step_name(step)
                bar.close()
                if is_main:
                    _write_summary(run_dir, step, first_loss, skips, skipped_steps, stopped=stop.name)
                    again = (f"cosmos-train train {recipe_path} --resume" if accelerator.num_processes == 1 else
                             f"the same launch of {accelerator.num_processes} processes with --resume (on P processes "
                             f"instead: train.grad_accum_steps={accelerator.num_processes * cfg.train.grad_accum_steps}"
                             "/P)")
                    print(f"cosmos-train: stopped by {stop.name} after step {step} of {cfg.train.max_steps}; "
                          f"checkpoint {path} saved. Continue with: {again} (exit status {stop.exit_code})",
                          flush=True)
                raise Interrupted(stop.exit_code)
    finally:
        stop.restore()
        bar.close()
        metrics.close()
        batcher.close()  # loader workers ignore SIGTERM: stop them here, whatever ended the loop

    # ---- summary -------------------------------------------------------------------------------
    if is_main:
        _write_summary(run_dir, step, first_loss, skips, skipped_steps)
        if len(batcher.decode_log):
            batcher.decode_log.write(run_dir / "data_log.jsonl")
            print(batcher.decode_log.summary())
        if skips.total:
            print(skips.summary())
        if skipped_steps:
            print(f"{skipped_steps} step(s) skipped for a non-finite loss or gradients (see 'skipped' in "
                  f"{run_dir / 'metrics.jsonl'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _write_summary(run_dir: Path, step: int, first_loss, skips, skipped_steps: int,
                   stopped: str | None = None) -> None:
    """run_summary.json; `stopped`: why the run ended before train.max_steps (SIGTERM, SIGINT,
    max_nonfinite_steps), absent when it completed."""
    found = ckpt.list_checkpoints(run_dir)
    summary = {"steps": step, "first_loss": first_loss, "final_checkpoint": str(found[-1]) if found else None,
               "skipped": skips.by_reason, "skipped_steps": skipped_steps}
    if stopped:
        summary["stopped"] = stopped
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))


def _save(accelerator, backend, run_dir, step, model, cfg, lr_scheduler, rank_state: dict,
          json_state: dict, extra_tensors: dict | None = None) -> None:
    ranks = [rank_state]
    if accelerator.num_processes > 1:
        ranks = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(ranks, rank_state)
    weights = backend.trainable_state_dict(model, cfg)  # every rank (gathered when sharded); the main one keeps them
    staged = None
    if backend.sharded:  # every rank writes its part of the optimizer state into one staged directory
        staged = _on_main(accelerator, lambda: ckpt.stage(run_dir, step))
        try:
            backend.save_optimizer(staged / SHARDED_OPTIMIZER)
            failed = None
        except Exception as err:  # noqa: BLE001 -- torch.distributed.checkpoint raises CheckpointException
            failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        failures = [failed]
        if accelerator.num_processes > 1:  # a rank that failed tells the others: all of them stop cleanly
            failures = [None] * accelerator.num_processes
            torch.distributed.all_gather_object(failures, failed)
        failed = next((f for f in failures if f), None)
        if failed is not None:
            if accelerator.is_main_process:
                shutil.rmtree(staged, ignore_errors=True)
            raise UserError(f"could not write the optimizer state of checkpoint step {step} in "
                            f"{ckpt.checkpoint_dir(run_dir)} ({failed}); the earlier checkpoints are intact")
    # A failed write (full disk) is a UserError on every rank; the earlier checkpoints stay as they were.
    _on_main(accelerator, lambda: ckpt.save_checkpoint(
        run_dir, step, weights,
        extra_state={"samples_consumed": [r["batcher"]["consumed"] for r in ranks], "method": cfg.train.method,
                     "backend": backend.name, "num_processes": accelerator.num_processes, **json_state},
        torch_state={"optimizer": backend.optimizer_state(), "lr_scheduler": lr_scheduler.state_dict(),
                     "ranks": ranks},
        keep=cfg.train.keep_checkpoints, extra_tensors=extra_tensors, staged=staged,
    ))
    accelerator.wait_for_everyone()


def _plain(cfg: RecipeConfig) -> dict:
    import yaml

    return yaml.safe_load(recipe_to_yaml(cfg))
