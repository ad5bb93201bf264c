"""Sound data (cosmos_train.data.audio), the sound encoder helpers (cosmos_train.models.sound) and the
bundled clips with sound (data/samples/clips_sound/, made by `data/make_samples.py --sound`)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cosmos_train.data import audio as audio_mod
from cosmos_train.data.audio import audio_window_for, load_audio, load_clip_audio
from cosmos_train.data.manifest import read_manifest
from cosmos_train.data.media import InMemoryMedia, load_video, load_video_clip, probe_video
from cosmos_train.errors import BadSampleError, UserError
from cosmos_train.models.sound import check_sound_encoder, encode_sound, sound_token_count

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
SOUND_MANIFEST = SAMPLES / "manifest_sound.jsonl"
CLIPS = SAMPLES / "clips_sound"
SR = 48000


def _make_samples_module():
    name = "_cosmos_train_make_samples"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / "make_samples.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


MS = _make_samples_module()


def _write_wav(path: Path, data: np.ndarray, sample_rate: int, layout: str) -> Path:
    """float [channels, n] -> 16-bit PCM WAV (exact timing, no codec delay)."""
    pcm = np.round(np.clip(data, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as c:
        stream = c.add_stream("pcm_s16le", rate=sample_rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.T.reshape(1, -1)), format="s16", layout=layout)
        frame.sample_rate = sample_rate
        for p in stream.encode(frame):
            c.mux(p)
        for p in stream.encode():
            c.mux(p)
    return path


# --------------------------------------------------------------------------------------------
# the bundled clips
# --------------------------------------------------------------------------------------------


def test_sound_manifest_and_clips():
    recs = read_manifest(SOUND_MANIFEST)
    assert [r.path.name for r in recs] == [f"{c.name}.mp4" for c in MS.SOUND_CLIPS]
    total = SOUND_MANIFEST.stat().st_size
    for rec, clip in zip(recs, MS.SOUND_CLIPS):
        total += rec.path.stat().st_size
        n, fps, h, w = probe_video(rec.path)
        assert (n, fps, h, w) == (clip.frames, 24.0, 64, 64) and 17 <= n <= 33
        assert rec.fps == 24 and len(rec.caption.split()) >= 8
        with av.open(str(rec.path)) as c:
            if clip.sound is None:
                assert not c.streams.audio
            else:
                a = c.streams.audio[0]
                assert (a.codec_context.name, a.codec_context.sample_rate, a.codec_context.channels) == ("aac", SR, 2)
    assert total < 300 * 1024
    # the manifest has exactly the keys of the main manifest's video lines
    main = json.loads((SAMPLES / "manifest.jsonl").read_text().splitlines()[0])
    for line in SOUND_MANIFEST.read_text().splitlines():
        assert set(json.loads(line)) == set(main)


def test_make_sound_samples_reproduces_the_committed_clips(tmp_path):
    records = MS.make_sound_samples(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips_sound", "manifest_sound.jsonl"]
    assert (tmp_path / "manifest_sound.jsonl").read_text() == SOUND_MANIFEST.read_text()
    for rec, clip in zip(records, MS.SOUND_CLIPS):
        new, old = tmp_path / rec["path"], SAMPLES / rec["path"]
        assert probe_video(new) == probe_video(old)
        a, b = load_audio(new, 0, clip.frames, 24), load_audio(old, 0, clip.frames, 24)
        assert (a is None) == (b is None) == (clip.sound is None)
        if a is not None:
            assert (a - b).abs().max() < 1e-3


# --------------------------------------------------------------------------------------------
# load_audio
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,fps", [(33, 24.0), (17, 24.0), (17, 30.0), (25, 29.97), (33, 12.0)])
def test_load_audio_length_stereo_range(num_frames, fps):
    x = load_audio(CLIPS / "disc_rising_tone.mp4", 0.0, num_frames, fps)
    n = int(num_frames / fps * SR)
    assert x.shape == (2, n) and x.dtype == torch.float32
    assert x.abs().max() <= 1.0
    assert x.abs().max() > 0.3  # the tone is there
    if num_frames / fps > 33 / 24:  # past the end of the track: zeros, still exactly n samples
        assert x[:, int(33 / 24 * SR) + 1200:].abs().max() == 0


def test_tone_pans_with_the_disc():
    """The disc goes left -> right; so does the tone (left channel loud first, right channel later)."""
    x = load_audio(CLIPS / "disc_rising_tone.mp4", 0.0, 33, 24.0)
    half = x.shape[1] // 2
    energy = x.pow(2)
    left1, left2 = energy[0, :half].mean(), energy[0, half:].mean()
    right1, right2 = energy[1, :half].mean(), energy[1, half:].mean()
    assert left1 > 3 * right1 and right2 > 3 * left2
    # and the picture agrees: the disc's bright pixels move from the left half to the right half
    pixels, _ = load_video(CLIPS / "disc_rising_tone.mp4", 33, 64, 64)
    cols = (pixels[0] > 0).float().sum(dim=(1,))  # [T, W]
    first, last = cols[0].argmax(), cols[-1].argmax()
    assert first < 32 <= last


def _click_positions(x: torch.Tensor) -> list[int]:
    """Onsets of clicks: first sample above half the peak after >= 2000 quiet samples."""
    env = x.abs().amax(dim=0).numpy()
    thr = 0.5 * env.max()
    out, last = [], -10**9
    for i in np.flatnonzero(env > thr):
        if i - last > 2000:
            out.append(int(i))
        last = i
    return out


@pytest.mark.parametrize("start_frame", [0, 5, 10, 13])
def test_click_lands_on_its_flash_frame(start_frame):
    """A click at the first sample of frame f is at sample (f - start_frame) / 24 * 48000 of the window
    that starts at start_frame (within 0.25 ms), and the square is lit on that video frame."""
    path = CLIPS / "flashing_square_clicks.mp4"
    clip = load_video_clip(path, 17, 64, 64, start_frame=start_frame)
    assert audio_window_for(clip)[:3] == (start_frame / 24, 17, 24.0)
    x = load_clip_audio(path, clip)
    assert x.shape == (2, int(17 / 24 * SR))
    expected_frames = [f for f in MS.FLASH_FRAMES if start_frame <= f < start_frame + 17]
    assert expected_frames
    expected = [round((f - start_frame) / 24 * SR) for f in expected_frames]
    found = _click_positions(x)
    assert len(found) == len(expected), (found, expected)
    for got, want in zip(found, expected):
        assert abs(got - want) <= 12, (found, expected)
    brightness = clip.pixels.mean(dim=(0, 2, 3))
    onsets = [f - start_frame for f in expected_frames]  # lit from the click's frame on (for 2 frames)
    unlit = [t for t in range(17) if not any(f <= t + start_frame < f + 2 for f in MS.FLASH_FRAMES)]
    assert brightness[onsets].min() > brightness[unlit].max() + 0.1


def test_same_window_by_time_or_by_frames():
    path = CLIPS / "flashing_square_clicks.mp4"
    by_frame = load_clip_audio(path, load_video_clip(path, 17, 64, 64, start_frame=6))
    by_time = load_clip_audio(path, load_video_clip(path, 17, 64, 64, start_time=5.2 / 24))  # ceil -> frame 6
    direct = load_audio(path, 6 / 24, 17, 24.0)
    assert torch.equal(by_frame, by_time) and torch.equal(by_frame, direct)


def test_end_time_silences_past_the_window():
    """A manifest end_frame ends the window: with short_clips='pad' the audio is not taken past it."""
    path = CLIPS / "flashing_square_clicks.mp4"
    clip = load_video_clip(path, 17, 64, 64, start_frame=10, end_frame=18, short_clips="pad")
    w = audio_window_for(clip)
    assert w.end_time == 18 / 24
    x = load_clip_audio(path, clip)
    cut = round(8 / 24 * SR)
    assert x[:, cut:].abs().max() == 0
    assert len(_click_positions(x)) == 1  # frame 12; the click of frame 20 is past the window
    assert len(_click_positions(load_audio(path, 10 / 24, 17, 24.0))) == 2


def test_no_audio_stream_is_none():
    assert load_audio(CLIPS / "falling_bar_silent.mp4", 0.0, 17, 24.0) is None
    clip = load_video_clip(CLIPS / "falling_bar_silent.mp4", 17, 64, 64)
    assert load_clip_audio(CLIPS / "falling_bar_silent.mp4", clip) is None


def test_corrupt_audio_stream_is_a_bad_sample(tmp_path):
    src = CLIPS / "flashing_square_clicks.mp4"
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.audio[0]) if p.size]
    rng = np.random.default_rng(0)
    for pos, size in packets:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad_audio.mp4"
    bad.write_bytes(bytes(data))
    load_video(bad, 17, 64, 64)  # the picture is fine
    with pytest.raises(BadSampleError) as e:
        load_audio(bad, 0.0, 17, 24.0)
    assert e.value.reason == "undecodable" and "bad_audio.mp4" in str(e.value) and "audio" in str(e.value)
    with pytest.raises(BadSampleError) as e:
        load_audio(tmp_path / "nope.mp4", 0.0, 17, 24.0)
    assert e.value.reason == "missing_file"
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 200)
    with pytest.raises(BadSampleError) as e:
        load_audio(tmp_path / "garbage.mp4", 0.0, 17, 24.0)
    assert e.value.reason == "undecodable"


def test_mono_44k_is_resampled_and_duplicated(tmp_path):
    sr = 44100
    mono = np.zeros((1, 2 * sr), np.float32)
    mono[0, int(0.5 * sr)] = 0.9  # an impulse at 0.5 s
    mono[0, sr:] = 0.25 * np.sin(2 * np.pi * 1000 * np.arange(sr) / sr)  # 1 kHz tone in the second half
    path = _write_wav(tmp_path / "mono.wav", mono, sr, "mono")
    x = load_audio(path, 0.25, 24, 24.0)  # [0.25 s, 1.25 s)
    assert x.shape == (2, SR) and torch.equal(x[0], x[1])
    assert abs(int(x[0, : SR // 2].abs().argmax()) - SR // 4) <= 1
    assert abs(float(x[0, : SR // 2].abs().max()) - 0.9) < 0.05  # duplicated, not a -3 dB upmix
    # the 1 kHz tone from 1.0 s on has 48 samples per period at 48 kHz (it was 44.1 per period)
    tone = x[0, int(0.80 * SR):].numpy()
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone))))
    assert abs(np.argmax(spectrum) * SR / len(tone) - 1000) < 10


def test_multichannel_is_downmixed_to_stereo(tmp_path):
    sr = 48000
    six = np.zeros((6, sr), np.float32)  # 5.1: FL FR FC LFE BL BR
    t = np.arange(sr) / sr
    six[0] = 0.5 * np.sin(2 * np.pi * 440 * t)  # front left only
    path = _write_wav(tmp_path / "surround.wav", six, sr, "5.1")
    x = load_audio(path, 0.0, 24, 24.0)
    assert x.shape == (2, SR)
    assert x[0].abs().max() > 0.2 and x[1].abs().max() < 1e-3


def test_audio_timestamps_are_relative_to_the_video_start(tmp_path):
    """A track that starts 0.25 s after the video: the window [0, 1 s) has 0.25 s of silence first."""
    path = tmp_path / "late_audio.mkv"
    with av.open(str(path), "w", format="matroska") as c:
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=SR)
        a.layout = "stereo"
        for i in range(24):
            f = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 24)
            for p in v.encode(f):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        pcm = np.zeros((1, 2 * SR), np.int16)
        pcm[0, :2] = 20000  # an impulse on the track's first sample
        f = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        f.sample_rate, f.pts, f.time_base = SR, SR // 4, Fraction(1, SR)
        for p in a.encode(f):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    x = load_audio(path, 0.0, 24, 24.0)
    assert int(x[0].abs().argmax()) == SR // 4 and x[:, : SR // 4].abs().max() == 0


def test_late_window_seeks_to_the_same_samples(tmp_path, monkeypatch):
    sr = 44100
    wave = np.zeros((2, 9 * sr), np.float32)
    wave[0, int(6.5 * sr)] = 0.8
    wave[1, int(7.0 * sr)] = -0.6
    path = _write_wav(tmp_path / "long.wav", wave, sr, "stereo")
    x = load_audio(path, 6.25, 24, 24.0)  # > _SEEK_MIN_S: seeks
    assert abs(int(x[0].abs().argmax()) - SR // 4) <= 1 and abs(int(x[1].abs().argmax()) - 3 * SR // 4) <= 1
    monkeypatch.setattr(audio_mod, "_SEEK_MIN_S", 1e9)
    y = load_audio(path, 6.25, 24, 24.0)  # decoded from the start
    assert torch.allclose(x, y, atol=1e-4)


def test_in_memory_media():
    path = CLIPS / "flashing_square_clicks.mp4"
    mem = InMemoryMedia("cell.mp4", path.read_bytes())
    assert torch.equal(load_audio(mem, 0.5, 17, 24.0), load_audio(path, 0.5, 17, 24.0))
    with pytest.raises(BadSampleError, match="cell.mp4"):
        load_audio(InMemoryMedia("cell.mp4", b"\x01" * 100), 0.0, 17, 24.0)


def test_bad_arguments():
    for kw in ({"num_frames": 0}, {"fps": 0.0}, {"start_time": -1.0}):
        args = {"start_time": 0.0, "num_frames": 17, "fps": 24.0} | kw
        with pytest.raises(ValueError):
            load_audio(CLIPS / "disc_rising_tone.mp4", **args)


# --------------------------------------------------------------------------------------------
# the sound tokenizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,fps", [(1, 24.0), (17, 24.0), (33, 24.0), (93, 24.0), (121, 30.0),
                                            (25, 29.97), (61, 16.0), (17, 25.0), (13, 23.976)])
def test_sound_token_count_formula(tiny_pipe, num_frames, fps):
    tok = tiny_pipe.sound_tokenizer
    hop, sr = tok._hop_size, tok.config.sampling_rate
    assert (hop, sr) == (1920, 48000)
    # the pipeline's prepare_latents: n_audio_samples = int(num_frames / fps * sampling_rate);
    # T_sound = (n_audio_samples + hop_size - 1) // hop_size
    n_audio_samples = int(num_frames / fps * sr)
    expected = (n_audio_samples + hop - 1) // hop
    assert sound_token_count(num_frames, fps) == sound_token_count(num_frames, fps, sr, hop) == expected
    assert expected == math.ceil(n_audio_samples / hop)


@pytest.mark.parametrize("num_frames,fps", [(1, 24.0), (17, 24.0), (25, 29.97), (33, 16.0)])
def test_sound_token_count_is_what_the_pipeline_builds(tiny_pipe, num_frames, fps):
    """The pipeline's own prepare_latents with sound on (16x16 keeps its VAE pass cheap)."""
    out = tiny_pipe.prepare_latents(num_frames=num_frames, height=16, width=16, fps=fps, device="cpu",
                                    dtype=torch.float32, enable_sound=True, generator=torch.Generator().manual_seed(0))
    sound_latents = out[1]
    assert sound_latents.shape == (tiny_pipe.transformer.config.sound_dim, sound_token_count(num_frames, fps))


