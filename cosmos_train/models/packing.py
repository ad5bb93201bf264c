"""Several generator samples in one Cosmos 3 transformer forward, kept apart by the attention masks.

`Cosmos3OmniTransformer.forward` takes ONE joint sequence and splits it at `und_len`: everything
before is the understanding (text) pathway, everything after the generation pathway. A pack of N
samples is therefore laid out as

    [text_1 | text_2 | ... | text_N | vision_1 | vision_2 | ... | vision_N]
     <------------ und_len ------->   <-------- generation pathway ------->

Each sample keeps exactly the positions, indexes and timesteps `build_vision_sequence` gives it on
its own (mRoPE positions restart per sample, as the pipeline starts them); only the indexes into the
joint sequence are offset. The stock `Cosmos3AttnProcessor` would let every vision token see every
sample, so `PackedCosmos3AttnProcessor` replaces it: with a `PackingLayout` set, sample i's text
attends causally to sample i's text only and sample i's vision tokens attend to sample i's text and
vision only; with no layout set it IS the stock processor (single-sample forwards and the pipeline
are unchanged).

Usage::

    install_packed_attention(transformer)                      # once; harmless for normal forwards
    packed = build_packed_sequence(samples, geometry, device)  # samples: (input_ids, latent_shape, clean_frames, fps)
    with packing_layout(transformer, packed["und_lens"], packed["gen_lens"]):
        preds, _, _ = transformer(**{k: packed[k] for k in TRANSFORMER_STATIC_KEYS}, vision_tokens=[...],
                                  vision_timesteps=packed_timesteps(packed, timesteps), return_dict=False)

The layout is also re-armed inside gradient-checkpointed layers: their recomputation runs during
`backward()`, after the `with` block has exited.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor, _rotate_half

from cosmos_train.models.sequence import MODALITIES, SequenceGeometry, build_vision_sequence

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    create_block_mask = flex_attention = None


# ---- 1. the packed sequence -------------------------------------------------------------------
def pack_sequences(seqs: Sequence[dict], device: torch.device | str = "cpu") -> dict:
    """Transformer inputs for N samples in one joint sequence, from each sample's own `build_sample_sequence`.

    Layout: all texts, then each sample's generation block [vision | sound | action] in sample order. Every
    modality's lists (token shapes, noisy frames, action domains) hold the samples that have it, in sample
    order, and its indexes are the sample's own shifted into the joint sequence. Returns the transformer
    static kwargs (`sequence.transformer_kwargs`) plus `und_lens` / `gen_lens` (the packing layout),
    `num_noisy_<modality>_tokens` per sample (0 where absent), `noisy_frames` per sample and `sequences`.
    """
    if not seqs:
        raise ValueError("a pack needs at least one sample")
    und_lens = [s["und_len"] for s in seqs]
    gen_lens = [s["sequence_length"] - s["und_len"] for s in seqs]
    und_total, gen_total = sum(und_lens), sum(gen_lens)
    out = {
        "input_ids": torch.cat([s["input_ids"] for s in seqs]).to(device),
        "text_indexes": torch.arange(und_total, dtype=torch.long, device=device),
        "position_ids": torch.cat([s["position_ids"][:, : s["und_len"]] for s in seqs]
                                  + [s["position_ids"][:, s["und_len"]:] for s in seqs], dim=1).to(device),
        "und_len": und_total,
        "sequence_length": und_total + gen_total,
        "und_lens": und_lens,
        "gen_lens": gen_lens,
        "noisy_frames": [s["noisy_frames"] for s in seqs],
        "sequences": list(seqs),
    }
    for modality in MODALITIES:
        present = [i for i, s in enumerate(seqs) if f"{modality}_token_shapes" in s]
        out[f"num_noisy_{modality}_tokens"] = [s.get(f"num_noisy_{modality}_tokens", 0) for s in seqs]
        if not present:
            continue
        gen_starts = [und_total + sum(gen_lens[:i]) for i in range(len(seqs))]
        shift = lambda i, key: seqs[i][key].to(device) - seqs[i]["und_len"] + gen_starts[i]  # noqa: E731
        out[f"{modality}_token_shapes"] = [seqs[i][f"{modality}_token_shapes"][0] for i in present]
        out[f"{modality}_sequence_indexes"] = torch.cat([shift(i, f"{modality}_sequence_indexes") for i in present])
        out[f"{modality}_mse_loss_indexes"] = torch.cat([shift(i, f"{modality}_mse_loss_indexes") for i in present])
        out[f"{modality}_noisy_frame_indexes"] = [seqs[i][f"{modality}_noisy_frame_indexes"][0].to(device)
                                                  for i in present]
        if modality == "action":
            out["action_domain_ids"] = [seqs[i]["action_domain_ids"][0].to(device) for i in present]
    return out


def build_packed_sequence(samples: Sequence, geometry: SequenceGeometry, device: torch.device | str = "cpu") -> dict:
    """`pack_sequences` of text + vision samples given as `(input_ids, latent_shape, clean_frames, fps)`."""
    return pack_sequences([build_vision_sequence(list(ids), shape, list(clean), fps, geometry, device=device)
                           for ids, shape, clean, fps in samples], device=device)


def packed_timesteps(packed: dict, timesteps: Sequence[float], device=None, modality: str = "vision") -> torch.Tensor:
    """Per-noisy-token timesteps (sigma * 1000) of one modality: each sample's own value on its noisy tokens,
    in item order."""
    counts = packed[f"num_noisy_{modality}_tokens"]
    if len(timesteps) != len(counts):
        raise ValueError(f"{len(timesteps)} timesteps for {len(counts)} packed samples")
    device = device if device is not None else packed["input_ids"].device
    return torch.cat([torch.full((n,), float(t), device=device) for n, t in zip(counts, timesteps)
                      if f"{modality}_token_shapes" in packed]) if counts else torch.zeros(0, device=device)


# ---- 2. the layout and its masks --------------------------------------------------------------
@dataclass(eq=False)
class PackingLayout:
    """Per-sample token counts of a pack: text (und) lengths and vision (gen) lengths, in sample order."""

    und_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.und_lens = tuple(int(x) for x in self.und_lens)
        self.gen_lens = tuple(int(x) for x in self.gen_lens)
        if len(self.und_lens) != len(self.gen_lens) or not self.und_lens:
            raise ValueError(f"packing layout: {len(self.und_lens)} und lengths vs {len(self.gen_lens)} gen lengths")
        if min(self.und_lens) < 1 or min(self.gen_lens) < 1:
            # An empty segment would leave rows with nothing to attend to (NaN from softmax).
            raise ValueError(f"packing layout: every sample needs text and vision tokens, got "
                             f"und {self.und_lens}, gen {self.gen_lens}")

    @property
    def und_total(self) -> int:
        return sum(self.und_lens)

    @property
    def gen_total(self) -> int:
        return sum(self.gen_lens)

    def check(self, und_len: int, gen_len: int) -> None:
        if und_len != self.und_total or gen_len != self.gen_total:
            raise ValueError(
                f"packing layout covers {self.und_total} und + {self.gen_total} gen tokens but the attention got "
                f"{und_len} + {gen_len} (a layout left over from another forward, or a sharded/context-parallel "
                "sequence, which packing does not support)")

    def segment_ids(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample index of every und token and of every gen token."""
        key = ("seg", str(device))
        if key not in self._cache:
            n = torch.arange(len(self.und_lens), device=device)
            self._cache[key] = (torch.repeat_interleave(n, torch.tensor(self.und_lens, device=device)),
                                torch.repeat_interleave(n, torch.tensor(self.gen_lens, device=device)))
        return self._cache[key]

    def bounds(self) -> list[tuple[int, int, int, int]]:
        """(und start, und end, gen start, gen end) of every sample, in the und / gen halves."""
        u = [0, *torch.tensor(self.und_lens).cumsum(0).tolist()]
        g = [0, *torch.tensor(self.gen_lens).cumsum(0).tolist()]
        return [(u[i], u[i + 1], g[i], g[i + 1]) for i in range(len(self.und_lens))]

    def sdpa_masks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks (True = attend): und [U, U] block-diagonal causal; gen [G, U + G], keys ordered
        [und | gen] as the processor concatenates them, each gen token seeing its own sample's blocks.
        Dense, so quadratic in the pack: only the `sdpa_dense` reference backend uses them."""
        key = ("sdpa", str(device))
        if key not in self._cache:
            seg_und, seg_gen = self.segment_ids(device)
            und = (seg_und[:, None] == seg_und[None, :]) & torch.ones(
                len(seg_und), len(seg_und), dtype=torch.bool, device=device).tril()
            gen = seg_gen[:, None] == torch.cat([seg_und, seg_gen])[None, :]
            self._cache[key] = (und, gen)
        return self._cache[key]

    def block_masks(self, device):
        """The same two masks as flex-attention BlockMasks (no dense [S, S] tensor on the GPU)."""
        key = ("flex", str(device))
        if key not in self._cache:
            seg_und, seg_gen = self.segment_ids(device)
            seg_keys = torch.cat([seg_und, seg_gen])
            u, g = len(seg_und), len(seg_gen)

            def und_mod(b, h, q, kv):
                return (seg_und[q] == seg_und[kv]) & (kv <= q)

            def gen_mod(b, h, q, kv):
                return seg_gen[q] == seg_keys[kv]

            compile_mask = torch.device(device).type == "cuda"
            self._cache[key] = (
                create_block_mask(und_mod, None, None, u, u, device=device, _compile=compile_mask),
                create_block_mask(gen_mod, None, None, g, u + g, device=device, _compile=compile_mask),
            )
        return self._cache[key]


# ---- 3. the attention processor ---------------------------------------------------------------
_compiled_flex = None
_flex_failed_warned = False


def _flex(q, k, v, block_mask):
    global _compiled_flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            # Uncompiled flex attention is a dense reference implementation; compiled it is a fused kernel.
            _compiled_flex = torch.compile(flex_attention, dynamic=None)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def _sdpa(q, k, v, mask=None, causal=False):
    """[S, H, D] in, [S, H, D] out; boolean mask (True = attend) or `causal` (top-left aligned, square)."""
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if q.device.type == "cpu":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    else:
        # The memory-efficient CUDA kernel takes an arbitrary mask but not GQA: repeat the kv heads
        # (SDPA's GQA maps query head h to kv head h // groups, which is what repeat_interleave does).
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.squeeze(0).transpose(0, 1)


def _sdpa_per_sample(layout, q_und, k_und, v_und, q_gen, k_und_for_gen, k_gen, v_gen):
    """The packed attention one sample at a time, with no mask tensor: sample i's text attends causally to its
    own text, its gen tokens to its own text + gen tokens (the rule of `PackingLayout.sdpa_masks`). Memory grows
    with the sum of the samples' squared lengths, not with the square of the pack."""
    und_out, gen_out = [], []
    for u0, u1, g0, g1 in layout.bounds():
        und_out.append(_sdpa(q_und[u0:u1], k_und[u0:u1], v_und[u0:u1], causal=True))
        keys = torch.cat([k_und_for_gen[u0:u1], k_gen[g0:g1]])  # [und | gen], as the processor orders them
        values = torch.cat([v_und[u0:u1], v_gen[g0:g1]])
        gen_out.append(_sdpa(q_gen[g0:g1], keys, values))
    return torch.cat(und_out), torch.cat(gen_out)


