"""AdamW and the learning-rate schedule (linear warmup, then constant / linear / cosine decay)."""

from __future__ import annotations

import math

import torch

from cosmos_train.config.schema import TrainConfig


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Factor applied to the base lr at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(params, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    # Fused AdamW on CUDA: one kernel per step and no full-size temporary copy of the weights (the default
    # multi-tensor path allocates one; ~28 GB for a full Nano finetune).
    fused = bool(tensors) and all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                  for p in tensors)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        **({"fused": True} if fused else {}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, schedule=cfg.lr_schedule,
            min_ratio=cfg.min_lr_ratio,
        ),
    )
    return optimizer, scheduler
