"""Trainable-weight selection, checkpoints, resume and export round trips on the tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cosmos_train.config import load_recipe
from cosmos_train.data import GeneratorDataset, read_manifest
from cosmos_train.errors import UserError
from cosmos_train.export import generator as export_mod
from cosmos_train.export.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from cosmos_train.export.generator import export_run
from cosmos_train.models import load_model
from cosmos_train.objectives import build_objective
from cosmos_train.trainer import checkpoint as ckpt
from cosmos_train.trainer.adapters import is_gen_param, setup_trainable
from cosmos_train.trainer.loop import train
from cosmos_train.trainer.optim import build_optimizer, lr_multiplier

from .conftest import TINY_RECIPES


def _cfg(tiny_dir, out, recipe="t2v_lora.yaml", *overrides):
    return load_recipe(TINY_RECIPES / recipe, [f"model.pretrained={tiny_dir}", f"output_dir={out}", *overrides])


def _train_steps(cfg, steps):
    model = load_model(cfg)
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    params = setup_trainable(model.transformer, cfg.train)
    optimizer, _ = build_optimizer(params, cfg.train)
    objective = build_objective(cfg, model, seed=0)
    h, w = cfg.pixel_size()
    dataset = GeneratorDataset(read_manifest(cfg.data.manifest), cfg.data.num_frames, h, w, fps=cfg.data.fps)
    for i in range(steps):
        loss, _ = objective.loss([objective.draw(objective.encode(dataset[i]))])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {k.replace(".base_layer", ""): v for k, v in model.transformer.state_dict().items()}
    return model, before, after


def test_lora_trains_only_adapters_and_base_stays_bit_identical(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run", "t2v_lora.yaml", "train.lr=1e-2")
    model, before, after = _train_steps(cfg, 3)
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.transformer.parameters() if p.requires_grad)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the adapters did learn (B starts at zero)
    # the default targets are the generation pathway only
    assert all(is_gen_param(n.split(".lora_")[0]) for n in trainable)


def test_full_finetune_of_gen_pathway_leaves_the_reasoner_untouched(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run", "t2v_full.yaml", "train.lr=1e-3")
    _, before, after = _train_steps(cfg, 2)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(is_gen_param(n) for n in changed)
    for name in ("layers.0.self_attn.to_q.weight", "layers.1.mlp.down_proj.weight", "embed_tokens.weight",
                 "lm_head.weight"):
        assert torch.equal(before[name], after[name])
    assert "layers.0.self_attn.add_q_proj.weight" in changed and "proj_out.weight" in changed


def test_lr_schedule_shapes():
    kw = dict(warmup_steps=10, max_steps=110)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(110, schedule="linear", **kw) == pytest.approx(0.0)
    assert lr_multiplier(110, schedule="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(100, schedule="constant", **kw) == 1.0


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = _cfg(tiny_dir, out, "t2v_lora.yaml", "train.max_steps=8", "train.checkpoint_every=4", "train.lr=1e-2",
               "train.keep_checkpoints=5")
    return cfg, train(cfg)


def test_run_directory_contents(lora_run):
    cfg, run_dir = lora_run
    assert load_recipe(run_dir / "recipe.yaml") == cfg  # the resolved recipe is saved with the run
    steps = [p.name for p in ckpt.list_checkpoints(run_dir)]
    assert steps == ["step-0000004", "step-0000008"]
    weights = load_file(str(run_dir / "checkpoints/step-0000008/trainable.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= m.keys() for m in metrics)
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary leftovers


def test_existing_run_is_never_overwritten(lora_run):
    cfg, _ = lora_run
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg)


def test_resumed_run_equals_uninterrupted_run(tiny_dir, tmp_path):
    over = ["train.max_steps=4", "train.checkpoint_every=2"]
    train(_cfg(tiny_dir, tmp_path / "a", "t2v_lora.yaml", *over))
    interrupted = _cfg(tiny_dir, tmp_path / "b", "t2v_lora.yaml", *over)
    _train_until(interrupted, stop_after=2)  # killed right after its step-2 checkpoint
    train(interrupted, resume=True)
    a = load_file(str(tmp_path / "a/checkpoints/step-0000004/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-0000004/trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert losses("a") == losses("b")


def _train_until(cfg, stop_after):
    """Run `cfg` but stop (like a killed job) right after the checkpoint at `stop_after`."""
    from cosmos_train.trainer import loop

    original = loop._save

    class Stop(Exception):
        pass

    def save_then_stop(accelerator, backend, run_dir, step, *args, **kwargs):
        original(accelerator, backend, run_dir, step, *args, **kwargs)
        if step == stop_after:
            raise Stop

    loop._save = save_then_stop
    try:
        with pytest.raises(Stop):
            train(cfg)
    finally:
        loop._save = original


def _velocity(pipe, seed=0):
    from cosmos_train.models.generator import Cosmos3Generator

    model = Cosmos3Generator(pipe)
    ids, _ = model.tokenize("A green square moves down.", 9, 64, 64, 24.0)
    latent = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.predict_velocity(model.build_sequence(ids, latent.shape, [], 24.0), latent, 600.0)


def test_export_merged_and_lora_only_round_trip(lora_run, tiny_dir, tmp_path):
    from diffusers import Cosmos3OmniPipeline

    _, run_dir = lora_run
    merged_info = export_run(run_dir, tmp_path / "merged")
    lora_info = export_run(run_dir, tmp_path / "lora", lora_only=True)
    assert merged_info["step"] == lora_info["step"] == 8
    assert (tmp_path / "lora" / ADAPTER_WEIGHTS).is_file() and (tmp_path / "lora" / ADAPTER_CONFIG).is_file()
    exported = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_tokenizer", "scheduler", "cosmos_train_export.json",
            "README.md", "vision_encoder", "model.safetensors.index.json"} <= exported
    assert exported - {"cosmos_train_export.json"} == {p.name for p in tiny_dir.iterdir()}  # all of the base, nothing lost

    merged = Cosmos3OmniPipeline.from_pretrained(str(tmp_path / "merged"))
    base = Cosmos3OmniPipeline.from_pretrained(str(tiny_dir))
    v_base = _velocity(base)
    base.transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name=ADAPTER_WEIGHTS)
    v_lora, v_merged = _velocity(base), _velocity(merged)
    assert not torch.allclose(v_merged, v_base, atol=1e-3)  # the finetune is in there
    assert torch.allclose(v_merged, v_lora, atol=1e-4)  # merged == base + adapter

    video = merged(prompt="A red circle moves.", num_frames=9, height=64, width=64, num_inference_steps=2,
                   output_type="np", enable_safety_check=False).video
    assert video.shape == (9, 64, 64, 3)


def test_export_refuses_to_overwrite_and_names_missing_steps(lora_run, tmp_path):
    _, run_dir = lora_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(UserError, match="not empty"):
        export_run(run_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "user data"
    with pytest.raises(UserError, match="available steps: 4, 8"):
        export_run(run_dir, tmp_path / "x", step=5)


def test_failed_verification_writes_nothing(lora_run, tmp_path, monkeypatch):
    _, run_dir = lora_run
    monkeypatch.setattr(export_mod, "TOLERANCE", {torch.float32: -1.0})
    with pytest.raises(RuntimeError, match="export verification failed"):
        export_run(run_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


@pytest.mark.slow  # bf16 matmuls are slow on CPU
def test_bf16_base_with_fp32_trainable_weights_trains_and_exports(tiny_dir, tmp_path):
    # full finetuning: fp32 gen-pathway modules inside a bf16 network (LoRA's casts are PEFT's own)
    cfg = _cfg(tiny_dir, tmp_path / "run", "t2v_full.yaml", "model.dtype=bfloat16", "train.max_steps=2",
               "train.checkpoint_every=2")
    run_dir = train(cfg)
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    weights = load_file(str(run_dir / "checkpoints/step-0000002/trainable.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    info = export_run(run_dir, tmp_path / "export")  # verification tolerance for bf16 merges
    from cosmos_train.models.layout import component_weight_map

    shards = component_weight_map(tmp_path / "export" / "transformer")
    stored = load_file(str(tmp_path / "export" / "transformer" / shards["proj_in.weight"]))
    assert stored["proj_in.weight"].dtype == torch.float32 and info["step"] == 2  # the base's stored precision kept


def test_checkpoints_store_pending_sample_keys_not_tensors(tiny_dir, tmp_path):
    """Samples waiting in the packer at a checkpoint are stored as their sampler keys (draws are keyed, so
    a resume draws them again identically): no latent / noise tensors in the checkpoint."""
    cfg = _cfg(tiny_dir, tmp_path / "run", "t2v_lora.yaml", "train.max_steps=2", "train.checkpoint_every=2",
               "data.cache=off")
    run = train(cfg)
    ranks = torch.load(run / "checkpoints" / "step-0000002" / "optimizer.pt", weights_only=True)["ranks"]
    pending = ranks[0]["batcher"]["pending"]
    assert pending and all(set(e) == {"order", "length", "key"} for e in pending)
