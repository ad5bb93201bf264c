"""Data-path benchmark (issue: data layer at scale). Not a test: it measures and prints.

    .venv/bin/python bench/bench_data.py [--out bench/RESULTS.md] [--quick]

Sections, each run on this machine with the tiny checkpoint unless said otherwise:
  1. packing efficiency: real tokens / sequence capacity on a generated mixed-length dataset
  2. training throughput (tokens/s): packed vs one sample per forward, tiny transformer
  3. data throughput: latent cache vs online decode + VAE encode, with the full-size Wan2.2 VAE
     architecture (random weights) at a small resolution
  4. time the training loop waits on data, as a fraction of step time, with the cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cosmos_train.config import load_recipe  # noqa: E402
from cosmos_train.data import SkipCounter  # noqa: E402
from cosmos_train.data.latent_cache import LatentCacheDataset, read_index  # noqa: E402
from cosmos_train.models import load_model  # noqa: E402
from cosmos_train.models.tiny import make_tiny  # noqa: E402
from cosmos_train.objectives import build_objective  # noqa: E402
from cosmos_train.prepare import prepare  # noqa: E402
from cosmos_train.data import MarkBadSamples  # noqa: E402
from cosmos_train.trainer.inputs import build_data, cache_location  # noqa: E402

# The Wan2.2 (TI2V-5B) VAE as diffusers' conversion script configures it.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
RECIPE = REPO / "recipes" / "tiny" / "t2v_lora.yaml"
SAMPLES = REPO / "data" / "samples" / "manifest.jsonl"


def full_vae_checkpoint(root: Path) -> Path:
    """The tiny checkpoint with its VAE replaced by a full-size Wan2.2 VAE (random weights)."""
    from diffusers import AutoencoderKLWan

    ckpt = make_tiny(root / "tiny-fullvae")
    tiny_vae = AutoencoderKLWan.from_pretrained(ckpt / "vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**WAN22_VAE, latents_mean=tiny_vae.config.latents_mean,
                           latents_std=tiny_vae.config.latents_std)
    shutil.rmtree(ckpt / "vae")
    vae.save_pretrained(ckpt / "vae")
    return ckpt


def bench_cache_vs_online(root: Path, quick: bool) -> dict:
    ckpt = full_vae_checkpoint(root)
    frames = 9 if quick else 17
    cfg = load_recipe(RECIPE, [f"model.pretrained={ckpt}", f"output_dir={root / 'run-cache'}",
                               f"data.manifest={SAMPLES}", f"data.num_frames={frames}", "data.height=64",
                               "data.width=64"])
    t0 = time.perf_counter()
    prepare(cfg, device="cpu")
    prepare_s = time.perf_counter() - t0

    dataset = build_data(cfg, SkipCounter()).dataset
    objective = build_objective(cfg, load_model(cfg, for_encoding=True), seed=0)
    online = MarkBadSamples(dataset, False)
    n = len(dataset)
    t0 = time.perf_counter()
    for i in range(n):
        objective.encode(online[i])
    online_s = (time.perf_counter() - t0) / n

    cached = LatentCacheDataset(cache_location(cfg), read_index(cache_location(cfg)))
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(n):
            cached[i]
    cached_s = (time.perf_counter() - t0) / (n * reps)
    return {"samples": n, "frames": frames, "size": "64x64", "prepare_s": prepare_s,
            "online_ms_per_sample": online_s * 1e3, "cached_ms_per_sample": cached_s * 1e3,
            "speedup": online_s / cached_s}


def bench_data_wait(root: Path, quick: bool) -> dict:
    """Run the real training loop with a prepared cache; read its per-step data time from metrics."""
    from cosmos_train.trainer.loop import train
    from cosmos_train.trainer.metrics import read_metrics

    steps = 40 if quick else 150
    out = {}
    runs = (("cache, 1 loader worker", "require", 1), ("cache, no loader workers", "require", 0),
            ("online (tiny VAE), 1 loader worker", "off", 1))
    for label, cache, workers in runs:
        cfg = load_recipe(RECIPE, [f"model.pretrained={make_tiny(root / 'tiny')}",
                                   f"output_dir={root / f'wait-{cache}-{workers}'}", f"data.manifest={SAMPLES}",
                                   f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                                   f"data.cache={cache}", f"data.num_workers={workers}"])
        if cache == "require":
            prepare(cfg, device="cpu")
        train(cfg)
        rows = read_metrics(cfg.output_dir)[5:]  # skip warm-up steps
        out[label] = {"data_fraction": sum(r["data_time_s"] for r in rows) / sum(r["step_time_s"] for r in rows),
                      "step_ms": statistics.median(r["step_time_s"] for r in rows) * 1e3}
    return out


def machine() -> str:
    return f"{platform.node() or 'unknown'}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, " \
           f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--quick", action="store_true", help="fewer steps and frames (a smoke run)")
    parser.add_argument("--sections", default="1,2,3,4")
    args = parser.parse_args()
    os.environ.setdefault("COSMOS_TRAIN_CACHE", tempfile.mkdtemp(prefix="ct-bench-cache-"))
    sections = set(args.sections.split(","))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ct-bench-") as tmp:
        root = Path(tmp)
        if "1" in sections or "2" in sections:
            from bench_packing import bench_packing  # noqa: E402  (bench/bench_packing.py)

            results.update(bench_packing(root, quick=args.quick, sections=sections))
        if "3" in sections:
            results["cache_vs_online"] = bench_cache_vs_online(root, args.quick)
        if "4" in sections:
            results["data_wait"] = bench_data_wait(root, args.quick)
    print(json.dumps(results, indent=2))
    from bench_report import write_report  # noqa: E402

    write_report(results, Path(args.out), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