class PackedCosmos3AttnProcessor(Cosmos3AttnProcessor):
    """`Cosmos3AttnProcessor` that keeps packed samples apart while a `PackingLayout` is set.

    `layout is None` -> exactly the stock processor (its own `__call__`). With a layout, the same
    projections / q-k norms / rotary embedding as the stock processor (copied from it), then per
    sample: und tokens attend causally within the sample's text; gen tokens attend to the sample's
    und + gen tokens. `backend`: "auto" (flex attention on CUDA when available, else "sdpa"), "sdpa" (SDPA one
    sample at a time: no mask tensor, memory linear in the number of samples), "flex" (BlockMasks), or
    "sdpa_dense" (one SDPA call with dense boolean [U, U] / [G, U + G] masks: the reference the others are
    tested against; quadratic in the pack).
    """

    BACKENDS = ("auto", "sdpa", "flex", "sdpa_dense")

    def __init__(self, backend: str = "auto"):
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(self.BACKENDS)}, got {backend!r}")
        if backend == "flex" and flex_attention is None:
            raise RuntimeError("flex attention needs torch >= 2.5")
        self.backend = backend
        self.layout: PackingLayout | None = None

    def _use_flex(self, device) -> bool:
        if flex_attention is None or self.backend in ("sdpa", "sdpa_dense"):
            return False
        return self.backend == "flex" or device.type == "cuda"

    def __call__(self, attn, und_seq, gen_seq, rotary_emb):
        layout = self.layout
        if layout is None:
            return super().__call__(attn, und_seq, gen_seq, rotary_emb)
        layout.check(und_seq.shape[0], gen_seq.shape[0])

        # ---- projections, norms and rotary: copied from Cosmos3AttnProcessor.__call__ ----
        q_und = attn.to_q(und_seq).view(-1, attn.num_attention_heads, attn.head_dim)
        k_und = attn.to_k(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        v_und = attn.to_v(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        q_gen = attn.add_q_proj(gen_seq).view(-1, attn.num_attention_heads, attn.head_dim)
        k_gen = attn.add_k_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        v_gen = attn.add_v_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim)

        q_und = attn.norm_q(q_und)
        k_und = attn.norm_k(k_und)
        k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und
        q_gen = attn.norm_added_q(q_gen)
        k_gen = attn.norm_added_k(k_gen)

        cos_und, sin_und, cos_gen, sin_gen = rotary_emb
        cos_und = cos_und.unsqueeze(1)
        sin_und = sin_und.unsqueeze(1)
        q_und = q_und * cos_und + _rotate_half(q_und) * sin_und
        k_und = k_und * cos_und + _rotate_half(k_und) * sin_und
        k_und_for_gen = k_und_for_gen * cos_und + _rotate_half(k_und_for_gen) * sin_und
        cos_gen = cos_gen.unsqueeze(1)
        sin_gen = sin_gen.unsqueeze(1)
        q_gen = q_gen * cos_gen + _rotate_half(q_gen) * sin_gen
        k_gen = k_gen * cos_gen + _rotate_half(k_gen) * sin_gen
        # ---- end of the copied part ----

        causal_out = full_out = None
        if self._use_flex(und_seq.device):
            try:
                und_bm, gen_bm = layout.block_masks(und_seq.device)
                causal_out = _flex(*(x.transpose(0, 1).unsqueeze(0) for x in (q_und, k_und, v_und)), und_bm)
                all_k, all_v = torch.cat([k_und_for_gen, k_gen]), torch.cat([v_und, v_gen])  # keys [und | gen]
                full_out = _flex(*(x.transpose(0, 1).unsqueeze(0) for x in (q_gen, all_k, all_v)), gen_bm)
                causal_out = causal_out.squeeze(0).transpose(0, 1)
                full_out = full_out.squeeze(0).transpose(0, 1)
            except Exception as err:  # noqa: BLE001 - any flex failure falls back to per-sample SDPA
                if self.backend == "flex":
                    raise
                global _flex_failed_warned
                if not _flex_failed_warned:
                    warnings.warn(f"flex attention failed ({type(err).__name__}: {err}); packed attention falls "
                                  "back to SDPA one sample at a time", stacklevel=2)
                    _flex_failed_warned = True
                self.backend = "sdpa"
                causal_out = full_out = None
        if causal_out is None and self.backend == "sdpa_dense":
            und_mask, gen_mask = layout.sdpa_masks(und_seq.device)
            causal_out = _sdpa(q_und, k_und, v_und, und_mask)
            full_out = _sdpa(q_gen, torch.cat([k_und_for_gen, k_gen]), torch.cat([v_und, v_gen]), gen_mask)
        elif causal_out is None:
            causal_out, full_out = _sdpa_per_sample(layout, q_und, k_und, v_und, q_gen, k_und_for_gen, k_gen, v_gen)

        und_out = attn.to_out(causal_out.flatten(-2, -1))
        gen_out = attn.to_add_out(full_out.flatten(-2, -1))
        return und_out, gen_out


# ---- 4. installing it and setting the layout --------------------------------------------------
def _unwrap(module):
    """The transformer inside a DDP / DeepSpeed / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        while hasattr(module, attr) and isinstance(getattr(module, attr), torch.nn.Module):
            module = getattr(module, attr)
    return module


def _attention_modules(transformer):
    return [m for m in _unwrap(transformer).modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def install_packed_attention(transformer, backend: str = "auto") -> int:
    """Give every Cosmos 3 attention module a `PackedCosmos3AttnProcessor` (one per module, keeping the
    module's attention backend / parallel config). Idempotent; returns how many were replaced.
    Refuses processors other than the stock one: packing could silently bypass them."""
    replaced = 0
    for module in _attention_modules(transformer):
        old = module.processor
        if isinstance(old, PackedCosmos3AttnProcessor):
            continue
        if type(old) is not Cosmos3AttnProcessor:
            raise RuntimeError(f"cannot install packed attention over {type(old).__name__}: expected the stock "
                               "Cosmos3AttnProcessor")
        new = PackedCosmos3AttnProcessor(backend=backend)
        for attr in ("_attention_backend", "_parallel_config"):
            if attr in vars(old):
                setattr(new, attr, getattr(old, attr))
        module.set_processor(new)
        replaced += 1
    return replaced


def uninstall_packed_attention(transformer) -> int:
    """Put stock `Cosmos3AttnProcessor`s back (keeping attention backend / parallel config)."""
    restored = 0
    for module in _attention_modules(transformer):
        old = module.processor
        if isinstance(old, PackedCosmos3AttnProcessor):
            new = Cosmos3AttnProcessor()
            for attr in ("_attention_backend", "_parallel_config"):
                if attr in vars(old):
                    setattr(new, attr, getattr(old, attr))
            module.set_processor(new)
            restored += 1
    return restored


def _packed_processors(transformer) -> list[PackedCosmos3AttnProcessor]:
    seen, out = set(), []
    for module in _attention_modules(transformer):
        p = module.processor
        if isinstance(p, PackedCosmos3AttnProcessor) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _WithLayout:
    """A checkpointed layer call that sets the layout itself, so its recomputation in backward (after the
    `packing_layout` block has exited) still masks like the forward did."""

    def __init__(self, fn, processors, layout):
        self.fn, self.processors, self.layout = fn, processors, layout

    def __call__(self, *args, **kwargs):
        saved = [p.layout for p in self.processors]
        for p in self.processors:
            p.layout = self.layout
        try:
            return self.fn(*args, **kwargs)
        finally:
            for p, old in zip(self.processors, saved):
                p.layout = old


@contextlib.contextmanager
def packing_layout(transformer, und_lens: Sequence[int], gen_lens: Sequence[int]):
    """Set the pack's layout on every packed processor of `transformer` (or its wrapper) for the
    duration of the block; restores the previous layouts after. Also wraps the transformer's
    gradient-checkpointing function so recomputed layers see the same layout in backward."""
    processors = _packed_processors(transformer)
    if not processors:
        raise RuntimeError("no PackedCosmos3AttnProcessor installed: call install_packed_attention(transformer) first")
    layout = PackingLayout(tuple(und_lens), tuple(gen_lens))
    saved = [p.layout for p in processors]
    patched = []
    for module in _unwrap(transformer).modules():
        orig = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and orig is not None:
            had_own = "_gradient_checkpointing_func" in vars(module)

            def wrapped(fn, *args, _orig=orig, **kwargs):
                return _orig(_WithLayout(fn, processors, layout), *args, **kwargs)

            module._gradient_checkpointing_func = wrapped
            patched.append((module, orig, had_own))
    for p in processors:
        p.layout = layout
    try:
        yield layout
    finally:
        for p, old in zip(processors, saved):
            p.layout = old
        for module, orig, had_own in patched:
            if had_own:
                module._gradient_checkpointing_func = orig
            else:
                del module._gradient_checkpointing_func
