"""The tiny random-weight checkpoint: real diffusers/transformers classes, Cosmos3-Nano layout, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmos_train.errors import UserError
from cosmos_train.models.tiny import QWEN_ADDED_TOKENS, TINY_BPE_VOCAB_SIZE, make_tiny

WEIGHT_FILES = [
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vision_encoder/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "sound_tokenizer/diffusion_pytorch_model.safetensors",
]
PROMPT = "A red car drives along a winding coastal road at sunset."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import Cosmos3OmniPipeline

    return Cosmos3OmniPipeline.from_pretrained(tiny_dir)


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


def test_layout_and_model_index(tiny_dir):
    for rel in [
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
        "sound_tokenizer/config.json",
        "scheduler/scheduler_config.json",
        "text_tokenizer/tokenizer.json",
        "text_tokenizer/tokenizer_config.json",
        *WEIGHT_FILES,
    ]:
        assert (tiny_dir / rel).is_file(), rel
    # safetensors only
    assert not list(tiny_dir.rglob("*.bin")) and not list(tiny_dir.rglob("*.pt"))

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos3OmniPipeline"
    assert index["transformer"] == ["diffusers", "Cosmos3OmniTransformer"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["sound_tokenizer"] == ["diffusers", "Cosmos3AVAEAudioTokenizer"]
    assert index["text_tokenizer"][0] == "transformers"
    assert index["enable_safety_checker"] is False
    assert index.get("safety_checker", [None, None]) == [None, None]


def test_weights_are_float32_and_loaded_exactly(tiny_dir, pipe):
    from safetensors.torch import load_file

    components = {}
    for rel in WEIGHT_FILES:
        if rel.endswith(".safetensors"):
            components.setdefault(rel.split("/")[0], {}).update(load_file(tiny_dir / rel))
    for component, saved in components.items():
        if component == "vision_encoder":  # not a pipeline component (see the layout tests)
            continue
        loaded = getattr(pipe, component).state_dict()
        assert set(saved) == set(loaded), component
        for key, tensor in saved.items():
            rel = component
            assert tensor.dtype == torch.float32, (rel, key)
            assert torch.equal(tensor, loaded[key]), (rel, key)


# ----------------------------------------------------------------------------------------------
# Generation through the real pipeline
# ----------------------------------------------------------------------------------------------


def _generate(pipe, **kwargs):
    return pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


def test_t2v_generates_finite_video(pipe):
    out = _generate(pipe, num_frames=9)
    video = out.video
    assert video.shape == (9, 64, 64, 3)
    assert np.isfinite(video).all()
    assert video.min() >= 0.0 and video.max() <= 1.0
    assert video.std() > 1e-3  # not a constant frame
    assert out.sound is None


def test_t2v_is_reproducible_with_the_same_generator(pipe):
    a = _generate(pipe, num_frames=5).video
    b = _generate(pipe, num_frames=5).video
    assert np.array_equal(a, b)


def test_t2i_generates_one_frame(pipe):
    out = _generate(pipe, num_frames=1)
    assert out.video.shape == (1, 64, 64, 3)
    assert np.isfinite(out.video).all()
    assert out.video.std() > 1e-3


def test_t2v_with_sound(pipe):
    out = _generate(pipe, num_frames=9, enable_sound=True)
    assert out.video.shape == (9, 64, 64, 3)
    # 9 frames at 24 fps = 0.375 s of 48 kHz audio -> ceil(18000 / 1920) = 10 latent steps of 1920 samples
    hop = pipe.sound_tokenizer._hop_size
    assert hop == 1920 and pipe.sound_tokenizer.config.sampling_rate / hop == 25.0
    assert tuple(out.sound.shape) == (2, math.ceil(18000 / hop) * hop)
    assert torch.isfinite(out.sound).all()


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_loads_offline_and_keeps_special_tokens_whole(tiny_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "text_tokenizer")
    assert len(tok) == TINY_BPE_VOCAB_SIZE + len(QWEN_ADDED_TOKENS)
    for offset, (content, _special) in enumerate(QWEN_ADDED_TOKENS):
        ids = tok(f"hello {content} world", add_special_tokens=False)["input_ids"]
        expected_id = TINY_BPE_VOCAB_SIZE + offset  # Qwen order: <|endoftext|> first, like 151643
        assert expected_id in ids and ids.count(expected_id) == 1, content
        assert tok.convert_ids_to_tokens(expected_id) == content
        assert tok.decode(ids) == f"hello {content} world"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == TINY_BPE_VOCAB_SIZE + 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == TINY_BPE_VOCAB_SIZE
    text = "Ünïcode, digits 1280x720 and   spaces\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless


def test_chat_template_is_chatml(pipe):
    tok = pipe.text_tokenizer
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "U."}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=False)
    assert rendered == "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nU.<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("U.<|im_end|>\n")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert tok.apply_chat_template(parts, tokenize=False, add_vision_id=True) == (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
    )


def test_tokenize_prompt_ends_with_eos_then_vision_start(pipe):
    tok = pipe.text_tokenizer
    vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
    assert vision_start == TINY_BPE_VOCAB_SIZE + 9
    cond, uncond = pipe.tokenize_prompt(PROMPT, num_frames=9, height=64, width=64, fps=24.0)
    for ids in (cond, uncond):
        assert ids[-2:] == [tok.eos_token_id, vision_start]
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert max(ids) < pipe.transformer.config.vocab_size
    text = tok.decode(cond)
    assert "You are a helpful assistant who will generate videos from a give prompt." in text
    assert "The video is 0.4 seconds long and is of 24 FPS. This video is of 64x64 resolution." in text
    assert text.endswith("<|im_start|>assistant\n<|im_end|><|vision_start|>")
    assert "is not of 64x64" in tok.decode(uncond)


# ----------------------------------------------------------------------------------------------
# Determinism, size, configuration
# ----------------------------------------------------------------------------------------------


def test_same_seed_writes_identical_files(tiny_dir, tmp_path):
    rng_before = torch.get_rng_state()
    again = make_tiny(tmp_path / "again", seed=0)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's global RNG is left alone
    files = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    # rewriting over an existing checkpoint works
    assert make_tiny(again, seed=0) == again


def test_other_seed_gives_other_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    other = make_tiny(tmp_path / "other", seed=1)
    a, b = ({k: v for rel in WEIGHT_FILES[:2] for k, v in load_file(root / rel).items()} for root in (tiny_dir, other))
    assert not torch.equal(a["proj_in.weight"], b["proj_in.weight"])
    assert (tiny_dir / "text_tokenizer/tokenizer.json").read_bytes() == (
        other / "text_tokenizer/tokenizer.json"
    ).read_bytes()


def test_refuses_to_overwrite_unrelated_directory(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        make_tiny(target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_transformer_is_tiny_and_configured_like_nano(pipe):
    tr = pipe.transformer
    cfg = tr.config
    n_params = sum(p.numel() for p in tr.parameters())
    assert 100_000 < n_params < 10_000_000
    assert cfg.vocab_size == len(pipe.text_tokenizer)
    assert cfg.sound_gen and cfg.sound_dim == pipe.sound_tokenizer.config.vocoder_input_dim
    assert cfg.action_gen and cfg.action_dim >= 57  # widest embodiment (hand_pose)
    assert cfg.enable_fps_modulation
    assert cfg.patch_latent_dim == cfg.latent_channel * cfg.latent_patch_size**2
    assert cfg.latent_channel == pipe.vae.config.z_dim
    assert cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size
    assert sum(cfg.rope_axes_dim) == cfg.head_dim // 2
    # interleaved mRoPE: every rotary frequency index goes to exactly one of T/H/W, with H and W
    # getting rope_axes_dim[1] and rope_axes_dim[2] of them
    rot = tr.rotary_emb
    freqs = torch.stack([torch.full((1, 1, cfg.head_dim // 2), float(axis)) for axis in range(3)])
    owner = rot.apply_interleaved_mrope(freqs.clone(), cfg.rope_axes_dim)[0, 0]
    assert [(owner == axis).sum().item() for axis in range(3)] == list(cfg.rope_axes_dim)
    # DomainAwareLinear heads are scaled down from nn.Embedding's N(0, 1)
    for head in (tr.action_proj_in, tr.action_proj_out):
        assert head.fc.weight.std().item() < 0.05
    x = torch.randn(6, cfg.hidden_size)
    y = tr.action_proj_out(x, torch.full((6,), 7))
    assert y.shape == (6, cfg.action_dim) and y.abs().max().item() < 5.0


def test_bf16_load_keeps_time_embedder_fp32(tiny_dir):
    from diffusers import Cosmos3OmniTransformer

    tr = Cosmos3OmniTransformer.from_pretrained(tiny_dir / "transformer", torch_dtype=torch.bfloat16)
    assert tr.proj_in.weight.dtype == torch.bfloat16
    assert tr.time_embedder.linear_1.weight.dtype == torch.float32


def test_vae_shapes_and_normalization(pipe):
    vae = pipe.vae
    cfg = vae.config
    assert (cfg.z_dim, cfg.is_residual, cfg.in_channels, cfg.out_channels, cfg.patch_size) == (48, True, 12, 12, 2)
    assert (cfg.scale_factor_spatial, cfg.scale_factor_temporal) == (16, 4)
    assert len(cfg.latents_mean) == len(cfg.latents_std) == 48
    assert any(abs(m) > 1e-3 for m in cfg.latents_mean)
    assert any(abs(s - 1.0) > 1e-2 for s in cfg.latents_std) and min(cfg.latents_std) > 0

    clip = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(clip).latent_dist.mode()
        assert tuple(raw.shape) == (1, 48, 5, 4, 4)
        decoded = vae.decode(raw).sample
        assert tuple(decoded.shape) == (1, 3, 17, 64, 64)
        normalized = pipe._encode_video(clip)
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(normalized, (raw - mean) / std)
    # the stats were calibrated on this VAE, so normalized latents are O(1), not O(0.1)
    assert 0.3 < normalized.std().item() < 3.0


def test_scheduler_is_flow_unipc(pipe):
    from diffusers import UniPCMultistepScheduler

    sched = pipe.scheduler
    assert isinstance(sched, UniPCMultistepScheduler)
    assert sched.config.prediction_type == "flow_prediction"
    assert sched.config.use_flow_sigmas is True
    assert sched.config.flow_shift > 1.0
    sched.set_timesteps(4)
    sigmas = sched.sigmas.tolist()
    assert sigmas[0] > 0.95 and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


# ----------------------------------------------------------------------------------------------
# The released layout: one root index over transformer/ + vision_encoder/, read by transformers too
# ----------------------------------------------------------------------------------------------


def test_released_layout_invariants(tiny_dir):
    from cosmos_train.models.layout import ROOT_INDEX, component_weight_map, layout_problems, root_weight_map

    assert layout_problems(tiny_dir) == []
    for rel in ("config.json", ROOT_INDEX, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "chat_template.json", "preprocessor_config.json",
                "video_preprocessor_config.json", "checkpoint.json", "README.md", "vision_encoder/config.json"):
        assert (tiny_dir / rel).is_file(), rel
    assert not list(tiny_dir.glob("*.safetensors"))  # no root weights: the language model exists once
    assert "vision_encoder" not in json.loads((tiny_dir / "model_index.json").read_text())
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Cosmos3ForConditionalGeneration"]
    assert config["model_type"] == "cosmos3_omni"
    assert config["allow_patterns_overrides"] == ["*/*.safetensors"]
    assert config["tie_word_embeddings"] is False and isinstance(config["model"], dict)
    text, vision = config["text_config"], config["vision_config"]
    # the hub form: explicit rope_scaling with mRoPE sections that fit the tiny head (head_dim 32 -> 16 pairs)
    assert text["rope_scaling"]["mrope_section"] == [6, 5, 5] and sum(text["rope_scaling"]["mrope_section"]) * 2 \
        == text["head_dim"]
    assert text["rope_scaling"]["mrope_interleaved"] is True and text["rope_theta"] == 5e6
    assert vision["model_type"] == "qwen3_vl" and vision["deepstack_visual_indexes"] == [0, 1]

    transformer = component_weight_map(tiny_dir / "transformer")
    assert len(set(transformer.values())) >= 2  # sharded, with its own index
    root = root_weight_map(tiny_dir)
    assert {k: v for k, v in root.items() if v.startswith("transformer/")} == {
        k: f"transformer/{v}" for k, v in transformer.items()}
    vision_keys = {k for k, v in root.items() if v == "vision_encoder/model.safetensors"}
    assert vision_keys == set(component_weight_map(tiny_dir / "vision_encoder"))
    assert all(k.startswith(("blocks.", "merger.", "patch_embed.", "pos_embed.", "deepstack_merger_list."))
               for k in vision_keys)  # bare keys, as Qwen3VLVisionModel.save_pretrained writes them
    assert set(root) == set(transformer) | vision_keys


def test_transformers_reads_the_very_tensors_diffusers_reads(tiny_dir, pipe):
    """The reasoner's language model and the generator's understanding pathway are one set of tensors."""
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.models.reasoner import hf_key_to_unified, is_generator_key, unified_key_to_hf

    model, info = Cosmos3OmniForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    diffusers_sd = pipe.transformer.state_dict()
    hf_sd = model.state_dict()
    shared = 0
    for key, value in hf_sd.items():
        ukey = hf_key_to_unified(key)
        assert unified_key_to_hf(ukey) == key
        if ukey in diffusers_sd:  # the language model IS the und pathway: the same stored tensor
            assert torch.equal(diffusers_sd[ukey], value), key
            shared += 1
    cfg = pipe.transformer.config
    per_layer = 4 + 2 + 3 + 2  # q/k/v/o, q/k norms, gate/up/down, input/post-attention norms
    assert shared == cfg.num_hidden_layers * per_layer + 3  # + embed_tokens, norm, lm_head
    # flipping one stored value is seen by both libraries (one file, not two copies)
    gen = [k for k in diffusers_sd if is_generator_key(k)]
    assert "layers.0.self_attn.add_q_proj.weight" in gen and "proj_in.weight" in gen
    assert all(unified_key_to_hf(k) is None for k in gen)
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in hf_sd)

    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        cfg.intermediate_size, cfg.vocab_size)
    assert text.rope_parameters["mrope_section"] == list(cfg.rope_axes_dim)
    assert text.rope_parameters["mrope_interleaved"] is True
    assert text.rope_parameters["rope_theta"] == cfg.rope_theta
    tok = pipe.text_tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")


def test_both_loaders_read_one_stored_copy(tiny_dir, tmp_path):
    """Change one understanding-pathway tensor in its transformer/ shard: diffusers AND transformers see it."""
    import shutil

    from diffusers import Cosmos3OmniTransformer
    from safetensors.torch import load_file, save_file
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.models.layout import component_weight_map

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, copy)
    shard = copy / "transformer" / component_weight_map(copy / "transformer")["layers.0.self_attn.to_q.weight"]
    tensors = load_file(shard)
    tensors["layers.0.self_attn.to_q.weight"] = torch.full_like(tensors["layers.0.self_attn.to_q.weight"], 0.125)
    save_file(tensors, shard, metadata={"format": "pt"})
    hf = Cosmos3OmniForConditionalGeneration.from_pretrained(copy)
    dm = Cosmos3OmniTransformer.from_pretrained(copy / "transformer")
    assert torch.all(hf.model.language_model.layers[0].self_attn.q_proj.weight == 0.125)
    assert torch.all(dm.layers[0].self_attn.to_q.weight == 0.125)


def test_loading_a_released_layout_from_the_hub_cache(tiny_dir, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache exactly like a local directory (offline)."""
    import shutil

    from cosmos_train.config import load_recipe
    from cosmos_train.models import load_model

    from .conftest import TINY_RECIPES

    cache = tmp_path / "hub"
    snapshot = cache / "models--nvidia--Cosmos3-Tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (cache / "models--nvidia--Cosmos3-Tiny" / "refs").mkdir()
    (cache / "models--nvidia--Cosmos3-Tiny" / "refs" / "main").write_text("0" * 40)
    # what an online download records: text_tokenizer/ has no config.json (AutoTokenizer probes for one)
    absent = cache / "models--nvidia--Cosmos3-Tiny" / ".no_exist" / ("0" * 40) / "text_tokenizer"
    absent.mkdir(parents=True)
    (absent / "config.json").touch()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for recipe in ("t2v_lora.yaml", "reasoner_caption.yaml"):
        cfg = load_recipe(TINY_RECIPES / recipe, ["model.pretrained=nvidia/Cosmos3-Tiny", f"output_dir={tmp_path}/r",
                                                   "model.local_files_only=true"])
        model = load_model(cfg)
        assert model.transformer is not None


def test_root_processor_files(tiny_dir, pipe):
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.get_vocab() == pipe.text_tokenizer.get_vocab()
    assert tok.chat_template == pipe.text_tokenizer.chat_template
    image_processor = AutoImageProcessor.from_pretrained(tiny_dir)
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"  # no torchvision needed
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (16, 2, 2)
    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (0.7, 0.8, 20, 1.0)
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
