"""Generate with an action finetune: policy, forward dynamics, inverse dynamics through the stock pipeline.

Diffusers never normalizes actions and only knows the embodiments in its own tables. An action export
records both (`action` in cosmos_train_export.json: embodiment name, domain id, width, the normalization and
its statistics, chunk size, fps, view point, canvas tier), so this module:
- registers the embodiment with the stock pipeline's tables (a new embodiment is then served by diffusers),
- normalizes given actions (forward dynamics) and de-normalizes predicted ones (policy, inverse dynamics),
- calls `Cosmos3OmniPipeline(..., action=CosmosActionCondition(...))` at the trained fps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cosmos_train.errors import UserError
from cosmos_train.inference import EXPORT_INFO


def action_record(*dirs) -> dict | None:
    """The `action` section of the first cosmos_train_export.json found in `dirs` (None: not an action export)."""
    for d in dirs:
        if d is None:
            continue
        path = Path(d) / EXPORT_INFO
        if path.is_file():
            try:
                record = json.loads(path.read_text()).get("action")
            except (OSError, ValueError) as err:
                raise UserError(f"{path}: unreadable ({err})") from None
            if record:
                return record
    return None


def register_embodiment(record: dict) -> None:
    """Make the stock pipeline accept the recorded embodiment (its tables are read at call time)."""
    from diffusers.pipelines.cosmos import pipeline_cosmos3_omni as p

    name, domain, width = record["embodiment"], int(record["domain_id"]), int(record["raw_action_dim"])
    known = p._EMBODIMENT_TO_DOMAIN_ID.get(name)
    if known is not None and known != domain:
        raise UserError(f"embodiment {name!r} is domain {known} in diffusers but {domain} in this export")
    p._EMBODIMENT_TO_DOMAIN_ID[name] = domain
    p._EMBODIMENT_TO_RAW_ACTION_DIM[name] = width


def _normalizer(record: dict):
    from cosmos_train.data.action_norm import ActionNormalizer

    return ActionNormalizer.from_dict(record["normalization"])


def read_actions(path: str | Path, chunk: int, width: int) -> np.ndarray:
    """Raw actions from a JSON file: a list of `chunk` rows of `width` numbers (or {"actions": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--actions {path}: unreadable JSON ({err})") from None
    try:
        rows = np.asarray(data["actions"] if isinstance(data, dict) else data, dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"--actions {path}: expected a list of rows of {width} numbers ({err})") from None
    if rows.ndim != 2 or rows.shape[1] != width:
        raise UserError(f"--actions {path}: expected rows of {width} numbers (the embodiment's width), got shape "
                        f"{tuple(rows.shape)}")
    if not np.isfinite(rows).all():
        raise UserError(f"--actions {path}: NaN or inf in the actions")
    if rows.shape[0] != chunk:  # the pipeline would silently repeat the last row or cut the rest
        raise UserError(f"--actions {path}: {rows.shape[0]} rows; this export rolls out chunks of {chunk} actions "
                        f"(chunk_size), give exactly {chunk}")
    return rows.astype(np.float32)


def generate_action(pipe, record: dict, mode: str, task: str, *, image=None, video=None,
                    actions: np.ndarray | None = None, steps: int = 35, guidance: float = 6.0, seed: int = 0,
                    use_system_prompt: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(frames [T, H, W, 3] in [0, 1], de-normalized actions [chunk, width] or None) for one action call.
    `image`: a PIL image / [H, W, 3] array; `video`: [T, H, W, 3] float array in [0, 1] (inverse dynamics);
    `actions`: raw actions [<=chunk, width] (forward dynamics)."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

    register_embodiment(record)
    normalizer = _normalizer(record)
    chunk = int(record["chunk_size"])
    raw = None
    if mode == "forward_dynamics":
        if actions is None:
            raise UserError("forward dynamics needs --actions (a JSON list of action rows)")
        raw = torch.as_tensor(np.asarray(normalizer.normalize(actions), dtype=np.float32))
    if image is None and video is None:
        raise UserError(f"{mode} needs a conditioning --image (or --video)")
    condition = CosmosActionCondition(mode=mode, chunk_size=chunk, domain_name=record["embodiment"],
                                      resolution_tier=int(record["resolution_tier"]), raw_actions=raw,
                                      image=image if video is None else None, video=video,
                                      view_point=record.get("view_point", "ego_view"))
    out = pipe(prompt=task, action=condition, fps=float(record["fps"]), num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np",
               enable_safety_check=False, use_system_prompt=use_system_prompt)
    frames = np.asarray(out.video)
    predicted = None
    if mode != "forward_dynamics" and out.action:
        width = int(record["raw_action_dim"])
        predicted = np.asarray(normalizer.denormalize(out.action[0][:, :width].float().cpu().numpy()))
    return frames, predicted
