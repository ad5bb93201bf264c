"""The released Cosmos 3 checkpoint layout: the one place that knows its file names.

nvidia/Cosmos3-Nano (see ../shared/notes/cosmos3-release-layout.md) is one directory that three tools read
differently: diffusers reads `model_index.json` and its components, transformers and vLLM read the root
`config.json` and ONE root weight index whose entries point into `transformer/` (the diffusers transformer
shards: understanding + generation pathways) and `vision_encoder/` (the Qwen3-VL vision tower, bare keys).
There are no weights at the root, so the Reasoner's language model and the Generator's understanding pathway
are the same tensors on disk.

`make-tiny` writes this layout and every export rewrites it here: `write_release_checkpoint` copies a base
checkpoint, writes each weight file once with the trained tensors put in (in the stored dtype), and rebuilds
the root index; `layout_problems` lists every way a directory departs from the layout (tests and the
exporters' self-checks use it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TRANSFORMER_DIR = "transformer"
VISION_DIR = "vision_encoder"
TRANSFORMER_INDEX = "diffusion_pytorch_model.safetensors.index.json"
ROOT_INDEX = "model.safetensors.index.json"
VISION_WEIGHTS = "model.safetensors"
RELEASED_ARCHITECTURE = "Cosmos3ForConditionalGeneration"  # what vLLM serves; transformers ignores it
ALLOW_PATTERNS_OVERRIDES = ["*/*.safetensors"]
# Root files a base checkpoint carries that an export must not copy: rebuilt (index), replaced (model card,
# export record) or pointing elsewhere (the modular pipeline's index names the base repository's components,
# so a modular pipeline loading the export would silently take the base transformer; without it diffusers
# falls back to model_index.json).
NOT_COPIED = {ROOT_INDEX, "README.md", "cosmos_train_export.json", "modular_model_index.json"}

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def transformer_shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


# ---- reading --------------------------------------------------------------------------------------------


def component_weight_map(directory: Path) -> dict[str, str]:
    """{tensor name: file name} of one component directory (sharded with an index, or single files)."""
    from safetensors import safe_open

    directory = Path(directory)
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        return dict(json.loads(indexes[0].read_text())["weight_map"])
    weight_map = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                weight_map[key] = path.name
    return weight_map


def root_weight_map(root: Path) -> dict[str, str]:
    """The root index's weight map ({} when there is none)."""
    path = Path(root) / ROOT_INDEX
    return dict(json.loads(path.read_text())["weight_map"]) if path.is_file() else {}


def is_release_layout(root: Path) -> bool:
    root = Path(root)
    return (root / ROOT_INDEX).is_file() and (root / VISION_DIR).is_dir() and not list(root.glob("*.safetensors"))


def layout_problems(root: Path) -> list[str]:
    """Every way `root` departs from the released layout ([] when it has it)."""
    root = Path(root)
    problems = []
    for name in ("model_index.json", "config.json", ROOT_INDEX, f"{TRANSFORMER_DIR}/{TRANSFORMER_INDEX}",
                 f"{TRANSFORMER_DIR}/config.json", f"{VISION_DIR}/config.json", f"{VISION_DIR}/{VISION_WEIGHTS}"):
        if not (root / name).is_file():
            problems.append(f"missing {name}")
    if problems:
        return problems
    stray = sorted(p.name for p in root.glob("*.safetensors"))
    if stray:
        problems.append(f"weights at the root ({', '.join(stray)}): the language model would exist twice")
    if "vision_encoder" in json.loads((root / "model_index.json").read_text()):
        problems.append("model_index.json names vision_encoder (it is a sidecar, not a pipeline component)")
    config = json.loads((root / "config.json").read_text())
    if config.get("architectures") != [RELEASED_ARCHITECTURE]:
        problems.append(f"config.json architectures is {config.get('architectures')}, not [{RELEASED_ARCHITECTURE!r}]")
    if config.get("model_type") != "cosmos3_omni":
        problems.append(f"config.json model_type is {config.get('model_type')!r}, not 'cosmos3_omni'")
    expected = {k: f"{TRANSFORMER_DIR}/{f}" for k, f in component_weight_map(root / TRANSFORMER_DIR).items()}
    expected.update({k: f"{VISION_DIR}/{f}" for k, f in component_weight_map(root / VISION_DIR).items()})
    actual = root_weight_map(root)
    if actual != expected:
        wrong = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
        problems.append(f"{ROOT_INDEX} disagrees with transformer/ + vision_encoder/ for {len(wrong)} keys "
                        f"(e.g. {wrong[:3]})")
    for rel in sorted(set(actual.values())):
        if not (root / rel).is_file():
            problems.append(f"{ROOT_INDEX} points at {rel}, which does not exist")
    return problems


