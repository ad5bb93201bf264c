"""`cosmos-train chat`: ask an exported reasoner (or any Cosmos 3 reasoner checkpoint) about images / videos.

The prompt is built exactly as training builds it (`cosmos_train.data.conversations.encode_conversation`:
chat template, Qwen3-VL image processing, video frames with their timestamps, optional reasoning format).
Sampling follows the documented Cosmos 3 Reasoner defaults:

- without reasoning: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.0, presence_penalty 1.5;
- with reasoning:    temperature 0.6, top_p 0.95, top_k 20, repetition_penalty 1.0, presence_penalty 0.

transformers has no presence penalty; it is applied here as vLLM does (subtract it once from the logit of
every token already generated), before temperature, top-k and top-p, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cosmos_train.errors import UserError


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float


REASONER_SAMPLING = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.0,
                                     presence_penalty=1.5)
REASONER_SAMPLING_WITH_REASONING = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0,
                                                    presence_penalty=0.0)


def sampling_defaults(reasoning: bool) -> SamplingDefaults:
    return REASONER_SAMPLING_WITH_REASONING if reasoning else REASONER_SAMPLING


class PresencePenaltyLogitsProcessor:
    """vLLM's presence penalty: logits of tokens that appear in the generated output are lowered by `penalty`."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning inside <think>...</think> or None, the answer after it)."""
    if "</think>" not in text:
        return None, text.strip()
    head, _, answer = text.partition("</think>")
    return head.replace("<think>", "").strip(), answer.strip()


def _build_record(question: str, images, videos, video_fps: float | None, video_num_frames: int | None):
    from cosmos_train.data.conversations import ConversationRecord

    parts = []
    for path in images:
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--image: file not found: {path}")
        parts.append({"type": "image", "path": path})
    for path in videos:
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--video: file not found: {path}")
        part = {"type": "video", "path": path}
        if video_num_frames:
            part["num_frames"] = video_num_frames
        elif video_fps:
            part["fps"] = video_fps
        parts.append(part)
    parts.append({"type": "text", "text": question})
    return ConversationRecord(messages=({"role": "user", "content": tuple(parts)},), source="chat")


def load_chat_model(model_dir: str | Path, *, device: str | None = None, dtype: str | None = None):
    from cosmos_train.models.reasoner import Cosmos3Reasoner, check_source, resolve_reasoner_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    source = resolve_reasoner_pretrained(str(model_dir))
    check_source(source, what="MODEL_DIR")  # named as on the command line, not as the recipe key
    reasoner = Cosmos3Reasoner.from_pretrained(source, dtype=dtype)
    return reasoner.to(device)


@torch.no_grad()
def chat(model_dir, question: str, images=(), videos=(), *, reasoning: bool = False, greedy: bool = False,
         max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
         top_k: int | None = None, presence_penalty: float | None = None, system_prompt: str | None = None,
         video_fps: float | None = None, video_num_frames: int | None = None, seed: int = 0,
         device: str | None = None, dtype: str | None = None, reasoner=None) -> str:
    """Answer `question` about `images` / `videos` with the reasoner in `model_dir` (an export directory, the
    unified checkpoint, a hub id or `tiny`); returns the generated text (special tokens removed).

    `greedy=True`: argmax decoding; otherwise sampling with the documented defaults (`reasoning` picks the
    reasoning set), each overridable. `reasoner`: an already loaded `Cosmos3Reasoner` (then `model_dir` is
    only used for messages).
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from cosmos_train.config.schema import ReasonerConfig
    from cosmos_train.data.conversations import encode_conversation

    if not question.strip():
        raise UserError("chat: the question is empty")
    reasoner = reasoner or load_chat_model(model_dir, device=device, dtype=dtype)
    cfg = ReasonerConfig(reasoning=reasoning, system_prompt=system_prompt, max_seq_len=10**9)
    record = _build_record(question, images, videos, video_fps, video_num_frames)
    enc = encode_conversation(record, reasoner.tokenizer, reasoner.image_processor, reasoner.video, cfg,
                              add_generation_prompt=True, for_training=False)
    device = reasoner.device
    input_ids = enc.input_ids[None].to(device)
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == reasoner.image_token_id] = 1
    mm[input_ids == reasoner.video_token_id] = 2
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": mm}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        value = getattr(enc, key)
        if value is not None:
            inputs[key] = value.to(device)

    tok = reasoner.tokenizer
    eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                       tok.convert_tokens_to_ids("<|endoftext|>")} if isinstance(i, int) and i >= 0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gen = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    if greedy:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        processors = LogitsProcessorList()
    else:
        s = sampling_defaults(reasoning)
        s = replace(s, **{k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                                             ("presence_penalty", presence_penalty)) if v is not None})
        # penalties -> temperature -> top-k -> top-p, as vLLM applies them; generate's own warpers stay off
        processors = LogitsProcessorList([PresencePenaltyLogitsProcessor(s.presence_penalty, input_ids.shape[1]),
                                          TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(s.top_k),
                                          TopPLogitsWarper(s.top_p)])
        gen.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=s.repetition_penalty)
        torch.manual_seed(seed)
    out = reasoner.model.generate(**inputs, **gen, logits_processor=processors)
    return tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
