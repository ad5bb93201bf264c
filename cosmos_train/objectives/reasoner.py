"""The reasoner objective: next-token cross-entropy on assistant tokens, as Qwen3-VL / Cosmos 3 SFT trains.

Same three steps as the generator objective:

1. `encode`: an encoded conversation (`ConversationDataset` sample: token ids, labels, pixel patches, grids)
   -> `ReasonerItem`: adds `mm_token_type_ids` (0 text, 1 image, 2 video) and the 4-row position ids
   (row 0: text positions 0..L-1; rows 1-3: transformers' own `get_rope_index` mRoPE ids).
2. `draw`: identity (SFT has no per-step randomness).
3. `loss`: one forward per conversation, or several conversations packed padding-free into one sequence
   (the trainer's packer builds packs of at most train.packing.max_tokens tokens with `token_count`):
   position ids [4, 1, S] (row 0 restarts at 0 for every conversation, so the causal mask becomes
   block-diagonal; rows 1-3 are each conversation's own mRoPE ids), `attention_mask=None`,
   `use_cache=False`. Logits are computed only where a target exists (`logits_to_keep` mask); the loss is
   the mean over all target tokens of the micro-batch, so packed and unpacked give the same value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cosmos_train.data.conversations import IGNORE_INDEX, EncodedConversation
from cosmos_train.errors import UserError
from cosmos_train.objectives.generator import StepInfo


@dataclass
class ReasonerItem:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, -100 outside trained assistant tokens (not shifted)
    mm_token_type_ids: torch.Tensor  # [L] int: 0 text, 1 image, 2 video
    position_ids: torch.Tensor  # [4, L]: text positions, then mRoPE t / h / w
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    source: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def kind(self) -> str:
        kinds = [k for k, g in (("image", self.image_grid_thw), ("video", self.video_grid_thw)) if g is not None]
        return "+".join(kinds) or "text"

    @property
    def shift_labels(self) -> torch.Tensor:
        """Target of each position: the next token's label; the last position has none."""
        return torch.cat([self.labels[1:], self.labels.new_full((1,), IGNORE_INDEX)])

    @property
    def num_targets(self) -> int:
        return int((self.shift_labels != IGNORE_INDEX).sum())


@dataclass
class ReasonerStepInfo(StepInfo):
    num_tokens: int = 0  # tokens forwarded
    num_target_tokens: int = 0  # tokens the loss is the mean over
    num_forwards: int = 0


