"""DeepSpeed ZeRO-2 / ZeRO-3 back-end (trainer/deepspeed_backend.py) on CPU (gloo), at the Backend level.

The slow tests run this file as a driver (`python tests/test_deepspeed_backend.py ...`, under torchrun for two
processes): it builds the tiny generator as the trainer does, trains a few LoRA steps on fixed samples through
the `Backend` calls the loop makes, and writes weights / optimizer moments for the tests to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny" / "t2v_lora.yaml"
LR = 1e-2


# ---- the driver (run as a script) -------------------------------------------------------------------------------

def _driver(argv: list[str]) -> None:
    import argparse

    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from cosmos_train.config import load_recipe
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective
    from cosmos_train.objectives.generator import LatentSample
    from cosmos_train.trainer.backends import SHARDED_OPTIMIZER, make_backend

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)  # zero2 | zero3 | plain (torch AdamW, no DeepSpeed: the reference)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-at", type=int, default=0)  # write a checkpoint after this step
    ap.add_argument("--load", default="")  # resume from this checkpoint directory (its step is in state.json)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", type=int, default=0)  # this step is skipped (as for a non-finite loss)
    ap.add_argument("--extra", nargs="*", default=[])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "train.device=cpu", f"train.lr={LR}", "train.warmup_steps=0",
                               f"train.grad_accum_steps={args.accum}", "train.packing.enabled=false",
                               f"train.distributed.backend={'ddp' if args.backend == 'plain' else args.backend}",
                               *args.extra])
    torch.manual_seed(0)  # LoRA A init: the same on every rank and in every run
    model = load_model(cfg)
    groups = model.setup_trainable(cfg)
    params = [p for g in groups for p in g["params"]]
    model.to(accelerator.device)
    objective = build_objective(cfg, model, seed=0)

    start = 0
    if args.load:
        ckpt = Path(args.load)
        start = json.loads((ckpt / "state.json").read_text())["step"]
        model.load_trainable_state_dict(cfg, load_file(str(ckpt / "trainable.safetensors")))  # before prepare
    if args.backend == "plain":
        from cosmos_train.trainer.optim import build_optimizer

        optimizer, scheduler = build_optimizer(groups, cfg.train)
        backend = None
        if args.load:
            torch_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
            optimizer.load_state_dict(torch_state["optimizer"])
            scheduler.load_state_dict(torch_state["lr_scheduler"])
    else:
        backend = make_backend(cfg, accelerator)
        optimizer, scheduler = backend.prepare(model, groups)
        if args.load:
            torch_state = torch.load(ckpt / "scheduler.pt", weights_only=False)
            backend.load_optimizer(ckpt, torch_state)
            scheduler.load_state_dict(torch_state["lr_scheduler"])

    # fixed samples: a random latent per global sample index (as if encoded), drawn with that index as key
    gen = torch.Generator().manual_seed(1)
    latents = [torch.randn(48, 5, 8, 8, generator=gen) for _ in range(64)]
    def sample(index):
        item = LatentSample(latent=latents[index], caption=f"sample {index}", fps=24.0, num_frames=17, height=64,
                            width=64)
        return objective.draw(item, key=index)

    def moments():  # whole exp_avg / exp_avg_sq and master weights, every rank taking part
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        names = {id(p): n for n, p in model.transformer.named_parameters()}
        found = {}
        for p in [p for n, p in model.transformer.named_parameters() if p.requires_grad]:
            for key in ("exp_avg", "exp_avg_sq"):
                found[f"{names[id(p)]}/{key}"] = safe_get_full_optimizer_state(p, key).reshape(-1).cpu()
            found[f"{names[id(p)]}/fp32"] = safe_get_full_fp32_param(p).reshape(-1).cpu()
        return found

    log = []
    model.transformer.train()
    global_batch = world * args.accum
    for step in range(start, args.steps):
        losses = []
        for micro in range(args.accum):
            # global sample order: micro-step major, rank minor (what the sampler deals to ranks / micro-steps)
            index = step * global_batch + micro * world + rank
            if backend is None:
                loss, _ = objective.loss([sample(index)])
                (loss / args.accum).backward()
            else:
                with backend.accumulating(last_micro=micro == args.accum - 1):
                    loss, _ = objective.loss([sample(index)])
                    backend.backward(loss / args.accum)
            losses.append(float(loss))
        skip = args.skip == step + 1
        if backend is None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            norm = backend.grad_norm(params, cfg.train.max_grad_norm)
            (backend.skip if skip else backend.step)()
        scheduler.step()
        log.append({"step": step + 1, "losses": losses, "grad_norm": norm})
        if args.save_at == step + 1:
            ckpt = out / "ckpt"
            if backend is None:
                weights = model.trainable_state_dict(cfg)
                if rank == 0:
                    ckpt.mkdir(parents=True, exist_ok=True)
                    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()},
                               ckpt / "optimizer.pt")
            else:
                weights = backend.trainable_state_dict(model, cfg)
                backend.save_optimizer(ckpt / SHARDED_OPTIMIZER)
                saved = moments()
                if rank == 0:
                    save_file(saved, str(out / "moments_saved.safetensors"))
                    torch.save({"lr_scheduler": scheduler.state_dict()}, ckpt / "scheduler.pt")
            if rank == 0:
                save_file(weights, str(ckpt / "trainable.safetensors"))
                (ckpt / "state.json").write_text(json.dumps({"step": step + 1}))
    weights = model.trainable_state_dict(cfg) if backend is None else backend.trainable_state_dict(model, cfg)
    if rank == 0:
        save_file(weights, str(out / "final.safetensors"))
        (out / "log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _driver(sys.argv[1:])
