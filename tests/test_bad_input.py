"""User errors through the real command: a clear message naming the file and line, exit status 2, no
traceback; with data.skip_bad_samples the run goes on and ends with a summary of what it skipped."""

import json
import shutil

import pytest

from cosmos_train.cli import main

from .conftest import SAMPLES, TINY_RECIPES

RECIPE = str(TINY_RECIPES / "t2v_lora.yaml")


@pytest.fixture()
def manifest_with(tmp_path):
    """Write a manifest: two good clips first, then the given bad line(s)."""

    def write(*bad_lines: str):
        clips = tmp_path / "clips"
        clips.mkdir(exist_ok=True)
        good = []
        for line in SAMPLES.read_text().splitlines()[:2]:
            record = json.loads(line)
            shutil.copy(SAMPLES.parent / record["path"], clips)
            record["path"] = "clips/" + record["path"].split("/")[-1]
            good.append(json.dumps(record))
        path = tmp_path / "manifest.jsonl"
        path.write_text("\n".join(good + list(bad_lines)) + "\n")
        return path

    return write


def _train(tiny_dir, tmp_path, manifest, *extra):
    return main(["train", RECIPE, f"model.pretrained={tiny_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.manifest={manifest}", "train.max_steps=3", "train.checkpoint_every=3", *extra])


BAD_LINES = {
    "missing_file": ('{"path": "clips/nowhere.mp4", "caption": "A ghost."}', "nowhere.mp4"),
    "empty_caption": ('{"path": "clips/red_circle.mp4", "caption": "   "}', "caption"),
    "bad_json": ('{"path": "clips/red_circle.mp4", "caption": oops', "JSON"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_manifest_line_fails_naming_file_and_line(reason, manifest_with, tiny_dir, tmp_path, capsys):
    line, word = BAD_LINES[reason]
    manifest = manifest_with(line)
    assert _train(tiny_dir, tmp_path, manifest) == 2
    err = capsys.readouterr().err
    assert "manifest.jsonl:3" in err and word in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_undecodable_video_fails_naming_the_file(manifest_with, tiny_dir, tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    manifest = manifest_with('{"path": "clips/broken.mp4", "caption": "A broken clip."}')
    assert _train(tiny_dir, tmp_path, manifest, "data.shuffle=false", "train.batch_size=3") == 2
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "manifest.jsonl:3" in err and "Traceback" not in err


def test_skip_bad_samples_counts_and_summarises(manifest_with, tiny_dir, tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "empty.mp4").write_bytes(b"")
    manifest = manifest_with(BAD_LINES["missing_file"][0], BAD_LINES["bad_json"][0],
                             '{"path": "clips/empty.mp4", "caption": "Nothing at all."}')
    assert _train(tiny_dir, tmp_path, manifest, "data.skip_bad_samples=true", "data.shuffle=false") == 0
    out = capsys.readouterr().out
    assert "skipped 3 bad samples" in out
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["skipped"] == {"missing_file": 1, "bad_json": 1, "undecodable": 1}
    assert summary["steps"] == 3


def test_unknown_checkpoint_path_and_offline_hub_id(manifest_with, tiny_dir, tmp_path, capsys, monkeypatch):
    manifest = manifest_with()
    assert main(["train", RECIPE, f"model.pretrained={tmp_path / 'no_such_ckpt'}",
                 f"output_dir={tmp_path / 'r1'}", f"data.manifest={manifest}"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", RECIPE, "model.pretrained=nvidia/Cosmos3-Nano-does-not-exist",
                 f"output_dir={tmp_path / 'r2'}", f"data.manifest={manifest}"]) == 2
    err = capsys.readouterr().err
    assert "could not load Cosmos 3 checkpoint 'nvidia/Cosmos3-Nano-does-not-exist'" in err
    assert "Traceback" not in err


def test_samples_over_the_packing_budget_are_skipped_by_name_never_looping(tiny_dir, tmp_path, capsys):
    # Videos here need 106-126 tokens, images 71-74: a 100-token budget keeps only the images.
    common = [f"model.pretrained={tiny_dir}", f"data.manifest={SAMPLES}", "generator.text_dropout=0",
              "train.max_steps=2", "train.checkpoint_every=2", "train.packing.lookahead=4"]
    with pytest.warns(UserWarning, match=r"manifest.jsonl:\d+: \d+ tokens exceed train.packing.max_tokens=100"):
        assert main(["train", RECIPE, *common, f"output_dir={tmp_path / 'a'}", "train.packing.max_tokens=100"]) == 0
    summary = json.loads((tmp_path / "a" / "run_summary.json").read_text())
    assert summary["skipped"] == {"over_token_budget": 6} and summary["steps"] == 2
    # Nothing fits: a clear error instead of an endless search for a sample that fits.
    with pytest.warns(UserWarning):
        assert main(["train", RECIPE, *common, f"output_dir={tmp_path / 'b'}", "train.packing.max_tokens=50"]) == 2
    assert "every sample" in capsys.readouterr().err
