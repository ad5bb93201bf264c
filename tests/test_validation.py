"""Seeing the run: validation (held-out loss at fixed sigmas, reasoner held-out loss, samples), step metrics,
trackers, EMA, warm start, and the recipe keys behind them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosmos_train.config import load_recipe
from cosmos_train.config import schema as S
from cosmos_train.errors import UserError
from cosmos_train.trainer import metrics as M
from cosmos_train.trainer.ema import EMA, ema_weights_for_export, load_warm_start
from cosmos_train.trainer.validation import fixed_sigmas, sigma_at_quantile

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPES = REPO / "recipes" / "tiny"
SAMPLES = REPO / "data" / "samples" / "manifest.jsonl"
CONVERSATIONS = REPO / "data" / "reasoner" / "caption.jsonl"


# ---- recipe keys ---------------------------------------------------------------------------------------------


def test_defaults_and_checks(tmp_path):
    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml")
    v = cfg.validation
    assert (v.every, v.manifest, v.max_samples, v.sigma_quantiles, v.prompts, v.images) == (
        0, None, 8, [0.1, 0.3, 0.5, 0.7, 0.9], [], [])
    assert (cfg.train.ema_decay, cfg.train.init_from, cfg.logging.trackers) == (None, None, [])
    # ./ paths are relative to the recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text((TINY_RECIPES / "t2v_lora.yaml").read_text().replace("../../data", str(REPO / "data"))
                      + "validation: {manifest: ./val.jsonl, prompts: [a, b], images: [./a.png]}\n")
    cfg = load_recipe(recipe, ["train.init_from=./runs/x"])
    assert cfg.validation.manifest == str(tmp_path / "val.jsonl")
    assert cfg.validation.images == [str(tmp_path / "a.png")]
    assert cfg.train.init_from == str(tmp_path / "runs" / "x")
    bad = {
        "validation.sigma_quantiles=[0.0,0.5]": "validation.sigma_quantiles",
        "validation.every=-1": "validation.every",
        "validation.every=10": "nothing to validate",
        "validation.sample_frames=6": "validation.sample_frames",
        "validation.images=[a.png]": "validation.images",
        "logging.trackers=[tensorbord]": "logging.trackers[0]",
        "train.ema_decay=1.0": "train.ema_decay",
    }
    for override, message in bad.items():
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            load_recipe(TINY_RECIPES / "t2v_lora.yaml", [override])
    with pytest.raises(UserError, match="apply to objective: generator"):
        load_recipe(TINY_RECIPES / "reasoner_caption.yaml", ["validation.prompts=[a cat]"])
    with pytest.raises(UserError, match="action.val_episodes"):
        load_recipe(TINY_RECIPES / "action_policy.yaml", ["validation.every=5", "action.val_episodes=0"])


@pytest.mark.parametrize("method", ["logit_normal", "uniform", "mode"])
def test_fixed_sigmas_are_quantiles_of_the_training_density(method):
    from cosmos_train.objectives.flow_matching import sample_sigma

    g = S.GeneratorConfig(sigma_sampling=method, logit_mean=0.3, logit_std=1.2)
    drawn = sample_sigma(200_000, method=method, logit_mean=0.3, logit_std=1.2, mode_scale=g.mode_scale, shift=5.0,
                         generator=torch.Generator().manual_seed(0))
    for q in (0.1, 0.5, 0.9):
        assert sigma_at_quantile(q, g, 5.0) == pytest.approx(float(torch.quantile(drawn[:100_000], q)), abs=0.01)
    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", ["validation.sigma_quantiles=[0.1,0.9]"])
    sigmas = fixed_sigmas(cfg)
    assert list(sigmas) == ["0.10", "0.90"] and 0 < sigmas["0.10"] < sigmas["0.90"] < 1


# ---- generator validation -------------------------------------------------------------------------------------


def _generator(tiny_dir, tmp_path, *extra):
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective
    from cosmos_train.trainer.optim import build_optimizer

    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", [
        f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}", "data.num_frames=9",
        "validation.every=2", f"validation.manifest={SAMPLES}", "validation.max_samples=2",
        "validation.sigma_quantiles=[0.2,0.8]", "validation.prompts=[A red circle moves.,A blue square.]",
        f"validation.images=['',{REPO / 'data/samples/images/sun_over_field.png'}]", "validation.sample_frames=5",
        "validation.sample_steps=2", *extra])
    model = load_model(cfg)
    groups = model.setup_trainable(cfg)
    objective = build_objective(cfg, model, seed=7)
    optimizer, _ = build_optimizer(groups, cfg.train)
    return cfg, model, objective, optimizer, [p for g in groups for p in g["params"]]


def test_generator_validation_is_reproducible_and_follows_the_weights(tiny_dir, tmp_path):
    from cosmos_train.trainer.validation import GeneratorValidator, build_validation

    cfg, model, objective, optimizer, params = _generator(tiny_dir, tmp_path)
    validation = build_validation(cfg, model, objective)
    validator = validation.validator
    assert isinstance(validator, GeneratorValidator) and len(validator.items) == 2
    assert validation.due(2) and validation.due(4) and not validation.due(3)
    model.transformer.train()
    rng = objective.generator.get_state()
    global_rng = torch.get_rng_state()
    first = validator()
    assert set(first) == {"val_loss", "val_loss_sigma_0.20", "val_loss_sigma_0.80"}
    assert first["val_loss"] == pytest.approx((first["val_loss_sigma_0.20"] + first["val_loss_sigma_0.80"]) / 2)
    assert validator() == first  # the same inputs every time
    assert model.transformer.training  # train mode restored
    assert torch.equal(objective.generator.get_state(), rng)  # no random number taken from the training stream
    assert torch.equal(torch.get_rng_state(), global_rng)
    # packed and one-forward-per-sample agree
    validator.packed = False
    unpacked = validator()
    assert unpacked["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)
    validator.packed = True

    # one training step moves the numbers
    sample = objective.encode(validator_sample(cfg))
    loss, _ = objective.loss([objective.draw(sample)])
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    optimizer.step()
    after = validator()
    assert after["val_loss"] != first["val_loss"]

    # samples: MP4 per prompt (the second one i2v), reproducible
    values, media = validation(2, tmp_path / "run")
    assert values == after
    assert [p.name for p in media] == ["00.mp4", "01.mp4"] and all(p.stat().st_size > 0 for p in media)
    info = json.loads((media[0].parent / "samples.json").read_text())
    assert media[0].parent.name == "step-0000002" and info["samples"][1]["image"].endswith("sun_over_field.png")
    assert [s["seed"] for s in info["samples"]] == [0, 1]
    assert model.transformer.training


def validator_sample(cfg):
    from cosmos_train.data.build import build_generator_data

    return build_generator_data(cfg).dataset[0]


def test_image_samples_and_bad_held_out_data(tiny_dir, tmp_path):
    from cosmos_train.trainer.validation import GeneratorValidator

    cfg, model, objective, _, _ = _generator(tiny_dir, tmp_path, "validation.sample_frames=1",
                                             "validation.prompts=[A sunset.]", "validation.images=[]")
    validator = GeneratorValidator(cfg, model, objective)
    (path,) = validator.generate_samples(5, tmp_path / "run")
    from PIL import Image

    assert path.suffix == ".png" and Image.open(path).size == (64, 64)

    cfg.validation.manifest = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="validation.manifest"):
        GeneratorValidator(cfg, model, objective)
    bad = tmp_path / "val.jsonl"
    bad.write_text(json.dumps({"path": str(tmp_path / "nope.mp4"), "caption": "x"}) + "\n")
    cfg.validation.manifest = str(bad)
    with pytest.raises(UserError, match="val.jsonl:1"):
        GeneratorValidator(cfg, model, objective)


# ---- reasoner validation --------------------------------------------------------------------------------------


def test_reasoner_validation_is_reproducible_and_follows_the_weights(tiny_dir, tmp_path):
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective
    from cosmos_train.trainer.validation import ReasonerValidator, build_validation

    cfg = load_recipe(TINY_RECIPES / "reasoner_caption.yaml", [
        f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}", "validation.every=5",
        f"validation.manifest={CONVERSATIONS}", "validation.max_samples=2"])
    model = load_model(cfg)
    groups = model.setup_trainable(cfg)
    objective = build_objective(cfg, model, seed=0)
    validation = build_validation(cfg, model, objective)
    assert isinstance(validation.validator, ReasonerValidator) and len(validation.validator.items) == 2
    model.transformer.train()
    first, media = validation(5, tmp_path / "run")
    assert media == [] and set(first) == {"val_loss", "val_tokens"} and first["val_tokens"] > 0
    assert validation.validator() == first
    assert model.transformer.training
    optimizer = torch.optim.AdamW(groups, lr=0.05)
    loss, _ = objective.loss(validation.validator.items[:1])
    loss.backward()
    optimizer.step()
    assert validation.validator()["val_loss"] != first["val_loss"]


# ---- step metrics -----------------------------------------------------------------------------------------------


def test_step_metric_helpers():
    bins = M.sigma_bins([0.05, 0.1, 0.5, 0.99, 1.0], [1.0, 3.0, 2.0, 4.0, 6.0])
    assert bins == {"loss_sigma_0.0-0.2": 2.0, "loss_sigma_0.4-0.6": 2.0, "loss_sigma_0.8-1.0": 5.0}
    with pytest.raises(ValueError):
        M.sigma_bins([0.1], [])
    assert M.flops_per_token(10, "full") == 60 and M.flops_per_token(10, "lora") == 40
    assert M.mfu(1000.0, 6e9, 1e15) == pytest.approx(0.006)
    assert M.mfu(1000.0, 6e9, 1e15, num_processes=2) == pytest.approx(0.003)
    assert M.mfu(1000.0, 6e9, None) is None
    assert M.peak_flops("cpu") is None
    assert next(f for k, f in M.PEAK_BF16_FLOPS if k in "NVIDIA H100 PCIe") == 756e12
    assert next(f for k, f in M.PEAK_BF16_FLOPS if k in "NVIDIA H200") == 989e12
    assert M.forward_params(torch.nn.Linear(3, 2)) == 8
    assert M.peak_memory_gb("cpu") > 0.01  # this process's max RSS
    assert M.data_wait_fraction(0.25, 1.0) == 0.25 and M.data_wait_fraction(1.0, 0.0) is None


# ---- trackers ---------------------------------------------------------------------------------------------------


class _Recorder:
    """A custom tracker through Accelerate's GeneralTracker interface."""

    def __new__(cls):
        from accelerate.tracking import GeneralTracker

        class Recorder(GeneralTracker):
            name = "recorder"
            requires_logging_directory = False

            def __init__(self):
                super().__init__()
                self.rows, self.images, self.config = [], [], None

            @property
            def tracker(self):
                return self

            def store_init_configuration(self, values):
                self.config = values

            def log(self, values, step=None, **kwargs):
                self.rows.append((step, values))

            def log_images(self, values, step=None, **kwargs):
                self.images.append((step, {k: [i.shape for i in v] for k, v in values.items()}))

        return Recorder()


