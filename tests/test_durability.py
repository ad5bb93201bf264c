"""Durability: SIGTERM / SIGINT stop with a checkpoint and resume exactly, non-finite steps are skipped and
counted, checkpoints carry checksums (damaged ones are named and skipped on resume), --resume edge cases,
output paths that cannot be written."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cosmos_train.config import load_recipe
from cosmos_train.errors import UserError
from cosmos_train.trainer import checkpoint as ckpt
from cosmos_train.trainer import loop
from cosmos_train.trainer.loop import GracefulStop, Interrupted, train
from cosmos_train.trainer.optim import lr_multiplier

from .conftest import REPO, TINY_RECIPES

RECIPE = TINY_RECIPES / "t2v_lora.yaml"
STEPS = 4
COMMON = ["data.cache=off", "train.packing.lookahead=4", f"train.max_steps={STEPS}", "train.warmup_steps=2"]


def _overrides(tiny_dir, out, *extra):
    return [f"model.pretrained={tiny_dir}", f"output_dir={out}", *COMMON, *extra]


def _cfg(tiny_dir, out, *extra):
    return load_recipe(RECIPE, _overrides(tiny_dir, out, *extra))


def _weights(run_dir, step):
    return load_file(str(ckpt.checkpoint_dir(run_dir) / ckpt.step_name(step) / ckpt.WEIGHTS))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """The uninterrupted run: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(tiny_dir, out, "train.checkpoint_every=2", "train.keep_checkpoints=5"))
    return out


# ---- 1. SIGTERM / SIGINT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_equals_uninterrupted(sig, reference, tiny_dir, tmp_path):
    from cosmos_train.cli import main

    run = tmp_path / "run"
    args = ["train", str(RECIPE), *_overrides(tiny_dir, run, "train.checkpoint_every=100")]
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_train.cli", *args], cwd=REPO, stdout=out, stderr=err,
                            env=dict(os.environ))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        assert time.monotonic() < deadline, "no metrics line"
        time.sleep(0.05)
    proc.send_signal(sig)
    rc = proc.wait(timeout=240)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == 128 + sig, f"exit {rc}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    stopped = [line for line in stdout.splitlines() if line.startswith(f"cosmos-train: stopped by {sig.name}")]
    assert len(stopped) == 1 and "--resume" in stopped[0], stdout
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert 1 <= step < STEPS
    assert [p.name for p in ckpt.list_checkpoints(run)] == [ckpt.step_name(step)]  # the stop's checkpoint only
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run) / ckpt.step_name(step))  # complete, with checksums
    assert json.loads((run / "run_summary.json").read_text())["stopped"] == sig.name

    assert main([*args, "--resume"]) == 0
    _assert_same_weights(_weights(run, STEPS), _weights(reference, STEPS))
    assert [m["step"] for m in _metrics(run)] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(reference)]


def test_second_signal_stops_at_once_and_a_repeat_within_the_grace_is_the_same_stop(monkeypatch):
    stop = GracefulStop().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a request to stop after this step
        for _ in range(100):
            if stop.requested:
                break
            time.sleep(0.01)
        assert stop.requested and stop.exit_code == 130 and stop.name == "SIGINT"
        stop._handle(signal.SIGINT, None)  # the same Ctrl-C forwarded again (torchrun): ignored
        clock = time.monotonic() + GracefulStop.REPEAT_GRACE_S + 1
        monkeypatch.setattr(loop.time, "monotonic", lambda: clock)
        with pytest.raises(Interrupted) as raised:
            stop._handle(signal.SIGTERM, None)
        assert raised.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        stop.restore()


# ---- 2. non-finite steps ------------------------------------------------------------------------------------

