"""EMA of the trainable weights (`train.ema_decay`) and warm starts (`train.init_from`).

EMA: an fp32 shadow copy of the TRAINABLE parameters only (LoRA adapters, action heads, or the fully trained
parameters), updated after every optimizer step with `torch.optim.swa_utils.get_ema_multi_avg_fn` (one fused
`torch._foreach_lerp_` over all tensors): shadow = decay * shadow + (1 - decay) * weights. Not
`torch.optim.swa_utils.AveragedModel`: that deep-copies the whole module, i.e. the frozen 16B / 64B base too, where
only the trainable tensors change. The shadow lives on the parameters' device (its memory = the trainable weights').

Checkpoints (the loop, on the main process): `ema.safetensors` beside `trainable.safetensors`, in the SAME keys,
written from `ema.export_state(model, cfg)` (the EMA weights put through the model's own `trainable_state_dict`), and
`ema.num_updates` in state.json; `ema_weights_for_export(checkpoint_dir)` reads it back for `export --ema`.

Warm start: `load_warm_start(path)` -> the trainable weights of another run (latest checkpoint) or of one
checkpoint directory: weights only; the optimizer, schedule, data position and RNG start fresh.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from cosmos_train.errors import UserError

EMA_WEIGHTS = "ema.safetensors"
WEIGHTS = "trainable.safetensors"  # trainer.checkpoint.WEIGHTS (not imported: this module is read by exporters too)
STATE = "state.json"
UNREADABLE = (OSError, ValueError, RuntimeError, SafetensorError)  # what a damaged / truncated safetensors raises


class EMA:
    """Exponential moving average of `params` (the optimizer's trainable parameters, in a fixed order)."""

    def __init__(self, params, decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        if not 0.0 < float(decay) < 1.0:
            raise UserError(f"train.ema_decay: {decay} (a decay in (0, 1), e.g. 0.999)")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("EMA of no parameters")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]
        self._update = get_ema_multi_avg_fn(self.decay)

    def rebind(self, params) -> None:
        """The parameters a back-end put in place of the originals (same order): an fsdp2 shard (DTensor) gets its
        shadow sharded the same way (each rank keeps the EMA of its own shard)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = list(params)
        if len(params) != len(self.params):
            raise ValueError(f"EMA: {len(params)} parameters to rebind, {len(self.params)} tracked")
        for i, p in enumerate(params):
            if isinstance(p, DTensor) and not isinstance(self.shadow[i], DTensor):
                self.shadow[i] = distribute_tensor(self.shadow[i].to(p.device), p.device_mesh, p.placements)
        self.params = params

    @torch.no_grad()
    def update(self) -> None:
        """After `optimizer.step()`: shadow <- decay * shadow + (1 - decay) * weights."""
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        self._update(self.shadow, current, self.num_updates)
        self.num_updates += 1

    @contextlib.contextmanager
    def swap(self):
        """Inside: the parameters hold the EMA weights (to evaluate, sample or save them); after: the training
        weights again, exactly. Exchanged tensor by tensor, so the extra memory is one tensor at a time. Whatever is
        written into the parameters inside (`load_trainable_state_dict`) becomes the shadow."""
        self._exchange()
        try:
            yield self
        finally:
            self._exchange()

    def _exchange(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                held = p.detach().clone()
                p.copy_(s)
                s.copy_(held)

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"decay", "num_updates", "shadow": [tensors in parameter order]} (torch.save / weights_only load)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise UserError("the checkpoint's EMA does not match the recipe's trainable weights "
                            f"({len(shadow)} tensors saved, {len(self.shadow)} trainable)")
        with torch.no_grad():
            for s, saved in zip(self.shadow, shadow):
                s.copy_(saved)
        self.num_updates = int(state.get("num_updates", 0))

    def export_state(self, model, cfg, gather=None) -> dict[str, torch.Tensor]:
        """The EMA weights in the keys of `model.trainable_state_dict(cfg)` (trainable.safetensors): what the loop
        writes as ema.safetensors. `gather(model, cfg)`: the back-end's whole-tensor state dict (sharded weights:
        a collective every rank calls; the main one gets the tensors)."""
        with self.swap():
            state = (gather or (lambda m, c: m.trainable_state_dict(c)))(model, cfg)
            return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_export_state(self, model, cfg, weights: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        """Resume: the shadow from an ema.safetensors (`export_state`'s keys); the parameters are untouched."""
        with self.swap():
            model.load_trainable_state_dict(cfg, weights)
        if num_updates is not None:
            self.num_updates = int(num_updates)


def ema_weights_for_export(checkpoint_dir) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint (ema.safetensors), in the keys of its trainable.safetensors: `export --ema`
    hands them to the exporter in place of the raw weights."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    _verify(checkpoint_dir)  # the checksums recorded at save time (ema.safetensors too, when the save listed it)
    path = checkpoint_dir / EMA_WEIGHTS
    if not path.is_file():
        raise UserError(f"--ema: checkpoint {checkpoint_dir} has no {EMA_WEIGHTS} (the run trained without "
                        "train.ema_decay, or before it was set); export without --ema")
    try:
        weights = load_file(str(path))
    except UNREADABLE as err:
        raise UserError(f"--ema: {path} is unreadable ({err}); export an earlier checkpoint (--step) or without "
                        "--ema") from None
    raw = checkpoint_dir / WEIGHTS
    if raw.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(raw), framework="pt") as f:
                keys = set(f.keys())
        except UNREADABLE as err:
            raise UserError(f"--ema: {raw} is unreadable ({err}); export an earlier checkpoint (--step)") from None
        if keys != set(weights):
            raise UserError(f"--ema: {path} does not hold the same tensors as {raw.name} "
                            f"({len(set(weights) ^ keys)} differ); the checkpoint is damaged")
    return weights


