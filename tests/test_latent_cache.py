"""Latent cache: prepare -> hit (same inputs as online encode), miss (online), stale (refused, naming why)."""

import json
import os
import shutil

import pytest
import torch

from cosmos_train.cli import main
from cosmos_train.config import load_recipe
from cosmos_train.data.latent_cache import LatentCacheDataset, read_index
from cosmos_train.objectives import build_objective
from cosmos_train.models import load_model
from cosmos_train.prepare import prepare
from cosmos_train.trainer.inputs import build_data, cache_location
from cosmos_train.trainer.loop import train
from cosmos_train.data import SkipCounter

from .conftest import SAMPLES, TINY_RECIPES


@pytest.fixture()
def data_copy(tmp_path):
    """A private copy of the bundled samples (the tests modify files)."""
    root = tmp_path / "samples"
    shutil.copytree(SAMPLES.parent, root)
    return root / "manifest.jsonl"


def _cfg(tiny_dir, tmp_path, manifest, *extra):
    return load_recipe(TINY_RECIPES / "t2v_lora.yaml", [
        f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}",
        "data.num_frames=9", "train.max_steps=3", "train.checkpoint_every=3", *extra])


def test_cache_holds_exactly_what_online_encoding_produces(tiny_dir, tmp_path, data_copy):
    cfg = _cfg(tiny_dir, tmp_path, data_copy)
    path, skips = prepare(cfg, device="cpu")
    assert path == cache_location(cfg) and skips.total == 0
    index = read_index(path)
    cached = LatentCacheDataset(path, index)
    pixels = build_data(cfg, SkipCounter()).dataset
    assert len(cached) == len(pixels) == 9
    objective = build_objective(cfg, load_model(cfg), seed=0)
    for i in (0, 4, 8):
        online = objective.encode(pixels[i])
        hit = cached[i]
        assert torch.equal(hit.latent, online.latent)
        assert (hit.caption, hit.fps, hit.num_frames, hit.height, hit.width) == (
            online.caption, online.fps, online.num_frames, online.height, online.width)


def test_training_uses_the_cache_and_matches_online_training(tiny_dir, tmp_path, data_copy, capsys):
    cached_cfg = _cfg(tiny_dir, tmp_path / "a", data_copy)
    prepare(cached_cfg, device="cpu")
    train(cached_cfg)
    assert "using latent cache" in capsys.readouterr().out
    online_cfg = _cfg(tiny_dir, tmp_path / "b", data_copy, "data.cache=off")
    train(online_cfg)
    losses = lambda c: [json.loads(x)["loss"] for x in (tmp_path / c / "run/metrics.jsonl").read_text().splitlines()]
    assert losses("a") == pytest.approx(losses("b"), rel=1e-5)


def test_stale_cache_is_refused_naming_what_changed(tiny_dir, tmp_path, data_copy, capsys):
    cfg = _cfg(tiny_dir, tmp_path, data_copy)
    prepare(cfg, device="cpu")
    recipe = str(TINY_RECIPES / "t2v_lora.yaml")
    args = [f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"data.manifest={data_copy}",
            "train.max_steps=2"]
    assert main(["train", recipe, *args, "data.num_frames=5"]) == 2
    err = capsys.readouterr().err
    assert "stale" in err and "num_frames: cache has 9, recipe needs 5" in err and "cosmos-train prepare" in err

    clip = data_copy.parent / "clips" / "red_circle.mp4"
    os.utime(clip, (clip.stat().st_atime, clip.stat().st_mtime + 100))  # the data changed
    assert main(["train", recipe, *args, "data.num_frames=9"]) == 2
    assert "data: cache has" in capsys.readouterr().err
    # data.cache=off ignores it; data.cache=require without a cache is an error
    assert main(["train", recipe, *args, "data.num_frames=9", "data.cache=off"]) == 0
    assert main(["train", recipe, *[a.replace("run", "run2") for a in args], "data.num_frames=9",
                 "data.cache=require"]) == 2
    assert "run `cosmos-train prepare" in capsys.readouterr().err


def test_prepare_counts_skips_and_training_reports_them(tiny_dir, tmp_path, data_copy, capsys):
    (data_copy.parent / "clips" / "green_square.mp4").write_bytes(b"")  # zero-byte clip
    with open(data_copy, "a") as f:
        f.write("not json\n")
    cfg = _cfg(tiny_dir, tmp_path, data_copy, "data.skip_bad_samples=true")
    _, skips = prepare(cfg, device="cpu")
    assert skips.by_reason == {"bad_json": 1, "undecodable": 1}
    index = read_index(cache_location(cfg))
    assert sum("skipped" not in e for e in index["samples"]) == 8 and len(index["skipped"]) == 2
    train(cfg)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["skipped"] == {"bad_json": 1, "undecodable": 1}
