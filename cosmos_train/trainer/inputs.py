"""Where a run's samples come from: decoded media (online encode) or a prepared latent cache.

Shared by `train` and `prepare` so both agree on the dataset, the cache location and its fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cosmos_train.config import RecipeConfig
from cosmos_train.data import GeneratorDataset, SkipCounter, read_manifest
from cosmos_train.data.latent_cache import check_cache, data_fingerprint, hash_directory
from cosmos_train.errors import BadSampleError, UserError


class SkipMarking(torch.utils.data.Dataset):
    """Turns a bad sample into a marker the main process counts (worker processes cannot share a counter)."""

    def __init__(self, dataset, skip_bad: bool):
        self.dataset, self.skip_bad = dataset, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset.load(index)
        except BadSampleError as err:
            if not self.skip_bad:
                raise
            return {"skipped": err.reason, "source": self.dataset.records[index].source, "message": str(err)}


def build_pixel_dataset(cfg: RecipeConfig, skips: SkipCounter) -> GeneratorDataset:
    records = read_manifest(cfg.data.manifest, skip_bad=cfg.data.skip_bad_samples, counter=skips)
    if not records:
        raise UserError(f"data.manifest: {cfg.data.manifest} has no usable samples")
    height, width = cfg.pixel_size()
    return GeneratorDataset(records, num_frames=cfg.data.num_frames, height=height, width=width, fps=cfg.data.fps)


def cache_location(cfg: RecipeConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "latent_cache"


def cache_fingerprint(cfg: RecipeConfig, dataset: GeneratorDataset, checkpoint_dir: Path) -> dict:
    """Everything that decides what the cache holds."""
    height, width = cfg.pixel_size()
    return {
        "data": data_fingerprint(dataset.records),
        "vae": hash_directory(checkpoint_dir / "vae"),
        "tokenizer": hash_directory(checkpoint_dir / "text_tokenizer"),
        "vae_dtype": cfg.model.vae_dtype,
        "resolution": cfg.data.resolution,
        "size": [height, width],
        "num_frames": cfg.data.num_frames,
        "fps": cfg.data.fps,
        "use_system_prompt": cfg.generator.use_system_prompt,
    }


def open_cache(cfg: RecipeConfig, dataset: GeneratorDataset, checkpoint_dir: Path, recipe: str):
    """The matching cache's index, or None (online encode). Refuses a stale cache; honours data.cache."""
    if cfg.data.cache == "off":
        return None
    location = cache_location(cfg)
    index = check_cache(location, cache_fingerprint(cfg, dataset, checkpoint_dir), recipe)
    if index is None and cfg.data.cache == "require":
        raise UserError(f"data.cache=require but there is no latent cache at {location}: "
                        f"run `cosmos-train prepare {recipe}` first")
    return index
