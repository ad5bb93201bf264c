"""Action training feeds the transformer what Cosmos3OmniPipeline feeds it in each action mode.

The pipeline runs on the tiny checkpoint with `action=CosmosActionCondition(...)` and a hook records its
transformer inputs; the framework builds the same window (same frames, actions, task, fps, tier) through its
encode -> draw path, and every sequence field must match: the action JSON prompt ids (the pipeline's own
builder), positions of text / vision / action, sequence and loss indexes, noisy frame indexes, the domain id,
per-modality timesteps, and the clean conditioning tokens (vision latent frames and given action rows).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cosmos_train.models.generator import Cosmos3Generator
from cosmos_train.models.sequence import MODALITY_KEYS, TEXT_KEYS
from cosmos_train.objectives.flow_matching import sigma_to_timestep
from cosmos_train.objectives.generator import GeneratorObjective

TASK = "Push the T-shaped block onto the green target."
CHUNK, FPS, WIDTH = 8, 10.0, 2


def _frames(seed=0, n=CHUNK + 1, h=64, w=96):
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, h // 16, w // 16, 3))
    return np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2).astype(np.float32)  # [T, H, W, 3] in [0, 1]


def _capture(pipe, action):
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()}),
        with_kwargs=True)
    try:
        pipe(prompt=TASK, action=CosmosActionCondition(**action), fps=FPS, num_inference_steps=2,
             guidance_scale=6.0, output_type="latent", enable_safety_check=False,
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return calls[0], calls[1], float(pipe.scheduler.sigmas[0])


def _same(ours, theirs, keys):
    for key in keys:
        a, b = ours[key], theirs[key]
        if torch.is_tensor(b):
            assert a.shape == b.shape, key
            assert torch.allclose(a.double(), b.double(), atol=1e-6), key
        elif isinstance(b, list) and b and torch.is_tensor(b[0]):
            assert len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b)), key
        else:
            assert a == b, key


@pytest.mark.parametrize("mode", ["policy", "forward_dynamics", "inverse_dynamics"])
def test_action_sample_equals_pipeline_inputs(tiny_pipe, mode):
    frames = _frames()
    actions = torch.linspace(-1, 1, CHUNK * WIDTH).reshape(CHUNK, WIDTH)
    action = {"mode": mode, "chunk_size": CHUNK, "domain_name": "pusht", "resolution_tier": 256,
              "video": frames, "view_point": "ego_view"}
    if mode == "forward_dynamics":
        action["raw_actions"] = actions
    cond, uncond, sigma0 = _capture(tiny_pipe, action)

    model = Cosmos3Generator(tiny_pipe)
    action_cfg = SimpleNamespace(resolution_tier=256, view_point="ego_view",
                                 modes=SimpleNamespace(**{m: float(m == mode) for m in
                                                          ("policy", "forward_dynamics", "inverse_dynamics")}))
    cfg = SimpleNamespace(use_system_prompt=None, duration_template=True, resolution_template=True,
                          template_dropout=0.0, uncond_prompt="pipeline", text_dropout=0.0, sigma_sampling="uniform",
                          logit_mean=0.0, logit_std=1.0, mode_scale=1.29, v2v_condition_frames=2,
                          loss_weights=SimpleNamespace(vision=1.0, sound=1.0, action=1.0))
    objective = GeneratorObjective(model, cfg, shift=1.0, seed=0, action_cfg=action_cfg, domain_id=4)
    window = SimpleNamespace(pixels=torch.from_numpy(frames).permute(3, 0, 1, 2) * 2 - 1, actions=actions,
                             task=TASK, fps=FPS, source="test")
    item = objective.encode(window)
    drawn = objective.draw(item)
    assert drawn.mode == mode

    ours = model.sample_sequence(drawn)
    keys = TEXT_KEYS + tuple(f"{m}_{k}" for m in ("vision", "action") for k in MODALITY_KEYS) + ("action_domain_ids",)
    _same(ours, cond, keys)
    drawn.input_ids = objective._tokenize_action(item.caption, item.num_frames, item.height, item.width, item.fps,
                                                 mode)[1]
    _same(model.sample_sequence(drawn), uncond, keys)  # CFG dropout trains on the pipeline's unconditional prompt

    # clean conditioning tokens: the same latent frames and given action rows; padded channels zero
    clean = drawn.clean_frames
    assert torch.allclose(drawn.tokens("vision")[:, :, clean], cond["vision_tokens"][0][:, :, clean].float(),
                          atol=1e-5)
    ours_action, theirs_action = drawn.tokens("action"), cond["action_tokens"][0].float()
    assert ours_action.shape == theirs_action.shape
    assert torch.equal(ours_action[:, WIDTH:], torch.zeros_like(ours_action[:, WIDTH:]))
    assert torch.equal(theirs_action[:, WIDTH:], torch.zeros_like(theirs_action[:, WIDTH:]))
    if drawn.action_clean:
        assert torch.allclose(ours_action[drawn.action_clean], theirs_action[drawn.action_clean], atol=1e-6)
    # one timestep for every noisy token of every modality, none for clean ones
    for modality in ("vision", "action"):
        expected = torch.full((ours[f"num_noisy_{modality}_tokens"],), sigma_to_timestep(sigma0))
        got = cond[f"{modality}_timesteps"]
        assert got.shape == expected.shape, modality
        assert torch.all((got.double() - expected.double()).abs() < 1.0), modality


def test_action_prompt_is_the_pipelines_json(tiny_pipe):
    model = Cosmos3Generator(tiny_pipe)
    ids, uncond = model.tokenize(TASK, CHUNK + 1, 256, 320, FPS, None, action_mode="policy",
                                 action_view_point="ego_view")
    text = tiny_pipe.text_tokenizer.decode(ids)
    assert '"actions"' in text and TASK in text and '"fps": 10.0' in text
    assert "seconds long" not in text  # the flat templates are not used in action mode
    assert TASK not in tiny_pipe.text_tokenizer.decode(uncond)


def _objective(model, modes):
    action_cfg = SimpleNamespace(resolution_tier=256, view_point="ego_view", modes=SimpleNamespace(**modes))
    cfg = SimpleNamespace(use_system_prompt=None, duration_template=True, resolution_template=True,
                          template_dropout=0.0, uncond_prompt="pipeline", text_dropout=0.0, sigma_sampling="uniform",
                          logit_mean=0.0, logit_std=1.0, mode_scale=1.29, v2v_condition_frames=2,
                          modes=SimpleNamespace(t2i=0.0, t2v=1.0, i2v=0.0, v2v=0.0),
                          loss_weights=SimpleNamespace(vision=1.0, sound=1.0, action=1.0))
    return GeneratorObjective(model, cfg, shift=1.0, seed=3, action_cfg=action_cfg, domain_id=4)


def test_action_and_vision_samples_pack_like_single_forwards(tiny_pipe):
    """One segment mechanism for both paths: a pack of a policy window, a forward-dynamics window and a plain
    t2v clip gives every modality's prediction (and loss) of three single forwards."""
    model = Cosmos3Generator(tiny_pipe)
    model.transformer.eval()
    batch = []
    for mode, seed in (("policy", 1), ("forward_dynamics", 2)):
        objective = _objective(model, {m: float(m == mode) for m in ("policy", "forward_dynamics",
                                                                     "inverse_dynamics")})
        window = SimpleNamespace(pixels=torch.from_numpy(_frames(seed)).permute(3, 0, 1, 2) * 2 - 1,
                                 actions=torch.randn(CHUNK, WIDTH, generator=torch.Generator().manual_seed(seed)),
                                 task=TASK, fps=FPS, source=f"w{seed}")
        batch.append(objective.draw(objective.encode(window)))
    clip = torch.rand(3, 9, 64, 64) * 2 - 1
    batch.append(objective.draw(objective.encode({"pixels": clip, "caption": "A red ball.", "fps": 24.0})))
    assert [s.mode for s in batch] == ["policy", "forward_dynamics", "t2v"]
    with torch.no_grad():
        single = model.predict(batch, packed=False)
        packed = model.predict(batch, packed=True)
        for a, b in zip(single, packed):
            for modality in ("vision", "action"):
                if a[modality] is None:
                    assert b[modality] is None
                    continue
                torch.testing.assert_close(a[modality], b[modality], atol=2e-5, rtol=1e-4)
        loss_single, _ = objective.loss(batch, packed=False)
        loss_packed, info = objective.loss(batch, packed=True)
    torch.testing.assert_close(loss_single, loss_packed, atol=1e-5, rtol=1e-5)
    assert set(info.modality_losses) == {"vision", "action"}
    # forward dynamics gives its actions: they carry no loss; policy's actions do
    assert objective.sample_losses(batch[1], single[1]).keys() == {"vision"}
    assert objective.sample_losses(batch[0], single[0]).keys() == {"vision", "action"}