def test_nonfinite_steps_are_skipped_counted_and_limited(tiny_dir, tmp_path, monkeypatch):
    """Step 2: NaN loss; step 4: finite loss, NaN gradients; step 5: NaN loss -> 2 in a row: stop (limit 2)."""
    nan_loss, nan_grad = {2, 5}, {4}
    real = loop.build_objective

    def build_objective(cfg, model, seed):
        objective = real(cfg, model, seed=seed)
        calls, original = [0], objective.loss

        def loss(batch, packed=False):
            calls[0] += 1  # one micro-step a step: call n is step n
            value, info = original(batch, packed=packed)
            if calls[0] in nan_loss:
                value = value * float("nan")
            if calls[0] in nan_grad:
                value.register_hook(lambda grad: grad * float("nan"))
            return value, info

        objective.loss = loss
        return objective

    monkeypatch.setattr(loop, "build_objective", build_objective)
    run = tmp_path / "run"
    cfg = _cfg(tiny_dir, run, "train.max_steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=10",
               "train.max_nonfinite_steps=2")
    with pytest.raises(UserError, match=r"2 steps in a row \(steps 4-5\).*non-finite.*max_nonfinite_steps=2.*"
                                        r"weights last changed at step 3"):
        train(cfg)
    # a skipped step changes no weight and no optimizer state
    w = {s: _weights(run, s) for s in range(1, 5)}
    _assert_same_weights(w[1], w[2])
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[3])
    _assert_same_weights(w[3], w[4])
    assert not (ckpt.checkpoint_dir(run) / ckpt.step_name(5)).exists()  # the stop comes before a save
    adam_steps = [float(torch.load(ckpt.checkpoint_dir(run) / ckpt.step_name(s) / ckpt.OPTIMIZER,
                                   weights_only=True)["optimizer"]["state"][0]["step"]) for s in range(1, 5)]
    assert adam_steps == [1.0, 1.0, 2.0, 2.0]
    rows = _metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    assert [m.get("skipped") for m in rows] == [None, "loss", None, "gradients", "loss"]
    assert [m["skipped_steps"] for m in rows] == [0, 1, 1, 2, 3]
    assert rows[1]["loss"] is None and rows[3]["loss"] is not None  # NaN is logged as null
    # the lr schedule follows the step count (warmup keeps rising through the skipped steps)
    assert [m["lr"] for m in rows] == pytest.approx([cfg.train.lr * lr_multiplier(
        s, warmup_steps=cfg.train.warmup_steps, max_steps=6, schedule=cfg.train.lr_schedule) for s in range(0, 5)])
    state = json.loads((ckpt.checkpoint_dir(run) / ckpt.step_name(4) / ckpt.STATE).read_text())
    assert state["skipped_steps"] == 2 and state["nonfinite_consecutive"] == 1  # a resume keeps counting
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["stopped"] == "max_nonfinite_steps" and summary["steps"] == 5


# ---- 3. checksums ---------------------------------------------------------------------------------------------

def _save_small(run_dir, step, keep=5):
    weights = {"a.lora_A.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8) * step}
    return ckpt.save_checkpoint(run_dir, step, weights, extra_state={"method": "lora"},
                                torch_state={"optimizer": {"state": {}, "param_groups": []}, "ranks": [{}]},
                                keep=keep)


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, file, problem", [
    (lambda p: _flip_byte(p / ckpt.WEIGHTS), ckpt.WEIGHTS, "does not match the sha256"),
    (lambda p: _truncate(p / ckpt.OPTIMIZER), ckpt.OPTIMIZER, "truncated"),
    (lambda p: (p / ckpt.STATE).unlink(), ckpt.STATE, "is missing"),
    (lambda p: (p / ckpt.CHECKSUMS).write_text("{not json"), ckpt.CHECKSUMS, "unreadable"),
    # written before checksums existed: still loads, and a damaged file is still a clear error
    (lambda p: ((p / ckpt.CHECKSUMS).unlink(), _truncate(p / ckpt.WEIGHTS)), ckpt.WEIGHTS, "unreadable"),
    (lambda p: ((p / ckpt.CHECKSUMS).unlink(), _truncate(p / ckpt.OPTIMIZER)), ckpt.OPTIMIZER, "unreadable"),
], ids=["flipped-weights", "truncated-optimizer", "missing-state", "bad-checksums", "legacy-truncated-weights",
        "legacy-truncated-optimizer"])
