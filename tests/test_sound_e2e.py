"""Video with sound as a user runs it: prepare (the cache carries the sound latents) -> train -> export ->
generate an MP4 with AAC sound through the stock pipeline."""

from __future__ import annotations

import json

import av
import pytest

from cosmos_train.cli import main
from cosmos_train.config import load_recipe
from cosmos_train.data.latent_cache import read_index
from cosmos_train.errors import UserError
from cosmos_train.prepare import prepare
from cosmos_train.trainer.inputs import cache_location
from cosmos_train.trainer.loop import train

from .conftest import TINY_RECIPES


def _cfg(tiny_dir, out, *overrides):
    return load_recipe(TINY_RECIPES / "t2v_sound.yaml", [f"model.pretrained={tiny_dir}", f"output_dir={out}",
                                                          "train.max_steps=3", "train.checkpoint_every=3",
                                                          *overrides])


def test_sound_run_from_cache_to_an_mp4_with_sound(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run")
    prepare(cfg)
    index = read_index(cache_location(cfg))
    with_sound = {e["source"]: e["sound"] for e in index["samples"]}
    assert sum(with_sound.values()) == 3 and len(with_sound) == 4  # the silent clip trains without sound
    run = train(cfg)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_sound" in m for m in metrics)
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    out = tmp_path / "sample.mp4"
    assert main(["generate", str(tmp_path / "export"), "A white disc moves.", "--frames", "17", "--height", "64",
                 "--width", "64", "--steps", "2", "--sound", "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.rate == 48000 and audio.channels == 2
        assert len(container.streams.video) == 1


def test_require_skips_clips_without_audio(tiny_dir, tmp_path):
    from cosmos_train.data import SkipCounter
    from cosmos_train.trainer.inputs import build_data

    cfg = _cfg(tiny_dir, tmp_path / "run", "generator.sound=require", "data.skip_bad_samples=true")
    data = build_data(cfg, SkipCounter())
    reasons = []
    for i in range(len(data.dataset)):
        try:
            data.dataset.load(i)
        except Exception as err:  # noqa: BLE001 - the reason is what is checked
            reasons.append(getattr(err, "reason", type(err).__name__))
    assert reasons == ["no_audio"]


def test_checkpoint_without_sound_encoder_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from cosmos_train.models import load_model

    base = tmp_path / "decoder-only"
    shutil.copytree(tiny_dir, base)
    weights = base / "sound_tokenizer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("encoder.")}, weights)
    with pytest.raises(UserError, match="sound_tokenizer"):
        load_model(_cfg(base, tmp_path / "run"))
