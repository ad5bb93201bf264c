"""The training loop, top to bottom: setup -> data -> trainable weights -> loop -> save.

Runs one process or many (torchrun / accelerate launch) through Accelerate. A micro-step is one pack
of samples sharing a transformer forward (`train.packing`), or `train.batch_size` single-sample forwards;
`train.grad_accum_steps` micro-steps make an optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cosmos_train.config import RecipeConfig, save_recipe
from cosmos_train.config.load import recipe_to_yaml
from cosmos_train.data import MarkBadSamples, SkipCounter
from cosmos_train.data.latent_cache import LatentCacheDataset
from cosmos_train.errors import UserError
from cosmos_train.models import adapter_class, load_model, local_checkpoint_dir
from cosmos_train.objectives import build_objective
from cosmos_train.trainer import checkpoint as ckpt
from cosmos_train.trainer.batching import MicroBatcher
from cosmos_train.trainer.inputs import build_data, cache_location, open_cache
from cosmos_train.trainer.metrics import MetricsLogger
from cosmos_train.trainer.optim import build_optimizer


def _accelerator(cfg: RecipeConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=adapter_class(cfg).ddp_find_unused_parameters(cfg))
    return Accelerator(cpu=cfg.train.device == "cpu", kwargs_handlers=[ddp])


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


def _prepare_run_dir(cfg: RecipeConfig, resume: bool, is_main: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    # Every rank checks, before any barrier, so all of them stop with this message (checked on rank 0
    # alone, the other ranks crash in the barrier with a "connection closed by peer" traceback).
    if not resume and ckpt.list_checkpoints(run_dir):
        raise UserError(
            f"output_dir {run_dir} already holds checkpoints; pass --resume to continue that run "
            "or choose another output_dir (nothing is overwritten)"
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(cfg, run_dir / "recipe.yaml")
    return run_dir


def train(cfg: RecipeConfig, resume: bool = False, recipe_path: str = "RECIPE") -> Path:
    # ---- setup ---------------------------------------------------------------------------
    accelerator = _accelerator(cfg)
    is_main = accelerator.is_main_process
    run_dir = _prepare_run_dir(cfg, resume, is_main)
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
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    groups = model.setup_trainable(cfg)  # optimizer parameter groups (each may carry its own lr)
    params = [p for group in groups for p in group["params"]]
    model.to(accelerator.device)
    optimizer, lr_scheduler = build_optimizer(groups, cfg.train)
    objective = build_objective(cfg, model, seed=cfg.train.seed + 1000 * accelerator.process_index)

    # A prepared latent cache replaces decoding and VAE encoding; without one, samples are encoded online.
    cache_index = (open_cache(cfg, data.dataset, local_checkpoint_dir(cfg), recipe_path)
                   if cfg.objective == "generator" and cfg.action is None else None)
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

    # ---- resume --------------------------------------------------------------------------------
    step, resumed = 0, None
    if resume and ckpt.list_checkpoints(run_dir):
        found = ckpt.list_checkpoints(run_dir)[-1]
        weights, state, torch_state = ckpt.load_checkpoint(found)
        ranks = torch_state["ranks"]
        if len(ranks) != accelerator.num_processes:
            raise UserError(
                f"{found} was written by a run of {len(ranks)} process(es) and this run has "
                f"{accelerator.num_processes}: resume with the same number of processes (the data position and "
                "noise RNG are stored per rank)"
            )
        model.load_trainable_state_dict(cfg, weights)
        optimizer.load_state_dict(torch_state["optimizer"])
        lr_scheduler.load_state_dict(torch_state["lr_scheduler"])
        resumed = ranks[accelerator.process_index]
        objective.load_state_dict(resumed["objective"])
        step = state["step"]
        skips.load_state_dict(state.get("skips", {}))
        if is_main:
            print(f"resuming from {found} (step {step})")

    # The lr scheduler is not prepared: Accelerate would step it once per process.
    forward_module, optimizer = accelerator.prepare(model.transformer, optimizer)
    model.forward_module = forward_module
    if cfg.train.packing.enabled:
        model.install_packed_attention()
    sampler = data.sampler
    sampler.start = resumed["batcher"]["consumed"] if resumed else 0
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
    )
    # Sources this rank can ever be given (all when shuffling, a fixed shard otherwise): once all of them
    # proved unusable, stop rather than loop forever.
    sources = [e["source"] for e in cache_index["samples"]] if cache_index else [r.source for r in data.dataset.records]
    reachable = {sources[k.index] for k in sampler.epoch_order(0)} if not cfg.data.shuffle else set(sources)
    # Without workers the DataLoader only adds per-sample overhead on the hot path: index directly.
    stream = iter(loader) if cfg.data.num_workers > 0 else (dataset[key] for key in sampler)
    batcher = MicroBatcher(stream, encode, objective, cfg, skips, reachable,
                           skipped_sources=set(state.get("skipped_sources", [])) if resumed else None)
    if resumed:
        batcher.load_rank_state(resumed["batcher"])
    metrics = MetricsLogger(run_dir, cfg.logging, json.loads(json.dumps(_plain(cfg))), enabled=is_main)
    evaluator = None
    if is_main and cfg.action is not None and cfg.action.val_episodes > 0 and cfg.action.eval_windows > 0:
        from cosmos_train.trainer.validation import ActionEvaluator

        evaluator = ActionEvaluator(cfg, model, data.dataset.windows.normalizer)

    # ---- loop ----------------------------------------------------------------------------------
    model.transformer.train()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    first_loss = None
    accum = cfg.train.grad_accum_steps
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        total_loss, modes, data_time, samples, tokens = 0.0, {}, 0.0, 0, 0
        modality_losses: dict = {}
        for micro in range(accum):
            t_data = time.perf_counter()
            batch = batcher.next()
            data_time += time.perf_counter() - t_data
            ctx = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(forward_module)
            with ctx:
                loss, info = objective.loss(batch, packed=cfg.train.packing.enabled)
                accelerator.backward(loss / accum)
            total_loss += float(loss.detach())
            samples += len(batch)
            tokens += MicroBatcher.tokens(batch, objective)
            for mode, n in info.modes.items():
                modes[mode] = modes.get(mode, 0) + n
            for name, value in getattr(info, "modality_losses", {}).items():
                modality_losses.setdefault(name, []).append(value)
        grad_norm = None
        if cfg.train.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        mean_loss = total_loss / accum
        if accelerator.num_processes > 1:  # the global batch's loss (and every rank sees a NaN), not rank 0's share
            mean_loss = float(accelerator.reduce(torch.tensor(mean_loss, device=accelerator.device), "mean"))
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"loss is {mean_loss} at step {step}; lower train.lr or check the data")
        first_loss = mean_loss if first_loss is None else first_loss
        dt = time.perf_counter() - t0
        lr = lr_scheduler.get_last_lr()[0]
        metrics.log(step, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
                           "data_time_s": data_time, "samples": samples, "tokens": tokens,
                           "samples_per_s": samples * accelerator.num_processes / dt,
                           "tokens_per_s": tokens * accelerator.num_processes / dt, "modes": modes,
                           **{f"loss_{m}": sum(v) / len(v) for m, v in modality_losses.items()
                              if len(modality_losses) > 1 or m != "vision"}})
        if step % cfg.train.log_every == 0 or step == 1:
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", it_s=f"{1 / dt:.1f}")
        bar.update(1)

        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            if evaluator:
                values = evaluator()
                metrics.log(step, values)
                print("  ".join(f"{k} {v:.4f}" for k, v in values.items()))
            _save(accelerator, run_dir, step, model, cfg, optimizer, lr_scheduler,
                  rank_state={"objective": objective.state_dict(), "batcher": batcher.rank_state()},
                  json_state={"skips": skips.state_dict(), "skipped_sources": sorted(batcher.skipped_sources)})
    bar.close()
    metrics.close()

    # ---- summary -------------------------------------------------------------------------------
    if is_main:
        summary = {"steps": step, "first_loss": first_loss, "final_checkpoint": str(ckpt.list_checkpoints(run_dir)[-1]),
                   "skipped": skips.by_reason}
        (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        if len(batcher.decode_log):
            batcher.decode_log.write(run_dir / "data_log.jsonl")
            print(batcher.decode_log.summary())
        if skips.total:
            print(skips.summary())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _save(accelerator, run_dir, step, model, cfg, optimizer, lr_scheduler, rank_state: dict,
          json_state: dict) -> None:
    ranks = [rank_state]
    if accelerator.num_processes > 1:
        ranks = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(ranks, rank_state)
    if accelerator.is_main_process:
        ckpt.save_checkpoint(
            run_dir, step, model.trainable_state_dict(cfg),
            extra_state={"samples_consumed": [r["batcher"]["consumed"] for r in ranks], "method": cfg.train.method,
                         **json_state},
            torch_state={"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                         "ranks": ranks},
            keep=cfg.train.keep_checkpoints,
        )
    accelerator.wait_for_everyone()


def _plain(cfg: RecipeConfig) -> dict:
    import yaml

    return yaml.safe_load(recipe_to_yaml(cfg))
