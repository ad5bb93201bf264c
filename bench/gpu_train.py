"""GPU training benchmark: the full-size Cosmos3-Nano transformer with random weights (no download).

One command, one table:

    python bench/gpu_train.py                      # on a GPU: the full Nano config, bf16
    python bench/gpu_train.py --tiny --device cpu  # the same code on the tiny config (what the tests run)

For LoRA and full finetuning of the generation pathway, 256p and 480p at 93 frames, with and without
gradient checkpointing and packing (two half-length clips in one forward through the packed attention
processor: flex attention on CUDA), it times optimizer steps (after warm-up) of the real training code
(`models.sequence` / `models.packing` sequences, `trainer.adapters` trainable selection, AdamW) and reports
tokens/s, step time, MFU (model FLOPs from the config: 6 x gen-pathway parameters per token for full
finetuning, 4 x for LoRA, attention not counted; `trainer.metrics`) and peak memory. The table is printed and
written to --out (default bench/gpu_results.md) with the date and device. Targets (issue #9, one H100-class
GPU): LoRA at 480p MFU >= 40 %, peak memory <= 45 GB with the bf16 base. `lora-int8` rows are LoRA over an int8
weight-only frozen base (`model.quantize_base: int8`, cosmos_train/models/quantize.py): same adapters, same
FLOPs counted as LoRA. `full-fsdp2` rows are full finetuning through the trainer's fsdp2 back-end on the one GPU
(`train.distributed.backend: fsdp2`): bf16 compute over fp32 master weights, instead of fp32 trained modules.

A second table measures the packed attention's memory against the number of samples in a pack, per attention
backend (per-sample SDPA, the dense-mask reference, flex on CUDA): per-sample SDPA and flex stay linear.
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings
from pathlib import Path

import torch

TIERS = {256: (192, 320), 480: (480, 832)}


def build_transformer(tiny: bool, layers: int | None, device: str, dtype: torch.dtype):
    from diffusers import Cosmos3OmniTransformer

    from cosmos_train.models.tiny import TINY_TRANSFORMER_CONFIG

    config = dict(TINY_TRANSFORMER_CONFIG, vocab_size=1050) if tiny else {}  # {}: diffusers' defaults = Nano
    if layers:
        config["num_hidden_layers"] = layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the base dtype: a full Nano in fp32 would need ~60 GB first
    try:
        with torch.device(device):
            model = Cosmos3OmniTransformer(**config)
    finally:
        torch.set_default_dtype(previous)
    model.time_embedder.float()  # as diffusers keeps it
    return model


def train_cfg(method: str):
    from cosmos_train.config.schema import TrainConfig

    cfg = TrainConfig(method=method, lr=1e-5)
    cfg.lora.rank, cfg.lora.alpha = 32, 32
    return cfg


def make_samples(model, tier: int, frames: int, packed: bool, device):
    """(segments per sample, noisy latents, input ids): one clip, or two half-length clips for a pack."""
    from cosmos_train.models.sequence import SequenceGeometry, build_sample_sequence, vision_segment

    geometry = SequenceGeometry(latent_patch_size=model.config.latent_patch_size,
                                enable_fps_modulation=model.config.enable_fps_modulation,
                                base_fps=float(model.config.base_fps),
                                temporal_modality_margin=model.config.unified_3d_mrope_temporal_modality_margin,
                                reset_spatial_ids=model.config.unified_3d_mrope_reset_spatial_ids,
                                temporal_compression=4)
    h, w = TIERS[tier]
    clips = [frames // 2 // 4 * 4 + 1] * 2 if packed else [frames]
    seqs, latents = [], []
    gen = torch.Generator().manual_seed(0)
    for n in clips:
        shape = (1, model.config.latent_channel, (n - 1) // 4 + 1, h // 16, w // 16)
        ids = torch.randint(0, model.config.vocab_size, (200,), generator=gen).tolist()  # a realistic prompt
        seqs.append(build_sample_sequence(ids, [vision_segment(shape, [0], geometry)], 24.0, geometry, device=device))
        latents.append(torch.randn(shape, generator=gen).to(device=device, dtype=model.embed_tokens.weight.dtype))
    return seqs, latents


def run_case(model_args, method: str, tier: int, frames: int, checkpointing: bool, packed: bool, steps: int,
             device: str) -> dict:
    from cosmos_train.models.packing import install_packed_attention, pack_sequences, packing_layout
    from cosmos_train.models.sequence import transformer_kwargs
    from cosmos_train.trainer import metrics as M
    from cosmos_train.trainer.adapters import is_gen_param, setup_trainable
    from cosmos_train.trainer.optim import build_optimizer

    variant = method.split("-")[1] if "-" in method else None
    quantize = variant if variant in ("int8", "fp8") else None  # lora-int8: LoRA over an int8 base
    sharded = variant == "fsdp2"  # full-fsdp2: FSDP2 on this one GPU (bf16 compute over fp32 masters)
    method = method.split("-")[0]
    model = build_transformer(*model_args)
    if quantize:
        from cosmos_train.models.quantize import quantize_frozen_base

        quantize_frozen_base(model, quantize, device)
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")  # PEFT: no merge wanted here
    params = setup_trainable(model, train_cfg(method))
    if sharded:  # the trainer's fsdp2 back-end, one process (trainer/backends.py)
        from cosmos_train.trainer.backends import ensure_process_group, fully_shard_layers, rebuild_groups

        names = {id(p): n for n, p in model.named_parameters()}
        started = ensure_process_group(torch.device(device))
        fully_shard_layers(model, torch.device(device), model_args[3])
        params = rebuild_groups([{"params": params}], names, model)
    optimizer, _ = build_optimizer(params, train_cfg(method))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    seqs, latents = make_samples(model, tier, frames, packed, device)
    if packed:
        install_packed_attention(model)
        seq = pack_sequences(seqs, device=device)
    else:
        seq = {**seqs[0], "sequences": seqs}
    tokens = seq["sequence_length"]
    timesteps = torch.cat([torch.full((s["num_noisy_vision_tokens"],), 500.0, device=device) for s in seqs])

    def step():
        context = packing_layout(model, seq["und_lens"], seq["gen_lens"]) if packed else _null()
        with context:
            preds, _, _ = model(**transformer_kwargs(seq), vision_tokens=latents, vision_timesteps=timesteps,
                                return_dict=False)
        loss = sum(p.float().pow(2).mean() for p in preds)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    step()  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    flops = M.flops_per_token(M.forward_params(model, is_gen_param), method)
    result = {"method": f"{method}-{variant}" if variant else method, "tier": f"{tier}p", "frames": frames,
              "checkpointing": checkpointing, "packed": packed, "tokens": tokens, "step_s": dt, "tokens_per_s": tokens / dt,
              "mfu": M.mfu(tokens / dt, flops, M.peak_flops(torch.device(device))),
              "peak_gb": M.peak_memory_gb(torch.device(device))}
    if cuda:
        torch.cuda.empty_cache()
    if sharded and started:
        torch.distributed.destroy_process_group()
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def table(rows: list[dict], device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    lines = [f"# GPU training benchmark ({datetime.date.today().isoformat()}, {name})", "",
             "| method | tier | frames | grad ckpt | packed | tokens | step (s) | tokens/s | MFU | peak mem (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['tier']} | {r['frames']} | {r['checkpointing']} | {r['packed']} | "
                         f"failed: {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu'] * 100:.1f} %" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['tier']} | {r['frames']} | {r['checkpointing']} | {r['packed']} | "
                     f"{r['tokens']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def attention_memory(model_args, counts: list[int], tier: int, frames: int, device: str) -> list[dict]:
    """The packed attention's memory against the number of samples in a pack: one no-grad forward of n clips
    (`frames` each, 200-token prompts) per backend. `largest_mb`: the largest tensor any op created (a dense
    [S, S] mask shows up there, quadratic in n; per-sample SDPA stays flat); `peak_gb`: the device's peak (CUDA).
    flex (CUDA only) is measured by its peak alone: its compiled kernel does not run under the op recorder."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cosmos_train.models.packing import PackedCosmos3AttnProcessor, install_packed_attention, pack_sequences, \
        packing_layout
    from cosmos_train.models.sequence import transformer_kwargs

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.bytes = max(self.bytes, t.numel() * t.element_size())
            return out

    model = build_transformer(*model_args).eval()
    install_packed_attention(model)
    procs = {id(m.processor): m.processor for m in model.modules()
             if isinstance(getattr(m, "processor", None), PackedCosmos3AttnProcessor)}.values()
    cuda = device.startswith("cuda")
    backends = ["sdpa", "sdpa_dense"] + (["flex"] if cuda else [])
    rows = []
    for n in counts:
        seqs, latents = [], []
        for _ in range(n):  # n copies of one clip: the pack grows, each sample's own attention does not
            s, lat = make_samples(model, tier, frames, False, device)
            seqs += s
            latents += lat
        seq = pack_sequences(seqs, device=device)
        timesteps = torch.cat([torch.full((s["num_noisy_vision_tokens"],), 500.0, device=device) for s in seqs])
        for backend in backends:
            for p in procs:
                p.backend = backend
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            recorder = Largest() if backend != "flex" else _null()
            try:
                with torch.no_grad(), packing_layout(model, seq["und_lens"], seq["gen_lens"]), recorder:
                    model(**transformer_kwargs(seq), vision_tokens=latents, vision_timesteps=timesteps,
                          return_dict=False)
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                rows.append({"backend": backend, "samples": n, "tokens": seq["sequence_length"],
                             "largest_mb": recorder.bytes / 2**20 if backend != "flex" else None, "peak_gb": peak})
            except torch.OutOfMemoryError:
                rows.append({"backend": backend, "samples": n, "tokens": seq["sequence_length"], "error": "OOM"})
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    return rows