def _verify(checkpoint: Path) -> None:
    """`trainer.checkpoint.verify_checkpoint`: a file that does not match its recorded checksum is a UserError
    (CheckpointDamaged) naming it."""
    from cosmos_train.trainer import checkpoint as ckpt

    verify = getattr(ckpt, "verify_checkpoint", None)
    if verify is not None:
        verify(checkpoint)


def _checkpoint_of(path: Path) -> Path:
    """A checkpoint directory itself, or a run directory's latest checkpoint."""
    from cosmos_train.trainer import checkpoint as ckpt

    if (path / WEIGHTS).is_file() or (path / STATE).is_file():
        return path
    steps = ckpt.list_checkpoints(path)
    if not steps:
        what = "run directory" if (path / "recipe.yaml").is_file() else "directory"
        raise UserError(f"train.init_from: {path} is a {what} without checkpoints (expected a run directory with "
                        f"checkpoints/step-N/ or a checkpoint directory holding {WEIGHTS})")
    return steps[-1]


def load_warm_start(path, method: str | None = None) -> dict[str, torch.Tensor]:
    """The trainable weights to start from (`train.init_from`): `path` is a run directory (its latest checkpoint)
    or a checkpoint directory. Weights only. `method`: the recipe's `train.method`; a checkpoint of the other method
    (LoRA vs full) is refused here, before the weights are loaded into the model (whose own check names keys)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"train.init_from: {path} does not exist")
    if not path.is_dir():
        raise UserError(f"train.init_from: {path} is a file; give a run directory or a checkpoint directory "
                        f"(checkpoints/step-N/)")
    checkpoint = _checkpoint_of(path)
    weights_path = checkpoint / WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"train.init_from: checkpoint {checkpoint} has no {WEIGHTS}")
    try:
        _verify(checkpoint)
    except UserError as err:
        raise UserError(f"train.init_from: {err}") from None
    if method is not None and (checkpoint / STATE).is_file():
        try:
            saved = json.loads((checkpoint / STATE).read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is not None and saved != method:
            raise UserError(f"train.init_from: {checkpoint} holds train.method={saved} weights and this recipe trains "
                            f"with train.method={method}")
    try:
        weights = load_file(str(weights_path))
    except UNREADABLE as err:
        raise UserError(f"train.init_from: {weights_path} is unreadable ({err}); use an earlier checkpoint") from None
    if not weights:
        raise UserError(f"train.init_from: {weights_path} holds no tensors")
    print(f"warm start from {checkpoint} ({len(weights)} tensors; optimizer, schedule and data start fresh)")
    return weights
