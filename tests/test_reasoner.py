"""Reasoner post-training: conversations -> masked next-token loss on the tiny Cosmos 3 (Qwen3-VL) reasoner,
padding-free packing, trainable selection, export (transformers dir and unified checkpoint), chat."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cosmos_train.config import schema as S
from cosmos_train.data.conversations import (
    IGNORE_INDEX,
    ConversationDataset,
    encode_conversation,
    frame_timestamps,
    parse_conversation,
    read_conversations,
)
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "reasoner"
SAMPLES = REPO / "data" / "samples"
RECIPES = REPO / "recipes" / "tiny"


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reasoner(tiny_dir):
    from cosmos_train.models.reasoner import Cosmos3Reasoner

    return Cosmos3Reasoner.from_pretrained(str(tiny_dir), dtype="float32")


@pytest.fixture(autouse=True)
def _reasoner_objective_available(monkeypatch):
    # the lead flips AVAILABLE_OBJECTIVES when the trainer is wired; recipes validate against it
    monkeypatch.setattr(S, "AVAILABLE_OBJECTIVES", ("generator", "reasoner"))


def _recipe(name: str, tiny_dir: Path, tmp_path: Path, *overrides: str):
    from cosmos_train.config import load_recipe
    from cosmos_train.objectives.reasoner import validate_reasoner_recipe

    cfg = load_recipe(RECIPES / name, [f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}",
                                       *overrides])
    validate_reasoner_recipe(cfg)
    return cfg


def _cfg(**kw) -> S.ReasonerConfig:
    cfg = S.ReasonerConfig(**kw)
    cfg.media.image_max_pixels = 16384
    cfg.media.video_max_pixels = 32768
    cfg.media.video_fps = 4
    return cfg


def _record(obj: dict, line: int = 1):
    return parse_conversation(obj, DATA, f"test.jsonl:{line}")


def _encode(reasoner, obj, cfg=None, **kw):
    return encode_conversation(_record(obj), reasoner.tokenizer, reasoner.image_processor, reasoner.video,
                               cfg or _cfg(), **kw)


def _decode_labels(reasoner, enc) -> str:
    return reasoner.tokenizer.decode(enc.labels[enc.labels != IGNORE_INDEX])


IMAGE = "../samples/images/red_circle_still.png"
VIDEO = "../samples/clips/red_circle.mp4"
MULTI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Shape?"}]},
    {"role": "assistant", "content": "A circle."},
    {"role": "user", "content": "Color?"},
    {"role": "assistant", "content": "Red."},
]}


# ----------------------------------------------------------------------------------------------
# data: forms, loss mask, media
# ----------------------------------------------------------------------------------------------


def test_sharegpt_converts_to_the_same_conversation():
    openai = _record({"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A circle."}]})
    sharegpt = _record({"system": "S", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}],
        "images": [IMAGE]})
    assert openai.messages == sharegpt.messages
    assert openai.media[0]["path"] == (SAMPLES / "images" / "red_circle_still.png").resolve()


def test_loss_mask_covers_assistant_tokens_only(reasoner):
    enc = _encode(reasoner, MULTI)
    tok = reasoner.tokenizer
    assert _decode_labels(reasoner, enc) == "A circle.<|im_end|>Red.<|im_end|>"
    # every trained token is inside an assistant turn: the tokens before each trained run end "assistant\n"
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    trained = [i for i, lbl in enumerate(labels) if lbl != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    starts = [i for i in trained if labels[i - 1] == IGNORE_INDEX]
    assert len(starts) == 2
    for s in starts:
        assert tok.decode(ids[:s]).endswith("<|im_start|>assistant\n")
    # system, user, image placeholders and the template's newlines are not trained
    assert reasoner.image_token_id in ids and all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids)
                                                  if t == reasoner.image_token_id)
    last = _encode(reasoner, MULTI, _cfg(loss_on="last_turn"))
    assert _decode_labels(reasoner, last) == "Red.<|im_end|>"
    assert torch.equal(last.input_ids, enc.input_ids)


def test_tokens_match_the_chat_template_rendering(reasoner):
    """Segment-wise tokenization equals tokenizing the whole (expanded) chat-template text at once."""
    enc = _encode(reasoner, MULTI)
    n = int((enc.input_ids == reasoner.image_token_id).sum())
    text = enc.text.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert reasoner.tokenizer(text, add_special_tokens=False)["input_ids"] == enc.input_ids.tolist()
    assert enc.image_grid_thw.tolist() == [[1, 8, 8]]  # 128x128 budget, patch 16
    assert n == 8 * 8 // 4 and enc.pixel_values.shape == (64, 3 * 2 * 16 * 16)


def test_reasoning_format(reasoner):
    obj = {"messages": [{"role": "user", "content": "Is it plausible?"},
                        {"role": "assistant", "content": "Yes", "reasoning_content": "It bounces."}]}
    cfg = _cfg(reasoning=True)
    enc = _encode(reasoner, obj, cfg)
    assert _decode_labels(reasoner, enc) == "<think>\nIt bounces.\n</think>\n\nYes<|im_end|>"
    assert "Is it plausible?" + S.REASONING_PROMPT in enc.text
    with pytest.raises(BadSampleError, match="test.jsonl:1") as err:
        _encode(reasoner, {"messages": obj["messages"][:1] + [{"role": "assistant", "content": "Yes"}]}, cfg)
    assert err.value.reason == "no_reasoning"


def test_templates_that_rewrite_history_still_mask_correctly(reasoner):
    """A Qwen3-thinking-style template drops <think> blocks from earlier assistant turns: the last turn's span is
    found by search; training earlier (rewritten) turns is refused."""
    import copy

    tok = copy.deepcopy(reasoner.tokenizer)
    tok.chat_template = (
        "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in message['content'] -%}"
        "{{- message['content'].split('</think>')[-1].lstrip('\\n') -}}"
        "{%- else -%}{{- message['content'] -}}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    obj = {"messages": [{"role": "user", "content": "A?"},
                        {"role": "assistant", "content": "<think>\nx\n</think>\n\nOne."},
                        {"role": "user", "content": "B?"},
                        {"role": "assistant", "content": "<think>\ny\n</think>\n\nTwo."}]}
    enc = encode_conversation(_record(obj), tok, reasoner.image_processor, reasoner.video, _cfg(loss_on="last_turn"))
    assert tok.decode(enc.labels[enc.labels != IGNORE_INDEX]) == "<think>\ny\n</think>\n\nTwo.<|im_end|>"
    assert "One." in enc.text and "<think>\nx" not in enc.text
    with pytest.raises(UserError, match="cannot locate an assistant turn"):
        encode_conversation(_record(obj), tok, reasoner.image_processor, reasoner.video, _cfg())


def test_video_frames_and_timestamps(reasoner):
    obj = {"messages": [{"role": "user", "content": [{"type": "video", "video": VIDEO, "fps": 8},
                                                     {"type": "text", "text": "When?"}]},
                        {"role": "assistant", "content": "At 0.7 seconds."}]}
    enc = _encode(reasoner, obj)
    # 33 frames at 24 fps sampled at 8 fps: int(33 / 24 * 8) = 11 frames, evenly spaced, padded to 12
    t, h, w = enc.video_grid_thw[0].tolist()
    assert t == 6
    from cosmos_train.data.conversations import video_frame_indices

    indices = video_frame_indices(33, 24.0, fps=8, num_frames=None, min_frames=4, max_frames=768)
    assert len(indices) == 11 and indices[0] == 0 and indices[-1] == 32
    stamps = frame_timestamps(indices, 24.0, 2)
    assert len(stamps) == 6 and stamps[-1] == pytest.approx(32 / 24)
    prompt = reasoner.tokenizer.decode(enc.input_ids)
    for s in stamps:
        assert f"<{s:.1f} seconds><|vision_start|>" in prompt
    assert int((enc.input_ids == reasoner.video_token_id).sum()) == t * h * w // 4
    assert enc.pixel_values_videos.shape[0] == t * h * w


def test_video_patches_match_qwen3vl_video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from cosmos_train.data.conversations import patchify_video

    x = torch.randn(5, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    mine, grid = patchify_video(x.numpy(), 2, 16, 2)
    ref, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, x[None], patch_size=16, merge_size=2,
                                                     temporal_patch_size=2)
    assert grid == (gt, gh, gw) == (3, 4, 6)
    assert torch.equal(torch.from_numpy(mine), ref[0])


def test_frame_sampling_and_timestamps_match_qwen3vl():
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    from cosmos_train.data.conversations import video_frame_indices

    stub = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    for total, src, fps, n in [(33, 24.0, 2, None), (33, 24.0, 8, None), (300, 30.0, 2, None), (7, 24.0, 2, None),
                               (33, 24.0, None, 6)]:
        ref = _qwen3vl_sample_frames(stub, VideoMetadata(total_num_frames=total, fps=src), fps, n)
        mine = video_frame_indices(total, src, fps=fps, num_frames=n, min_frames=4, max_frames=768)
        assert mine == ref, (total, src, fps, n)
        assert frame_timestamps(mine, src, 2) == Qwen3VLProcessor._calculate_timestamps(None, list(mine), src, 2)


def _qwen3vl_sample_frames(stub, metadata, fps, num_frames):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    kwargs = {"num_frames": num_frames} if num_frames else {"fps": fps}
    return Qwen3VLVideoProcessor.sample_frames(stub, metadata, **kwargs).tolist()


def test_encode_positions_are_transformers_rope_index(reasoner):
    from cosmos_train.objectives.reasoner import ReasonerObjective

    obj = ReasonerObjective(reasoner, _cfg())
    enc = _encode(reasoner, MULTI)
    item = obj.encode(enc)
    mm = item.mm_token_type_ids
    assert set(mm.tolist()) == {0, 1} and int((mm == 1).sum()) == int((enc.input_ids == reasoner.image_token_id).sum())
    ref, _ = reasoner.model.model.get_rope_index(enc.input_ids[None], mm[None], image_grid_thw=enc.image_grid_thw)
    assert item.position_ids.shape == (4, item.length)
    assert torch.equal(item.position_ids[1:], ref[:, 0])
    assert torch.equal(item.position_ids[0], torch.arange(item.length))
    # an image block: t constant, h / w = start + row / col (4x4 merged grid)
    block = (mm == 1).nonzero()[:, 0]
    t, h, w = item.position_ids[1:, block]
    start = int(t[0])
    assert (t == start).all() and h.tolist() == [start + i // 4 for i in range(16)]
    assert w.tolist() == [start + i % 4 for i in range(16)]


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------


def _mixed_items(reasoner, cfg=None):
    from cosmos_train.objectives.reasoner import ReasonerObjective

    cfg = cfg or _cfg()
    objective = ReasonerObjective(reasoner, cfg)
    objs = [
        MULTI,
        {"messages": [{"role": "user", "content": [{"type": "video", "video": VIDEO},
                                                   {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": "A red circle moves to the right."}]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "../samples/images/sun_over_field.png"},
                                                   {"type": "video", "video": "../samples/clips/green_square.mp4"},
                                                   {"type": "text", "text": "Compare."}]},
                      {"role": "assistant", "content": "A sun; a moving square."}]},
    ]
    return objective, [objective.encode(_encode(reasoner, o, cfg)) for o in objs]


def test_packed_logits_equal_per_sample_logits(reasoner):
    objective, items = _mixed_items(reasoner)
    packed = objective.logits(items, packed=True)
    single = objective.logits(items, packed=False)
    for a, b, it in zip(packed, single, items):
        assert a.shape == (it.length, reasoner.model.config.text_config.vocab_size)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # negative control (the facts file): with 3-row position ids the packed samples attend to each other
    from cosmos_train.objectives.reasoner import pack_items

    p = pack_items(items)
    p["inputs"]["position_ids"] = p["inputs"]["position_ids"][1:]
    with torch.no_grad():
        leaked = reasoner.model(**p["inputs"]).logits[0]
    second = slice(items[0].length, items[0].length + items[1].length)
    assert (leaked[second] - single[1]).abs().max() > 1e-3


def test_packed_loss_equals_unpacked_loss_and_budget_splits(reasoner):
    objective, items = _mixed_items(reasoner)
    packed, info = objective.loss(items, packed=True)
    unpacked, info_u = objective.loss(items, packed=False)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)
    assert info.num_forwards == 1 and info_u.num_forwards == 4
    assert info.num_target_tokens == sum(it.num_targets for it in items)
    assert info.modes == {"image": 1, "video": 1, "text": 1, "image+video": 1}
    objective.max_pack_tokens = max(it.length for it in items)
    split, info_s = objective.loss(items, packed=True)
    assert info_s.num_forwards > 1
    torch.testing.assert_close(split, unpacked, atol=1e-5, rtol=1e-5)
    # the loss is next-token cross-entropy over assistant targets, as transformers computes it
    it = items[2]
    out = reasoner.model(input_ids=it.input_ids[None], labels=it.labels[None])
    single, _ = objective.loss([it], packed=False)
    torch.testing.assert_close(single, out.loss, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# truncation and bad input
# ----------------------------------------------------------------------------------------------


def test_truncation_never_cuts_into_an_image(reasoner, caplog):
    obj = {"messages": [{"role": "user", "content": "Look."}, {"role": "assistant", "content": "OK."},
                        {"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                     {"type": "text", "text": "And this?"}]},
                        {"role": "assistant", "content": "A red circle."}]}
    full = _encode(reasoner, obj)
    start = int((full.input_ids == reasoner.image_token_id).nonzero()[0]) - 1  # <|vision_start|>
    limit = start + 5  # inside the image block
    with pytest.raises(BadSampleError, match="longer than reasoner.max_seq_len") as err:
        _encode(reasoner, obj, _cfg(max_seq_len=limit))
    assert err.value.reason == "too_long"
    with caplog.at_level(logging.WARNING):
        cut = _encode(reasoner, obj, _cfg(max_seq_len=limit, truncate=True))
    assert "would cut an image/video block" in caplog.text
    assert cut.input_ids.shape[0] == start and cut.truncated
    assert cut.pixel_values is None and cut.image_grid_thw is None  # the image went with its block
    assert _decode_labels(reasoner, cut) == "OK.<|im_end|>"
    with pytest.raises(BadSampleError) as err:  # nothing left to train on
        _encode(reasoner, obj, _cfg(max_seq_len=5, truncate=True))
    assert err.value.reason == "too_long"


def test_bad_inputs_name_file_line_and_reason(tmp_path, reasoner):
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 50)
    (tmp_path / "ok.png").write_bytes((SAMPLES / "images" / "red_circle_still.png").read_bytes())
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [
        json.dumps(ok),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                                 {"role": "assistant", "content": "?"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"conversations": [{"from": "alien", "value": "Hi"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "video": "broken.mp4"}]},
                                 {"role": "assistant", "content": "?"}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"},
                                                              {"type": "text", "text": "x" * 200}]},
                                 {"role": "assistant", "content": "long"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "<image> two? <image>"},
                                      {"from": "gpt", "value": "x"}], "images": ["ok.png"]}),
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=rf"conv.jsonl:2: not valid JSON"):
        read_conversations(path)
    counter = SkipCounter()
    records = read_conversations(path, skip_bad=True, counter=counter)
    assert counter.by_reason == {"bad_json": 1, "no_assistant": 1, "missing_file": 1, "bad_role": 2,
                                 "bad_format": 1}
    assert {src.split(":")[-1] for src, _ in counter.examples["bad_role"]} == {"5", "6"}
    assert [r.source.split(":")[-1] for r in records] == ["1", "7", "8"]
    dataset = ConversationDataset(records, reasoner.tokenizer, reasoner.image_processor, reasoner.video,
                                  _cfg(max_seq_len=64))
    assert dataset.load(0)["labels"].ne(IGNORE_INDEX).any()
    with pytest.raises(BadSampleError, match=r"conv.jsonl:7: .*broken.mp4: cannot decode video") as err:
        dataset.load(1)
    assert err.value.reason == "undecodable"
    with pytest.raises(BadSampleError, match=r"conv.jsonl:8: conversation is \d+ tokens") as err:
        dataset.load(2)
    assert err.value.reason == "too_long"


# ----------------------------------------------------------------------------------------------
# trainable selection
# ----------------------------------------------------------------------------------------------


def test_model_source_errors(tmp_path):
    from cosmos_train.models.reasoner import Cosmos3Reasoner

    with pytest.raises(UserError, match="checkpoint directory not found"):
        Cosmos3Reasoner.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no config.json"):
        Cosmos3Reasoner.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="model_type 'llama'"):
        Cosmos3Reasoner.from_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="could not load the Cosmos 3 reasoner from 'nvidia/no-such-model'"):
        Cosmos3Reasoner.from_pretrained("nvidia/no-such-model", local_files_only=True)
    with pytest.raises(UserError, match="neither a local directory nor a hub id"):
        Cosmos3Reasoner.from_pretrained("not-a-hub-id")


def _fresh(tiny_dir):
    from cosmos_train.models.reasoner import Cosmos3Reasoner

    return Cosmos3Reasoner.from_pretrained(str(tiny_dir), dtype="float32")


def test_lora_trains_only_adapters(tiny_dir, tmp_path):
    from cosmos_train.models.reasoner import setup_reasoner_trainable
    from cosmos_train.objectives.reasoner import ReasonerObjective

    cfg = _recipe("reasoner_caption.yaml", tiny_dir, tmp_path)
    r = _fresh(tiny_dir)
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    groups = setup_reasoner_trainable(r.model, cfg)
    assert [g["name"] for g in groups] == ["language"] and groups[0]["lr"] == cfg.train.lr
    trainable = [n for n, p in r.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith("model.language_model.layers.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(S.REASONER_LANGUAGE_LORA_TARGETS)
    assert all(p.dtype == torch.float32 for p in r.model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    objective = ReasonerObjective(r, cfg.reasoner)
    item = objective.encode(_encode(r, MULTI, cfg.reasoner))
    loss, _ = objective.loss([item])
    loss.backward()
    opt.step()
    after = r.model.state_dict()
    for key, value in before.items():  # base weights (incl. LoRA-wrapped ones) are untouched
        match = after[key] if key in after else after[_base_layer_key(key)]
        assert torch.equal(value, match), key
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in after if ".lora_B." in n)


def _base_layer_key(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def test_vision_lora_full_merger_and_learning_rates(tiny_dir, tmp_path):
    from cosmos_train.models.reasoner import setup_reasoner_trainable

    cfg = _recipe("reasoner_grounding.yaml", tiny_dir, tmp_path)
    r = _fresh(tiny_dir)
    groups = {g["name"]: g for g in setup_reasoner_trainable(r.model, cfg)}
    assert groups["language"]["lr"] == 2e-3 and groups["vision"]["lr"] == 1e-3 and groups["merger"]["lr"] == 5e-4
    names = {n for n, p in r.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.visual.blocks.0.attn.qkv.lora_A") for n in names)
    assert "model.visual.merger.linear_fc1.weight" in names
    assert "model.visual.deepstack_merger_list.0.linear_fc2.weight" in names
    assert not any(n.startswith("model.visual.patch_embed") or n.startswith("model.visual.pos_embed") for n in names)
    assert not any(n.startswith("lm_head") or "embed_tokens" in n for n in names)


def test_full_language_and_bad_selections(tiny_dir, tmp_path):
    from cosmos_train.models.reasoner import setup_reasoner_trainable

    cfg = _recipe("reasoner_multiturn.yaml", tiny_dir, tmp_path)
    r = _fresh(tiny_dir)
    groups = setup_reasoner_trainable(r.model, cfg)
    names = {n for n, p in r.model.named_parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["language"]
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names
    assert not any(n.startswith("model.visual.") for n in names) and not any("lora_" in n for n in names)
    cfg.reasoner.language = "frozen"
    with pytest.raises(UserError, match="no trainable parameters"):
        setup_reasoner_trainable(_fresh(tiny_dir).model, cfg)
    cfg.reasoner.language = "lora"
    cfg.reasoner.language_lora_targets = ["to_q"]
    with pytest.raises(UserError, match="language_lora_targets: no module named 'to_q'"):
        setup_reasoner_trainable(_fresh(tiny_dir).model, cfg)


# ----------------------------------------------------------------------------------------------
# training + export round trips
# ----------------------------------------------------------------------------------------------


def _mini_train(cfg, steps: int, batch: int | None = None):
    """A short in-process training run (what the trainer does), checkpointed like the trainer checkpoints."""
    from cosmos_train.config import save_recipe
    from cosmos_train.data.conversations import build_conversation_dataset
    from cosmos_train.models.reasoner import (
        load_reasoner,
        reasoner_trainable_state_dict,
        setup_reasoner_trainable,
    )
    from cosmos_train.objectives.reasoner import ReasonerObjective
    from cosmos_train.trainer import checkpoint as ckpt
    from cosmos_train.trainer.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    dataset = build_conversation_dataset(cfg)
    model = load_reasoner(cfg)
    groups = setup_reasoner_trainable(model.model, cfg)
    optimizer, scheduler = build_optimizer(groups, cfg.train)
    objective = ReasonerObjective(model, cfg.reasoner, max_pack_tokens=cfg.train.packing.max_tokens)
    items = [objective.draw(objective.encode(dataset[i])) for i in range(len(dataset))]
    batch = batch or len(items)
    model.model.train()
    losses = []
    for step in range(steps):
        chunk = [items[(step * batch + k) % len(items)] for k in range(batch)]
        loss, _ = objective.loss(chunk)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, run_dir / "recipe.yaml")
    ckpt.save_checkpoint(run_dir, steps, reasoner_trainable_state_dict(model.model),
                         extra_state={"samples_consumed": [steps * batch], "method": cfg.train.method},
                         torch_state={"optimizer": optimizer.state_dict()}, keep=1)
    model.model.eval()
    return model, run_dir, losses, items


def test_loss_falls_and_export_round_trips(tiny_dir, tmp_path):
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.export.reasoner import export_reasoner_run
    from cosmos_train.objectives.reasoner import ReasonerObjective

    cfg = _recipe("reasoner_caption.yaml", tiny_dir, tmp_path, "train.max_steps=10", "train.warmup_steps=2",
                  "train.lr=5e-3")
    model, run_dir, losses, items = _mini_train(cfg, steps=10, batch=9)
    assert losses[-1] < 0.85 * losses[0], losses

    out = tmp_path / "export"
    info = export_reasoner_run(run_dir, out, form="transformers")
    assert info["lora_layers_merged"] == 2 * 7 and info["verification_max_relative_difference"] < 1e-4
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json", "README.md"):
        assert (out / name).is_file(), name
    exported = Cosmos3OmniForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in k for k in exported.state_dict())
    from cosmos_train.models.reasoner import Cosmos3Reasoner

    again = Cosmos3Reasoner.from_pretrained(str(out), dtype="float32")
    assert again.tokenizer.chat_template == model.tokenizer.chat_template
    reference = ReasonerObjective(model, cfg.reasoner).logits(items[:3], packed=True)
    reloaded = ReasonerObjective(again, cfg.reasoner).logits(items[:3], packed=True)
    for a, b in zip(reference, reloaded):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="not empty"):
        export_reasoner_run(run_dir, out, form="transformers")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp dir left behind


def _stored(root, sub, key):
    from cosmos_train.models.layout import component_weight_map
    from safetensors import safe_open

    with safe_open(str(root / sub / component_weight_map(root / sub)[key]), framework="pt") as fh:
        return fh.get_tensor(key)


def test_release_export_loads_in_both_libraries_with_one_language_model(tiny_dir, tmp_path):
    """Default reasoner export: the released layout, finetuned language weights in transformer/, the fully
    trained merger in vision_encoder/, generation pathway bit-identical; diffusers and transformers agree."""
    from diffusers import Cosmos3OmniPipeline
    from transformers import Cosmos3OmniForConditionalGeneration

    from cosmos_train.export.reasoner import export_reasoner_run
    from cosmos_train.models.layout import component_weight_map, layout_problems
    from cosmos_train.models.reasoner import hf_key_to_unified, is_generator_key

    cfg = _recipe("reasoner_grounding.yaml", tiny_dir, tmp_path, "train.max_steps=3")
    model, run_dir, _, _ = _mini_train(cfg, steps=3)
    out = tmp_path / "release"
    info = export_reasoner_run(run_dir, out)
    assert info["transformer_check"]["replaced"] == 2 * 7 and info["transformer_check"]["untouched"] > 0
    assert layout_problems(out) == [] and not list(out.glob("*.safetensors"))
    assert set(component_weight_map(out / "transformer").values()) == set(
        component_weight_map(tiny_dir / "transformer").values())  # same shard files, each written once

    pipe = Cosmos3OmniPipeline.from_pretrained(str(out))
    diffusers_sd = pipe.transformer.state_dict()
    hf = Cosmos3OmniForConditionalGeneration.from_pretrained(out)
    hf_sd = hf.state_dict()
    changed = 0
    for key, value in hf_sd.items():
        ukey = hf_key_to_unified(key)
        if ukey in diffusers_sd:  # the shared und pathway: the same finetuned values in both libraries
            assert torch.equal(diffusers_sd[ukey], value), key
            changed += int(not torch.equal(_stored(tiny_dir, "transformer", ukey), value))
    assert changed == 2 * 7  # the LoRA-merged q/k/v/o/gate/up/down of both layers
    for key in component_weight_map(tiny_dir / "transformer"):
        if is_generator_key(key):  # generation pathway untouched, bit for bit
            assert torch.equal(diffusers_sd[key], _stored(tiny_dir, "transformer", key)), key
    merger = _stored(out, "vision_encoder", "merger.linear_fc1.weight")
    assert not torch.equal(merger, _stored(tiny_dir, "vision_encoder", "merger.linear_fc1.weight"))
    assert torch.equal(hf_sd["model.visual.merger.linear_fc1.weight"], merger)  # the trained merger is what loads
    video = pipe(prompt="A red circle.", num_frames=1, height=64, width=64, num_inference_steps=1,
                 output_type="np", generator=torch.Generator().manual_seed(0)).video
    assert video.shape == (1, 64, 64, 3)
    card = (out / "README.md").read_text()
    assert "vllm serve" in card and str(tmp_path) not in card and str(tiny_dir) not in card


def test_trainer_data_path_packs_and_skips(tiny_dir, tmp_path):
    """What the trainer does with a reasoner recipe: build_conversation_data -> MarkBadSamples -> DataLoader ->
    MicroBatcher (token-budget packs through objective.token_count) -> objective.loss(pack, packed=True)."""
    from cosmos_train.data import MarkBadSamples
    from cosmos_train.data.conversations import build_conversation_data
    from cosmos_train.objectives.reasoner import ReasonerObjective
    from cosmos_train.trainer.batching import MicroBatcher

    lines = (DATA / "multiturn.jsonl").read_text().splitlines()
    bad = json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "video": "broken.mp4"}]},
                                   {"role": "assistant", "content": "?"}]})
    (tmp_path / "broken.mp4").write_bytes(b"garbage" * 100)
    manifest = tmp_path / "conv.jsonl"
    manifest.write_text("\n".join([line.replace("../samples/", str(SAMPLES) + "/") for line in lines]
                                  + [bad, "{oops"]) + "\n")
    cfg = _recipe("reasoner_multiturn.yaml", tiny_dir, tmp_path, f"data.manifest={manifest}",
                  "data.skip_bad_samples=true", "train.packing.max_tokens=600")
    skips = SkipCounter()
    data = build_conversation_data(cfg, skips)
    assert skips.by_reason == {"bad_json": 1} and len(data.dataset) == 5
    assert "5 conversations" in data.info.summary() and data.info.to_json()["kinds"] == {"image": 2, "video": 3}
    reasoner = _fresh(tiny_dir)
    objective = ReasonerObjective(reasoner, cfg.reasoner, max_pack_tokens=cfg.train.packing.max_tokens)
    loader = torch.utils.data.DataLoader(MarkBadSamples(data.dataset, True), sampler=data.sampler, batch_size=None)
    reachable = {r.source for r in data.dataset.records}
    batcher = MicroBatcher(iter(loader), objective.encode, objective, cfg, skips, reachable)
    for _ in range(2):
        pack = batcher.next()
        assert 1 <= len(pack) and sum(objective.token_count(it) for it in pack) <= 600
        loss, info = objective.loss(pack, packed=True)
        assert torch.isfinite(loss) and info.num_forwards == 1
    assert skips.by_reason.get("undecodable") == 1  # the broken video, counted once


# ----------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------


def test_chat_defaults_and_presence_penalty(reasoner, tiny_dir):
    from cosmos_train.chat import PresencePenaltyLogitsProcessor, chat, sampling_defaults, split_reasoning

    s = sampling_defaults(False)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.presence_penalty) == (0.7, 0.8, 20, 1.0, 1.5)
    s = sampling_defaults(True)
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty) == (0.6, 0.95, 20, 0.0)
    proc = PresencePenaltyLogitsProcessor(1.5, prompt_length=2)
    scores = proc(torch.tensor([[5, 6, 7, 7]]), torch.zeros(1, 10))
    assert scores[0].tolist() == [0, 0, 0, 0, 0, 0, 0, -1.5, 0, 0]  # prompt tokens 5, 6 are not penalised

    image = SAMPLES / "images" / "red_circle_still.png"
    a = chat(tiny_dir, "What is this?", images=[image], greedy=True, max_new_tokens=6, reasoner=reasoner)
    b = chat(tiny_dir, "What is this?", images=[image], greedy=True, max_new_tokens=6, reasoner=reasoner)
    assert isinstance(a, str) and a == b
    c = chat(tiny_dir, "What happens?", videos=[SAMPLES / "clips" / "red_circle.mp4"], reasoning=True,
             max_new_tokens=6, reasoner=reasoner, seed=1)
    assert isinstance(c, str)
    assert split_reasoning("<think>\nbecause\n</think>\n\nYes") == ("because", "Yes")
    with pytest.raises(UserError, match="file not found"):
        chat(tiny_dir, "?", images=["nope.png"], reasoner=reasoner)


def test_bundled_examples_encode(reasoner):
    from cosmos_train.objectives.reasoner import ReasonerObjective

    for name in ("caption", "temporal_localization", "grounding_2d", "plausibility", "multiturn"):
        cfg = _cfg(reasoning=name == "plausibility")
        records = read_conversations(DATA / f"{name}.jsonl")
        assert len(records) >= 4, name
        dataset = ConversationDataset(records, reasoner.tokenizer, reasoner.image_processor, reasoner.video, cfg)
        objective = ReasonerObjective(reasoner, cfg)
        for i in range(len(dataset)):
            item = objective.encode(dataset[i])
            assert item.num_targets > 0 and item.length < 512, (name, i)


def test_reasoner_recipe_through_the_cli_train_export_chat(tiny_dir, tmp_path, capsys):
    """As a user runs it: train a tiny reasoner recipe, resume it, export (transformers and released layout), chat."""
    from cosmos_train.cli import main

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "reasoner_caption.yaml")
    run = tmp_path / "run"
    common = [f"model.pretrained={tiny_dir}", f"output_dir={run}", "train.checkpoint_every=2"]
    assert main(["train", recipe, *common, "train.max_steps=2"]) == 0
    assert main(["train", recipe, *common, "train.max_steps=4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert main(["export", str(run), str(tmp_path / "hf"), "--transformers"]) == 0
    assert main(["export", str(run), str(tmp_path / "unified")]) == 0
    assert (tmp_path / "unified" / "model_index.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", str(run), str(tmp_path / "x"), "--lora-only", "--transformers"]) == 2
    capsys.readouterr()
    video = Path(__file__).resolve().parent.parent / "data" / "samples" / "clips" / "red_circle.mp4"
    for exported in ("hf", "unified"):
        assert main(["chat", str(tmp_path / exported), "What moves?", "--video", str(video), "--greedy",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()  # an answer came back
    assert main(["prepare", recipe, *common]) == 2  # the latent cache is a generator thing
