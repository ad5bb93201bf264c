"""`make-tiny`: a tiny random-weight checkpoint in the layout of nvidia/Cosmos3-Nano's diffusers form.

The checkpoint is built only from the real library classes (`diffusers.Cosmos3OmniTransformer`,
`diffusers.AutoencoderKLWan` in its Wan2.2 form, `diffusers.Cosmos3AVAEAudioTokenizer`,
`diffusers.UniPCMultistepScheduler`, a `transformers.PreTrainedTokenizerFast` carrying the Qwen3-VL
special tokens and a ChatML template) and written with `Cosmos3OmniPipeline.save_pretrained`, so
`Cosmos3OmniPipeline.from_pretrained(out_dir)` loads it offline and generates. Everything is small enough
for CPU tests (transformer well under 10 M parameters, one 2-step 9x64x64 generation in well under a
second) and deterministic: the same `seed` gives bit-identical files.

Layout written: exactly the released nvidia/Cosmos3-Nano layout (cosmos_train/models/layout.py and
../shared/notes/cosmos3-release-layout.md), so every loader reads the tiny as it reads the real one::

    model_index.json                 Cosmos3OmniPipeline components (no vision_encoder entry)
    config.json                      released form: Cosmos3ForConditionalGeneration / cosmos3_omni, `model`
                                     section, allow_patterns_overrides, Qwen3-VL text (rope_scaling with mRoPE
                                     sections that fit the tiny head) and vision sub-configs
    model.safetensors.index.json     ONE root weight map into transformer/ and vision_encoder/; no root weights
    transformer/                     config.json, 2 shards diffusion_pytorch_model-0000k-of-00002 + their index
    vision_encoder/                  config.json + model.safetensors (Qwen3VLVisionModel, bare keys blocks.*, ...)
    vae/, sound_tokenizer/           config.json + diffusion_pytorch_model.safetensors
    text_tokenizer/, scheduler/      the pipeline's tokenizer and UniPC config
    tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template.json,
    preprocessor_config.json, video_preprocessor_config.json, generation_config.json   (Qwen3-VL files)
    checkpoint.json, README.md
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.export.staging import normalize_permissions

TINY_SHARD_SIZE = "10MB"  # the tiny transformer is ~17 MB in fp32: two shards

# ---------------------------------------------------------------------------------------------
# Tiny configurations. Keys not listed keep the diffusers defaults, which are the Nano values
# (fps modulation on, base_fps 24, mRoPE margin 15000, spatial-id reset, timestep_scale 0.001, ...).
# ---------------------------------------------------------------------------------------------

TINY_TRANSFORMER_CONFIG: dict = {
    # hidden_size >= patch_latent_dim (192): a narrower model cannot carry the noisy latent through
    # proj_in, so it could never learn to denoise (its loss floors near 2/3 of the noise variance).
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "head_dim": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "latent_channel": 48,
    "latent_patch_size": 2,
    "patch_latent_dim": 192,  # latent_channel * latent_patch_size**2
    # head_dim // 2 == 16 rotary frequencies, interleaved T/H/W like Nano's [24, 20, 20] of 64:
    # H takes indices 1, 4, ..., 13 and W takes 2, 5, ..., 14; T keeps the other 6.
    "rope_axes_dim": [6, 5, 5],
    # the same sections where vLLM-Omni reads them (it ignores rope_axes_dim and would fall back to Nano's)
    "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    "rope_theta": 5000000.0,
    "enable_fps_modulation": True,
    "base_fps": 24,
    "unified_3d_mrope_reset_spatial_ids": True,
    "unified_3d_mrope_temporal_modality_margin": 15000,
    "sound_gen": True,
    "sound_dim": 64,  # == Cosmos3AVAEAudioTokenizer.vocoder_input_dim (its default, 64)
    "sound_latent_fps": 25.0,
    "action_gen": True,
    "action_dim": 64,  # widest embodiment (hand_pose) is 57, zero-padded up to action_dim
    "num_embodiment_domains": 32,
    "timestep_scale": 0.001,
    "hidden_act": "silu",
    "qk_norm_for_text": True,
    "use_und_k_norm_for_gen": False,
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    # vocab_size is set to len(tokenizer) at build time
}

# Wan2.2 topology (z_dim 48, residual blocks, 2x2 patchify of 3 -> 12 channels, 16x spatial, 4x temporal)
# with tiny widths. latents_mean / latents_std are computed at build time (see `_calibrate_latent_stats`).
TINY_VAE_CONFIG: dict = {
    "base_dim": 8,
    "decoder_base_dim": 12,  # Wan2.2 also uses a wider decoder than encoder (256 vs 160)
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
}

# The shipped AVAE topology (48 kHz stereo, hop 2*4*5*6*8 = 1920 samples -> 25 latent frames/s,
# 64 latent channels) with tiny widths.
TINY_SOUND_TOKENIZER_CONFIG: dict = {
    "sampling_rate": 48000,
    "vocoder_input_dim": 64,
    "dec_dim": 8,
    "dec_c_mults": [1, 2, 4, 8, 16],
    "dec_strides": [2, 4, 5, 6, 8],
    "dec_out_channels": 2,
    "stereo": True,
    "enc_dim": 8,
    "enc_intermediate_dim": 32,
    "enc_num_layers": 3,
    "enc_num_blocks": 1,
    "enc_n_fft": 64,
    "enc_hop_length": 16,
    "enc_latent_dim": 128,  # 2 * vocoder_input_dim (mean and scale)
    "enc_c_mults": [1, 2, 4],
    "enc_strides": [4, 5, 6],
}

# UniPC as a flow-matching solver, as Cosmos 3 samples (Nano uses flow_shift 10 at 720p; the tiny
# model works at 64x64, where a smaller shift is the matching choice).
TINY_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 5.0,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}

# The Reasoner's view of the checkpoint (transformers' Cosmos3OmniConfig = Qwen3-VL). The text model IS the
# transformer's understanding pathway, so its sizes are TINY_TRANSFORMER_CONFIG's; mrope_section is the
# transformer's rope_axes_dim (interleaved T/H/W, as Qwen3-VL's [24, 20, 20] for head_dim 128).
def tiny_text_config(vocab_size: int) -> dict:
    t = TINY_TRANSFORMER_CONFIG
    return {
        "model_type": "qwen3_vl_text",
        "vocab_size": vocab_size,
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"],
        "head_dim": t["head_dim"],
        "hidden_act": t["hidden_act"],
        "rms_norm_eps": t["rms_norm_eps"],
        "attention_bias": t["attention_bias"],
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": t["rope_theta"],
                            "mrope_section": list(t["rope_axes_dim"]), "mrope_interleaved": True},
    }


# Qwen3-VL's vision tower topology (16x16 patches, 2x2 spatial merge, 2-frame temporal patches, deepstack
# features into the first text layers) with tiny widths. out_hidden_size is the text hidden size.
TINY_VISION_CONFIG: dict = {
    "model_type": "qwen3_vl_vision",
    "depth": 2,
    "hidden_size": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 128,
    "num_heads": 4,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": TINY_TRANSFORMER_CONFIG["hidden_size"],
    "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated to each image's patch grid
    "deepstack_visual_indexes": [0, 1],
}

# Qwen3-VL's image processor settings (patch 16, merge 2, mean/std 0.5) with a small pixel budget:
# a 64x64 image is 4x4 patches -> 4 merged tokens.
TINY_IMAGE_PROCESSOR_CONFIG: dict = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
}

# Qwen3-VL's video processor settings (2 fps, 4..768 frames; pixel budgets are totals over the sampled
# frames, as Qwen3VLVideoProcessor's smart_resize counts them), with a small budget.
TINY_VIDEO_PROCESSOR_CONFIG: dict = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 8 * 64 * 64},
    "fps": 2,
    "min_frames": 4,
    "max_frames": 16,
    "do_sample_frames": True,
    "resample": 3,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
}

# The documented Reasoner sampling defaults (no reasoning): temperature 0.7, top_p 0.8, top_k 20,
# repetition_penalty 1.0 (presence_penalty 1.5 has no GenerationConfig field: cosmos_train.chat applies it).
REASONER_GENERATION_DEFAULTS: dict = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.0,
}

# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on a fixed corpus, Qwen3-VL's pre-tokenization and special tokens.
# ---------------------------------------------------------------------------------------------

TINY_BPE_VOCAB_SIZE = 1024  # byte-level BPE part; the special tokens follow it, as in Qwen

# (content, special) in Qwen3-VL's order; ids are TINY_BPE_VOCAB_SIZE + index, mirroring
# Qwen's 151643 + index (<|endoftext|> 151643, <|im_start|> 151644, <|vision_start|> 151652, ...).
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

# Qwen2 / Qwen3 pre-tokenization regex.
_QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen3-VL writes it (no default system prompt; string or list-of-parts content;
# image/video parts become <|vision_start|><|image_pad|/video_pad|><|vision_end|>; `add_vision_id`
# prefixes "Picture n: " / "Video n: "). Tool calls and <think> handling are left out.
QWEN_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Fixed training text: video-caption English plus the exact prompt templates the pipeline adds,
# so that prompts tokenize into short, realistic sequences.
_CORPUS = """\
You are a helpful assistant who will generate videos from a give prompt.
You are a helpful assistant who will generate images from a give prompt.
The video is 7.9 seconds long and is of 24 FPS. This video is of 720x1280 resolution.
The video is 5.0 seconds long and is of 16 FPS. This video is of 480x832 resolution.
The video is 0.4 seconds long and is of 24 FPS. This video is of 64x64 resolution.
The video is not 2.0 seconds long and is not of 30 FPS. This video is not of 192x320 resolution.
This image is of 1024x1024 resolution. This image is not of 256x256 resolution.
A red car drives along a winding coastal road at sunset, the camera following from behind.
A small brown dog runs across a green park and jumps to catch a yellow ball in the air.
A robot arm picks up a blue cube from a wooden table and places it inside a white bowl.
The camera slowly pans across a busy city street at night, with neon signs and wet pavement.
Waves crash against black rocks on a stormy beach while seagulls fly over the water.
A woman in a long coat walks through falling snow in a quiet forest, leaving footprints behind her.
Close-up of hands kneading dough on a floured kitchen counter in warm morning light.
A time-lapse of clouds moving over snowy mountain peaks, shadows sliding across the valley.
A cyclist rides down a narrow street lined with old stone houses and flower boxes.
A cat sleeps on a sunny windowsill, its tail slowly twitching as leaves move outside.
An aerial drone shot flies over a river that winds through autumn forests of red and orange trees.
A chef slices fresh vegetables with a sharp knife, the pieces falling into a metal pan.
Children play soccer on a dusty field while the sun sets behind distant hills.
A train moves through a green countryside, steam rising from the engine into the blue sky.
Rain drops run down a window, and blurry city lights glow in the background.
A humanoid robot walks forward on a factory floor, turning its head to look at a conveyor belt.
A gripper opens, moves toward a red apple, closes around it and lifts it from the basket.
The ego car waits at a traffic light, then turns left at the intersection as pedestrians cross.
A person pours hot coffee into a white cup; steam curls upward in the morning light.
Fireworks burst over a harbor at night, reflected in the calm dark water below.
A horse gallops across an open field of tall grass, its mane flowing in the wind.
A scientist in a laboratory looks through a microscope and writes notes in a notebook.
Leaves fall from a large oak tree onto a quiet path in the park during autumn.
A boat sails across a blue lake surrounded by pine trees and snowy mountains.
A street musician plays the guitar on a corner while people walk past and listen.
Slow motion of a water balloon bursting, droplets spreading in every direction.
A toy train circles a track on the living room floor next to a decorated tree.
The camera moves forward through a long hallway with white walls and bright lights.
An old man feeds pigeons on a bench in a city square on a cold winter morning.
A butterfly lands on a purple flower, opens its wings and then flies away.
A kitchen robot stirs soup in a pot, then lifts the spoon and taps it on the edge.
Two people shake hands in a modern office with large windows and a view of the city.
A mountain biker rides down a rocky trail, dust rising behind the wheels.
Ocean waves roll onto a sandy beach, and the foam slides back into the sea.
A hot air balloon rises above green fields in the early morning mist.
The view from a car window shows trees and houses passing quickly by.
A dancer spins on a wooden stage under a single bright spotlight.
Snow falls on a quiet village street, and warm light shines from every window.
A hand writes with a pen on white paper, the words appearing line by line.
A small boat drifts down a canal between old brick buildings in the evening.
A squirrel climbs a tree trunk, stops, looks around, and runs along a branch.
A wrist camera shows the gripper approaching a drawer handle and pulling the drawer open.
From a first-person perspective, two hands fold a shirt on a bed and place it in a pile.
A third-person view shows a robot pushing a T-shaped block across a table to a target.
Traffic flows on a highway at dusk, headlights and tail lights forming bright lines.
A glass of water is filled from a tap, the water level rising until it nearly overflows.
A golden retriever swims in a lake and carries a stick back to the shore.
Sunlight shines through tall trees in a misty forest as birds sing in the branches.
A bakery display shows fresh bread, cakes and pastries under warm yellow lights.
A child blows out candles on a birthday cake while friends clap and cheer.
A spaceship flies past a large blue planet with rings, stars shining in the distance.
Lightning strikes over a dark plain during a summer thunderstorm.
The camera zooms in on an old clock tower as its hands move toward noon.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 25 30 48 60 64 100 128 256 480 720 1080 1280.
Punctuation and symbols: ( ) [ ] { } < > . , ; : ! ? ' " - _ / \\ | @ # $ % ^ & * + = ~
"""


def build_tiny_tokenizer():
    """Train the tiny byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    Deterministic: the corpus and trainer settings are fixed, so every call gives the same vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    bpe_size = tok.get_vocab_size(with_added_tokens=False)
    if bpe_size != TINY_BPE_VOCAB_SIZE:  # the corpus must support the full merge count
        raise RuntimeError(f"tiny tokenizer: BPE vocab has {bpe_size} tokens, expected {TINY_BPE_VOCAB_SIZE}")
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for content, special in QWEN_ADDED_TOKENS
        ]
    )
    specials = [content for content, special in QWEN_ADDED_TOKENS if special]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return fast


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def _build_transformer(vocab_size: int, generator: torch.Generator):
    from diffusers import Cosmos3OmniTransformer

    model = Cosmos3OmniTransformer(**TINY_TRANSFORMER_CONFIG, vocab_size=vocab_size)
    with torch.no_grad():
        # DomainAwareLinear keeps its per-domain weights in nn.Embedding, which nn.init makes N(0, 1):
        # a 64x64 projection with unit-variance weights blows activations up by ~8x per layer.
        for head in (model.action_proj_in, model.action_proj_out):
            head.fc.weight.normal_(0.0, 0.02, generator=generator)
            head.bias.weight.zero_()
        # Parameters the library initialises to constants (zeros / ones) get a small random offset, so a
        # loader that silently drops or re-initialises one of them is caught by weight comparisons.
        # A trained Cosmos 3 passes the noisy latent through proj_in -> residual stream -> proj_out; a random
        # one has no such path, and low-rank adapters cannot build a full-rank one. Starting proj_out as
        # proj_in's pseudo-inverse gives the tiny model that path, so LoRA on it behaves like LoRA on a
        # pretrained model (it adapts, rather than having to learn the identity from scratch).
        w_in = model.proj_in.weight  # [hidden, patch_latent_dim]
        rms = (w_in.pow(2).sum(dim=1).mean()).sqrt()  # typical per-unit gain of proj_in on a unit-variance latent
        model.proj_out.weight.copy_(torch.linalg.pinv(w_in) * rms)
        model.proj_out.bias.zero_()
        model.audio_modality_embed.normal_(0.0, 0.02, generator=generator)
        model.action_modality_embed.normal_(0.0, 0.02, generator=generator)
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()