# ---- writing --------------------------------------------------------------------------------------------


def write_root_index(root: Path) -> dict[str, str]:
    """Rebuild the root index over transformer/ + vision_encoder/ (what transformers and vLLM read)."""
    root = Path(root)
    weight_map = {k: f"{TRANSFORMER_DIR}/{f}" for k, f in component_weight_map(root / TRANSFORMER_DIR).items()}
    for key, name in component_weight_map(root / VISION_DIR).items():
        if key in weight_map:
            raise RuntimeError(f"vision_encoder/ key {key} collides with a transformer key")
        weight_map[key] = f"{VISION_DIR}/{name}"
    total = sum((root / rel).stat().st_size for rel in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / ROOT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def save_sharded(state: dict[str, torch.Tensor], directory: Path, num_shards: int) -> None:
    """Write a transformer state dict as `num_shards` shards + index, sizes balanced, keys in order."""
    from safetensors.torch import save_file

    keys = sorted(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    target = sum(sizes) / num_shards
    shards: list[list[str]] = [[]]
    running = 0.0
    for key, size in zip(keys, sizes):
        if shards[-1] and running + size / 2 > target * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(key)
        running += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = transformer_shard_name(i, len(shards))
        save_file({k: state[k].contiguous() for k in shard}, str(Path(directory) / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(sizes)
    (Path(directory) / TRANSFORMER_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _rewrite_component(source: Path, out: Path, new: dict[str, torch.Tensor]) -> set[str]:
    """Write `source`'s weight files into `out` once each, with the tensors in `new` put in (stored dtype and
    shape kept; a shape mismatch is an error). Files without a replaced tensor are copied. -> keys replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map = component_weight_map(source)
    replaced: set[str] = set()
    for name in sorted(set(weight_map.values())):
        src = source / name
        with safe_open(str(src), framework="pt") as fh:
            keys = list(fh.keys())
            hits = [k for k in keys if k in new]
            if not hits:
                shutil.copy2(src, out / name)
                continue
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {}
            for key in keys:
                if key in new:
                    stored = fh.get_slice(key)
                    shape = tuple(stored.get_shape())
                    if shape != tuple(new[key].shape):
                        raise RuntimeError(f"{source.name}/{name}: {key} has shape {shape}, the trained weight "
                                           f"{tuple(new[key].shape)}")
                    tensors[key] = new[key].detach().to("cpu", _SAFETENSORS_DTYPES[stored.get_dtype()]).contiguous()
                else:
                    tensors[key] = fh.get_tensor(key)
        save_file(tensors, str(out / name), metadata=metadata)
        replaced.update(hits)
    for index in source.glob("*.safetensors.index.json"):
        shutil.copy2(index, out / index.name)
    return replaced


def write_release_checkpoint(source: Path, out: Path, *, transformer: dict[str, torch.Tensor] | None = None,
                             vision: dict[str, torch.Tensor] | None = None) -> dict:
    """Copy the released-layout checkpoint `source` into the (empty) directory `out`, with `transformer`
    (diffusers names) and `vision` (bare vision-tower names) tensors replaced in place. Every weight file is
    written once, in its stored dtype and file name; the root index is rebuilt; root files that would
    describe the base instead of this checkpoint are left out (NOT_COPIED). -> counts of replaced tensors."""
    source, out = Path(source), Path(out)
    problems = layout_problems(source)
    if problems:
        raise ValueError(f"{source} is not in the released Cosmos 3 layout: {'; '.join(problems)}")
    transformer, vision = transformer or {}, vision or {}
    counts = {}
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name in NOT_COPIED:
            continue
        if item.is_dir() and item.name in (TRANSFORMER_DIR, VISION_DIR):
            (out / item.name).mkdir()
            new = transformer if item.name == TRANSFORMER_DIR else vision
            replaced = _rewrite_component(item, out / item.name, new)
            missing = sorted(set(new) - replaced)
            if missing:
                raise RuntimeError(f"the base checkpoint's {item.name}/ has no tensor named {missing[:3]}")
            counts[item.name] = len(replaced)
            for other in item.iterdir():
                if not other.name.endswith(".safetensors") and not other.name.endswith(".index.json"):
                    shutil.copy2(other, out / item.name / other.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    write_root_index(out)
    return counts
