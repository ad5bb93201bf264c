"""Held-out evaluation during training.

Action runs: the action error of policy and inverse dynamics on held-out episodes (`action.val_episodes`),
sampled the way a user samples the export (the stock pipeline's action call, `inference_action.generate_action`,
around the model being trained), as the mean absolute error of the DE-normalized actions against the stored
ones, so the number is in the dataset's own units and comparable across normalizations.
"""

from __future__ import annotations

import numpy as np
import torch


def action_record_for(cfg, normalizer, embodiment, fps: float) -> dict:
    """The export's `action` record, for a model still in training."""
    return {"embodiment": embodiment.name, "domain_id": embodiment.domain_id,
            "raw_action_dim": normalizer.width, "chunk_size": int(cfg.action.chunk_size), "fps": float(fps),
            "view_point": cfg.action.view_point, "resolution_tier": int(cfg.action.resolution_tier),
            "normalization": normalizer.to_dict()}


class ActionEvaluator:
    """`action.eval_windows` held-out windows (spread evenly over the val split), sampled with
    `action.eval_steps` denoising steps and no CFG, one fixed seed per window."""

    MODES = ("policy", "inverse_dynamics")

    def __init__(self, cfg, model, normalizer):
        from cosmos_train.data.lerobot import LeRobotActionDataset

        self.cfg, self.model = cfg, model
        self.val = LeRobotActionDataset(cfg.action, split="val", normalizer=normalizer,
                                        skip_bad_samples=cfg.data.skip_bad_samples)
        n = min(int(cfg.action.eval_windows), len(self.val))
        self.indices = sorted({int(i) for i in np.linspace(0, len(self.val) - 1, n)}) if n else []
        self.record = action_record_for(cfg, normalizer, model.embodiment(cfg), self.val.fps)
        self.modes = [m for m in self.MODES if getattr(cfg.action.modes, m) > 0]

    def __bool__(self) -> bool:
        return bool(self.indices and self.modes)

    @torch.no_grad()
    def __call__(self) -> dict:
        from PIL import Image

        from cosmos_train.inference_action import generate_action

        pipe = self.model.pipe
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        use_system_prompt = self.cfg.generator.use_system_prompt
        errors: dict = {m: [] for m in self.modes}
        try:
            for seed, index in enumerate(self.indices):
                window = self.val[index]
                if window is None:
                    continue
                frames = ((window.pixels.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).numpy()  # [T, H, W, 3]
                raw = window.raw_actions.numpy()
                for mode in self.modes:
                    condition = ({"image": Image.fromarray((frames[0] * 255).round().astype(np.uint8))}
                                 if mode == "policy" else {"video": frames})
                    _, predicted = generate_action(pipe, self.record, mode, window.task, **condition,
                                                   steps=int(self.cfg.action.eval_steps), guidance=1.0, seed=seed,
                                                   use_system_prompt=use_system_prompt)
                    errors[mode].append(float(np.abs(np.asarray(predicted) - raw).mean()))
        finally:
            pipe.transformer.train(was_training)
        return {f"val_action_mae_{m}": float(np.mean(v)) for m, v in errors.items() if v}
