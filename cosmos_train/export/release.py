"""Checks every released-layout export makes before it is renamed into place.

Both objectives export the same kind of directory (cosmos_train/models/layout.py): diffusers reads the
transformer shards as the generator, transformers reads the same shards (through the root index) as the
reasoner's language model. An export is only written when both views load it and see the same weights:

- `layout_problems` is empty (one root index over transformer/ + vision_encoder/, no root weights);
- every tensor on disk that training changed holds the trained value (in the stored dtype);
- transformers' language model and vision tower are, tensor for tensor, what the files hold (one language
  model: the tensors diffusers' understanding pathway reads), and its logits are finite.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cosmos_train.models.layout import TRANSFORMER_DIR, VISION_DIR, component_weight_map, layout_problems


def changed_weights(trained: dict) -> list[str]:
    """Model state-dict keys a checkpoint changes: LoRA layers' base weights and fully trained parameters."""
    keys = set()
    for name in trained:
        if ".lora_" in name:
            keys.add(name.split(".lora_")[0] + ".weight")
        else:
            keys.add(name)
    return sorted(keys)


def _fail(message: str):
    raise RuntimeError(f"export verification failed: {message}; the export was not written")


def _read_tensor(directory: Path, weight_map: dict, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(directory / weight_map[key]), framework="pt") as fh:
        return fh.get_tensor(key)


def verify_written_tensors(out: Path, transformer: dict[str, torch.Tensor], vision: dict[str, torch.Tensor]) -> int:
    """Every trained tensor is on disk with its trained value (rounded to the stored dtype)."""
    checked = 0
    for sub, expected in ((TRANSFORMER_DIR, transformer), (VISION_DIR, vision)):
        weight_map = component_weight_map(out / sub)
        for key, value in expected.items():
            if key not in weight_map:
                _fail(f"{sub}/ has no tensor {key}")
            stored = _read_tensor(out / sub, weight_map, key)
            if not torch.equal(stored, value.detach().cpu().to(stored.dtype)):
                _fail(f"{sub}/{weight_map[key]}: {key} is not the trained weight")
            checked += 1
    return checked


@torch.no_grad()
def verify_one_language_model(out: Path, dtype: torch.dtype) -> dict:
    """Load `out` with transformers and check that its language model and vision tower ARE the tensors in
    transformer/ and vision_encoder/ (what diffusers' understanding pathway reads), then that it runs."""
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.models.reasoner import hf_key_to_unified

    problems = layout_problems(out)
    if problems:
        _fail("not the released layout: " + "; ".join(problems))
    model = Cosmos3OmniForConditionalGeneration.from_pretrained(str(out), dtype=dtype).eval()
    maps = {TRANSFORMER_DIR: component_weight_map(out / TRANSFORMER_DIR),
            VISION_DIR: component_weight_map(out / VISION_DIR)}
    compared = 0
    for name, param in model.state_dict().items():
        key = hf_key_to_unified(name)
        sub = TRANSFORMER_DIR if key in maps[TRANSFORMER_DIR] else VISION_DIR if key in maps[VISION_DIR] else None
        if sub is None:
            _fail(f"transformers' {name} has no tensor in transformer/ or vision_encoder/")
        stored = _read_tensor(out / sub, maps[sub], key)
        if not torch.equal(param, stored.to(param.dtype)):
            _fail(f"transformers' {name} differs from {sub}/{key}: two language models in one checkpoint")
        compared += 1
    ids = torch.arange(1, 9)[None] % model.config.text_config.vocab_size
    logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        _fail("the transformers view gives non-finite logits")
    del model
    return {"transformers_tensors_checked": compared}


def write_export_record(out: Path, info: dict) -> None:
    """cosmos_train_export.json: what was exported, from what, verified how (no absolute local paths)."""
    (Path(out) / "cosmos_train_export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def set_default_use_system_prompt(out: Path, value: bool) -> None:
    """Record the trained prompt format where the stock pipeline reads it (model_index.json)."""
    path = Path(out) / "model_index.json"
    index = json.loads(path.read_text())
    index["default_use_system_prompt"] = bool(value)
    path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
