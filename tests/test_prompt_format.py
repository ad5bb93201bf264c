"""The generator's prompt format (system prompt, duration / resolution templates, template dropout, the
unconditional prompt) is a recipe choice: training tokenizes with the pipeline's own `tokenize_prompt` for
exactly those flags, the checkpoint's `default_use_system_prompt` applies when the recipe leaves it unset,
and `cosmos-train generate` prompts an export the way it was trained."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from cosmos_train.config import load_recipe, load_saved_recipe
from cosmos_train.config.schema import GeneratorConfig, ModeProbabilities
from cosmos_train.errors import UserError
from cosmos_train.inference import EXPORT_INFO, choose_prompt, export_prompt_format, generate_video
from cosmos_train.models import load_model
from cosmos_train.models.prompt_format import (
    PromptFormat,
    checkpoint_default_use_system_prompt,
    resolve_prompt_format,
)
from cosmos_train.objectives.generator import GeneratorObjective, LatentSample

from .conftest import TINY_RECIPES

CAPTION = "A red circle moves from left to right across a dark blue background."
H, W, FPS = 64, 96, 16.0


def _load(checkpoint, tmp_path):
    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", [f"model.pretrained={checkpoint}",
                                                       f"output_dir={tmp_path / 'run'}"])
    return load_model(cfg, for_encoding=True)  # tokenizer + VAE: all that prompt ids need


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    return _load(tiny_dir, tmp_path_factory.mktemp("pf"))


def _objective(model, *, text_dropout=0.0, t2i=False, seed=0, **prompt_keys):
    modes = ModeProbabilities(t2i=1.0, t2v=0.0, i2v=0.0, v2v=0.0) if t2i else ModeProbabilities(t2v=1.0, i2v=0.0,
                                                                                                v2v=0.0)
    cfg = GeneratorConfig(modes=modes, text_dropout=text_dropout, **prompt_keys)
    return GeneratorObjective(model, cfg, shift=3.0, seed=seed)


def _item(num_frames):
    latent = torch.zeros(48, (num_frames - 1) // 4 + 1, H // 16, W // 16)
    return LatentSample(latent=latent, caption=CAPTION, fps=FPS, num_frames=num_frames, height=H, width=W)


def _pipeline_ids(pipe, num_frames, *, system, duration, resolution, prompt=CAPTION):
    return pipe.tokenize_prompt(prompt, "", num_frames=num_frames, height=H, width=W, fps=FPS,
                                use_system_prompt=system, add_duration_template=duration,
                                add_resolution_template=resolution)


FLAGS = list(itertools.product([True, False], [True, False], [True, False], ["pipeline", "empty"]))


@pytest.mark.parametrize("system,duration,resolution,uncond", FLAGS)
def test_trained_ids_are_the_pipelines_own_for_every_flag_combination(model, tiny_pipe, system, duration,
                                                                      resolution, uncond):
    keys = dict(use_system_prompt=system, duration_template=duration, resolution_template=resolution,
                uncond_prompt=uncond)
    # (sample frames, trained as t2i, frames of the prompt): a clip, an image, a clip trained as an image
    for frames, t2i, prompt_frames in ((17, False, 17), (1, True, 1), (17, True, 1)):
        cond_ref, uncond_ref = _pipeline_ids(tiny_pipe, prompt_frames, system=system, duration=duration,
                                             resolution=resolution)
        kept = _objective(model, t2i=t2i, **keys).draw(_item(frames))
        dropped = _objective(model, t2i=t2i, text_dropout=0.999999, **keys).draw(_item(frames))
        assert not kept.dropped_text and dropped.dropped_text
        assert kept.input_ids == cond_ref
        if uncond == "pipeline" or not (duration or resolution):
            assert dropped.input_ids == uncond_ref
        else:  # `empty`: the bare empty prompt, whatever the templates
            assert dropped.input_ids == _pipeline_ids(tiny_pipe, prompt_frames, system=system, duration=False,
                                                      resolution=False)[1]
            if resolution or prompt_frames > 1:  # an image has no duration sentence
                assert dropped.input_ids != uncond_ref
    # every flag shows in the ids of a clip (so a flipped flag cannot pass)
    kept = _objective(model, **keys).draw(_item(17)).input_ids
    for flipped in ({"system": not system}, {"duration": not duration}, {"resolution": not resolution}):
        flags = {"system": system, "duration": duration, "resolution": resolution, **flipped}
        assert kept != _pipeline_ids(tiny_pipe, 17, **flags)[0], flipped


def test_empty_uncond_prompt_is_the_bare_empty_prompt(model, tiny_pipe):
    dropped = _objective(model, text_dropout=0.999999, uncond_prompt="empty", use_system_prompt=False).draw(
        _item(17))
    bare = _pipeline_ids(tiny_pipe, 17, system=False, duration=False, resolution=False, prompt="")[0]
    assert dropped.input_ids == bare
    text = tiny_pipe.text_tokenizer.decode(dropped.input_ids)
    assert "resolution" not in text and "seconds" not in text and "<|im_start|>user\n<|im_end|>" in text
    pipeline = _objective(model, text_dropout=0.999999, uncond_prompt="pipeline", use_system_prompt=False).draw(
        _item(17))
    assert "is not of 64x96 resolution" in tiny_pipe.text_tokenizer.decode(pipeline.input_ids)


@pytest.mark.parametrize("templates", [True, False])
def test_template_dropout_trains_both_forms_at_its_rate_deterministically(model, tiny_pipe, templates):
    keys = dict(duration_template=templates, resolution_template=templates, use_system_prompt=False)
    on_ids = _pipeline_ids(tiny_pipe, 17, system=False, duration=True, resolution=True)[0]
    off_ids = _pipeline_ids(tiny_pipe, 17, system=False, duration=False, resolution=False)[0]
    own, other = (on_ids, off_ids) if templates else (off_ids, on_ids)

    objective = _objective(model, template_dropout=0.3, seed=7, **keys)
    drawn = [objective.draw(_item(17)) for _ in range(400)]
    assert all(s.input_ids == (on_ids if s.templates_on else off_ids) for s in drawn)
    share = sum(s.input_ids == other for s in drawn) / len(drawn)
    assert 0.24 < share < 0.36, share
    # no dropout: only the recipe's own form
    assert all(_objective(model, **keys).draw(_item(17)).input_ids == own for _ in range(20))

    # the form is drawn from the objective's generator: same seed, same forms; restoring its state resumes exactly
    again = _objective(model, template_dropout=0.3, seed=7, **keys)
    assert [again.draw(_item(17)).templates_on for _ in range(400)] == [s.templates_on for s in drawn]
    state = objective.state_dict()
    after = [(s.templates_on, s.sigma) for s in (objective.draw(_item(17)) for _ in range(30))]
    resumed = _objective(model, template_dropout=0.3, seed=123, **keys)
    resumed.load_state_dict(state)
    assert [(s.templates_on, s.sigma) for s in (resumed.draw(_item(17)) for _ in range(30))] == after


def test_checkpoint_default_decides_when_the_key_is_unset(model, tiny_dir, tiny_pipe, tmp_path):
    edge_like = tmp_path / "no-system-prompt"
    shutil.copytree(tiny_dir, edge_like)
    index = json.loads((edge_like / "model_index.json").read_text())
    index["default_use_system_prompt"] = False
    (edge_like / "model_index.json").write_text(json.dumps(index))

    assert checkpoint_default_use_system_prompt(str(tiny_dir)) is True
    assert checkpoint_default_use_system_prompt(str(edge_like)) is False
    edge_model = _load(edge_like, tmp_path)
    assert edge_model.pipe.config.default_use_system_prompt is False

    unset = _objective(edge_model)
    assert unset.prompt_format.use_system_prompt is False
    ids = unset.draw(_item(17)).input_ids
    assert ids == _pipeline_ids(tiny_pipe, 17, system=False, duration=True, resolution=True)[0]
    assert "You are a helpful assistant" not in tiny_pipe.text_tokenizer.decode(ids)
    # an explicit key wins over the checkpoint; the tiny checkpoint's default is the system prompt
    assert _objective(edge_model, use_system_prompt=True).draw(_item(17)).input_ids == _pipeline_ids(
        tiny_pipe, 17, system=True, duration=True, resolution=True)[0]
    assert _objective(model).prompt_format.use_system_prompt is True

    del index["default_use_system_prompt"]  # absent: the pipeline's default (on)
    (edge_like / "model_index.json").write_text(json.dumps(index))
    assert checkpoint_default_use_system_prompt(str(edge_like)) is True


@pytest.mark.parametrize(
    "override,expected",
    [
        ("generator.template_dropout=1.5", "invalid value for 'generator.template_dropout'"),
        ("generator.template_dropout=-0.1", "invalid value for 'generator.template_dropout'"),
        ("generator.uncond_prompt=negative", "invalid value for 'generator.uncond_prompt'"),
        ("generator.use_system_prompt=sometimes", "wrong type for 'generator.use_system_prompt'"),
        ("generator.duration_template=sometimes", "wrong type for 'generator.duration_template'"),
        ("generator.resolution_template=sometimes", "wrong type for 'generator.resolution_template'"),
    ],
)
def test_bad_prompt_keys_name_the_key(tmp_path, override, expected):
    with pytest.raises(UserError) as err:
        load_recipe(TINY_RECIPES / "t2v_lora.yaml", [f"output_dir={tmp_path}", override])
    assert expected in str(err.value)


def test_keys_defaults_and_older_saved_recipes(tmp_path):
    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", [f"output_dir={tmp_path}", "generator.template_dropout=1"])
    g = cfg.generator
    assert (g.use_system_prompt, g.duration_template, g.resolution_template, g.uncond_prompt) == (
        None, True, True, "pipeline")
    # a recipe saved before these keys existed (use_system_prompt: true, no template keys) still loads
    saved = tmp_path / "recipe.yaml"
    saved.write_text(f"output_dir: {tmp_path}\nmodel: {{pretrained: tiny}}\ndata: {{manifest: m.jsonl}}\n"
                     "generator: {text_dropout: 0.1, use_system_prompt: true}\n")
    old = load_saved_recipe(saved)
    fmt = resolve_prompt_format(old.generator, checkpoint_default_use_system_prompt=False)
    assert fmt == PromptFormat(use_system_prompt=True, duration_template=True, resolution_template=True,
                               template_dropout=0.0, uncond_prompt="pipeline")
    assert PromptFormat.from_dict(fmt.to_dict()) == fmt
    assert resolve_prompt_format(cfg.generator, False).use_system_prompt is False


def _export_dir(tmp_path, fmt: PromptFormat):
    d = tmp_path / "export"
    d.mkdir()
    (d / EXPORT_INFO).write_text(json.dumps({"step": 3, "prompt_format": fmt.to_dict()}))
    return d


def test_generate_chooses_the_flags_the_export_was_trained_with(tmp_path):
    trained = PromptFormat(use_system_prompt=False, duration_template=True, resolution_template=False,
                           template_dropout=0.5, uncond_prompt="pipeline")
    recorded, source = export_prompt_format(None, _export_dir(tmp_path, trained))
    assert recorded == trained and source.name == EXPORT_INFO

    choice = choose_prompt(recorded)
    assert choice.kwargs == {"use_system_prompt": False, "add_duration_template": True,
                             "add_resolution_template": False, "negative_prompt": ""}
    assert not choice.bare_uncond and "as trained" in choice.description
    assert "system prompt off" in choice.description and "templates duration," in choice.description
    off = choose_prompt(recorded, templates=False)  # --no-templates
    assert (off.kwargs["add_duration_template"], off.kwargs["add_resolution_template"]) == (False, False)
    assert "other template form" in off.description
    assert choose_prompt(recorded, system_prompt=True).kwargs["use_system_prompt"] is True
    assert "NOT a form" in choose_prompt(recorded, system_prompt=True).description
    # without a recorded format: the pipeline's defaults, unless a flag says otherwise
    assert export_prompt_format(None, tmp_path) is None
    assert choose_prompt(None).kwargs == {}
    assert choose_prompt(None, templates=False).kwargs == {"add_duration_template": False,
                                                          "add_resolution_template": False}
    assert choose_prompt(PromptFormat(True, True, True, 0.0, "empty")).bare_uncond
    assert not choose_prompt(PromptFormat(True, True, True, 0.0, "empty"), templates=False).bare_uncond


@pytest.mark.parametrize("fmt,templates", [
    (PromptFormat(False, True, True, 0.0, "empty"), None),  # bare uncond with templates on
    (PromptFormat(False, True, True, 0.5, "pipeline"), False),  # --no-templates: the dropout form
])
def test_generation_feeds_the_transformer_the_trained_ids(model, tiny_pipe, fmt, templates):
    """2 denoising steps on the tiny pipeline: the conditional and unconditional passes get exactly the ids the
    objective trains on for that form."""
    calls = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: calls.append(kw["input_ids"].flatten().tolist()), with_kwargs=True)
    try:
        video = generate_video(tiny_pipe, CAPTION, num_frames=9, height=H, width=W, fps=FPS, steps=2,
                               prompt_choice=choose_prompt(fmt, templates=templates))
    finally:
        hook.remove()
    assert video.shape[0] == 9 and np.isfinite(video).all()
    assert "tokenize_prompt" not in vars(tiny_pipe)  # the bare-uncond wrapper is gone again
    objective = _objective(model, **{k: v for k, v in fmt.to_dict().items()})
    form = fmt.templates_on if templates is None else templates
    cond, uncond = objective.prompt_ids(CAPTION, 9, H, W, FPS, templates_on=form)
    assert calls[0] == cond and calls[1] == uncond


def test_generate_command_prints_and_uses_the_recorded_form(tiny_dir, tmp_path, capsys):
    from cosmos_train.cli import main

    export = tmp_path / "export"
    shutil.copytree(tiny_dir, export)
    (export / EXPORT_INFO).write_text(json.dumps({"prompt_format": PromptFormat(False, True, True, 0.5).to_dict()}))
    args = ["generate", str(export), CAPTION, "--frames", "5", "--height", "64", "--width", "64", "--steps", "2",
            "--device", "cpu", "--out", str(tmp_path / "a.mp4")]
    assert main(args) == 0
    assert "prompt format: system prompt off, templates duration + resolution" in capsys.readouterr().out
    assert main([*args, "--no-templates", "--system-prompt"]) == 0
    assert "prompt format: system prompt on, templates off" in capsys.readouterr().out


def test_prompt_keys_do_not_key_the_latent_cache(tiny_dir, tmp_path):
    from cosmos_train.data import SkipCounter
    from cosmos_train.data.latent_cache import INDEX, check_cache
    from cosmos_train.trainer.inputs import build_data, cache_fingerprint

    def fingerprint(*overrides):
        cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", [f"model.pretrained={tiny_dir}",
                                                           f"output_dir={tmp_path}", *overrides])
        return cache_fingerprint(cfg, build_data(cfg, SkipCounter()).dataset, tiny_dir)

    base = fingerprint()
    assert fingerprint("generator.use_system_prompt=false", "generator.duration_template=false",
                       "generator.resolution_template=false", "generator.template_dropout=0.5",
                       "generator.uncond_prompt=empty") == base
    assert fingerprint("data.num_frames=9") != base  # what does change the cached latents still keys it
    # a cache prepared before prompt ids moved to draw time (format 2, ids + prompt keys in its fingerprint) is
    # still used: its latents are the same, its ids are not read
    cache = tmp_path / "cache"
    cache.mkdir()
    old = {"format": 2, "fingerprint": {**base, "tokenizer": "0123", "use_system_prompt": True}, "samples": []}
    (cache / INDEX).write_text(json.dumps(old))
    assert check_cache(cache, base) is not None
    (cache / INDEX).write_text(json.dumps({**old, "format": 1}))
    with pytest.raises(UserError, match="cache format 1"):
        check_cache(cache, base)