def test_metrics_logger_with_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cosmos_train.inference import write_mp4

    assert M.tracker_names(S.LoggingConfig(wandb=True)) == ["wandb"]  # the older switch still means wandb
    assert M.tracker_names(S.LoggingConfig(wandb=True, trackers=["tensorboard"])) == ["tensorboard", "wandb"]
    recipe = {"train": {"lr": 1e-4, "lora": {"target_modules": ["a", "b"]}}, "output_dir": "x", "x": None}
    logging_cfg = S.LoggingConfig(trackers=["tensorboard"])
    recorder = _Recorder()
    trackers = M.init_trackers(None, logging_cfg, tmp_path, recipe)
    trackers.trackers.append(recorder)
    logger = M.MetricsLogger(tmp_path, logging_cfg, recipe, trackers=trackers)
    logger.log(1, {"loss": 0.5, "grad_norm": None, "modes": {"t2v": 3}, "lr": 1e-4})
    logger.log(2, {"loss": 0.25})
    logger.log(2, {"val_loss": 0.75})
    video = write_mp4(np.random.default_rng(0).random((5, 32, 48, 3)), tmp_path / "s" / "00.mp4", fps=8)
    image = tmp_path / "s" / "01.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    logger.log_media(2, [video, image])
    assert recorder.rows[0] == (1, {"loss": 0.5, "modes/t2v": 3, "lr": 1e-4})
    assert recorder.images == [(2, {"samples": [(32, 144, 3), (16, 16, 3)]})]
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a line torn by a kill
    rows = M.read_metrics(tmp_path)
    assert [(r["step"], r.get("loss")) for r in rows] == [(1, 0.5), (2, 0.25), (2, None)]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([0.5, 0.25])
    assert events.Scalars("val_loss")[0].value == 0.75
    assert {"samples/00", "samples/01"} <= set(events.Tags()["images"])


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import accelerate.tracking as T

    monkeypatch.setattr(T, "get_available_trackers", lambda: [])
    with pytest.raises(UserError, match=r"wandb is not installed: pip install 'cosmos-train\[wandb\]'"):
        M.init_trackers(None, S.LoggingConfig(wandb=True), tmp_path, {})


