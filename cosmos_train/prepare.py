"""`cosmos-train prepare RECIPE`: decode and VAE-encode every sample once into the latent cache.

Decoding runs in `data.num_workers` DataLoader worker processes; encoding runs on the accelerator in the
main process. The cache is built aside and renamed into place when complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cosmos_train.config import RecipeConfig
from cosmos_train.data import MarkBadSamples, SkipCounter
from cosmos_train.data.dataset import bad_sample_marker, check_marker, close_loader_workers, is_marker
from cosmos_train.data.latent_cache import LatentCacheWriter, check_finite_latents
from cosmos_train.errors import BadSampleError, UserError
from cosmos_train.models import load_model, local_checkpoint_dir
from cosmos_train.objectives import build_objective
from cosmos_train.trainer.inputs import build_data, cache_fingerprint, cache_location


def prepare(cfg: RecipeConfig, device: str | None = None) -> tuple[Path, SkipCounter]:
    if cfg.objective != "generator":
        raise UserError(f"prepare caches generator latents; a '{cfg.objective}' recipe trains from its data directly")
    skips = SkipCounter()
    data = build_data(cfg, skips)
    dataset = data.dataset
    print(data.info.summary())
    if cfg.action is not None:
        # No latent cache for action windows yet (training encodes each window once per run and keeps it);
        # what prepare does for them: read the dataset, check it, and fix the action normalization for the run.
        from cosmos_train.data.action_data import NORMALIZATION_FILE

        path = Path(cfg.output_dir) / NORMALIZATION_FILE
        print(f"action normalization ({dataset.windows.normalizer!r}) written to {path}; action windows are "
              "encoded during training (no latent cache for them yet)")
        return path, skips
    checkpoint_dir = local_checkpoint_dir(cfg)
    fingerprint = cache_fingerprint(cfg, dataset, checkpoint_dir)

    device = device or ("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = load_model(cfg, for_encoding=True).to(device)
    objective = build_objective(cfg, model, seed=0)

    loader = torch.utils.data.DataLoader(MarkBadSamples(dataset, cfg.data.skip_bad_samples), batch_size=None,
                                         num_workers=cfg.data.num_workers, pin_memory=device == "cuda")
    writer = LatentCacheWriter(cache_location(cfg), fingerprint)
    stream = None
    try:
        stream = iter(loader)
        bar = tqdm(stream, total=len(dataset), desc="prepare", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        for index, sample in enumerate(bar):
            if not is_marker(sample):
                item = objective.encode(sample)
                try:
                    check_finite_latents(item, sample["source"])
                except BadSampleError as err:  # the VAE gave NaN / inf: never cached, never trained on
                    sample = bad_sample_marker(err, sample["source"], cfg.data.skip_bad_samples)
            if is_marker(sample):  # a bad sample (met in a loader worker or here): as without workers
                check_marker(sample)  # raises unless data.skip_bad_samples
                skips.add(sample["skipped"], sample["source"], sample["message"])
                writer.add_skipped(sample["source"], sample["skipped"], sample["message"])
                continue
            record = dataset.records[index]
            writer.add(item, list(record.caption_candidates))
        for reason, examples in skips.examples.items():  # manifest-level skips, for the training summary
            for source, message in examples:
                if not any(s["source"] == source for s in writer.skipped):
                    writer.add_skipped(source, reason, message, in_dataset=False)
        path = writer.finish()
    except BaseException:
        close_loader_workers(stream)
        writer.abort()
        raise
    return path, skips
