"""World-action runs as a user runs them: the tiny action recipe on the bundled LeRobot dataset -> train ->
export (merged, LoRA-only) -> `cosmos-train generate --action ...` through the stock pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmos_train.cli import main
from cosmos_train.config import load_recipe
from cosmos_train.export.generator import export_run
from cosmos_train.trainer.loop import train

from .conftest import TINY_RECIPES

RECIPE = TINY_RECIPES / "action_policy.yaml"
REPO = Path(__file__).resolve().parent.parent


def _cfg(tiny_dir, out, *overrides):
    return load_recipe(RECIPE, [f"model.pretrained={tiny_dir}", f"output_dir={out}", "train.max_steps=3",
                                "train.checkpoint_every=3", "train.packing.max_tokens=512", *overrides])


@pytest.fixture(scope="module")
def action_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("action")
    run = train(_cfg(tiny_dir, root / "run", "action.eval_windows=2", "action.eval_steps=2"))
    export_run(run, root / "export")
    export_run(run, root / "adapter", lora_only=True)
    return root, run


def _first_frame(root: Path) -> Path:
    from PIL import Image

    from cosmos_train.data.lerobot import LeRobotSource

    src = LeRobotSource(REPO / "data" / "lerobot_tiny")
    frame = src.decode_frames("observation.images.top", sorted(src.episodes)[0], [0.0], "test")[0]
    path = root / "frame.png"
    Image.fromarray(frame).save(path)
    return path


def test_action_run_trains_and_exports_what_serving_needs(action_run, tmp_path):
    root, run = action_run
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 3 and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert any("loss_action" in m for m in metrics)  # per-modality losses are logged
    # held-out action error (de-normalized units) of policy and inverse dynamics at the checkpoint
    evaluated = [m for m in metrics if "val_action_mae_policy" in m]
    assert len(evaluated) == 1 and evaluated[0]["step"] == 3
    assert all(np.isfinite(evaluated[0][f"val_action_mae_{m}"]) for m in ("policy", "inverse_dynamics"))
    record = json.loads((root / "export" / "cosmos_train_export.json").read_text())["action"]
    assert (record["embodiment"], record["domain_id"], record["raw_action_dim"], record["chunk_size"]) == \
        ("pusht", 4, 2, 8)
    assert record["fps"] == 10.0 and record["normalization"]["method"] == "quantile"
    assert record["normalization"] == json.loads((run / "action_normalization.json").read_text())
    card = (root / "export" / "README.md").read_text()
    assert "World-action" in card and "--action policy" in card and str(REPO) not in card
    assert "Held-out action error, policy" in card
    # the trained head rows of the pusht domain are in the export; other domains' rows are the base's
    from safetensors import safe_open

    from cosmos_train.models.layout import component_weight_map

    def table(root_dir):
        shards = component_weight_map(root_dir / "transformer")
        with safe_open(str(root_dir / "transformer" / shards["action_proj_out.fc.weight"]), framework="pt") as fh:
            return fh.get_tensor("action_proj_out.fc.weight")

    exported, base = table(root / "export"), table(_tiny_of(run))
    assert not torch.equal(exported[4], base[4])
    others = [d for d in range(exported.shape[0]) if d != 4]
    assert torch.equal(exported[others], base[others])
    assert (root / "adapter" / "action_heads.safetensors").is_file()


def _tiny_of(run: Path) -> Path:
    import yaml

    return Path(yaml.safe_load((run / "recipe.yaml").read_text())["model"]["pretrained"])


def test_generate_every_action_mode_from_the_export(action_run, tmp_path, capsys):
    root, _ = action_run
    frame = _first_frame(tmp_path)
    export = str(root / "export")
    common = ["--steps", "2", "--guidance", "1.0"]
    assert main(["generate", export, "push the disc", "--action", "policy", "--image", str(frame),
                 "--out", str(tmp_path / "policy.mp4"), *common]) == 0
    policy = json.loads((tmp_path / "policy.actions.json").read_text())
    assert np.asarray(policy["actions"]).shape == (8, 2) and np.isfinite(policy["actions"]).all()

    actions = tmp_path / "actions.json"
    out = {}
    for name, rows in (("a", [[0.1, 0.0]] * 8), ("b", [[-0.1, 0.05]] * 8)):
        actions.write_text(json.dumps(rows))
        assert main(["generate", export, "push the disc", "--action", "forward_dynamics", "--image", str(frame),
                     "--actions", str(actions), "--out", str(tmp_path / f"fwd_{name}.mp4"), *common]) == 0
        from cosmos_train.data.media import load_video

        out[name], _ = load_video(tmp_path / f"fwd_{name}.mp4", 9, 64, 64)
    assert not torch.allclose(out["a"], out["b"], atol=1e-3)  # the given actions steer the rolled-out future

    clip = tmp_path / "policy.mp4"
    assert main(["generate", export, "push the disc", "--action", "inverse_dynamics", "--video", str(clip),
                 "--out", str(tmp_path / "inv.mp4"), *common]) == 0
    assert np.asarray(json.loads((tmp_path / "inv.actions.json").read_text())["actions"]).shape == (8, 2)
    capsys.readouterr()
    assert main(["generate", export, "push", "--action", "forward_dynamics", "--image", str(frame),
                 "--out", str(tmp_path / "x.mp4")]) == 2  # no --actions: a clear error
    assert "--actions" in capsys.readouterr().err
    actions.write_text(json.dumps([[0.1, 0.0, 0.3]] * 8))
    assert main(["generate", export, "push", "--action", "forward_dynamics", "--image", str(frame), "--actions",
                 str(actions), "--out", str(tmp_path / "x.mp4")]) == 2  # wrong width for the embodiment
    assert main(["generate", str(_tiny_of(action_run[1])), "push", "--action", "policy", "--image", str(frame),
                 "--lora", str(root / "adapter"), "--out", str(tmp_path / "lora.mp4"), *common]) == 0


def test_new_embodiment_from_configuration_alone(tiny_dir, tmp_path, capsys):
    """An embodiment diffusers does not know: its head rows start as a copy of pusht's, train, and the export
    serves it through the stock pipeline (registered from the export record)."""
    from cosmos_train.models import load_model

    overrides = ["action.embodiment=my_pusher", "action.new_embodiment.name=my_pusher",
                 "action.new_embodiment.raw_action_dim=2", "action.new_embodiment.domain_id=24",
                 "action.new_embodiment.init_from=pusht"]
    cfg = _cfg(tiny_dir, tmp_path / "run", *overrides)
    model = load_model(cfg)
    model.setup_trainable(cfg)
    head = model.transformer.action_proj_in.fc.weight
    assert torch.equal(head[24], head[4])  # init_from copies the named embodiment's rows
    run = train(cfg)
    export_run(run, tmp_path / "export")
    record = json.loads((tmp_path / "export" / "cosmos_train_export.json").read_text())["action"]
    assert (record["embodiment"], record["domain_id"], record["new_embodiment"]) == ("my_pusher", 24, True)
    frame = _first_frame(tmp_path)
    assert main(["generate", str(tmp_path / "export"), "push", "--action", "policy", "--image", str(frame),
                 "--steps", "2", "--out", str(tmp_path / "p.mp4")]) == 0
    assert np.asarray(json.loads((tmp_path / "p.actions.json").read_text())["actions"]).shape == (8, 2)


@pytest.mark.slow  # ~100 CPU training steps
def test_policy_overfit_on_one_window_samples_its_actions_back(tiny_dir, tmp_path):
    """The whole chain (normalization, domain, action prompt, positions, masks, heads, export record,
    de-normalization) as the stock pipeline samples it: a policy trained on one window returns that window's
    actions from its first frame. A flipped velocity target or a skipped de-normalization fails this."""
    from PIL import Image

    from cosmos_train.config import load_saved_recipe
    from cosmos_train.data.lerobot import LeRobotActionDataset
    from cosmos_train.inference import load_pipeline
    from cosmos_train.inference_action import action_record, generate_action

    cfg = _cfg(tiny_dir, tmp_path / "run", "train.max_steps=100", "train.checkpoint_every=100",
               "train.packing.max_tokens=1024", "action.val_episodes=5", "action.window_stride=100",
               "action.modes.policy=1.0", "action.modes.forward_dynamics=0.0", "action.modes.inverse_dynamics=0.0",
               "train.lr=5e-3", "generator.text_dropout=0.0", "train.warmup_steps=5")
    run = train(cfg)
    export_run(run, tmp_path / "export")
    window = LeRobotActionDataset(load_saved_recipe(run / "recipe.yaml").action)[0]
    frame = ((window.pixels[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    pipe = load_pipeline(tmp_path / "export", device="cpu")
    _, predicted = generate_action(pipe, action_record(tmp_path / "export"), "policy", window.task,
                                   image=Image.fromarray(frame), steps=10, guidance=1.0, seed=0,
                                   use_system_prompt=False)
    raw = window.raw_actions.numpy()
    error = float(np.abs(predicted - raw).mean())
    assert error < 0.4 * float(np.abs(raw).mean()), (error, raw, predicted)
    assert error < float(np.abs(predicted + raw).mean()) / 3


def test_action_generate_refuses_what_it_cannot_do(action_run, tmp_path, capsys):
    root, _ = action_run
    frame = _first_frame(tmp_path)
    export = str(root / "export")
    actions = tmp_path / "short.json"
    actions.write_text(json.dumps([[0.1, 0.0]] * 3))  # the pipeline would repeat the last row silently
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1, "a"]] * 8))
    for extra, needle in ((["--action", "inverse_dynamics", "--image", str(frame)], "--video"),
                          (["--action", "forward_dynamics", "--image", str(frame), "--actions", str(actions)],
                           "exactly 8"),
                          (["--action", "forward_dynamics", "--image", str(frame), "--actions", str(bad)],
                           "numbers"),
                          (["--action", "policy", "--image", str(frame), "--sound"], "--sound"),
                          (["--actions", str(actions)], "--action forward_dynamics")):
        capsys.readouterr()
        assert main(["generate", export, "push", *extra, "--out", str(tmp_path / "x.mp4")]) == 2, extra
        assert needle in capsys.readouterr().err, extra
    card = (root / "export" / "README.md").read_text()
    assert "actions = normalized * scale + center" in card and "first_frame = Image.open" in card
    assert "LeRobot dataset `lerobot_tiny`" in card


@pytest.mark.parametrize("recipe,mode", [("action_forward_dynamics.yaml", "forward_dynamics"),
                                         ("action_inverse_dynamics.yaml", "inverse_dynamics")])
def test_single_mode_tiny_recipes_train(tiny_dir, tmp_path, recipe, mode):
    cfg = load_recipe(TINY_RECIPES / recipe, [f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}",
                                              "train.max_steps=1", "train.checkpoint_every=1",
                                              "train.packing.max_tokens=512", "action.eval_windows=0"])
    run = train(cfg)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["modes"]) == {mode}
    # forward dynamics gives the actions (no action loss), inverse dynamics the whole video (no vision loss)
    assert ("loss_action" in row) == (mode == "inverse_dynamics")