# ---- EMA and warm start -----------------------------------------------------------------------------------------


def test_ema_update_swap_and_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    params = list(net.parameters())
    start = [p.detach().clone() for p in params]
    ema = EMA(params, decay=0.9)
    expected = [s.clone() for s in start]
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, params)]
    assert all(torch.allclose(s, e) for s, e in zip(ema.shadow, expected)) and ema.num_updates == 3
    trained = [p.detach().clone() for p in params]
    with ema.swap():
        assert all(torch.allclose(p, e) for p, e in zip(params, expected))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))  # the training weights exactly
    state = ema.state_dict()
    other = EMA(params, decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 3 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(UserError, match="does not match"):
        EMA(params[:1], decay=0.9).load_state_dict(state)


def test_ema_export_state_uses_the_checkpoint_keys_and_exports(tmp_path):
    from safetensors.torch import save_file

    class Adapter:  # the model adapter's trainable-state interface
        def __init__(self):
            self.net = torch.nn.Linear(2, 2)

        def trainable_state_dict(self, cfg):
            return {f"transformer.{n}": p.detach().cpu().contiguous() for n, p in self.net.named_parameters()}

        def load_trainable_state_dict(self, cfg, weights):
            with torch.no_grad():
                for n, p in self.net.named_parameters():
                    p.copy_(weights[f"transformer.{n}"])

    model = Adapter()
    ema = EMA(model.net.parameters(), decay=0.5)
    with torch.no_grad():
        model.net.weight.add_(2.0)
    ema.update()
    raw = model.trainable_state_dict(None)
    exported = ema.export_state(model, None)
    assert set(exported) == set(raw)
    assert torch.allclose(exported["transformer.weight"], raw["transformer.weight"] - 1.0)
    assert torch.equal(model.trainable_state_dict(None)["transformer.weight"], raw["transformer.weight"])
    resumed = EMA(model.net.parameters(), decay=0.5)
    resumed.load_export_state(model, None, exported, num_updates=1)
    assert torch.allclose(resumed.shadow[0], ema.shadow[0]) and resumed.num_updates == 1

    from cosmos_train.trainer import checkpoint as C

    ckpt = C.save_checkpoint(tmp_path / "run", 4, {k: v.clone() for k, v in raw.items()},
                             extra_state={"method": "lora"}, torch_state={"optimizer": {}}, keep=2)
    with pytest.raises(UserError, match="no ema.safetensors"):
        ema_weights_for_export(ckpt)
    save_file(exported, str(ckpt / "ema.safetensors"))
    got = ema_weights_for_export(ckpt)
    assert set(got) == set(raw) and torch.allclose(got["transformer.weight"], exported["transformer.weight"])
    (ckpt / "ema.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(UserError, match="unreadable"):
        ema_weights_for_export(ckpt)

    # warm start: a run directory (latest checkpoint) or a checkpoint directory
    assert set(load_warm_start(tmp_path / "run")) == set(raw)
    assert set(load_warm_start(ckpt, method="lora")) == set(raw)
    with pytest.raises(UserError, match="train.method=lora weights"):
        load_warm_start(ckpt, method="full")
    with pytest.raises(UserError, match="does not exist"):
        load_warm_start(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without checkpoints"):
        load_warm_start(tmp_path / "empty")
    (ckpt / "trainable.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="init_from: checkpoint .* is damaged: trainable.safetensors has 4 bytes"):
        load_warm_start(ckpt)


def test_action_runs_validate_on_held_out_episodes(tiny_dir, tmp_path):
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective
    from cosmos_train.trainer.validation import build_validation

    cfg = load_recipe(TINY_RECIPES / "action_policy.yaml", [
        f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}", "train.packing.max_tokens=512",
        "validation.every=2", "validation.max_samples=1", "validation.sigma_quantiles=[0.5]"])
    model = load_model(cfg)
    model.setup_trainable(cfg)
    validator = build_validation(cfg, model, build_objective(cfg, model, seed=0)).validator
    assert [s.split(":frame=")[0] for s in validator.sources] == ["lerobot_tiny:episode=5"]  # the held-out episode
    values = validator()
    assert set(values) == {"val_loss", "val_loss_sigma_0.50", "val_loss_vision", "val_loss_action"}
    assert validator() == values
    with pytest.raises(UserError, match="does not apply to action runs"):
        load_recipe(TINY_RECIPES / "action_policy.yaml", [f"validation.manifest={SAMPLES}"])
