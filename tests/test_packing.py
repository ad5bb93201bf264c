"""Multi-sample packing: several samples in one transformer forward give each sample exactly what it
gets alone (predictions and gradients), the packed processor is the stock one when no pack is set,
and the pack planner covers every sample once under the token budget."""

import contextlib
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cosmos_train.config.schema import GeneratorConfig
from cosmos_train.data.packing import (
    StreamingPacker,
    iter_packs,
    plan_efficiency,
    plan_packs,
    sample_token_count,
)
from cosmos_train.models.generator import Cosmos3Generator
from cosmos_train.models.packing import (
    PackedCosmos3AttnProcessor,
    PackingLayout,
    build_packed_sequence,
    install_packed_attention,
    packing_layout,
    uninstall_packed_attention,
)
from cosmos_train.models.sequence import TRANSFORMER_STATIC_KEYS, build_vision_sequence
from cosmos_train.objectives.flow_matching import noise_latent_frames
from cosmos_train.objectives.generator import GeneratorObjective, NoisedSample

# (caption, pixel frames, height, width, fps, clean latent frames, sigma, use the unconditional prompt)
SPECS = [
    ("A red circle moves from left to right across a dark blue background.", 17, 64, 64, 24.0, [], 0.3, False),
    ("Waves roll onto a sandy beach under a cloudy sky while seagulls circle overhead and a dog "
     "runs along the waterline chasing the foam.", 9, 64, 96, 16.0, [0], 0.8, False),  # i2v
    ("A bowl of fruit.", 1, 64, 64, 24.0, [], 0.55, False),  # image
    ("A lighthouse at night.", 1, 80, 80, 24.0, [], 0.1, True),  # 5x5 latent: patch padding, dropped text
]


@pytest.fixture(scope="module")
def model(tiny_dir):
    """A private fp32 pipeline: installing processors must not touch the session's `tiny_pipe`."""
    from diffusers import Cosmos3OmniPipeline

    pipe = Cosmos3OmniPipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    m = Cosmos3Generator(pipe)
    m.transformer.eval()
    return m