def test_encode_sound_shape_dtype_determinism(tiny_pipe):
    tok = tiny_pipe.sound_tokenizer
    x = load_audio(CLIPS / "disc_rising_tone.mp4", 0.0, 33, 24.0)
    z = encode_sound(tok, x)
    assert z.shape == (64, sound_token_count(33, 24.0)) == (64, 35)  # 66000 samples / 1920
    assert z.dtype == torch.float32 and z.device.type == "cpu" and torch.isfinite(z).all()
    assert torch.equal(z, encode_sound(tok, x))
    # the mode of the posterior: the first half of the encoder's moments
    with torch.no_grad():
        moments = tok.encode(x[None]).latent_dist.parameters
    assert torch.equal(z, moments[0, :64])
    # different audio -> different latents; a shorter window -> fewer tokens
    assert not torch.allclose(z, encode_sound(tok, load_audio(CLIPS / "pulsing_circle_hum.mp4", 0.0, 33, 24.0)))
    assert encode_sound(tok, load_audio(CLIPS / "pulsing_circle_hum.mp4", 0.0, 17, 24.0)).shape == (64, 18)
    # same length in train mode (encode pads to a whole hop only in eval unless forced)
    tok.train()
    try:
        assert encode_sound(tok, x[:, :-100]).shape == z.shape
    finally:
        tok.eval()
    with pytest.raises(ValueError, match="one stereo clip"):
        encode_sound(tok, x[None])
    with pytest.raises(ValueError, match="one stereo clip"):
        encode_sound(tok, x[:1])