def attention_table(rows: list[dict]) -> str:
    lines = ["", "## Packed attention memory vs samples per pack (no-grad forward)", "",
             "| attention | samples | tokens | largest tensor (MB) | peak mem (GB) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['samples']} | {r['tokens']} | {r['error']} | |")
            continue
        largest = f"{r['largest_mb']:.2f}" if r["largest_mb"] is not None else "n/a"
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "n/a"
        lines.append(f"| {r['backend']} | {r['samples']} | {r['tokens']} | {largest} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny config (CPU test) instead of full Nano")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--tiers", default="256,480")
    parser.add_argument("--methods", default="lora,lora-int8,full,full-fsdp2")
    parser.add_argument("--attention-samples", default="1,2,4,8",
                        help="samples per pack for the packed attention memory table ('' to skip)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "gpu_results.md"))
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model_args = (args.tiny, args.layers, args.device, dtype)
    rows = []
    for method in args.methods.split(","):
        for tier in (int(t) for t in args.tiers.split(",")):
            for checkpointing in (True, False):
                for packed in (False, True):
                    try:
                        rows.append(run_case(model_args, method, tier, args.frames, checkpointing, packed, args.steps,
                                             args.device))
                    except torch.OutOfMemoryError as err:  # a case that does not fit is a result too
                        rows.append({"method": method, "tier": f"{tier}p", "frames": args.frames,
                                     "checkpointing": checkpointing, "packed": packed,
                                     "error": f"out of memory ({str(err).splitlines()[0][:60]})"})
                        torch.cuda.empty_cache()
                    print(rows[-1], flush=True)
    text = table(rows, args.device)
    if args.attention_samples:
        counts = [int(n) for n in args.attention_samples.split(",")]
        tier = int(args.tiers.split(",")[0])
        text += attention_table(attention_memory(model_args, counts, tier, args.frames, args.device))
    Path(args.out).write_text(text)
    print(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
