"""`cosmos-train generate` covers the vision modes from the command line: t2i, t2v, i2v (--image), v2v (--video);
the conditioning really enters (same seed, another conditioning image gives another clip). The tiny VAE is random
(it does not reconstruct its input), so the test compares outputs with each other, not with the input."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cosmos_train.cli import main
from cosmos_train.data.media import load_video

from .conftest import SAMPLES


def _first_frame(path):
    frames, _ = load_video(path, 1, 64, 64)
    return ((frames[:, 0] + 1) / 2).permute(1, 2, 0).numpy()


def test_generate_t2i_t2v_i2v_v2v(tiny_dir, tmp_path):
    common = ["--height", "64", "--width", "64", "--steps", "2"]
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 230
    Image.fromarray(red).save(tmp_path / "red.png")
    clip = SAMPLES.parent / "clips" / "red_circle.mp4"
    outs = {}
    for name, extra in (("t2i", ["--frames", "1"]), ("t2v", ["--frames", "9"]),
                        ("i2v", ["--frames", "9", "--image", str(tmp_path / "red.png")]),
                        ("v2v", ["--frames", "9", "--video", str(clip)])):
        outs[name] = tmp_path / f"{name}.mp4"
        assert main(["generate", str(tiny_dir), "A red scene.", *common, *extra, "--out", str(outs[name])]) == 0
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 230
    Image.fromarray(blue).save(tmp_path / "blue.png")
    assert main(["generate", str(tiny_dir), "A red scene.", *common, "--frames", "9", "--image",
                 str(tmp_path / "blue.png"), "--out", str(tmp_path / "i2v_blue.mp4")]) == 0
    t2v, i2v = _first_frame(outs["t2v"]), _first_frame(outs["i2v"])
    assert np.abs(i2v - _first_frame(tmp_path / "i2v_blue.mp4")).mean() > 0.01  # the image conditions the clip
    assert np.abs(i2v - t2v).mean() > 0.01 and np.abs(_first_frame(outs["v2v"]) - t2v).mean() > 0.01
    assert main(["generate", str(tiny_dir), "x", *common, "--frames", "9", "--image", str(tmp_path / "no.png"),
                 "--out", str(tmp_path / "x.mp4")]) == 2
