"""Exports in the released Cosmos 3 layout, for every kind of run: both views load them and agree, there is
one language model, adapters load in the tools they are named for, and nothing names a local path."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cosmos_train.config import load_recipe
from cosmos_train.errors import UserError
from cosmos_train.export.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLLM_DIR, VLLM_OMNI_DIR
from cosmos_train.export.generator import export_run
from cosmos_train.export.reasoner import export_reasoner_run
from cosmos_train.models.layout import component_weight_map, layout_problems
from cosmos_train.models.reasoner import hf_key_to_unified, is_generator_key
from cosmos_train.trainer.loop import train

from .conftest import TINY_RECIPES
from .serving_rules import (omni_weight_name, vllm_lora_module, vllm_name_of_transformers_param,
                            vllm_weight_name)


def _run(tiny_dir, out, recipe, *overrides):
    cfg = load_recipe(TINY_RECIPES / recipe, [f"model.pretrained={tiny_dir}", f"output_dir={out}",
                                              "train.max_steps=2", "train.checkpoint_every=2", *overrides])
    return train(cfg)


def _stored(root: Path, sub: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(root / sub / component_weight_map(root / sub)[key]), framework="pt") as fh:
        return fh.get_tensor(key)


def _both_views(out: Path):
    """(diffusers transformer state, transformers state) of an exported directory."""
    from diffusers import Cosmos3OmniTransformer
    from transformers import Cosmos3OmniForConditionalGeneration

    dm = Cosmos3OmniTransformer.from_pretrained(str(out / "transformer")).state_dict()
    hf, info = Cosmos3OmniForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return dm, hf.state_dict()


def _assert_one_language_model(out: Path) -> int:
    assert layout_problems(out) == []
    assert not list(out.glob("*.safetensors"))
    dm, hf = _both_views(out)
    shared = 0
    for key, value in hf.items():
        ukey = hf_key_to_unified(key)
        if ukey in dm:
            assert torch.equal(dm[ukey], value), key
            shared += 1
    assert shared > 0
    return shared


def _assert_servable(out: Path) -> None:
    """The names and configs vLLM (reasoner) and vLLM-Omni (generator) read (rules in serving_rules.py)."""
    from safetensors import safe_open
    from transformers import Cosmos3OmniForConditionalGeneration

    from .serving_rules import VLLM_WEIGHT_DIRS

    stored = {}
    for sub in out.iterdir():
        if sub.is_dir() and VLLM_WEIGHT_DIRS.match(sub.name):
            for path in sub.glob("*.safetensors"):
                with safe_open(str(path), framework="pt") as fh:
                    stored.update({k: sub.name for k in fh.keys()})
    assert set(stored.values()) == {"transformer", "vision_encoder"}
    # vLLM: strict both ways -- every stored tensor maps to one of its parameters or is dropped, and every
    # parameter (the Qwen3-VL model transformers also builds) gets a tensor
    hf = Cosmos3OmniForConditionalGeneration.from_pretrained(str(out))
    expected = {vllm_name_of_transformers_param(n) for n in hf.state_dict()}
    assert {vllm_weight_name(k) for k in stored} - {None} == expected
    # vLLM-Omni: unknown names would be dropped silently (serving the base); only lm_head is meant to be
    transformer_keys = [k for k, sub in stored.items() if sub == "transformer"]
    assert [k for k in transformer_keys if omni_weight_name(k) is None] == ["lm_head.weight"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["rope_scaling"]["mrope_section"] == config["rope_axes_dim"]  # what vLLM-Omni's mRoPE reads
    for key, value in {"qk_norm_for_diffusion": True, "qk_norm_for_text": True,
                       "position_embedding_type": "unified_3d_mrope", "unified_3d_mrope_reset_spatial_ids": True,
                       "joint_attn_implementation": "two_way"}.items():
        assert config.get(key, value) == value, key  # vLLM-Omni refuses other values
    assert "scale_factor_temporal" in json.loads((out / "vae" / "config.json").read_text())
    root = json.loads((out / "config.json").read_text())
    assert root["architectures"] == ["Cosmos3ForConditionalGeneration"]  # selects vLLM's Cosmos 3 class
    assert hf.config.text_config.rope_parameters["mrope_section"] == config["rope_axes_dim"]


def test_tiny_checkpoint_is_read_by_the_serving_rules(tiny_dir):
    _assert_servable(tiny_dir)


def _assert_publishable(out: Path, *local: Path) -> None:
    """No exported text file names a local path; every file is readable by other accounts."""
    for path in out.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & stat.S_IROTH, path
            if path.suffix in (".json", ".md", ".txt", ".jinja", ".yaml"):
                text = path.read_text()
                for root in local:
                    assert str(root) not in text, (path, root)


# ---- generator ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["gen", "all"])
def test_generator_full_finetune_exports_one_language_model(tiny_dir, tmp_path, trainable):
    """`all` changes the understanding pathway: the reasoner's language model must be the trained one, in the
    one place both libraries read. `gen` leaves it exactly the base's."""
    run = _run(tiny_dir, tmp_path / "run", "t2v_full.yaml", f"train.full_trainable={trainable}", "train.lr=1e-2")
    out = tmp_path / "export"
    info = export_run(run, out)
    assert info["verification_max_relative_difference"] < 1e-4 and info["transformers_tensors_checked"] > 0
    _assert_one_language_model(out)
    _assert_servable(out)
    trained = load_file(str(run / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    und_key = "layers.0.self_attn.to_q.weight"
    gen_key = "layers.0.self_attn.add_q_proj.weight"
    assert not torch.equal(_stored(out, "transformer", gen_key), _stored(tiny_dir, "transformer", gen_key))
    und_changed = not torch.equal(_stored(out, "transformer", und_key), _stored(tiny_dir, "transformer", und_key))
    assert und_changed == (trainable == "all")
    if trainable == "all":
        assert torch.equal(_stored(out, "transformer", und_key), trained[und_key])
    _assert_publishable(out, tmp_path, tiny_dir)
    _assert_publishable(run / "checkpoints")  # checkpoints are readable by other accounts too


def test_prompt_format_is_carried_into_the_export(tiny_dir, tmp_path):
    """Trained without the system prompt and without templates: the stock pipeline loaded from the export
    defaults to no system prompt, and the record / card say how to prompt it."""
    from diffusers import Cosmos3OmniPipeline

    run = _run(tiny_dir, tmp_path / "run", "t2v_lora.yaml", "generator.use_system_prompt=false",
               "generator.duration_template=false", "generator.resolution_template=false")
    out = tmp_path / "export"
    export_run(run, out)
    assert json.loads((out / "model_index.json").read_text())["default_use_system_prompt"] is False
    assert Cosmos3OmniPipeline.from_pretrained(str(out)).config.default_use_system_prompt is False
    fmt = json.loads((out / "cosmos_train_export.json").read_text())["prompt_format"]
    assert (fmt["use_system_prompt"], fmt["duration_template"], fmt["resolution_template"]) == (False, False, False)
    card = (out / "README.md").read_text()
    assert "add_duration_template=False" in card and "add_resolution_template=False" in card


def test_merged_export_refuses_a_root_weight_copy(tiny_dir, tmp_path, monkeypatch):
    """The old bug: base root weights beside a rewritten transformer/ (two language models). The export's
    own check catches it and writes nothing."""
    from cosmos_train.export import generator as gen_export
    from cosmos_train.models import layout

    run = _run(tiny_dir, tmp_path / "run", "t2v_lora.yaml")
    original = layout.write_release_checkpoint

    def with_stale_root_weights(source, out, **kwargs):
        counts = original(source, out, **kwargs)
        from safetensors.torch import save_file

        save_file({"layers.0.self_attn.to_q.weight": _stored(source, "transformer", "layers.0.self_attn.to_q.weight")},
                  str(out / "model.safetensors"))
        return counts

    monkeypatch.setattr(gen_export, "write_release_checkpoint", with_stale_root_weights)
    with pytest.raises(RuntimeError, match="weights at the root"):
        export_run(run, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_merged_export_needs_the_released_layout(tiny_dir, tmp_path):
    old = tmp_path / "old-layout"
    shutil.copytree(tiny_dir, old)
    (old / "model.safetensors.index.json").unlink()
    run = _run(old, tmp_path / "run", "t2v_lora.yaml")
    with pytest.raises(UserError, match="released Cosmos 3 layout"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# vLLM-Omni 0.30.0, vllm_omni/diffusion/models/cosmos3/pipeline_cosmos3.py (`_remap_ckpt_key`) and
# vllm_omni/diffusion/lora/manager.py: the adapter's modules are its own (no renaming), the generation
# pathway lives in `gen_layers.N` with `cross_attention.to_{q,k,v,out}` and `mlp.{gate,up,down}_proj`.
OMNI_EXPECTED = {
    "layers.1.self_attn.add_q_proj": "gen_layers.1.cross_attention.to_q",
    "layers.1.self_attn.add_k_proj": "gen_layers.1.cross_attention.to_k",
    "layers.1.self_attn.add_v_proj": "gen_layers.1.cross_attention.to_v",
    "layers.1.self_attn.to_add_out": "gen_layers.1.cross_attention.to_out",
    "layers.1.mlp_moe_gen.gate_proj": "gen_layers.1.mlp.gate_proj",
    "layers.1.mlp_moe_gen.up_proj": "gen_layers.1.mlp.up_proj",
    "layers.1.mlp_moe_gen.down_proj": "gen_layers.1.mlp.down_proj",
    "layers.1.self_attn.to_q": "language_model.layers.1.self_attn.to_q",
    "layers.1.mlp.down_proj": "language_model.layers.1.mlp.down_proj",
}


def test_generator_adapters_load_in_diffusers_and_name_vllm_omni_modules(tiny_dir, tmp_path):
    from diffusers import Cosmos3OmniPipeline

    from cosmos_train.export.adapters import omni_module_name

    assert {k: omni_module_name(k) for k in OMNI_EXPECTED} == OMNI_EXPECTED
    assert omni_module_name("proj_in") is None

    run = _run(tiny_dir, tmp_path / "run", "t2v_lora.yaml", "train.lr=1e-2")
    export_run(run, tmp_path / "merged")
    info = export_run(run, tmp_path / "lora", lora_only=True)
    adapter = tmp_path / "lora"
    assert info["adapters"][VLLM_OMNI_DIR] == VLLM_OMNI_DIR

    # diffusers: base + adapter == merged export
    from cosmos_train.models.generator import Cosmos3Generator

    def velocity(pipe):
        model = Cosmos3Generator(pipe)
        ids, _ = model.tokenize("A green square moves down.", 9, 64, 64, 24.0)
        latent = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model.predict_velocity(model.build_sequence(ids, latent.shape, [], 24.0), latent, 600.0)

    base = Cosmos3OmniPipeline.from_pretrained(str(tiny_dir))
    v_base = velocity(base)
    base.transformer.load_lora_adapter(str(adapter), weight_name=ADAPTER_WEIGHTS)
    v_merged = velocity(Cosmos3OmniPipeline.from_pretrained(str(tmp_path / "merged")))
    assert not torch.allclose(v_merged, v_base, atol=1e-4)
    torch.testing.assert_close(velocity(base), v_merged, atol=1e-4, rtol=1e-4)

    # vLLM-Omni: the same tensors under its module names, every name binding, no PEFT ".default."
    diffusers_tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    omni = load_file(str(adapter / VLLM_OMNI_DIR / ADAPTER_WEIGHTS))
    assert len(omni) == len(diffusers_tensors)
    inverse = {}
    for key in diffusers_tensors:
        module, _, tail = key.removeprefix("transformer.").partition(".lora_")
        inverse[f"base_model.model.{omni_module_name(module)}.lora_{tail}"] = key
    assert set(omni) == set(inverse)
    for key, value in omni.items():
        assert re.search(r"\.lora_[AB]\.weight$", key) and ".default." not in key
        assert torch.equal(value, diffusers_tensors[inverse[key]])
    config = json.loads((adapter / VLLM_OMNI_DIR / ADAPTER_CONFIG).read_text())
    assert {"r", "lora_alpha", "target_modules"} <= config.keys()
    pattern = config["target_modules"]  # vLLM-Omni: re.search against "transformer.<module path>"
    assert re.search(pattern, "transformer.gen_layers.0.cross_attention.to_q")
    assert re.search(pattern, "transformer.gen_layers.1.mlp.down_proj")
    assert not re.search(pattern, "transformer.language_model.layers.0.self_attn.to_q")  # gen-only LoRA
    _assert_publishable(adapter, tmp_path, tiny_dir)


# ---- reasoner -------------------------------------------------------------------------------------------

def test_vllm_rule_binds_flat_names_and_skips_peft_names():
    assert vllm_lora_module("base_model.model.layers.3.self_attn.to_q.lora_A.weight") == \
        "language_model.model.layers.3.self_attn.q_proj"
    assert vllm_lora_module("layers.0.mlp.gate_proj.lora_B.weight") == "language_model.model.layers.0.mlp.gate_proj"
    # a standard PEFT name maps to a module vLLM's Cosmos 3 class does not have (silently skipped there)
    assert not vllm_lora_module("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight") \
        .startswith("language_model.model.layers.")
    with pytest.raises(ValueError):
        vllm_lora_module("base_model.model.layers.0.self_attn.add_q_proj.lora_A.weight")


def test_reasoner_adapters_load_in_peft_and_bind_in_vllm(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import Cosmos3OmniForConditionalGeneration

    run = _run(tiny_dir, tmp_path / "run", "reasoner_caption.yaml", "train.lr=1e-2")
    export_reasoner_run(run, tmp_path / "merged")
    info = export_reasoner_run(run, tmp_path / "lora", lora_only=True)
    adapter = tmp_path / "lora"
    assert info["verification_max_relative_difference"] < 1e-4

    # PEFT onto transformers' model == the merged export
    ids = torch.arange(3, 40)[None]
    merged = Cosmos3OmniForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    base = Cosmos3OmniForConditionalGeneration.from_pretrained(str(tiny_dir)).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4)
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)

    # vLLM: every tensor binds to the language model module PEFT put it on, same values
    peft_tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    vllm_tensors = load_file(str(adapter / VLLM_DIR / ADAPTER_WEIGHTS))
    assert len(vllm_tensors) == len(peft_tensors)
    for key, value in vllm_tensors.items():
        module = vllm_lora_module(key)  # raises where vLLM would reject the adapter
        assert module.startswith("language_model.model.layers."), key
        hf_module = "model.language_model." + module[len("language_model.model."):]
        peft_key = f"base_model.model.{hf_module}.{key.rsplit('.', 2)[-2]}.weight"
        assert torch.equal(value, peft_tensors[peft_key]), key
    config = json.loads((adapter / VLLM_DIR / ADAPTER_CONFIG).read_text())
    peft_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert {"r", "lora_alpha", "target_modules"} <= config.keys()
    assert (config["r"], config["lora_alpha"]) == (peft_config["r"], peft_config["lora_alpha"])  # same scaling
    _assert_publishable(adapter, tmp_path, tiny_dir)


def test_reasoner_full_finetune_with_vision_exports_one_model(tiny_dir, tmp_path):
    run = _run(tiny_dir, tmp_path / "run", "reasoner_caption.yaml", "train.method=full", "reasoner.language=full",
               "reasoner.vision=full", "reasoner.merger=full", "train.lr=1e-3")
    out = tmp_path / "export"
    info = export_reasoner_run(run, out)
    assert info["verification_max_relative_difference"] < 1e-4
    assert info["tensors_replaced"]["vision_encoder"] > 0 and info["tensors_replaced"]["transformer"] > 0
    _assert_one_language_model(out)
    _assert_servable(out)
    for sub, key in (("transformer", "layers.1.mlp.down_proj.weight"), ("transformer", "embed_tokens.weight"),
                     ("vision_encoder", "blocks.0.attn.qkv.weight"), ("vision_encoder", "merger.linear_fc2.weight")):
        assert not torch.equal(_stored(out, sub, key), _stored(tiny_dir, sub, key)), key
    for key in component_weight_map(tiny_dir / "transformer"):
        if is_generator_key(key):
            assert torch.equal(_stored(out, "transformer", key), _stored(tiny_dir, "transformer", key)), key
    with pytest.raises(UserError, match="only LoRA"):
        export_reasoner_run(run, tmp_path / "adapter", lora_only=True)
    _assert_publishable(out, tmp_path, tiny_dir)