def _batch(model, specs=SPECS, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.transformer.config.latent_channel
    batch = []
    for caption, frames, h, w, fps, clean, sigma, uncond in specs:
        cond_ids, uncond_ids = model.tokenize(caption, frames, h, w, fps)
        shape = (1, c, (frames - 1) // 4 + 1, h // 16, w // 16)
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        batch.append(NoisedSample(
            input_ids=list(uncond_ids if uncond else cond_ids), x0=x0, noise=noise,
            xt=noise_latent_frames(x0, noise, sigma, clean), sigma=sigma, clean_frames=clean, fps=fps,
            mode="i2v" if clean else ("t2i" if frames == 1 else "t2v"), dropped_text=uncond))
    return batch


def _alone(model, s):
    return model.predict_velocity(model.build_sequence(s.input_ids, s.x0.shape, s.clean_frames, s.fps), s.xt, s.timestep)


# ---- layout -----------------------------------------------------------------------------------
def test_packed_sequence_layout(model):
    batch = _batch(model)
    packed = build_packed_sequence([(s.input_ids, s.x0.shape, s.clean_frames, s.fps) for s in batch], model.geometry)
    und, gen = packed["und_lens"], packed["gen_lens"]
    assert len({len(s.input_ids) for s in batch}) == len(batch)  # really different caption lengths
    assert packed["und_len"] == sum(und) and packed["sequence_length"] == sum(und) + sum(gen)
    assert gen == [5 * 2 * 2, 3 * 2 * 3, 1 * 2 * 2, 1 * 3 * 3]  # latent T x ceil(H/2) x ceil(W/2)
    u0, g0 = 0, packed["und_len"]
    for s, u, g in zip(batch, und, gen):
        alone = build_vision_sequence(s.input_ids, s.x0.shape, s.clean_frames, s.fps, model.geometry)
        # Every sample keeps its own positions (restarting at 0) in its text block and its vision block.
        assert torch.equal(packed["position_ids"][:, u0:u0 + u], alone["position_ids"][:, :u])
        assert torch.equal(packed["position_ids"][:, g0:g0 + g], alone["position_ids"][:, u:])
        assert torch.equal(packed["input_ids"][u0:u0 + u], alone["input_ids"])
        u0, g0 = u0 + u, g0 + g
    # Loss indexes: per item, its noisy frames' tokens (the i2v sample skips its clean frame 0).
    assert packed["vision_mse_loss_indexes"].numel() == sum(packed["num_noisy_vision_tokens"]) == 20 + 2 * 6 + 4 + 9
    assert torch.all(packed["vision_mse_loss_indexes"].diff() > 0)


# ---- (a) the key test: packed == unpacked ------------------------------------------------------
@torch.no_grad()
def test_packed_forward_equals_separate_forwards(model):
    batch = _batch(model)
    model.install_packed_attention()
    alone = [_alone(model, s) for s in batch]
    packed = model.predict_velocity_packed(batch)
    assert len(packed) == len(batch)
    for s, a, p in zip(batch, alone, packed):
        assert p.shape == s.x0.shape
        assert torch.allclose(p, a, atol=1e-5, rtol=1e-5), (p - a).abs().max()
        for f in s.clean_frames:
            assert torch.all(p[:, :, f] == 0)

    # The same packed sequence through the stock processor (no layout): samples leak into each other.
    seq = build_packed_sequence([(s.input_ids, s.x0.shape, s.clean_frames, s.fps) for s in batch], model.geometry)
    t = torch.cat([torch.full((n,), s.timestep) for n, s in zip(seq["num_noisy_vision_tokens"], batch)])
    leaky, _, _ = model.transformer(**{k: seq[k] for k in TRANSFORMER_STATIC_KEYS}, vision_tokens=[s.xt for s in batch],
                                    vision_timesteps=t, return_dict=False)
    assert max(float((lk - a).abs().max()) for lk, a in zip(leaky, alone)) > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_flex_attention_path_matches(model):
    """The GPU path's masks (flex BlockMasks), run here with eager flex attention on CPU."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = _batch(model)[:3]
    alone = [_alone(model, s) for s in batch]
    model.install_packed_attention()
    procs = [m.processor for m in model.transformer.modules() if isinstance(getattr(m, "processor", None),
                                                                            PackedCosmos3AttnProcessor)]
    try:
        for p in procs:
            p.backend = "flex"
        packed = model.predict_velocity_packed(batch)
    finally:
        for p in procs:
            p.backend = "auto"
    for a, p in zip(alone, packed):
        assert torch.allclose(p, a, atol=1e-5, rtol=1e-5), (p - a).abs().max()


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@contextlib.contextmanager
def _backend(model, backend):
    model.install_packed_attention()
    procs = [m.processor for m in model.transformer.modules()
             if isinstance(getattr(m, "processor", None), PackedCosmos3AttnProcessor)]
    for p in procs:
        p.backend = backend
    try:
        yield
    finally:
        for p in procs:
            p.backend = "auto"


@torch.no_grad()
def test_per_sample_sdpa_equals_the_dense_reference_without_a_pack_sized_mask(model, monkeypatch):
    """The CPU / fallback path runs each sample's attention on its own: the same predictions as one SDPA call with
    the dense [U, U] / [G, U + G] masks, and no tensor spanning two token counts of the pack is ever created (the
    dense path does create them: the detector is real)."""
    batch = _batch(model)
    seqs = [model.sample_sequence(s) for s in batch]
    und = sum(s["und_len"] for s in seqs)
    gen = sum(s["sequence_length"] - s["und_len"] for s in seqs)
    pack_sizes = {und, gen, und + gen}

    def run(backend):
        with _backend(model, backend), _Shapes() as rec:
            preds = model.predict_velocity_packed(batch)
        return preds, [sh for sh in rec.shapes if sum(d in pack_sizes for d in sh) >= 2]

    dense, dense_square = run("sdpa_dense")
    assert (und, und) in dense_square and (gen, und + gen) in dense_square
    monkeypatch.setattr(PackingLayout, "sdpa_masks", lambda *a: pytest.fail("dense masks built"))
    blocks, block_square = run("sdpa")
    assert block_square == []
    for d, b in zip(dense, blocks):
        assert torch.allclose(b, d, atol=1e-5, rtol=1e-5), (b - d).abs().max()  # kernels differ: fp32 rounding


# ---- (b) no layout: the stock processor -------------------------------------------------------
@torch.no_grad()
def test_no_layout_is_the_stock_processor(model):
    s = _batch(model)[1]
    uninstall_packed_attention(model.transformer)
    stock = _alone(model, s)
    latents_stock = model.pipe(prompt="A cat", num_frames=5, height=64, width=64, num_inference_steps=2,
                               output_type="latent", enable_safety_check=False,
                               generator=torch.Generator().manual_seed(0))
    assert install_packed_attention(model.transformer) == model.transformer.config.num_hidden_layers
    assert install_packed_attention(model.transformer) == 0  # idempotent
    assert torch.equal(_alone(model, s), stock)
    latents = model.pipe(prompt="A cat", num_frames=5, height=64, width=64, num_inference_steps=2,
                         output_type="latent", enable_safety_check=False, generator=torch.Generator().manual_seed(0))
    out, ref = latents[0], latents_stock[0]
    out, ref = (x[0] if isinstance(x, (list, tuple)) else x for x in (out, ref))
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_layout_is_scoped_and_checked(model):
    model.install_packed_attention()
    procs = {id(m.processor): m.processor for m in model.transformer.modules()
             if isinstance(getattr(m, "processor", None), PackedCosmos3AttnProcessor)}
    with packing_layout(model.transformer, [3, 4], [8, 8]) as layout:
        assert all(p.layout is layout for p in procs.values())
        und, gen = layout.sdpa_masks("cpu")
        assert und.shape == (7, 7) and gen.shape == (16, 23)
        assert und[4, 3] and not und[3, 4] and not und[4, 2]  # causal, within sample 2 only
        assert gen[0, :3].all() and not gen[0, 3:7].any() and gen[0, 7:15].all() and not gen[0, 15:].any()
        with pytest.raises(ValueError, match="packing layout covers"):
            model.predict_velocity(model.build_sequence([1, 2, 3], (1, 48, 1, 4, 4), [], 24.0),
                                   torch.zeros(1, 48, 1, 4, 4), 500.0)
    assert all(p.layout is None for p in procs.values())


# ---- (c) gradients: packed loss == mean of per-sample losses -----------------------------------
def test_packed_gradients_match(model):
    tr = model.transformer
    batch = _batch(model)[:3]
    objective = GeneratorObjective(model, GeneratorConfig(), shift=3.0)
    model.install_packed_attention()
    tr.enable_gradient_checkpointing()  # recomputation in backward runs after packing_layout has exited
    try:
        grads = []
        for packed in (False, True):
            tr.zero_grad(set_to_none=True)
            loss, info = objective.loss(batch, packed=packed)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None})
    finally:
        tr.disable_gradient_checkpointing()
        tr.zero_grad(set_to_none=True)
    ref, got = grads
    assert info.num_samples == 3 and ref.keys() == got.keys()
    assert any("add_q_proj" in n for n in ref) and any(n.endswith("to_k.weight") for n in ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-5, rtol=1e-4), (n, (got[n] - ref[n]).abs().max())


# ---- (d) the planner --------------------------------------------------------------------------
def test_sample_token_count():
    assert sample_token_count(100, (1, 48, 5, 4, 4)) == 100 + 5 * 2 * 2
    assert sample_token_count(7, (1, 5, 5)) == 7 + 9  # padded to a multiple of the patch
    assert sample_token_count(0, (48, 3, 4, 6), patch_size=1) == 72


def test_plan_packs_covers_and_fits():
    rng = random.Random(0)
    lengths = [rng.choice([150, 300, 500, 800, 1200, 2500, 4000]) + rng.randint(0, 200) for _ in range(500)]
    lengths[7] = lengths[300] = 9000  # oversize: skipped, reported
    budget = 8192
    packs, skipped = plan_packs(lengths, budget, lookahead=32)
    assert skipped == [7, 300]
    flat = sorted(i for p in packs for i in p)
    assert flat == [i for i in range(len(lengths)) if i not in (7, 300)]
    assert all(sum(lengths[i] for i in p) <= budget for p in packs)
    assert plan_efficiency(lengths, packs, budget) > 0.95
    assert (packs, skipped) == plan_packs(lengths, budget, lookahead=32)  # deterministic
    # Order is kept approximately: each pack starts with the oldest sample not yet packed.
    firsts = [p[0] for p in packs]
    assert firsts == sorted(firsts)
    # Shuffling the input changes the packs (it is not a global sort).
    order = list(range(len(lengths)))
    rng.shuffle(order)
    shuffled, _ = plan_packs([lengths[i] for i in order], budget, lookahead=32)
    assert [[order[i] for i in p] for p in shuffled] != packs


def test_streaming_packer_matches_plan_and_reports_oversize():
    lengths = [5, 9, 3, 12, 7, 1, 8, 2, 6, 4, 11, 10]
    seen = []
    packer = StreamingPacker(budget=11, lookahead=4, on_oversize=lambda item, n: seen.append((item, n)))
    packs = list(iter_packs(((f"s{i}", n) for i, n in enumerate(lengths)), 11, 4, packer=packer))
    assert seen == [("s3", 12)]
    plan, skipped = plan_packs(lengths, 11, lookahead=4)
    assert skipped == [3] and packs == [[f"s{i}" for i in p] for p in plan]
    assert all(sum(lengths[int(s[1:])] for s in p) <= 11 for p in packs)
    assert packer.efficiency == pytest.approx((sum(lengths) - 12) / (len(packs) * 11))
    with pytest.warns(UserWarning, match="exceeds the packing budget"):
        StreamingPacker(4).add("big", 5)
    assert plan_packs([], 10) == ([], [])
    assert plan_packs([10, 10], 10) == ([[0], [1]], [])
