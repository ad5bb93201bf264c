"""Model cards per export form, `generate --lora` refusing what is not a generator adapter, and the reasoner's
source messages (what a new user meets first)."""

import json
import re
from pathlib import Path

import pytest

from cosmos_train.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny"
NO_SYSTEM_PROMPT = {"use_system_prompt": False, "duration_template": True, "resolution_template": True,
                    "template_dropout": 0.0, "uncond_prompt": "pipeline"}


def _run_dir(tmp_path, steps=4):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 1.0 - 0.1 * i}) + "\n"
                                               for i in range(steps)))
    return run


def _card(tmp_path, kind, *, overrides=(), prompt_format=None, steps=4):
    from cosmos_train.config import load_recipe
    from cosmos_train.export.model_card import write_model_card

    recipe = "t2v_lora.yaml" if kind.startswith("generator") else "reasoner_caption.yaml"
    cfg = load_recipe(TINY / recipe, list(overrides))
    out = tmp_path / kind
    out.mkdir(parents=True)
    write_model_card(out, kind=kind, cfg=cfg, recipe={}, run_dir=_run_dir(out, steps),
                     info={"checkpoint": "step-4", "step": 4},
                     prompt_format=prompt_format if kind.startswith("generator") else None)
    return (out / "README.md").read_text()


def _code(card: str) -> str:
    return "\n".join(re.findall(r"```(?:python|bash)\n(.*?)```", card, flags=re.S))


def _replace_line(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("Replace "))


@pytest.mark.parametrize("kind", ["generator-adapter", "generator-merged"])
@pytest.mark.parametrize("system", [False, True])
def test_generator_snippets_pass_the_trained_system_prompt(tmp_path, kind, system):
    card = _card(tmp_path, kind, overrides=[f"generator.use_system_prompt={str(system).lower()}"],
                 prompt_format={**NO_SYSTEM_PROMPT, "use_system_prompt": system})
    calls = [line for line in _code(card).splitlines() if line.startswith("video = pipe(")]
    assert calls and all(f"use_system_prompt={system}" in c and 'negative_prompt=""' in c for c in calls)
    if kind == "generator-adapter":  # vLLM-Omni takes no prompt options: the card says the form to send
        assert f"system prompt {'on' if system else 'off'}" in card.split("### vLLM-Omni")[1]
        assert 'negative prompt ""' in card.split("### vLLM-Omni")[1]


def test_reasoner_cards_load_the_processor_explicitly_and_say_nothing_of_the_generator_prompt(tmp_path):
    import transformers

    assert hasattr(transformers, "Qwen3VLProcessor")
    for kind in ("reasoner-adapter", "reasoner-merged", "reasoner-transformers"):
        card = _card(tmp_path, kind)
        assert "AutoProcessor.from_pretrained" not in _code(card), kind
        assert "Qwen3VLProcessor.from_pretrained(" in _code(card), kind
        assert "default_use_system_prompt" not in card, kind


def test_transformers_form_shows_only_what_loads_it(tmp_path):
    card = _card(tmp_path, "reasoner-transformers")
    code = _code(card)
    assert "diffusers" not in code and "vllm serve" not in code and "--omni" not in code
    assert "Cosmos3OmniForConditionalGeneration.from_pretrained" in code and "cosmos-train chat" in code


def test_adapter_rank_filled_and_every_placeholder_named(tmp_path):
    card = _card(tmp_path, "reasoner-adapter", overrides=["train.lora.rank=8"])
    assert "--max-lora-rank 8 " in card and "RANK" not in card
    for kind in ("generator-adapter", "generator-merged", "reasoner-adapter", "reasoner-merged",
                 "reasoner-transformers"):
        card = _card(tmp_path / "all", kind, prompt_format=NO_SYSTEM_PROMPT) if kind != "reasoner-adapter" else card
        placeholders = set(re.findall(r"\b[A-Z][A-Z_]{3,}\b", _code(card)))
        assert placeholders and all(f"`{p}`" in _replace_line(card) for p in placeholders), (kind, placeholders)


def test_local_base_has_no_front_matter_base_model_and_loss_names_its_window(tmp_path):
    local = tmp_path / "my-base"
    card = _card(tmp_path, "generator-merged", overrides=[f"model.pretrained={local}"],
                 prompt_format=NO_SYSTEM_PROMPT, steps=4)
    front = card.split("---")[1]
    assert "base_model:" not in front and "`local:my-base`" in card and str(tmp_path) not in card
    assert "mean of the last 4 logged steps" in card and "last 20" not in card
    card = _card(tmp_path, "generator-adapter", overrides=["model.pretrained=nvidia/Cosmos3-Nano"],
                 prompt_format=NO_SYSTEM_PROMPT, steps=30)
    assert "base_model: nvidia/Cosmos3-Nano" in card.split("---")[1]
    assert "mean of the last 20 logged steps" in card


@pytest.mark.parametrize("record, match", [
    ({"objective": "reasoner", "form": "lora-only"}, "records a reasoner export"),
    ({"objective": "generator", "lora_only": False}, "merged generator export, not an adapter"),
])
def test_generate_lora_refuses_what_is_not_a_generator_adapter(tiny_dir, tmp_path, record, match):
    from cosmos_train.inference import load_pipeline

    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "cosmos_train_export.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=match) as err:
        load_pipeline(tiny_dir, device="cpu", lora=tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_generate_lora_refuses_an_adapter_that_loads_nothing(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from cosmos_train.inference import load_pipeline

    save_file({"text_encoder.q_proj.lora_A.weight": torch.zeros(4, 8),
               "text_encoder.q_proj.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="none of its LoRA weights matched") as err:
        load_pipeline(tiny_dir, device="cpu", lora=tmp_path)
    assert str(tmp_path) in str(err.value)


def test_check_source_names_what_it_was_given_and_the_missing_root_index(tmp_path):
    from cosmos_train.models.reasoner import check_source

    with pytest.raises(UserError, match=r"^MODEL_DIR: .* has no config\.json") as err:
        check_source(str(tmp_path), what="MODEL_DIR")
    assert "model.pretrained" not in str(err.value)
    (tmp_path / "config.json").write_text('{"model_type": "cosmos3_omni"}')
    with pytest.raises(UserError, match=r"^model\.pretrained: .*no root weights index "
                                        r"\(model\.safetensors\.index\.json\).*released layout"):
        check_source(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    check_source(str(tmp_path))


def test_chat_names_model_dir(tmp_path):
    from cosmos_train.chat import load_chat_model

    with pytest.raises(UserError, match=r"^MODEL_DIR: .* has no config\.json"):
        load_chat_model(tmp_path, device="cpu")