def test_batch_encoding_mixes_peaks_so_we_encode_one_at_a_time(tiny_pipe):
    tok = tiny_pipe.sound_tokenizer
    loud = load_audio(CLIPS / "disc_rising_tone.mp4", 0.0, 17, 24.0)
    quiet = 0.2 * load_audio(CLIPS / "pulsing_circle_hum.mp4", 0.0, 17, 24.0)
    assert loud.abs().max() > 2 * quiet.abs().max()
    with torch.no_grad():
        batch = tok.encode(torch.stack([loud, quiet])).latent_dist.mode()
    one_loud, one_quiet = encode_sound(tok, loud), encode_sound(tok, quiet)
    assert torch.allclose(batch[0], one_loud, atol=1e-5)  # the loud clip sets the batch's peak
    assert not torch.allclose(batch[1], one_quiet, atol=1e-3)  # the quiet one is scaled by the loud one's
    # one at a time, each clip is normalized by its own peak: the volume does not matter
    assert torch.allclose(encode_sound(tok, 0.5 * quiet), one_quiet, atol=1e-4)


def test_decode_round_trip_shape(tiny_pipe):
    tok = tiny_pipe.sound_tokenizer
    x = load_audio(CLIPS / "flashing_square_clicks.mp4", 0.0, 17, 24.0)
    z = encode_sound(tok, x)
    with torch.no_grad():
        wave = tiny_pipe.decode_sound(z)
    assert wave.shape == (2, z.shape[1] * tok._hop_size)
    assert wave.shape[1] >= x.shape[1] > wave.shape[1] - tok._hop_size


