"""What training feeds the transformer equals what Cosmos3OmniPipeline feeds it at inference.

The pipeline is run on the tiny checkpoint with a hook that records the transformer's first call
(conditional pass) and second call (unconditional pass); the framework builds the same sample for the
same prompt, size, fps and mode, and every sequence field must match: token ids (prompt templates,
chat template, trailing eos + <|vision_start|>), mRoPE positions, sequence / loss indexes, noisy frame
indexes and timesteps (sigma * 1000).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_train.models.generator import Cosmos3Generator
from cosmos_train.models.sequence import TRANSFORMER_STATIC_KEYS
from cosmos_train.objectives.flow_matching import sigma_to_timestep
from cosmos_train.objectives.generator import clean_frames_for_mode

CAPTION = "A red circle moves from left to right across a dark blue background."


def _run_pipeline_capturing(pipe, **kwargs):
    calls = []

    def hook(module, args, kw):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=CAPTION, num_inference_steps=2, guidance_scale=6.0, output_type="latent",
             enable_safety_check=False, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        handle.remove()
    return calls[0], calls[1], float(pipe.scheduler.sigmas[0])


def _assert_same(ours: dict, theirs: dict):
    for key in TRANSFORMER_STATIC_KEYS:
        a, b = ours[key], theirs[key]
        if torch.is_tensor(b):
            assert a.shape == b.shape, key
            assert torch.allclose(a.double(), b.double(), atol=1e-6), key
        elif isinstance(b, list) and b and torch.is_tensor(b[0]):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), key
        else:
            assert a == b, key


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "mode,num_frames,fps",
    [("t2v", 17, 24.0), ("t2v", 9, 16.0), ("i2v", 17, 24.0), ("v2v", 17, 24.0), ("t2i", 1, 24.0)],
)
def test_training_sequence_equals_pipeline_inputs(tiny_pipe, mode, num_frames, fps):
    h, w = 64, 96
    extra = {}
    if mode == "i2v":
        extra["image"] = _image()
    if mode == "v2v":
        extra["video"] = [_image(i, 64) for i in range(num_frames)]
        extra["condition_frame_indexes_vision"] = (0, 1)
    cond, uncond, sigma0 = _run_pipeline_capturing(
        tiny_pipe, num_frames=num_frames, height=h, width=w, fps=fps, **extra)

    model = Cosmos3Generator(tiny_pipe)
    cond_ids, uncond_ids = model.tokenize(CAPTION, num_frames, h, w, fps)
    latent_shape = cond["vision_tokens"][0].shape
    clean = clean_frames_for_mode(mode, latent_shape[2], v2v_condition_frames=2)

    ours = model.build_sequence(cond_ids, latent_shape, clean, fps)
    _assert_same(ours, cond)
    # The CFG-dropout prompt is exactly the pipeline's unconditional prompt.
    _assert_same(model.build_sequence(uncond_ids, latent_shape, clean, fps), uncond)
    # Timesteps: sigma * 1000 on every noisy token, none on clean ones. UniPC hands the transformer
    # int64(sigma * 1000) (truncated); training uses the continuous value, so they agree within 1.
    expected_t = torch.full((ours["num_noisy_vision_tokens"],), sigma_to_timestep(sigma0))
    assert cond["vision_timesteps"].shape == expected_t.shape
    assert torch.all((cond["vision_timesteps"].double() - expected_t.double()).abs() < 1.0)


def test_prompt_carries_the_templates(tiny_pipe):
    model = Cosmos3Generator(tiny_pipe)
    ids, _ = model.tokenize(CAPTION, 93, 480, 832, 24.0)
    text = tiny_pipe.text_tokenizer.decode(ids)
    assert "generate videos from a give prompt" in text
    assert "The video is 3.9 seconds long and is of 24 FPS." in text
    assert "This video is of 480x832 resolution." in text
    assert ids[-2:] == [tiny_pipe.text_tokenizer.eos_token_id,
                        tiny_pipe.text_tokenizer.convert_tokens_to_ids("<|vision_start|>")]


def test_conditioning_latent_equals_pipeline_encoding(tiny_pipe):
    """i2v: latent frame 0 of the training clip == the pipeline's encoded conditioning image
    (the Wan VAE is causal in time, and both normalize with latents_mean / latents_std)."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image

    image = _image(3)
    h = w = 64
    captured = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: captured.append(kw["vision_tokens"][0].clone()), with_kwargs=True)
    try:
        tiny_pipe(prompt=CAPTION, image=image, num_frames=9, height=h, width=w, num_inference_steps=1,
                  guidance_scale=1.0, output_type="latent", enable_safety_check=False)
    finally:
        hook.remove()
    first = _preprocess_conditioning_image(image, h, w)[0]  # [3, H, W]
    rest = torch.rand(3, 8, h, w) * 2 - 1  # whatever follows must not leak into latent frame 0
    clip = torch.cat([first[:, None], rest], dim=1)
    ours = Cosmos3Generator(tiny_pipe).encode_pixels(clip)
    assert torch.allclose(ours[:, :, 0], captured[0][:, :, 0].float(), atol=1e-5)


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_sound_segment_equals_pipeline_inputs(tiny_pipe, mode):
    """t2v / i2v with sound: the sound segment (after vision, same temporal offset, 25 latent steps per second,
    always noisy) and its timesteps are what the pipeline hands the transformer with enable_sound=True."""
    from cosmos_train.models.sequence import MODALITY_KEYS, TEXT_KEYS, build_sample_sequence, sound_segment, \
        vision_segment
    from cosmos_train.models.sound import sound_token_count

    num_frames, fps, h, w = 17, 24.0, 64, 64
    extra = {"image": _image()} if mode == "i2v" else {}
    cond, uncond, sigma0 = _run_pipeline_capturing(tiny_pipe, num_frames=num_frames, height=h, width=w, fps=fps,
                                                   enable_sound=True, **extra)
    model = Cosmos3Generator(tiny_pipe)
    cond_ids, _ = model.tokenize(CAPTION, num_frames, h, w, fps)
    latent_shape = cond["vision_tokens"][0].shape
    clean = clean_frames_for_mode(mode, latent_shape[2], v2v_condition_frames=2)
    tokens = sound_token_count(num_frames, fps)
    assert cond["sound_tokens"][0].shape[-1] == tokens
    ours = build_sample_sequence(cond_ids, [vision_segment(latent_shape, clean, model.geometry),
                                            sound_segment(tokens)], fps, model.geometry)
    keys = TEXT_KEYS + tuple(f"{m}_{k}" for m in ("vision", "sound") for k in MODALITY_KEYS)
    for key in keys:
        a, b = ours[key], cond[key]
        if torch.is_tensor(b):
            assert a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-6), key
        elif isinstance(b, list) and b and torch.is_tensor(b[0]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), key
        else:
            assert a == b, key
    expected = torch.full((ours["num_noisy_sound_tokens"],), sigma_to_timestep(sigma0))
    assert torch.all((cond["sound_timesteps"].double() - expected.double()).abs() < 1.0)