def test_damaged_checkpoint_files_are_named(tmp_path, damage, file, problem):
    path = _save_small(tmp_path, 3)
    weights, state, _ = ckpt.load_checkpoint(path)
    assert state["step"] == 3 and json.loads((path / ckpt.CHECKSUMS).read_text())["files"].keys() == {
        ckpt.WEIGHTS, ckpt.OPTIMIZER, ckpt.STATE}
    damage(path)
    with pytest.raises(ckpt.CheckpointDamaged, match=problem) as raised:
        ckpt.load_checkpoint(path)
    assert raised.value.file == file and str(path) in str(raised.value) and "--resume" in str(raised.value)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    path = _save_small(tmp_path, 2)
    (path / ckpt.CHECKSUMS).unlink()
    assert ckpt.verify_checkpoint(path) is False
    assert ckpt.load_checkpoint(path)[1]["step"] == 2


def test_no_intact_checkpoint_names_every_damaged_one(tmp_path):
    for step in (1, 2):
        _flip_byte(_save_small(tmp_path, step) / ckpt.WEIGHTS)
    with pytest.raises(UserError, match=r"no intact checkpoint.*step-0000002: trainable.safetensors.*"
                                        r"step-0000001: trainable.safetensors"):
        ckpt.load_latest_intact(tmp_path)


