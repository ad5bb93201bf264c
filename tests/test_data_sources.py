"""Data layer at scale: time windows, several captions, Hugging Face dataset sources, weighted mixing,
short clips, aspect buckets and the bucketing sampler, the decode log, unreadable files."""

from __future__ import annotations

import io
import itertools
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_train.config import load_recipe
from cosmos_train.config.schema import TIER_SIZES
from cosmos_train.data import (
    BUCKET_SIZES,
    BucketBatchSampler,
    BucketSampler,
    DecodeLog,
    GeneratorDataset,
    InMemoryMedia,
    ManifestRecord,
    MarkBadSamples,
    SampleKey,
    SkipCounter,
    assign_bucket,
    build_generator_data,
    caption_for,
    load_image,
    load_video_clip,
    read_hf_dataset,
    read_manifest,
)
from cosmos_train.data.media import load_image_info, to_model_pixels
from cosmos_train.errors import BadSampleError, UserError

BASE, STEP = 10, 6  # gray level of frame i = BASE + STEP * i


def write_clip(path: Path, n: int, fps: int = 24, h: int = 32, w: int = 48) -> Path:
    with av.open(str(path), mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps, 1))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "10", "preset": "ultrafast"}
        for i in range(n):
            f = np.full((h, w, 3), BASE + STEP * i if n <= 40 else (BASE + 4 * i) % 250, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def indices_of(pixels: torch.Tensor) -> list[int]:
    gray = (to_model_pixels(pixels).mean(dim=(0, 2, 3)) + 1.0) * 127.5
    return [int(round((g - BASE) / STEP)) for g in gray.tolist()]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media_sources")
    write_clip(d / "index24.mp4", 40)
    write_clip(d / "short.mp4", 5)
    write_clip(d / "index30.mp4", 40, fps=30)
    write_clip(d / "wide.mp4", 9, h=36, w=64)  # 16:9
    write_clip(d / "tall.mp4", 9, h=64, w=36)  # 9:16
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "img43.png")  # 4:3
    Image.new("RGB", (30, 30), (0, 0, 255)).save(d / "square.png")  # 1:1
    return d