def _calibrate_latent_stats(vae, generator: torch.Generator) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the tiny VAE's raw latents on a fixed smooth synthetic clip.

    The real checkpoint's latents_mean/latents_std make normalized latents roughly zero-mean, unit-variance;
    computing them the same way here keeps that property (and makes the normalization non-trivial).
    """
    t, h, w = 17, 64, 64
    coarse = torch.rand(1, 3, 5, 8, 8, generator=generator) * 2 - 1
    clip = torch.nn.functional.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=True)
    clip = (clip + 0.05 * torch.randn(clip.shape, generator=generator)).clamp(-1, 1)
    with torch.no_grad():
        mu = vae.encode(clip).latent_dist.mode()  # [1, 48, 5, 4, 4]
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4)).clamp_min(0.05)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _build_vae(generator: torch.Generator):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE_CONFIG, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()
    mean, std = _calibrate_latent_stats(vae, generator)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


def _build_sound_tokenizer():
    from diffusers import Cosmos3AVAEAudioTokenizer

    return Cosmos3AVAEAudioTokenizer(**TINY_SOUND_TOKENIZER_CONFIG).eval()


def _build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG)


def build_tiny_reasoner_config(tokenizer):
    """`Cosmos3OmniConfig` of the tiny checkpoint's Reasoner (special token ids from `tokenizer`)."""
    from transformers import Cosmos3OmniConfig

    ids = tokenizer.convert_tokens_to_ids
    config = Cosmos3OmniConfig(
        text_config=tiny_text_config(len(tokenizer)),
        vision_config=dict(TINY_VISION_CONFIG),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = ["Cosmos3OmniForConditionalGeneration"]
    return config


def _build_vision_tower(config, seed: int):
    """The Qwen3-VL vision tower (random weights; norms offset from 1/0 so dropped weights are noticed)."""
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        generator = torch.Generator().manual_seed(seed + 3)
        tower = AutoModel.from_config(config.vision_config).float().eval()
        with torch.no_grad():
            for name, param in tower.named_parameters():
                if ".norm" in name or name.startswith("norm"):
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return tower


def released_root_config(config) -> dict:
    """The root config.json in the released form: Qwen3-VL-8B's hub config shape (explicit `rope_scaling`
    with the mRoPE sections, `rope_theta` beside it, vision model_type `qwen3_vl`) under the architecture
    name vLLM serves, with the framework's `model` section and the loader hint for the sub-folder weights.
    transformers reads it as it reads the real one (it maps rope_scaling to rope_parameters itself)."""
    from cosmos_train.models.layout import ALLOW_PATTERNS_OVERRIDES, RELEASED_ARCHITECTURE

    data = config.to_diff_dict()
    data["text_config"] = config.text_config.to_diff_dict()
    data["vision_config"] = config.vision_config.to_diff_dict()
    data.pop("transformers_version", None)
    text = data["text_config"]
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope  # {"rope_type": "default", "mrope_section": [...], "mrope_interleaved": true}
    vision = data["vision_config"]
    vision.pop("rope_parameters", None)  # not in the hub form: the vision rotary embedding has fixed settings
    vision["model_type"] = "qwen3_vl"
    for sub in (text, vision):
        for key in ("transformers_version", "dtype", "architectures"):
            sub.pop(key, None)
        if sub.get("pad_token_id", 0) is None:
            del sub["pad_token_id"]
    data.update({
        "architectures": [RELEASED_ARCHITECTURE],
        "model_type": "cosmos3_omni",
        "allow_patterns_overrides": list(ALLOW_PATTERNS_OVERRIDES),
        # the official framework's own model config (what its trainer builds); other loaders ignore it
        "model": {"_target": "omni_mot_model", "name": "cosmos3_tiny", "num_layers": text["num_hidden_layers"],
                  "hidden_size": text["hidden_size"], "sound_gen": True, "action_gen": True},
    })
    return data


def write_tiny_reasoner(root: Path, pipe, seed: int = 0) -> None:
    """Write the released layout's reasoner side at `root`: the root config, the vision tower in
    `vision_encoder/` (as `Qwen3VLVisionModel.save_pretrained` writes it, bare keys), the root weight index
    over `transformer/` + `vision_encoder/` (no root weights: the language model exists once, in the
    transformer shards), and the Qwen3-VL tokenizer / processor / generation files at the root."""
    import json

    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cosmos_train.models.layout import VISION_DIR, write_root_index

    tokenizer = pipe.text_tokenizer
    config = build_tiny_reasoner_config(tokenizer)
    tower = _build_vision_tower(config, seed)
    transformer_keys = set(pipe.transformer.state_dict())
    clash = sorted(set(tower.state_dict()) & transformer_keys)
    if clash:
        raise RuntimeError(f"tiny: vision keys {clash[:3]} collide with transformer keys")
    _save_vision_tower(tower, root / VISION_DIR)
    (root / "config.json").write_text(json.dumps(released_root_config(config), indent=2, sort_keys=True) + "\n")
    write_root_index(root)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(**REASONER_GENERATION_DEFAULTS, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(root)
    tokenizer.save_pretrained(root)
    _released_tokenizer_files(root, tokenizer)
    Qwen2VLImageProcessorPil(**TINY_IMAGE_PROCESSOR_CONFIG).save_pretrained(root)
    (root / "video_preprocessor_config.json").write_text(json.dumps(TINY_VIDEO_PROCESSOR_CONFIG, indent=2,
                                                                    sort_keys=True) + "\n")
    (root / "checkpoint.json").write_text("{}\n")
    (root / "README.md").write_text(TINY_MODEL_CARD)


def _save_vision_tower(tower, directory: Path) -> None:
    """What `tower.save_pretrained` writes (config.json + model.safetensors), written by this process whatever its
    rank: transformers' save_pretrained writes nothing on a rank other than 0 of an initialized process group, and
    every rank of a multi-process run may build the tiny checkpoint (the first to finish renames it into place)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tower.config.architectures = [type(tower).__name__]
    tower.config.dtype = tower.dtype
    tower.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def _released_tokenizer_files(root: Path, tokenizer) -> None:
    """The Qwen tokenizer files as the release ships them: vocab.json + merges.txt beside tokenizer.json, and
    the chat template in tokenizer_config.json and chat_template.json (the processor's file), not a .jinja."""
    import json

    tokenizer.backend_tokenizer.model.save(str(root))  # vocab.json, merges.txt
    template = tokenizer.chat_template
    (root / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((root / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    (root / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


TINY_MODEL_CARD = """\
---
library_name: diffusers
tags: [cosmos3, tiny, random-weights, test-fixture]
---
# Tiny random-weight Cosmos 3 (cosmos_train fixture)

Written by `cosmos-train make-tiny`: random weights in exactly the file layout of nvidia/Cosmos3-Nano, for
CPU tests and the demo. It generates noise-like video and answers gibberish until trained.
"""


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny `Cosmos3OmniPipeline` in memory (float32, CPU, deterministic for a given seed)."""
    import warnings

    from diffusers import Cosmos3OmniPipeline

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        transformer = _build_transformer(len(tokenizer), generator)
        vae = _build_vae(generator)
        with warnings.catch_warnings():  # torch.nn.utils.weight_norm deprecation inside diffusers
            warnings.simplefilter("ignore", FutureWarning)
            sound_tokenizer = _build_sound_tokenizer()
    return Cosmos3OmniPipeline(
        transformer=transformer,
        text_tokenizer=tokenizer,
        vae=vae,
        scheduler=_build_scheduler(),
        sound_tokenizer=sound_tokenizer,
        safety_checker=None,
        enable_safety_checker=False,  # cosmos_guardrail is not a dependency
        default_use_system_prompt=True,
        use_native_flow_schedule=False,
    )


def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Cosmos3-Nano-layout checkpoint to `out_dir` and return its path.

    `out_dir` must not exist, be empty, or hold an earlier checkpoint (a `model_index.json`), which is
    replaced. Weights are float32 safetensors, initialised from `seed`; the same seed gives identical files.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"make-tiny: {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "model_index.json").is_file():
            raise UserError(f"make-tiny: {out} is not empty and holds no model_index.json; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)

    pipe = build_tiny_pipeline(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # transformer/ in 2 shards with its index, as the release shards it (7 shards for Nano)
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=TINY_SHARD_SIZE)
        write_tiny_reasoner(tmp, pipe, seed)
        normalize_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
