"""Where a run's samples come from: decoded media (online encode) or a prepared latent cache.

Shared by `train` and `prepare` so both agree on the dataset, the cache location and its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cosmos_train.config import RecipeConfig
from cosmos_train.data import GeneratorDataset, SkipCounter
from cosmos_train.data.build import GeneratorData, build_generator_data
from cosmos_train.data.latent_cache import check_cache, data_fingerprint, hash_directory
from cosmos_train.errors import UserError


def build_data(cfg: RecipeConfig, skips: SkipCounter, rank: int = 0, world_size: int = 1) -> GeneratorData:
    """The objective's dataset + sampler: every source read (bad records counted in `skips`, or raised);
    generator media bucketed and mixed, reasoner conversations tokenized with the checkpoint's processor,
    action windows of a LeRobot dataset (`action:` recipes)."""
    if cfg.objective == "reasoner":
        from cosmos_train.data.conversations import build_conversation_data

        return build_conversation_data(cfg, skips, rank, world_size)
    if cfg.action is not None:
        from cosmos_train.data.action_data import build_action_data

        return build_action_data(cfg, skips, rank, world_size)
    return build_generator_data(cfg, rank, world_size, counter=skips)


def cache_location(cfg: RecipeConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "latent_cache"


def cache_fingerprint(cfg: RecipeConfig, dataset: GeneratorDataset, checkpoint_dir: Path) -> dict:
    """Everything that decides what the cache holds (per-sample sizes follow from the data + buckets).

    Not the tokenizer nor the prompt format (`generator.use_system_prompt`, templates, template_dropout,
    uncond_prompt): prompt ids are built at draw time, so changing them needs no re-encode."""
    return {
        "data": data_fingerprint(dataset.records),
        "vae": hash_directory(checkpoint_dir / "vae"),
        "vae_dtype": cfg.model.vae_dtype,
        "resolution": cfg.data.resolution,
        "sizes": hashlib.sha256(json.dumps([dataset.size_of(i) for i in range(len(dataset))]).encode()).hexdigest()[:16],
        "short_clips": cfg.data.short_clips,
        "caption_seed": dataset.seed,
        "num_frames": cfg.data.num_frames,
        "fps": cfg.data.fps,
        "sound": cfg.generator.sound,
        **({"sound_tokenizer": hash_directory(checkpoint_dir / "sound_tokenizer")}
           if cfg.generator.sound != "off" else {}),
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