def write_manifest(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rec(path: Path, source: str = "m:1", **kw) -> ManifestRecord:
    return ManifestRecord(path=path, caption=kw.pop("caption", "a caption"), fps=kw.pop("fps", None),
                          start_frame=kw.pop("start_frame", None), end_frame=kw.pop("end_frame", None),
                          source=source, is_image=path.suffix == ".png", **kw)


# ------------------------------------------------------------------------------------------
# time windows
# ------------------------------------------------------------------------------------------


def test_time_window_manifest_and_decoding(media, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [
        {"path": str(media / "index24.mp4"), "caption": "x", "start_time": 0.5, "end_time": 1.0},
        {"path": str(media / "index30.mp4"), "caption": "x", "start_time": 0.1},
        {"path": str(media / "index24.mp4"), "caption": "x", "end_time": 0.25},
    ])
    r0, r1, r2 = read_manifest(m)
    assert (r0.start_time, r0.end_time, r0.start_frame, r0.end_frame) == (0.5, 1.0, None, None)
    assert (r1.start_time, r1.end_time) == (0.1, None) and (r2.start_time, r2.end_time) == (None, 0.25)
    ds = GeneratorDataset([r0, r1, r2], 9, 8, 8, short_clips="skip")
    s0 = ds[0]  # [0.5 s, 1.0 s) at 24 fps = frames [12, 24)
    assert indices_of(s0["pixels"]) == list(range(12, 21))
    assert s0["decode"]["window"] == [12, 24] and s0["decode"]["window_frames"] == 12
    assert s0["decode"]["window_time"] == [0.5, 1.0]
    # 0.1 s at 30 fps is frame 3 exactly (no float round-up to 4)
    assert ds[1]["decode"]["window"][0] == 3 and ds[1]["decode"]["frame_span"] == [3, 11]
    with pytest.raises(BadSampleError, match=r"too short: window \[0 s, 0\.25 s\) = frames \[0, 6\) at 24 fps "
                                             r"has 6 frames, need 9 consecutive frames") as ei:
        ds.load(2)
    assert ei.value.reason == "too_short" and str(ei.value).startswith(f"{m}:3: ")
    # directly, and frame and time windows exclude each other
    clip = load_video_clip(media / "index24.mp4", 5, 8, 8, start_time=1.0, end_time=2.0)
    assert clip.frame_indices == [24, 25, 26, 27, 28] and (clip.window_start, clip.window_end) == (24, 40)
    with pytest.raises(ValueError, match="not both"):
        load_video_clip(media / "index24.mp4", 5, 8, 8, start_frame=2, end_time=2.0)


@pytest.mark.parametrize("row,reason", [
    ({"start_time": 0.5, "end_frame": 30}, "bad_record"),
    ({"start_frame": 2, "end_time": 1.0}, "bad_record"),
    ({"start_time": -1}, "bad_record"),
    ({"start_time": 1.0, "end_time": 1.0}, "bad_record"),
    ({"end_time": "2"}, "bad_record"),
    ({"captions": []}, "empty_caption"),
    ({"captions": ["ok", " "]}, "empty_caption"),
    ({"captions": "not a list"}, "bad_record"),
    ({"width": 10}, "bad_record"),
])
def test_manifest_window_and_caption_errors(media, tmp_path, row, reason):
    base = {"path": str(media / "index24.mp4")}
    if "captions" not in row:
        base["caption"] = "x"
    m = write_manifest(tmp_path / "m.jsonl", [{**base, **row}])
    with pytest.raises(BadSampleError, match=r"m\.jsonl:1: ") as ei:
        read_manifest(m)
    assert ei.value.reason == reason


def test_image_time_window_is_an_error(media, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [{"path": str(media / "square.png"), "caption": "x", "end_time": 1}])
    with pytest.raises(BadSampleError, match="only valid for videos"):
        read_manifest(m)


# ------------------------------------------------------------------------------------------
# several captions
# ------------------------------------------------------------------------------------------


def test_multi_caption_is_deterministic_and_cycles(media, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [
        {"path": str(media / "square.png"), "caption": "first", "captions": ["second", "third", "first"]},
        {"path": str(media / "square.png"), "captions": ["only"]},
    ])
    r0, r1 = read_manifest(m)
    assert r0.caption == "first" and r0.captions == ("first", "second", "third")
    assert r1.caption == "only" and r1.captions == ()
    picks = [caption_for(r0, e, seed=7) for e in range(12)]
    assert picks == [caption_for(r0, e, seed=7) for e in range(12)]  # deterministic
    for block in range(4):  # every caption once per block of 3 epochs
        assert sorted(picks[3 * block: 3 * block + 3]) == ["first", "second", "third"]
    assert picks != [caption_for(r0, e, seed=8) for e in range(12)]
    assert {caption_for(r1, e, 0) for e in range(5)} == {"only"}
    ds = GeneratorDataset([r0, r1], 1, 8, 8, seed=7)
    assert [ds[SampleKey(0, e)]["caption"] for e in range(12)] == picks
    assert ds[0]["caption"] == picks[0]  # a plain index is epoch 0


# ------------------------------------------------------------------------------------------
# Hugging Face datasets
# ------------------------------------------------------------------------------------------


def test_hf_parquet_path_columns(media, tmp_path):
    import datasets

    (tmp_path / "clips").mkdir()
    for name in ("index24.mp4", "square.png"):
        (tmp_path / "clips" / name).write_bytes((media / name).read_bytes())
    datasets.Dataset.from_dict({
        "file": ["clips/index24.mp4", "clips/square.png", "clips/gone.mp4", "clips/index24.mp4"],
        "text": ["a ramp", "a square", "missing", None],
        "alt": [["a ramp", "a gray ramp"], ["a square"], ["m"], ["a ramp"]],
        "rate": [12.0, None, None, None],
        "t0": [0.5, None, None, None],
        "t1": [None, None, None, None],
    }).to_parquet(str(tmp_path / "ds.parquet"))
    spec = str(tmp_path / "ds.parquet")
    cols = {"video": "file", "caption": "text", "fps": "rate", "start_time": "t0", "end_time": "t1"}
    with pytest.raises(BadSampleError, match=r"ds\.parquet:row 2: media file not found") as ei:
        read_hf_dataset(spec, columns=cols, cache_dir=str(tmp_path / "cache"))
    assert ei.value.reason == "missing_file"
    counter = SkipCounter()
    recs = read_hf_dataset(spec, columns=cols, cache_dir=str(tmp_path / "cache"), skip_bad=True, counter=counter)
    assert counter.by_reason == {"missing_file": 1, "empty_caption": 1}
    assert [r.source for r in recs] == [f"{spec}:row 0", f"{spec}:row 1"]
    v, i = recs
    assert v.path == tmp_path / "clips" / "index24.mp4" and not v.is_image and v.fps == 12.0 and v.start_time == 0.5
    assert i.is_image and i.caption == "a square" and i.dataset == spec
    s = GeneratorDataset(recs, 5, 8, 8)[0]
    assert indices_of(s["pixels"]) == [12, 14, 16, 18, 20] and s["fps"] == 12.0
    # a list column of captions
    recs = read_hf_dataset(spec, columns={**cols, "caption": "alt"}, cache_dir=str(tmp_path / "cache"),
                           skip_bad=True)
    assert recs[0].captions == ("a ramp", "a gray ramp")
    with pytest.raises(UserError, match=r"no column 'nope' \(columns\.caption\)"):
        read_hf_dataset(spec, columns={**cols, "caption": "nope"}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="not found"):
        read_hf_dataset(str(tmp_path / "absent.parquet"))
    # as a recipe source, mixed with a manifest
    m = write_manifest(tmp_path / "m.jsonl", [{"path": "clips/square.png", "caption": "from the manifest"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'run'}
model: {{pretrained: tiny}}
data:
  sources:
    - {{hf_dataset: ./ds.parquet, columns: {{video: file, caption: text, fps: rate}}, cache_dir: ./cache, weight: 3}}
    - {{manifest: ./m.jsonl, weight: 1}}
  height: 16
  width: 16
  num_frames: 9
  skip_bad_samples: true
""")
    data = build_generator_data(load_recipe(recipe))
    assert [(s.name, s.kind, s.records, s.share) for s in data.info.sources] == [
        (spec, "hf_dataset", 2, 0.75), (str(m), "manifest", 1, 0.25)]
    assert data.info.skips.by_reason == {"missing_file": 1, "empty_caption": 1}
    assert data.dataset[0]["source"] == f"{spec}:row 0" and data.dataset[2]["caption"] == "from the manifest"


def test_hf_bytes_columns_decode_in_memory(media, tmp_path):
    import datasets

    video = (media / "index24.mp4").read_bytes()
    img = (media / "img43.png").read_bytes()
    datasets.Dataset.from_dict({
        "video": [video, None, b"", b"garbage" * 10],
        "image": [None, img, None, None],
        "caption": ["v", "i", "empty", "broken"],
        "w": [48, None, None, None],
        "h": [32, None, None, None],
    }).to_parquet(str(tmp_path / "bytes.parquet"))
    spec = str(tmp_path / "bytes.parquet")
    recs = read_hf_dataset(spec, columns={"video": "video", "image": "image", "width": "w", "height": "h"},
                           cache_dir=str(tmp_path / "cache"))
    assert [r.is_image for r in recs] == [False, True, False, False]
    assert recs[0].media is not None and (recs[0].width, recs[0].height) == (48, 32)
    ds = GeneratorDataset(recs, 5, 16, 16, skip_bad_samples=True)
    assert indices_of(ds[0]["pixels"]) == [0, 1, 2, 3, 4]
    assert ds[1]["pixels"].shape == (3, 1, 16, 16) and ds[1]["decode"]["source_size"] == [30, 40]
    assert ds[2] is None and ds[3] is None
    assert ds.counter.by_reason == {"undecodable": 2}
    assert f"{spec}:row 2" in ds.counter.summary() and "0 bytes" in ds.counter.summary()
    # the datasets.Image feature's {bytes, path} struct, and a save_to_disk directory (memory-mapped)
    feat = datasets.Dataset.from_dict({"image": [{"bytes": img, "path": "x.png"}], "caption": ["struct"]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "caption": datasets.Value("string")}))
    feat.save_to_disk(str(tmp_path / "saved"))
    (r,) = read_hf_dataset(str(tmp_path / "saved"))
    assert r.is_image and r.media is not None and "saved:row 0" in r.media.name
    assert load_image(r.media, 8, 8).shape == (3, 1, 8, 8)


def test_in_memory_media_errors():
    with pytest.raises(BadSampleError, match=r"blob: cannot decode, media is empty") as ei:
        load_video_clip(InMemoryMedia("blob", b""), 5, 8, 8)
    assert ei.value.reason == "undecodable"
    with pytest.raises(BadSampleError, match="blob2: cannot decode image") as ei:
        load_image(InMemoryMedia("blob2", b"not an image"), 8, 8)


# ------------------------------------------------------------------------------------------
# weighted mixing
# ------------------------------------------------------------------------------------------


def test_weighted_mixing_proportions_and_determinism():
    sources = [range(0, 30), range(30, 40)]
    sampler = BucketSampler([0] * 40, sources=sources, weights=[1.0, 3.0], seed=5, epoch_size=40)
    assert list(sampler.source_quotas) == [10, 30] and sampler.per_epoch == 40
    stream = [k.index for k in itertools.islice(iter(sampler), 400)]
    assert sum(i >= 30 for i in stream) == 300  # exactly 3:1, epoch by epoch
    assert stream == [k.index for k in itertools.islice(iter(BucketSampler(
        [0] * 40, sources=sources, weights=[1.0, 3.0], seed=5, epoch_size=40)), 400)]
    assert stream != [k.index for k in itertools.islice(iter(BucketSampler(
        [0] * 40, sources=sources, weights=[1.0, 3.0], seed=6, epoch_size=40)), 400)]
    # default epoch for weighted mixing: >= 1000 keys, so odd weights still come out right
    default = BucketSampler([0] * 40, sources=sources, weights=[1.0, 2.0], seed=5)
    assert default.epoch_size == 1000 and list(default.source_quotas) == [333, 667]
    # the big, down-weighted source still cycles through all its records: 30 records at 10 per epoch
    assert set(stream[:120]) >= set(range(30))
    # the small up-weighted source repeats: each record 3x per epoch, with its pass number in `epoch`
    keys = list(itertools.islice(iter(sampler), 40))
    passes = sorted(k.epoch for k in keys if k.index == 35)
    assert passes == [0, 1, 2]


def test_mixed_recipe_sources(media, tmp_path):
    a = write_manifest(tmp_path / "a.jsonl", [{"path": str(media / "square.png"), "caption": f"a{i}"}
                                               for i in range(6)])
    b = write_manifest(tmp_path / "b.jsonl", [{"path": str(media / "img43.png"), "caption": "b"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'run'}
model: {{pretrained: tiny}}
data:
  sources:
    - {{manifest: ./a.jsonl, weight: 1.0}}
    - {{manifest: ./b.jsonl, weight: 1.0, name: small}}
  resolution: 256
  num_frames: 1
generator: {{modes: {{t2i: 1.0, t2v: 0.0, i2v: 0.0, v2v: 0.0}}}}
train: {{batch_size: 2}}
""")
    cfg = load_recipe(recipe)
    assert cfg.data.sources[0].manifest == str(a) and cfg.data.use_buckets()
    data = build_generator_data(cfg)
    assert [s.records for s in data.info.sources] == [6, 1]
    assert [round(s.share, 3) for s in data.info.sources] == [0.5, 0.5]
    assert data.info.sources[1].name == "small" and "small: 1 records, weight 1" in data.info.summary()
    assert data.info.buckets == {"256p 1:1": 6, "256p 4:3": 1}
    for batch in itertools.islice(iter(data.batch_sampler), 6):
        sizes = {tuple(data.dataset[k]["pixels"].shape[-2:]) for k in batch}
        assert len(batch) == 2 and len(sizes) == 1 and sizes <= {(256, 256), (256, 320)}
    text = recipe.read_text()
    for edit, match in [
        (("- {manifest: ./a.jsonl, weight: 1.0}", "- {manifest: ./a.jsonl}"), "every source or on none"),
        (("weight: 1.0, name: small", "weight: 1.0, split: test"), "only apply to an hf_dataset"),
        (("- {manifest: ./a.jsonl, weight: 1.0}", "- {weight: 1.0}"), "exactly one of 'manifest' or 'hf_dataset'"),
        (("weight: 1.0, name: small", "weight: -1.0"), "data.sources\\[1\\].weight"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(*edit))
        with pytest.raises(UserError, match=match):
            load_recipe(bad)
    for overrides, match in [
        (["data.sources=[]"], "missing required value 'data.manifest'"),
        ([f"data.manifest={a}"], "not both"),
        (["data.short_clips=stretch"], "data.short_clips"),
        (["data.height=64", "data.aspect_buckets=true"], "aspect_buckets"),
    ]:
        with pytest.raises(UserError, match=match):
            load_recipe(recipe, overrides)


# ------------------------------------------------------------------------------------------
# short clips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,fps,end,expected", [
    ("loop", None, None, [0, 1, 2, 3, 4, 0, 1, 2, 3]),
    ("pad", None, None, [0, 1, 2, 3, 4, 4, 4, 4, 4]),
    ("loop", 12, None, [0, 2, 4, 0, 2, 4, 0, 2, 4]),  # loops at the target rate, never resampled to fit
    ("pad", 12, None, [0, 2, 4, 4, 4, 4, 4, 4, 4]),
    ("loop", None, 3, [0, 1, 2, 0, 1, 2, 0, 1, 2]),  # window end inside the file
])
def test_short_clips_loop_and_pad(media, mode, fps, end, expected):
    clip = load_video_clip(media / "short.mp4", 9, 8, 8, fps=fps, end_frame=end, short_clips=mode)
    assert clip.frame_indices == expected and indices_of(clip.pixels) == expected
    assert clip.short_fill == mode and clip.valid_frames == len(set(expected))
    assert clip.fps == (fps or 24.0)
    with pytest.raises(BadSampleError) as ei:
        load_video_clip(media / "short.mp4", 9, 8, 8, fps=fps, end_frame=end)  # default: skip
    assert ei.value.reason == "too_short"


def test_short_clips_in_dataset_and_nothing_to_loop(media):
    recs = [rec(media / "short.mp4", "m:1"), rec(media / "index24.mp4", "m:2", start_frame=38)]
    skip = GeneratorDataset(recs, 9, 8, 8, skip_bad_samples=True)
    assert skip[0] is None and skip.counter.by_reason == {"too_short": 1}
    pad = GeneratorDataset(recs, 9, 8, 8, short_clips="pad")
    s = pad[0]
    assert s["decode"]["short_clip"] == "pad" and s["decode"]["valid_frames"] == 5
    assert "(5 in window, padded to 9)" in s["decode"]["text"]
    assert indices_of(pad[1]["pixels"]) == [38, 39] + [39] * 7
    with pytest.raises(BadSampleError, match="too short") as ei:  # start past the end: nothing to pad
        GeneratorDataset([rec(media / "short.mp4", start_frame=7)], 9, 8, 8, short_clips="pad")[0]
    assert ei.value.reason == "too_short"


# ------------------------------------------------------------------------------------------
# buckets
# ------------------------------------------------------------------------------------------


def test_bucket_table_is_diffusers_table():
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _ACTION_RESOLUTION_BINS

    for tier in (256, 480, 720):
        ours = sorted(BUCKET_SIZES[tier].values(), key=lambda hw: hw[0] / hw[1])
        theirs = sorted((tuple(v) for v in _ACTION_RESOLUTION_BINS[str(tier)].values()), key=lambda hw: hw[0] / hw[1])
        assert ours == theirs
        for key, hw in _ACTION_RESOLUTION_BINS[str(tier)].items():
            assert abs(hw[0] / hw[1] - float(key)) < 1e-9
        assert BUCKET_SIZES[tier]["16:9"] == TIER_SIZES[tier]
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKET_SIZES[tier].values())
    assert BUCKET_SIZES[480] == {"16:9": (480, 832), "4:3": (544, 736), "1:1": (640, 640), "3:4": (736, 544),
                                 "9:16": (832, 480)}
    assert BUCKET_SIZES[720]["16:9"] == (720, 1280) and BUCKET_SIZES[720]["1:1"] == (960, 960)
    assert BUCKET_SIZES[256]["16:9"] == (192, 320) and BUCKET_SIZES[256]["4:3"] == (256, 320)