def test_check_sound_encoder(tiny_dir, tiny_pipe, tmp_path):
    from diffusers import Cosmos3AVAEAudioTokenizer
    from safetensors.torch import load_file, save_file

    check_sound_encoder(tiny_pipe.sound_tokenizer, str(tiny_dir))  # the tiny checkpoint has an encoder

    # a decoder-only sound_tokenizer/ (no encoder.* tensors), loaded the way the pipeline loads it
    ckpt = tmp_path / "decoder-only"
    (ckpt / "sound_tokenizer").mkdir(parents=True)
    src = tiny_dir / "sound_tokenizer"
    (ckpt / "sound_tokenizer" / "config.json").write_text((src / "config.json").read_text())
    weights = {}
    for f in src.glob("*.safetensors"):
        weights.update(load_file(f))
    assert any(k.startswith("encoder.") for k in weights)
    save_file({k: v for k, v in weights.items() if not k.startswith("encoder.")},
              ckpt / "sound_tokenizer" / "diffusion_pytorch_model.safetensors")
    tok = Cosmos3AVAEAudioTokenizer.from_pretrained(str(ckpt), subfolder="sound_tokenizer")
    assert tok.encoder is None  # diffusers dropped it
    with pytest.raises(UserError) as e:
        check_sound_encoder(tok, str(ckpt))
    msg = str(e.value)
    assert f"{ckpt}/sound_tokenizer/" in msg and "no encoder weights" in msg and "generator.sound: off" in msg
    with pytest.raises(ValueError, match="no encoder"):
        encode_sound(tok, torch.zeros(2, 4000))
    # no sound tokenizer at all
    with pytest.raises(UserError, match="sound_tokenizer/"):
        check_sound_encoder(None, str(ckpt))