def test_resume_falls_back_past_a_damaged_checkpoint(reference, tiny_dir, tmp_path, capsys):
    """Also: --resume=auto with a checkpoint resumes; metrics keep each step once; leftovers of an
    interrupted save are removed."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _flip_byte(ckpt.checkpoint_dir(run) / ckpt.step_name(4) / ckpt.WEIGHTS)
    leftover = ckpt.checkpoint_dir(run) / ".step-0000005.abc123"
    leftover.mkdir()
    (leftover / ckpt.WEIGHTS).write_bytes(b"half")
    capsys.readouterr()
    train(_cfg(tiny_dir, run, "train.checkpoint_every=2", "train.keep_checkpoints=5"), resume="auto")
    out = capsys.readouterr().out
    assert "step-0000004 is damaged (trainable.safetensors does not match" in out
    assert "resuming from the previous intact checkpoint step-0000002" in out
    assert not leftover.exists() and "removed 1 unfinished checkpoint save" in out
    assert (ckpt.checkpoint_dir(run) / "damaged-step-0000004").is_dir()  # set aside, kept for inspection
    _assert_same_weights(_weights(run, STEPS), _weights(reference, STEPS))
    assert [m["step"] for m in _metrics(run)] == list(range(1, STEPS + 1))  # steps 3-4 not logged twice
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(reference)]


# ---- 4. --resume edge cases ---------------------------------------------------------------------------------

def test_resume_without_a_checkpoint_is_an_error_unless_auto(tiny_dir, tmp_path, capsys):
    from cosmos_train.cli import main

    run = tmp_path / "run"
    assert main(["train", str(RECIPE), *_overrides(tiny_dir, run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume=auto" in err and "Traceback" not in err
    assert not ckpt.list_checkpoints(run)
    # auto starts a new run and says so; rows a crashed earlier attempt logged are dropped
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo')
    train(_cfg(tiny_dir, run, "train.max_steps=1"), resume="auto")
    assert "--resume=auto: no checkpoint" in capsys.readouterr().out
    assert [(m["step"], m["loss"] != 9.0) for m in _metrics(run)] == [(1, True)]


@pytest.mark.parametrize("extra, message", [
    (["train.lr=1e-3", "train.seed=7"], r"train\.lr: 0\.005 -> 0\.001; train\.seed: 42 -> 7"),
    (["data.num_frames=9"], r"data\.num_frames: 17 -> 9"),
    (["train.packing.max_tokens=256"], r"train\.packing: "),
    (["train.max_steps=6"], r"train\.max_steps changed from 4 to 6.*cosine.*train\.extend_schedule=true"),
    (["train.max_steps=3"], r"train\.max_steps=3 is below the step of the checkpoint to resume \(4\)"),
], ids=["lr-seed", "num_frames", "packing", "longer", "shorter"])
def test_resume_refuses_a_changed_schedule_or_data_order(reference, tiny_dir, extra, message):
    before = sorted(p.name for p in reference.rglob("*"))
    with pytest.raises(UserError, match=message):
        train(_cfg(tiny_dir, reference, *extra), resume=True)
    assert sorted(p.name for p in reference.rglob("*")) == before  # refused before touching the run


def test_schedule_change_rules():
    cfg = load_recipe(RECIPE, ["output_dir=x", "train.lr_schedule=constant", "train.max_steps=10"])
    assert "same either way: a constant schedule" in loop._check_schedule(cfg, 4, 6)[0]
    cfg.train.lr_schedule = "cosine"
    cfg.train.warmup_steps = 20  # the steps left are all warmup: same lr for any length
    assert "same either way: still warming up" in loop._check_schedule(cfg, 4, 6)[0]
    cfg.train.warmup_steps = 2
    with pytest.raises(UserError, match="train.extend_schedule=true"):
        loop._check_schedule(cfg, 4, 6)
    with pytest.raises(UserError, match="below the step of the checkpoint"):
        loop._check_schedule(cfg, 12, 12)
    cfg.train.extend_schedule = True
    assert "recomputed over 10 steps" in loop._check_schedule(cfg, 4, 6)[0]
    assert loop._check_schedule(cfg, 4, 10) == []


def test_extend_schedule_continues_on_the_longer_schedule(reference, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = _cfg(tiny_dir, run, "train.max_steps=6", "train.extend_schedule=true", "train.checkpoint_every=2")
    train(cfg, resume=True)
    assert "recomputed over 6 steps" in capsys.readouterr().out
    t = cfg.train
    rows = _metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 7))
    # (a row's lr is the one its step used) the old 4-step schedule would have reached 0 at step 5
    lr = t.lr * lr_multiplier(4, warmup_steps=t.warmup_steps, max_steps=6, schedule=t.lr_schedule)
    assert lr > 1e-4 and rows[4]["lr"] == pytest.approx(lr)
    assert json.loads((ckpt.checkpoint_dir(run) / ckpt.step_name(6) / ckpt.STATE).read_text())["schedule_steps"] == 6


# ---- 5. output paths ------------------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_or_unwritable_is_a_clear_error(tiny_dir, tmp_path, capsys, monkeypatch):
    from cosmos_train.cli import main

    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    for out in (a_file, a_file / "run"):
        assert main(["train", str(RECIPE), *_overrides(tiny_dir, out)]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {out}" in err and "is a file" in err and "Traceback" not in err
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: there, the failing write is simulated below
        locked.chmod(0o500)
        assert main(["train", str(RECIPE), *_overrides(tiny_dir, locked / "run")]) == 2
        assert "not writable" in capsys.readouterr().err
        locked.chmod(0o700)

    def denied(cfg, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(loop, "save_recipe", denied)
    assert main(["train", str(RECIPE), *_overrides(tiny_dir, locked / "run")]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {locked / 'run'}: cannot write there (Permission denied" in err and "Traceback" not in err


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _save_small(tmp_path, 1)
    real = ckpt.torch.save

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-0000002: the disk is full .*"
                                        r"the previous checkpoint .*step-0000001 is intact.*--resume"):
        _save_small(tmp_path, 2)
    monkeypatch.setattr(ckpt.torch, "save", real)
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step-0000001"]  # no temporary left
    assert ckpt.verify_checkpoint(first) and ckpt.load_checkpoint(first)[1]["step"] == 1
