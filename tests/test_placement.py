"""What goes to the accelerator for training (models/placement.py, Cosmos3Generator.place_for_training).

CPU has no second device, so the "accelerator" here is the `meta` device: a part that went there has lost its
values, a part that stayed has them."""

import pytest
import torch

from cosmos_train.config import load_recipe
from cosmos_train.data import GeneratorDataset, read_manifest
from cosmos_train.models import load_model
from cosmos_train.models.placement import is_parked, park, unpark
from cosmos_train.objectives import build_objective

from .conftest import TINY_RECIPES

META = torch.device("meta")


def _model(tiny_dir, tmp_path, recipe="t2v_sound.yaml", *overrides):
    cfg = load_recipe(TINY_RECIPES / recipe, [f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}",
                                              "model.dtype=float32", *overrides])
    model = load_model(cfg)
    model.setup_trainable(cfg)
    return cfg, model


def _devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("online", [True, False])
def test_training_places_only_what_training_uses(tiny_dir, tmp_path, online):
    _, model = _model(tiny_dir, tmp_path)
    lm_head = model.transformer.lm_head.weight.detach().clone()
    model.place_for_training(META, encodes_online=online)
    t, vae, sound = model.transformer, model.pipe.vae, model.pipe.sound_tokenizer
    assert _devices(t) == {"meta"}  # everything the transformer still holds, LoRA included
    assert not any(n.startswith("lm_head") for n, _ in t.named_parameters())
    assert not any(k.startswith("lm_head") for k in t.state_dict())
    assert torch.equal(t.lm_head.weight, lm_head)  # parked on the CPU, values intact, still readable
    # what a wrapper does with the module it is given (Accelerate's prepare_model: model.to(device)) leaves it
    t.to(META)
    assert t.lm_head.weight.device.type == "cpu"
    encoder = {"meta"} if online else {"cpu"}
    assert _devices(vae.encoder) == _devices(vae.quant_conv) == encoder
    assert _devices(sound.encoder) == encoder
    assert _devices(vae.decoder) == _devices(vae.post_quant_conv) == _devices(sound.decoder) == {"cpu"}


def test_full_finetuning_of_all_weights_leaves_lm_head_frozen_and_parked(tiny_dir, tmp_path):
    _, model = _model(tiny_dir, tmp_path, "t2v_full.yaml", "train.full_trainable=all")
    trained = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trained and "embed_tokens.weight" in trained  # the und pathway does train
    assert not model.training_placement(encodes_online=True)["transformer.lm_head"]
    model.place_for_training(META, encodes_online=True)
    assert is_parked(model.transformer, "lm_head")
    assert model.transformer.lm_head.weight.device.type == "cpu"


def test_park_and_unpark_round_trip(tiny_dir, tmp_path):
    _, model = _model(tiny_dir, tmp_path)
    t = model.transformer
    before = {k: v.clone() for k, v in t.state_dict().items()}
    park(t, "lm_head")
    park(t, "lm_head")  # idempotent
    assert set(before) - set(t.state_dict()) == {"lm_head.weight"}
    unpark(t, "lm_head")
    after = t.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_generator_loss_never_touches_lm_head(tiny_dir, tmp_path):
    """The fact the placement rests on (diffusers' Cosmos3OmniTransformer.forward does not call lm_head): with
    lm_head's values gone (meta) the loss and its gradients are exactly what they are with them."""
    cfg, model = _model(tiny_dir, tmp_path, "t2v_lora.yaml")
    h, w = cfg.pixel_size()
    sample = GeneratorDataset(read_manifest(cfg.data.manifest), cfg.data.num_frames, h, w, fps=cfg.data.fps)[0]

    def loss_and_grads():
        objective = build_objective(cfg, model, seed=0)
        loss, _ = objective.loss([objective.draw(objective.encode(sample))])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None}
        model.transformer.zero_grad(set_to_none=True)
        return loss.detach(), grads

    ref_loss, ref_grads = loss_and_grads()
    model.place_for_training("cpu", encodes_online=True)
    model.transformer.lm_head.to(META)
    loss, grads = loss_and_grads()
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_media_on_device_brings_vae_and_sound_over_and_back(tiny_dir, tmp_path, monkeypatch):
    """Validation's sampling: every VAE / sound-tokenizer part on the transformer's device inside, each back to its
    own device after (recorded: a meta part cannot come back to the CPU)."""
    _, model = _model(tiny_dir, tmp_path)
    model.place_for_training(META, encodes_online=True)
    moves = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moves.append((self, torch.device(args[0]) if args else kwargs.get("device")))
        return self

    names = {m: f"{c}.{n}" for c in ("vae", "sound_tokenizer") for n, m in getattr(model.pipe, c).named_children()}
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    with model.media_on_device():
        inside = [(names[m], d.type) for m, d in moves]
        moves.clear()
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    after = {names[m]: d.type for m, d in moves}
    assert sorted(inside) == sorted((n, "meta") for n in names.values())
    assert after == {"vae.encoder": "meta", "vae.quant_conv": "meta", "sound_tokenizer.encoder": "meta",
                     "vae.decoder": "cpu", "vae.post_quant_conv": "cpu", "sound_tokenizer.decoder": "cpu"}

