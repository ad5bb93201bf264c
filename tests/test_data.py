"""Tests for cosmos_train.data: manifest parsing, media decoding, the dataset and the bundled samples."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_train.data import (
    resize_frames,
    to_model_pixels,
    GeneratorDataset,
    ManifestRecord,
    SkipCounter,
    collate_skip_none,
    iter_samples,
    load_image,
    load_video,
    load_video_clip,
    probe_video,
    read_manifest,
    sample_frame_indices,
)
from cosmos_train.errors import BadSampleError, UserError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"

# brightness encodes the frame index in the test clips: gray = BASE + STEP * index
BASE, STEP, N_INDEX_FRAMES = 10, 6, 40


def _diffusers_preprocess():
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image

    return _preprocess_conditioning_image


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 24) -> Path:
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps, 1))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "10", "preset": "ultrafast"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def index_frames(n: int = N_INDEX_FRAMES, h: int = 32, w: int = 48) -> list[np.ndarray]:
    return [np.full((h, w, 3), BASE + STEP * i, dtype=np.uint8) for i in range(n)]


def decoded_indices(pixels: torch.Tensor) -> list[int]:
    """Recover the source frame index of each frame of a [3, T, H, W] tensor (uint8 or [-1, 1]) from its brightness."""
    gray = (to_model_pixels(pixels).mean(dim=(0, 2, 3)) + 1.0) * 127.5
    return [int(round((g - BASE) / STEP)) for g in gray.tolist()]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    write_clip(d / "index24.mp4", index_frames())
    write_clip(d / "short.mp4", index_frames(5))
    # a non-square clip with structure, for the resize/crop comparison
    yy, xx = np.mgrid[0:90, 0:160]
    frames = []
    for t in range(9):
        f = np.stack([(xx * 1.5 + t * 10) % 256, (yy * 2.7) % 256, ((xx + yy) * 0.8) % 256], -1).astype(np.uint8)
        frames.append(f)
    write_clip(d / "pattern.mp4", frames)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "img.png")
    (d / "sub").mkdir()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(d / "sub" / "img2.jpg")
    (d / "notes.txt").write_text("hello")
    return d


# ------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------


def write_manifest(d: Path, lines: list[str | bytes], name: str = "manifest.jsonl") -> Path:
    p = d / name
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    p.write_bytes(data)
    return p


def test_manifest_parses_records(media_dir):
    m = write_manifest(
        media_dir,
        [
            '\ufeff{"path": "index24.mp4", "caption": "  gray ramp  ", "fps": 12, "start_frame": 2, "end_frame": 30}',
            "",
            "   ",
            '{"path": "sub/img2.jpg", "caption": "blue"}',
            json.dumps({"path": str(media_dir / "img.png"), "caption": "red", "fps": 30}),
        ],
    )
    recs = read_manifest(m)
    assert len(recs) == 3
    r0, r1, r2 = recs
    assert isinstance(r0, ManifestRecord)
    assert r0.path == media_dir / "index24.mp4" and r0.path.is_absolute()
    assert r0.caption == "gray ramp"
    assert r0.fps == 12.0 and isinstance(r0.fps, float)
    assert (r0.start_frame, r0.end_frame, r0.is_image) == (2, 30, False)
    assert r0.source == f"{m}:1"
    assert r1.source == f"{m}:4" and r1.is_image and r1.path == media_dir / "sub" / "img2.jpg"
    assert (r1.fps, r1.start_frame, r1.end_frame) == (None, None, None)
    assert r2.path == media_dir / "img.png" and r2.fps == 30.0 and r2.source.endswith(":5")


BAD_LINES = [
    ("not json", "bad_json"),
    ('{"path": "img.png", "caption": "x",}', "bad_json"),
    (b'{"path": "img.png", "caption": "\xff\xfe"}', "bad_json"),
    ("[1, 2]", "bad_record"),
    ('"just a string"', "bad_record"),
    ('{"caption": "x"}', "bad_record"),
    ('{"path": 5, "caption": "x"}', "bad_record"),
    ('{"path": "  ", "caption": "x"}', "bad_record"),
    ('{"path": "img.png", "caption": "x", "captoin": "y"}', "bad_record"),
    ('{"path": "img.png", "caption": ""}', "empty_caption"),
    ('{"path": "img.png", "caption": " \\t\\n "}', "empty_caption"),
    ('{"path": "img.png"}', "empty_caption"),
    ('{"path": "img.png", "caption": null}', "empty_caption"),
    ('{"path": "img.png", "caption": 3}', "bad_record"),
    ('{"path": "nope.mp4", "caption": "x"}', "missing_file"),
    ('{"path": "sub", "caption": "x"}', "bad_record"),  # no media extension
    ('{"path": "sub.mp4", "caption": "x"}', "missing_file"),
    ('{"path": "notes.txt", "caption": "x"}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "fps": "24"}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "fps": 0}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "fps": -24}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "fps": true}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "fps": NaN}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "start_frame": -1}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "start_frame": 1.5}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "start_frame": "2"}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "end_frame": 0}', "bad_record"),
    ('{"path": "index24.mp4", "caption": "x", "start_frame": 5, "end_frame": 5}', "bad_record"),
    ('{"path": "img.png", "caption": "x", "start_frame": 0}', "bad_record"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_LINES)])
def test_manifest_bad_line(media_dir, tmp_path, line, reason):
    # the manifest lives next to the media (paths are relative to it); line 3 is the bad one
    name = f"bad_{tmp_path.name}.jsonl"
    m = write_manifest(media_dir, ['{"path": "img.png", "caption": "ok"}', "", line], name=name)
    with pytest.raises(BadSampleError) as ei:
        read_manifest(m)
    assert ei.value.reason == reason
    assert f"{name}:3" in str(ei.value)
    # skip mode: the good line survives, the bad one is counted
    counter = SkipCounter()
    recs = read_manifest(m, skip_bad=True, counter=counter)
    assert [r.source for r in recs] == [f"{m}:1"]
    assert counter.total == 1 and counter.by_reason == {reason: 1}


def test_manifest_unknown_key_message_names_key(media_dir):
    m = write_manifest(media_dir, ['{"path": "img.png", "captoin": "y", "caption": "x"}'], name="typo.jsonl")
    with pytest.raises(BadSampleError, match=r"typo\.jsonl:1: .*'captoin'"):
        read_manifest(m)


def test_manifest_missing_file_itself_is_user_error(tmp_path):
    with pytest.raises(UserError) as ei:
        read_manifest(tmp_path / "nope.jsonl")
    assert not isinstance(ei.value, BadSampleError)
    assert "nope.jsonl" in str(ei.value)
    with pytest.raises(UserError):
        read_manifest(tmp_path)  # a directory


def test_manifest_empty_and_all_bad(media_dir):
    with pytest.raises(UserError, match="no records"):
        read_manifest(write_manifest(media_dir, ["", "  "], name="empty.jsonl"))
    m = write_manifest(media_dir, ["oops", '{"path": "nope.png", "caption": "x"}'], name="allbad.jsonl")
    with pytest.raises(UserError, match="all 2 records are bad") as ei:
        read_manifest(m, skip_bad=True)
    assert "bad_json" in str(ei.value) and "missing_file" in str(ei.value)


def test_skip_counter_summary(media_dir):
    lines = [
        '{"path": "img.png", "caption": "a"}',
        "{broken",
        '{"path": "gone1.mp4", "caption": "b"}',
        '{"path": "gone2.mp4", "caption": "c"}',
        '{"path": "img.png", "caption": ""}',
        '{"path": "index24.mp4", "caption": "d", "fps": 24}',
        '{"path": "gone3.mp4", "caption": "e"}',
    ]
    m = write_manifest(media_dir, lines, name="mixed.jsonl")
    counter = SkipCounter(keep_examples=2)
    recs = read_manifest(m, skip_bad=True, counter=counter)
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["1", "6"]
    assert counter.total == 5 and len(counter) == 5 and counter
    assert counter.by_reason == {"bad_json": 1, "missing_file": 3, "empty_caption": 1}
    summary = counter.summary()
    assert "skipped 5 bad samples" in summary
    assert "missing_file: 3" in summary and "bad_json: 1" in summary and "empty_caption: 1" in summary
    assert "mixed.jsonl:3" in summary and "mixed.jsonl:4" in summary and "(1 more)" in summary
    assert "mixed.jsonl:7" not in summary  # only the first `keep_examples` sources are listed
    assert summary.splitlines()[1].strip().startswith("missing_file")  # most frequent first
    assert SkipCounter().summary() == "no samples skipped" and not SkipCounter()
    other = SkipCounter()
    other.add("too_short", "x:1", "x:1: too short")
    counter.merge(other)
    assert counter.total == 6 and counter.by_reason["too_short"] == 1


# ------------------------------------------------------------------------------------------
# video
# ------------------------------------------------------------------------------------------


def test_probe_video(media_dir):
    assert probe_video(media_dir / "index24.mp4") == (N_INDEX_FRAMES, 24.0, 32, 48)
    assert probe_video(media_dir / "pattern.mp4") == (9, 24.0, 90, 160)


def test_load_video_shape_range_and_consecutive_frames(media_dir):
    pixels, src_fps = load_video(media_dir / "index24.mp4", 17, 16, 24)
    assert src_fps == 24.0
    assert pixels.shape == (3, 17, 16, 24) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert decoded_indices(pixels) == list(range(17))
    # same rate given explicitly: not a resampling
    clip = load_video_clip(media_dir / "index24.mp4", 9, 16, 16, fps=24, start_frame=7)
    assert not clip.resampled and clip.fps == 24.0 and clip.frame_indices == list(range(7, 16))
    assert decoded_indices(clip.pixels) == list(range(7, 16))


@pytest.mark.parametrize(
    "fps,start,expected",
    [
        (12, 0, [0, 2, 4, 6, 8, 10, 12, 14, 16]),
        (12, 5, [5, 7, 9, 11, 13, 15, 17, 19, 21]),
        (16, 0, [0, 2, 3, 5, 6, 8, 9, 11, 12]),  # 1.5 source frames per output frame, ties -> later
        (8, 1, [1, 4, 7, 10, 13, 16, 19, 22, 25]),
        (48, 0, [0, 1, 1, 2, 2, 3, 3, 4, 4]),  # upsampling repeats frames
        (24.01, 0, list(range(9))),  # within 0.1%: same rate
    ],
)
def test_fps_resampling_picks_nearest_frames(media_dir, fps, start, expected):
    clip = load_video_clip(media_dir / "index24.mp4", 9, 8, 8, fps=fps, start_frame=start)
    assert clip.frame_indices == expected
    assert decoded_indices(clip.pixels) == expected
    assert clip.source_fps == 24.0
    assert clip.resampled == (fps != 24.01)
    assert clip.fps == (float(fps) if clip.resampled else 24.0)
    assert sample_frame_indices(9, 24.0, fps, start) == (expected, clip.resampled)


def test_invalid_video_arguments_are_programming_errors(media_dir):
    for kw in ({"fps": 0}, {"fps": float("nan")}, {"start_frame": -1}):
        with pytest.raises(ValueError):
            load_video(media_dir / "index24.mp4", 5, 8, 8, **kw)


def test_too_short(media_dir):
    with pytest.raises(BadSampleError) as ei:
        load_video(media_dir / "short.mp4", 9, 16, 16)
    assert ei.value.reason == "too_short"
    msg = str(ei.value)
    assert "short.mp4" in msg and "5 decodable frames" in msg and "9 consecutive frames" in msg
    # long enough at its own rate, too short once resampled to a lower fps
    load_video(media_dir / "index24.mp4", 33, 8, 8)
    with pytest.raises(BadSampleError, match=r"index24\.mp4.*40 decodable frames.*at 6 fps") as ei:
        load_video(media_dir / "index24.mp4", 17, 8, 8, fps=6)
    assert ei.value.reason == "too_short"
    # start_frame pushes it past the end
    with pytest.raises(BadSampleError, match="33 from start_frame 7") as ei:
        load_video(media_dir / "index24.mp4", 37, 8, 8, start_frame=7)
    # window end
    with pytest.raises(BadSampleError, match=r"window \[2, 12\) has 10 frames") as ei:
        load_video_clip(media_dir / "index24.mp4", 17, 8, 8, start_frame=2, end_frame=12)
    assert ei.value.reason == "too_short"


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "zero_bytes": b"",
        "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"this is not a video\n" * 20,
        "truncated": good[: len(good) // 2],
        "header_only": good[:64],
        "zeroed_middle": good[:1500] + bytes(1500) + good[3000:],
    }


@pytest.mark.parametrize("kind", list(_corrupt_variants(b"x" * 4000)))
def test_corrupt_video_is_bad_sample(media_dir, tmp_path, kind):
    good = (media_dir / "index24.mp4").read_bytes()
    assert len(good) > 3000
    p = tmp_path / f"{kind}.mp4"
    p.write_bytes(_corrupt_variants(good)[kind])
    with pytest.raises(BadSampleError) as ei:
        load_video(p, 33, 16, 16)
    assert ei.value.reason == "undecodable"
    assert str(p) in str(ei.value)
    if kind != "zeroed_middle":  # its container header is intact
        with pytest.raises(BadSampleError, match="undecodable|cannot decode"):
            probe_video(p)


def test_missing_video(tmp_path):
    with pytest.raises(BadSampleError) as ei:
        load_video(tmp_path / "gone.mp4", 5, 8, 8)
    assert ei.value.reason == "missing_file" and "gone.mp4" in str(ei.value)


@pytest.mark.parametrize("size", [(64, 64), (48, 96), (100, 50), (90, 160), (33, 47)])
def test_resize_crop_matches_diffusers(media_dir, size):
    height, width = size
    fn = _diffusers_preprocess()
    with av.open(str(media_dir / "pattern.mp4")) as c:
        raw = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    pixels, _ = load_video(media_dir / "pattern.mp4", 5, height, width)
    for t in (0, 4):
        ref = fn(Image.fromarray(raw[t]), height=height, width=width)  # [1, 3, H, W]
        assert torch.equal(pixels[:, t], ref[0]), t
    img = load_image(media_dir / "img.png", height, width)
    assert torch.equal(img[:, 0], fn(Image.open(media_dir / "img.png"), height=height, width=width)[0])


def test_resize_is_cover_then_center_crop(tmp_path):
    # 200x100 (WxH): left quarter red, rest blue. To 50x50: scale 0.5 -> 100x50, crop 25 px each side,
    # which removes exactly the red quarter.
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:] = (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 50, 50)
    assert out.shape == (3, 1, 50, 50)
    # no red left (column 0 only sees the antialiasing filter's tail of the red edge), all blue
    assert out[0, :, :, 1:].max() < -0.9 and out[0].max() < -0.5 and out[2].min() > 0.5
    # to 100x20 (HxW): scale = max(20/200, 100/100) = 1 -> no resize, crop columns 90..110
    out = load_image(tmp_path / "wide.png", 100, 20)
    assert torch.all(out[2] == 1.0) and torch.all(out[0] == -1.0)


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------


def _to255(t: torch.Tensor) -> torch.Tensor:
    return (t + 1.0) * 127.5


def test_image_rgba_composited_on_white(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, 8:] = (255, 0, 0, 255)  # opaque red right half; left half fully transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out = _to255(load_image(tmp_path / "rgba.png", 16, 16))[:, 0]
    assert out.shape == (3, 16, 16)
    assert torch.all(out[:, :, :6] > 250)  # white where transparent
    assert torch.all(out[0, :, 10:] > 250) and torch.all(out[1:, :, 10:] < 5)  # red where opaque


def test_image_cmyk(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = _to255(load_image(tmp_path / "cmyk.jpg", 8, 8))
    assert out.shape == (3, 1, 8, 8)
    assert out[0].mean() > 240 and out[1].mean() < 15 and out[2].mean() < 15  # red


def test_image_grayscale_modes(tmp_path):
    Image.new("L", (12, 12), 100).save(tmp_path / "gray.png")
    out = _to255(load_image(tmp_path / "gray.png", 12, 12))
    assert torch.allclose(out, torch.full_like(out, 100.0), atol=1e-3)
    # 16-bit: 200 * 257 must become 200, not be clipped to 255 as Image.convert("RGB") would do
    Image.fromarray(np.full((12, 12), 200 * 257, np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    out = _to255(load_image(tmp_path / "gray16.png", 12, 12))
    assert torch.allclose(out, torch.full_like(out, 200.0), atol=1e-3)
    # 16-bit ramp keeps its ordering and full range
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    out = _to255(load_image(tmp_path / "ramp16.png", 8, 64))[0, 0, 0]
    assert out[0] == 0 and out[-1] == 255 and torch.all(out[1:] >= out[:-1])
    # palette with transparency, and bilevel
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    out = _to255(load_image(tmp_path / "pal.png", 8, 8))
    assert out[1].min() > 250 and out[0].max() < 5  # green (index 1 is opaque)
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    assert torch.all(load_image(tmp_path / "bw.png", 8, 8) == 1.0)


@pytest.mark.parametrize("kind", ["zero", "truncated", "text"])
def test_corrupt_image_is_bad_sample(tmp_path, kind):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    data = {"zero": b"", "truncated": good[: len(good) // 2], "text": b"not an image"}[kind]
    p = tmp_path / f"{kind}.png"
    p.write_bytes(data)
    with pytest.raises(BadSampleError) as ei:
        load_image(p, 16, 16)
    assert ei.value.reason == "undecodable" and f"{kind}.png" in str(ei.value)


# ------------------------------------------------------------------------------------------
# dataset
# ------------------------------------------------------------------------------------------


def _rec(path: Path, source: str, **kw) -> ManifestRecord:
    return ManifestRecord(
        path=path,
        caption=kw.pop("caption", "a caption"),
        fps=kw.pop("fps", None),
        start_frame=kw.pop("start_frame", None),
        end_frame=kw.pop("end_frame", None),
        source=source,
        is_image=path.suffix == ".png",
    )


@pytest.mark.parametrize("n", [0, 2, 4, 16, 18, -3, True, 17.0])
def test_dataset_num_frames_must_be_4k_plus_1(media_dir, n):
    with pytest.raises(UserError, match="4k\\+1"):
        GeneratorDataset([_rec(media_dir / "img.png", "m:1")], n, 16, 16)


def test_dataset_samples(media_dir):
    recs = [
        _rec(media_dir / "index24.mp4", "m:1"),
        _rec(media_dir / "index24.mp4", "m:2", fps=12, start_frame=3, end_frame=40),
        _rec(media_dir / "img.png", "m:3", caption="red"),
    ]
    for n in (1, 5, 9):
        GeneratorDataset(recs, n, 16, 16)
    ds = GeneratorDataset(recs, 9, 16, 24)
    assert len(ds) == 3
    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert set(s0) == {"pixels", "caption", "fps", "source", "is_image", "decode", "audio"}
    assert s0["audio"] is None  # generator.sound off: no soundtrack read
    assert s0["pixels"].shape == (3, 9, 16, 24) and s0["fps"] == 24.0 and s0["source"] == "m:1"
    assert decoded_indices(s0["pixels"]) == list(range(9))
    assert s1["fps"] == 12.0 and decoded_indices(s1["pixels"]) == [3 + 2 * k for k in range(9)]
    assert s2["pixels"].shape == (3, 1, 16, 24) and s2["is_image"] and s2["caption"] == "red"
    assert s2["fps"] == 24.0 and not s0["is_image"]
    assert ds[-1]["source"] == "m:3"


def test_dataset_bad_samples_propagate_or_skip(media_dir, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 100)
    recs = [
        _rec(media_dir / "index24.mp4", "m:1"),
        _rec(tmp_path / "corrupt.mp4", "m:2"),
        _rec(media_dir / "short.mp4", "m:3"),
        _rec(media_dir / "index24.mp4", "m:4", start_frame=0, end_frame=5),
        _rec(media_dir / "img.png", "m:5"),
    ]
    strict = GeneratorDataset(recs, 9, 8, 8)
    with pytest.raises(BadSampleError) as ei:
        strict[1]
    assert ei.value.reason == "undecodable" and str(ei.value).startswith("m:2: ") and "corrupt.mp4" in str(ei.value)
    with pytest.raises(BadSampleError, match="^m:3: .*too short"):
        strict[2]

    counter = SkipCounter()
    ds = GeneratorDataset(recs, 9, 8, 8, skip_bad_samples=True, counter=counter)
    assert ds.counter is counter
    out = [ds[i] for i in range(len(ds))]
    assert [o is None for o in out] == [False, True, True, True, False]
    assert counter.by_reason == {"undecodable": 1, "too_short": 2}
    assert ds[1] is None and counter.total == 3  # not counted twice
    assert "m:2" in counter.summary() and "m:3" in counter.summary()
    assert [s["source"] for s in iter_samples(ds)] == ["m:1", "m:5"]
    batch = collate_skip_none(out)
    assert [s["source"] for s in batch] == ["m:1", "m:5"]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_skip_none)
    assert [[s["source"] for s in b] for b in loader] == [["m:1", "m:5"]]
    assert GeneratorDataset(recs, 9, 8, 8, skip_bad_samples=True).counter.total == 0


# ------------------------------------------------------------------------------------------
# bundled samples
# ------------------------------------------------------------------------------------------


def test_bundled_manifest_loads_and_every_sample_decodes():
    recs = read_manifest(SAMPLES / "manifest.jsonl")
    assert len(recs) == 9 and sum(r.is_image for r in recs) == 3
    total = sum(r.path.stat().st_size for r in recs) + (SAMPLES / "manifest.jsonl").stat().st_size
    assert total < 2 * 1024 * 1024
    for n in (17, 33):
        ds = GeneratorDataset(recs, n, 32, 48)
        for i in range(len(ds)):
            s = ds[i]
            t = 1 if recs[i].is_image else n
            assert s["pixels"].shape == (3, t, 32, 48), s["source"]
            assert s["pixels"].dtype == torch.uint8  # decoded frames cross the DataLoader as uint8
            assert s["fps"] == 24.0 and len(s["caption"].split()) >= 8
            if t > 1:  # something moves
                px = to_model_pixels(s["pixels"])
                assert (px[:, :1] - px).abs().amax(dim=(0, 2, 3)).max() > 0.5, s["source"]


def test_make_samples_is_reproducible(tmp_path):
    out = tmp_path / "samples"
    subprocess.run([sys.executable, str(REPO / "data" / "make_samples.py"), str(out)], check=True, capture_output=True)
    assert (out / "manifest.jsonl").read_text() == (SAMPLES / "manifest.jsonl").read_text()
    for rec in read_manifest(out / "manifest.jsonl"):
        committed = SAMPLES / rec.path.relative_to(out)
        if rec.is_image:
            assert np.array_equal(np.asarray(Image.open(rec.path)), np.asarray(Image.open(committed)))
        else:
            assert probe_video(rec.path) == probe_video(committed)
            a, b = _raw_frames(rec.path), _raw_frames(committed)
            assert a.shape == b.shape and np.abs(a.astype(np.int16) - b).mean() < 2.0


def _raw_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ---- uint8 frames through the DataLoader, floats made at encode time (issue #9) --------------------------------


def test_uint8_frames_are_the_pipelines_pixels_bit_for_bit():
    """`to_model_pixels(resize_frames(x))` is exactly diffusers' `_preprocess_conditioning_image` output, for down- and
    up-scaling, odd sizes and crops (the uint8 frames lose nothing of what the model was given before)."""
    fn = _diffusers_preprocess()
    gen = torch.Generator().manual_seed(0)
    for (h, w), (out_h, out_w) in [((37, 53), (16, 24)), ((20, 30), (64, 48)), ((48, 48), (33, 47)), ((9, 200), (8, 8))]:
        frames = torch.randint(0, 256, (3, h, w, 3), generator=gen, dtype=torch.uint8)
        small = resize_frames(frames, out_h, out_w)
        assert small.dtype == torch.uint8 and small.shape == (3, 3, out_h, out_w)
        ref = torch.cat([fn(f.permute(2, 0, 1), height=out_h, width=out_w) for f in frames]).permute(1, 0, 2, 3)
        assert torch.equal(to_model_pixels(small), ref)
        assert torch.equal(to_model_pixels(ref), ref)  # float pixels pass through


def test_dataset_uint8_samples_encode_to_the_previous_latents(tiny_dir):
    """A video and an image sample: the dataset's uint8 frames, turned into floats inside `encode_pixels`, give the
    same VAE latent, bit for bit, as the float pixels the pipeline's function makes from the decoded frames."""
    from cosmos_train.models.generator import Cosmos3Generator

    model = Cosmos3Generator.from_pretrained(str(tiny_dir), load_transformer=False)
    fn = _diffusers_preprocess()
    recs = read_manifest(SAMPLES / "manifest.jsonl")
    video, image = next(r for r in recs if not r.is_image), next(r for r in recs if r.is_image)
    ds = GeneratorDataset([video, image], 5, 32, 48)
    for index, rec in enumerate((video, image)):
        sample = ds[index]
        assert sample["pixels"].dtype == torch.uint8
        if rec.is_image:
            raw = [np.asarray(Image.open(rec.path).convert("RGB"))]
        else:
            with av.open(str(rec.path)) as c:
                decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            raw = [decoded[i] for i in load_video_clip(rec.path, 5, 32, 48, fps=rec.fps).frame_indices]
        old = torch.cat([fn(Image.fromarray(f), height=32, width=48) for f in raw]).permute(1, 0, 2, 3)
        assert torch.equal(model.encode_pixels(sample["pixels"]), model.encode_pixels(old)), rec.source
