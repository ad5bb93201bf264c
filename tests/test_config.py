"""Recipes: schema validation (before any model loads), overrides, `show`, and the shipped recipes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cosmos_train.cli import main
from cosmos_train.config import load_recipe, load_saved_recipe, save_recipe
from cosmos_train.errors import UserError

from .conftest import REPO

MINIMAL = {"output_dir": "runs/x", "model": {"pretrained": "tiny"},
           "data": {"manifest": "data/samples/manifest.jsonl", "num_frames": 17}}


def _write(tmp_path, content) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr' (not a field of 'train'); did you mean 'train.lr'?"),
        ("train.lr=abc", "wrong type for 'train.lr'"),
        ("train.lr=-1", "'train.lr'"),
        ("generator.shift=0", "'generator.shift'"),
        ("generator.modes.t2v=0.5", "sum to 1"),
        ("generator.text_dropout=1.5", "'generator.text_dropout'"),
        ("data.num_frames=10", "4k+1"),
        ("data.resolution=300", "'data.resolution'"),
        ("data.height=70", "multiple of 16"),
        ("train.method=qlora", "'train.method'"),
        ("train.warmup_steps=-1", "'train.warmup_steps'"),
        ("objective=painter", "'objective'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, expected):
    with pytest.raises(UserError) as err:
        load_recipe(_write(tmp_path, MINIMAL), [override])
    assert expected in str(err.value)
    assert "recipe.yaml" in str(err.value)


def test_missing_required_values_are_listed(tmp_path):
    with pytest.raises(UserError, match="missing required value.*model.pretrained.*output_dir"):
        load_recipe(_write(tmp_path, {"data": {"manifest": "m.jsonl"}}))


def test_unknown_key_in_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(UserError, match="unknown key 'data.frames'"):
        load_recipe(_write(tmp_path, {**MINIMAL, "data": {"manifest": "m.jsonl", "frames": 3}}))
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_recipe(_write(tmp_path, "output_dir: x\nmodel: [unclosed\n"))


def test_overrides_defaults_and_round_trip(tmp_path):
    cfg = load_recipe(_write(tmp_path, MINIMAL), ["train.lr=3e-4", "generator.modes.t2v=0.6",
                                                  "generator.modes.i2v=0.3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.flow_shift() == 5.0 and cfg.pixel_size() == (480, 832)  # the 480p tier defaults
    assert load_recipe(_write(tmp_path, MINIMAL), ["data.resolution=720"]).flow_shift() == 10.0
    save_recipe(cfg, tmp_path / "saved.yaml")
    again = load_saved_recipe(tmp_path / "saved.yaml")
    assert again == cfg


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    recipe = _write(tmp_path, {**MINIMAL, "data": {"manifest": "./m.jsonl", "num_frames": 17}})
    assert load_recipe(recipe).data.manifest == str(tmp_path / "m.jsonl")


def test_show_prints_resolved_recipe_and_errors_exit_nonzero(capsys, tmp_path):
    assert main(["show", str(REPO / "recipes/tiny/t2v_lora.yaml"), "train.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["max_steps"] == 7 and shown["model"]["pretrained"] == "tiny"
    assert main(["show", str(REPO / "recipes/tiny/t2v_lora.yaml"), "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


def test_cli_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cosmos_train.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "recipe not found" in proc.stderr and "Traceback" not in proc.stderr


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        cfg = load_recipe(path)
        assert cfg.train.max_steps > 0 and cfg.output_dir