def _cat(tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.cat(tensors, dim=0) if tensors else None


def pack_items(items: list[ReasonerItem], device=None) -> dict:
    """Padding-free packing: model inputs of one sequence holding every item, and its shifted labels."""
    input_ids = torch.cat([it.input_ids for it in items])
    position_ids = torch.cat([it.position_ids for it in items], dim=1)[:, None, :]  # [4, 1, S]
    inputs = {
        "input_ids": input_ids[None],
        "position_ids": position_ids,
        "mm_token_type_ids": torch.cat([it.mm_token_type_ids for it in items])[None],
        "pixel_values": _cat([it.pixel_values for it in items]),
        "image_grid_thw": _cat([it.image_grid_thw for it in items]),
        "pixel_values_videos": _cat([it.pixel_values_videos for it in items]),
        "video_grid_thw": _cat([it.video_grid_thw for it in items]),
    }
    if device is not None:
        inputs = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    inputs.update(attention_mask=None, use_cache=False)
    return {"inputs": inputs, "shift_labels": torch.cat([it.shift_labels for it in items])}


class ReasonerObjective:
    def __init__(self, model, cfg, seed: int = 0, max_pack_tokens: int | None = None):
        """`model`: a `Cosmos3Reasoner`; `cfg`: the recipe's ReasonerConfig; `max_pack_tokens`: a packed
        micro-batch longer than this is split into several packed forwards (train.packing.max_tokens)."""
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.max_pack_tokens = max_pack_tokens

    # ---- 1. encode (deterministic, cacheable) -------------------------------------------------
    def encode(self, sample) -> ReasonerItem:
        """`sample`: a `ConversationDataset` item (dict) or an `EncodedConversation`."""
        if isinstance(sample, EncodedConversation):
            sample = sample.as_dict()
        input_ids = sample["input_ids"].long()
        mm = torch.zeros_like(input_ids, dtype=torch.int32)
        mm[input_ids == self.model.image_token_id] = 1
        mm[input_ids == self.model.video_token_id] = 2
        rope = self.model.rope_index(input_ids, mm, sample.get("image_grid_thw"), sample.get("video_grid_thw"))
        text = torch.arange(input_ids.shape[0], dtype=rope.dtype)[None]
        return ReasonerItem(
            input_ids=input_ids, labels=sample["labels"].long(), mm_token_type_ids=mm,
            position_ids=torch.cat([text, rope], dim=0),
            pixel_values=sample.get("pixel_values"), image_grid_thw=sample.get("image_grid_thw"),
            pixel_values_videos=sample.get("pixel_values_videos"), video_grid_thw=sample.get("video_grid_thw"),
            source=sample.get("source", ""),
        )

    # ---- 2. draw (no randomness in SFT) ---------------------------------------------------------
    def draw(self, item: ReasonerItem, key=None) -> ReasonerItem:
        return item

    def token_count(self, item: ReasonerItem) -> int:
        """Tokens the item puts in a packed sequence (what the trainer's packer budgets)."""
        return item.length

    @staticmethod
    def restore_item(state: dict) -> ReasonerItem:
        """A `ReasonerItem` back from `dataclasses.asdict(item)` (packer state in a checkpoint)."""
        return ReasonerItem(**state)

    # ---- 3. loss --------------------------------------------------------------------------------
    def _groups(self, batch: list[ReasonerItem], packed: bool) -> list[list[ReasonerItem]]:
        if not packed:
            return [[it] for it in batch]
        budget = self.max_pack_tokens
        groups: list[list[ReasonerItem]] = [[]]
        used = 0
        for it in batch:
            if budget and groups[-1] and used + it.length > budget:
                groups.append([])
                used = 0
            groups[-1].append(it)
            used += it.length
        return groups

    def _forward(self, group: list[ReasonerItem], keep: torch.Tensor | int):
        device = self.model.device
        packed = pack_items(group, device=device)
        out = self.model.forward(**packed["inputs"], logits_to_keep=keep)
        return out.logits, packed["shift_labels"].to(device)

    def loss(self, batch: list[ReasonerItem], packed: bool = True) -> tuple[torch.Tensor, ReasonerStepInfo]:
        """Mean cross-entropy over every target token of the batch; one padding-free packed forward (split
        above `max_pack_tokens`), or one forward per conversation. Both give the same value."""
        total = torch.zeros((), device=self.model.device)
        num_targets = 0
        groups = self._groups(batch, packed)
        for group in groups:
            shift = torch.cat([it.shift_labels for it in group])
            mask = shift != IGNORE_INDEX
            if not bool(mask.any()):
                continue
            logits, targets = self._forward(group, mask[None].to(self.model.device))
            targets = targets[mask.to(targets.device)]
            total = total + F.cross_entropy(logits.float(), targets, reduction="sum")
            num_targets += int(mask.sum())
        if num_targets == 0:
            raise UserError("reasoner: a micro-batch without any assistant token to train on")
        modes: dict = {}
        for it in batch:
            modes[it.kind] = modes.get(it.kind, 0) + 1
        info = ReasonerStepInfo(modes=modes, sigmas=[], num_samples=len(batch),
                                num_tokens=sum(it.length for it in batch), num_target_tokens=num_targets,
                                num_forwards=len(groups))
        return total / num_targets, info

    @torch.no_grad()
    def logits(self, batch: list[ReasonerItem], packed: bool) -> list[torch.Tensor]:
        """Full logits [L_i, V] of every item (packed into one forward, or one forward each)."""
        out = []
        for group in self._groups(batch, packed):
            logits, _ = self._forward(group, 0)
            logits = logits[0]
            start = 0
            for it in group:
                out.append(logits[start:start + it.length])
                start += it.length
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def validate_reasoner_recipe(cfg, where: str = "recipe") -> None:
    """Range checks for the `reasoner` section (UserError naming the key); call it for reasoner recipes."""
    from cosmos_train.config import schema as S

    r = cfg.reasoner

    def check(ok, key, allowed, value):
        if not ok:
            raise UserError(f"{where}: invalid value for 'reasoner.{key}': {value!r} ({allowed})")

    check(r.loss_on in S.REASONER_LOSS_ON, "loss_on", "all_turns or last_turn", r.loss_on)
    check(r.max_seq_len > 0, "max_seq_len", "must be > 0", r.max_seq_len)
    check(r.language is None or r.language in S.REASONER_TRAINABLE, "language", "lora, full or frozen", r.language)
    check(r.vision in S.REASONER_TRAINABLE, "vision", "lora, full or frozen", r.vision)
    check(r.merger in ("full", "frozen"), "merger", "full or frozen", r.merger)
    for key in ("language_lora_targets", "vision_lora_targets"):
        value = getattr(r, key)
        check(len(value) > 0 and all(isinstance(v, str) and v for v in value), key,
              "a non-empty list of module names", value)
    for key in ("language_lr", "vision_lr", "merger_lr"):
        value = getattr(r, key)
        check(value is None or value > 0, key, "must be > 0", value)
    m = r.media
    for key in ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels", "video_num_frames",
                "video_min_frames", "video_max_frames"):
        value = getattr(m, key)
        check(value is None or value > 0, f"media.{key}", "must be > 0", value)
    check(m.video_fps is None or m.video_fps > 0, "media.video_fps", "must be > 0", m.video_fps)
    check(m.video_fps is None or m.video_num_frames is None, "media.video_num_frames",
          "set media.video_fps or media.video_num_frames, not both", m.video_num_frames)
    for lo, hi in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels"),
                   ("video_min_frames", "video_max_frames")):
        a, b = getattr(m, lo), getattr(m, hi)
        check(a is None or b is None or a <= b, f"media.{lo}", f"must be <= media.{hi} ({b})", a)
    check(r.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
          "attn_implementation", "sdpa, eager, flash_attention_2 or flash_attention_3", r.attn_implementation)
    if r.language is None and cfg.train.method not in ("lora", "full"):
        raise UserError(f"{where}: train.method must be lora or full")
    packing = cfg.train.packing
    if packing.enabled and packing.max_tokens < r.max_seq_len:
        raise UserError(f"{where}: invalid value for 'train.packing.max_tokens': {packing.max_tokens} (must be >= "
                        f"reasoner.max_seq_len {r.max_seq_len}, or conversations that long could never be packed)")