@pytest.mark.parametrize("src,aspect", [((1080, 1920), "16:9"), ((1920, 1080), "9:16"), ((768, 1024), "4:3"),
                                        ((1024, 768), "3:4"), ((500, 500), "1:1"), ((400, 1200), "16:9"),
                                        ((30, 40), "4:3")])
def test_assign_bucket(src, aspect):
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _ACTION_RESOLUTION_BINS
    from diffusers.video_processor import VideoProcessor

    for tier in (256, 480, 720):
        b = assign_bucket(*src, tier)
        assert b.aspect == aspect and b.size == BUCKET_SIZES[tier][aspect] and b.name == f"{tier}p {aspect}"
        assert b.size == VideoProcessor.classify_height_width_bin(*src, ratios=_ACTION_RESOLUTION_BINS[str(tier)])
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 4000, size=(200, 2)):
        assert assign_bucket(int(h), int(w), 480).size == VideoProcessor.classify_height_width_bin(
            int(h), int(w), ratios=_ACTION_RESOLUTION_BINS["480"])


def test_build_assigns_buckets_images_and_videos(media, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [
        {"path": str(media / p), "caption": "x"} for p in ("wide.mp4", "tall.mp4", "img43.png", "square.png")
    ] + [{"path": str(media / "wide.mp4"), "caption": "hinted", "width": 100, "height": 100}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{pretrained: tiny}}\ndata: {{manifest: {m}, "
                      "resolution: 256, num_frames: 9}\n")
    data = build_generator_data(load_recipe(recipe))
    ds = data.dataset
    assert [ds.size_of(i) for i in range(5)] == [(192, 320), (320, 192), (256, 320), (256, 256), (256, 256)]
    assert [data.record_info(i)["source_size"] for i in range(5)] == [[36, 64], [64, 36], [30, 40], [30, 30],
                                                                      [100, 100]]
    assert data.record_info(2) == {"source": f"{m}:3", "dataset": str(m), "kind": "image", "bucket": "256p 4:3",
                                   "size": [256, 320], "source_size": [30, 40]}
    for i, t in enumerate([9, 9, 1, 1]):
        assert ds[i]["pixels"].shape == (3, t, *ds.size_of(i))
    # fixed height/width: no buckets (the tiny recipes' 64x64)
    fixed = build_generator_data(load_recipe(recipe, ["data.height=64", "data.width=64"]))
    assert not fixed.info.aspect_buckets and fixed.info.fixed_size == (64, 64)
    assert {fixed.dataset[i]["pixels"].shape[-2:] for i in range(4)} == {(64, 64)}
    # aspect_buckets=false without a size: the tier's 16:9 size, as before
    off = build_generator_data(load_recipe(recipe, ["data.aspect_buckets=false"]))
    assert off.dataset.size_of(2) == (192, 320)


def test_unprobeable_media_skipped_at_build(media, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    m = write_manifest(tmp_path / "m.jsonl", [{"path": str(media / "square.png"), "caption": "x"},
                                              {"path": str(tmp_path / "broken.mp4"), "caption": "y"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{pretrained: tiny}}\ndata: {{manifest: {m}, "
                      "resolution: 256, num_frames: 9}\n")
    with pytest.raises(BadSampleError, match=r"m\.jsonl:2: .*broken\.mp4"):
        build_generator_data(load_recipe(recipe))
    data = build_generator_data(load_recipe(recipe, ["data.skip_bad_samples=true"]))
    assert len(data.dataset) == 1 and data.info.skips.by_reason == {"undecodable": 1}


# ------------------------------------------------------------------------------------------
# bucket sampler
# ------------------------------------------------------------------------------------------

LAYOUT = ["a"] * 7 + ["b"] * 3 + ["c"] * 12 + ["a"] * 2  # 24 indices, 3 buckets


@pytest.mark.parametrize("group_size,world_size", [(1, 1), (2, 1), (4, 2), (3, 3)])
def test_bucket_sampler_properties(group_size, world_size):
    def make(rank, start=0, seed=3):
        return BucketSampler(LAYOUT, group_size=group_size, seed=seed, rank=rank, world_size=world_size, start=start)

    samplers = [make(r) for r in range(world_size)]
    per_epoch = samplers[0].per_epoch
    for epoch in range(3):
        seen = []
        for s in samplers:
            keys = s.epoch_order(epoch)
            assert len(keys) in (per_epoch, per_epoch - group_size)  # groups dealt round the ranks, no padding
            for g in range(0, len(keys), group_size):  # aligned groups share one bucket
                assert len({LAYOUT[k.index] for k in keys[g:g + group_size]}) == 1
            assert {k.epoch for k in keys} == {epoch}
            seen += [k.index for k in keys]
        assert set(seen) == set(range(len(LAYOUT)))  # every index, every epoch
        assert len(seen) - len(LAYOUT) < 3 * group_size  # only the buckets' last groups filled up with repeats
    # deterministic, seed-dependent, resumable from a count
    n = 3 * per_epoch + 30
    stream = list(itertools.islice(iter(make(0)), n))
    assert stream == list(itertools.islice(iter(make(0)), n))
    assert stream != list(itertools.islice(iter(make(0, seed=4)), n))
    for start in (1, per_epoch - 1, per_epoch, per_epoch + 5):
        assert list(itertools.islice(iter(make(0, start)), 20)) == stream[start:start + 20]
    # batches: groups of one bucket, and a mid-group resume finishes the group first
    batches = list(itertools.islice(iter(BucketBatchSampler(make(0))), 6))
    assert [k for b in batches for k in b] == stream[:6 * group_size]
    assert all(len(b) == group_size and len({LAYOUT[k.index] for k in b}) == 1 for b in batches)
    if group_size > 1:
        first = next(iter(BucketBatchSampler(make(0, start=1))))
        assert first == stream[1:group_size]


def test_bucket_sampler_no_shuffle_is_index_order():
    s = BucketSampler(["x", "y", "x", "y", "x"], group_size=1, shuffle=False)
    assert [k.index for k in s.epoch_order(0)] == [0, 2, 4, 1, 3]


# ------------------------------------------------------------------------------------------
# decode log
# ------------------------------------------------------------------------------------------


def test_decode_log(media, tmp_path):
    recs = [rec(media / "index30.mp4", "m:1", start_frame=0, end_frame=40),
            rec(media / "index24.mp4", "m:2"), rec(media / "square.png", "m:3")]
    ds = GeneratorDataset(recs, 17, 16, 16, fps=24.0)
    e = ds[0]["decode"]
    assert e["text"].startswith("index30.mp4: 30 fps -> 24 fps (nearest-frame), 40 frames window -> 17 frames")
    assert (e["source_fps"], e["fps"], e["fps_change"], e["window_frames"], e["frames"]) == (30.0, 24.0,
                                                                                           "nearest-frame", 40, 17)
    assert e["frame_span"] == [0, 20] and e["short_clip"] is None and e["source_size"] == [32, 48]
    assert e["size"] == [16, 16] and e["kind"] == "video" and e["source"] == "m:1"
    e2 = ds[1]["decode"]
    assert "24 fps (kept), 40 frames window -> 17 frames" in e2["text"] and e2["window"] == [0, 40]
    e3 = ds[2]["decode"]
    assert e3["kind"] == "image" and e3["mode"] == "RGB" and "square.png: image (RGB), 30x30 -> 16x16" in e3["text"]
    assert set(ds.decode_report) == {0, 1, 2}
    log = DecodeLog()
    for i in (0, 1, 2, 0):
        log.add(ds[i]["decode"])
    assert len(log) == 3
    path = log.write(tmp_path / "data_log.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["source"] for x in lines] == ["m:1", "m:2", "m:3"]
    summary = log.summary()
    assert "decoded 3 sources (2 videos, 1 image)" in summary
    assert "30 -> 24 fps (nearest-frame): 1" in summary and "24 fps kept: 1" in summary


# ------------------------------------------------------------------------------------------
# unreadable files, image modes
# ------------------------------------------------------------------------------------------


@pytest.fixture
def deny(monkeypatch):
    """Make files unreadable: chmod 000, and (root ignores permissions) os.open raising EACCES."""
    denied: set[str] = set()
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "open", fake_open)

    def add(path: Path):
        denied.add(os.fspath(path))
        path.chmod(0)

    yield add
    for p in denied:
        Path(p).chmod(0o644)


def test_permission_denied(media, tmp_path, deny):
    for name in ("locked.mp4", "locked.png", "late.png"):
        src = media / ("index24.mp4" if name.endswith(".mp4") else "square.png")
        (tmp_path / name).write_bytes(src.read_bytes())
    m = write_manifest(tmp_path / "m.jsonl", [{"path": "locked.mp4", "caption": "x"},
                                              {"path": "locked.png", "caption": "y"},
                                              {"path": "late.png", "caption": "z"}])
    deny(tmp_path / "locked.mp4")
    deny(tmp_path / "locked.png")
    with pytest.raises(BadSampleError, match=r"m\.jsonl:1: cannot read media file .*locked\.mp4: permission denied") \
            as ei:
        read_manifest(m)
    assert ei.value.reason == "unreadable"
    counter = SkipCounter()
    recs = read_manifest(m, skip_bad=True, counter=counter)
    assert counter.by_reason == {"unreadable": 2} and [r.source for r in recs] == [f"{m}:3"]
    # a file that becomes unreadable after the manifest was read
    deny(tmp_path / "late.png")
    with pytest.raises(BadSampleError, match=r"m\.jsonl:3: .*late\.png: cannot read the file: permission denied"):
        GeneratorDataset(recs, 1, 8, 8)[0]
    marked = MarkBadSamples(GeneratorDataset(recs, 1, 8, 8), skip_bad=True)[SampleKey(0, 0)]
    assert marked["skipped"] == "unreadable" and marked["source"] == f"{m}:3"


def test_image_mode_that_cannot_convert_is_bad_image_mode(monkeypatch):
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGBA", (4, 4)).save(buf, format="PNG")
    real_open = PILImage.open

    def open_as_la(fp, *a, **k):  # Pillow cannot write mode "La"; open a real file and relabel it
        img = real_open(fp, *a, **k)
        img.load()
        return PILImage.new("La", img.size)

    monkeypatch.setattr(PILImage, "open", open_as_la)
    with pytest.raises(BadSampleError, match="cannot convert image mode 'La'") as ei:
        load_image_info(InMemoryMedia("la.png", buf.getvalue()), 4, 4)
    assert ei.value.reason == "bad_image_mode"


def test_image_modes_cmyk_16bit_alpha_are_converted(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.fromarray(np.full((8, 8), 100 * 257, np.uint16)).save(tmp_path / "g16.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    for name, mode in (("c.jpg", "CMYK"), ("g16.png", "I;16"), ("a.png", "RGBA")):
        px, size, got = load_image_info(tmp_path / name, 8, 8)
        assert got == mode and size == (8, 8) and px.shape == (3, 1, 8, 8)
