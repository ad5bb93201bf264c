"""A run that shows itself, as a user runs it: validation (held-out loss at fixed sigmas, samples), EMA,
a TensorBoard tracker, `cosmos-train report`, `export --ema`, and a warm start from that run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cosmos_train.cli import main

from .conftest import SAMPLES, TINY_RECIPES


def test_validation_ema_tracker_report_and_ema_export(tiny_dir, tmp_path):
    run = tmp_path / "run"
    recipe = str(TINY_RECIPES / "t2v_lora.yaml")
    common = [f"model.pretrained={tiny_dir}", "data.cache=off", "train.checkpoint_every=4",
              "validation.every=2", f"validation.manifest={SAMPLES}", "validation.max_samples=2",
              "validation.prompts=[A red circle moves.]", "validation.sample_frames=9", "validation.sample_steps=2",
              "train.ema_decay=0.9", "logging.trackers=[tensorboard]"]
    assert main(["train", recipe, f"output_dir={run}", "train.max_steps=4", *common]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all("val_loss_sigma_0.50" in r for r in val)
    train_rows = [r for r in rows if "loss" in r]
    assert all("data_wait" in r and "peak_memory_gb" in r for r in train_rows)
    assert list((run / "samples").glob("step-*/*.mp4"))  # the fixed prompt's sample
    assert list(run.rglob("events.out.tfevents.*"))  # TensorBoard got the metrics
    checkpoint = run / "checkpoints" / "step-0000004"
    assert (checkpoint / "ema.safetensors").is_file()
    assert "ema.safetensors" in json.loads((checkpoint / "checksums.json").read_text())["files"]

    assert main(["report", str(run)]) == 0
    plots = sorted((run / "report").glob("*.png"))
    assert plots and all(Image.open(p).size[0] > 100 for p in plots)
    assert "val" in (run / "report" / "report.md").read_text().lower()

    assert main(["export", str(run), str(tmp_path / "ema"), "--ema", "--lora-only"]) == 0
    assert main(["export", str(run), str(tmp_path / "raw"), "--lora-only"]) == 0
    ema = load_file(str(tmp_path / "ema" / "adapter_model.safetensors"))
    raw = load_file(str(tmp_path / "raw" / "adapter_model.safetensors"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)

    # warm start: a new run starts from this run's weights (not its optimizer or data position)
    warm = tmp_path / "warm"
    assert main(["train", recipe, f"output_dir={warm}", "train.max_steps=1", f"model.pretrained={tiny_dir}",
                 "data.cache=off", f"train.init_from={run}", "train.lr=1e-12", "train.warmup_steps=0"]) == 0
    started = load_file(str(warm / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    final = load_file(str(checkpoint / "trainable.safetensors"))
    # a negligible lr: still the warm-start weights (a fresh LoRA would have lora_B all zero)
    assert all(torch.allclose(started[k], final[k], atol=1e-6) for k in final)
    assert any(k.endswith("lora_B.weight") and started[k].abs().sum() > 0 for k in started)
