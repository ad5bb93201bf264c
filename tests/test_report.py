"""`cosmos-train report RUN_DIR`: plots and a Markdown summary from a run directory's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cosmos_train.cli import main


def _generator_run(run: Path, steps: int = 40) -> None:
    run.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        loss = 1.0 / math.sqrt(step)
        rows.append({"step": step, "loss": loss, "lr": 1e-3 * (1 - step / steps), "grad_norm": 2.0 / step,
                     "step_time_s": 0.5, "data_time_s": 0.05, "samples": 4, "tokens": 2048,
                     "samples_per_s": 8.0, "tokens_per_s": 4096.0, "modes": {"t2v": 4}, "mfu": 0.31,
                     "peak_memory_gb": 60.5, "loss_sigma_0.0-0.2": loss * 0.5, "loss_sigma_0.8-1.0": loss * 1.5,
                     "grad_norm_none": None})
        if step % 10 == 0:
            rows.append({"step": step, "val_loss": 1.2 / math.sqrt(step), "val_loss_sigma_0.10": 0.4,
                         "val_loss_sigma_0.90": 1.9 / math.sqrt(step)})
    rows.append({"step": steps, "val_action_mae_policy": 0.12})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "loss": 0.1'  # a torn last line
    (run / "metrics.jsonl").write_text(text)
    (run / "run_summary.json").write_text(json.dumps({"steps": steps, "first_loss": 1.0,
                                                      "skipped": {"too_short": 2}, "skipped_steps": 1}))
    (run / "data_info.json").write_text(json.dumps({"skipped": {"undecodable": 1}}))
    (run / "recipe.yaml").write_text("objective: generator\nmodel: {pretrained: tiny}\ntrain: {method: lora}\n")
    old = run / "samples" / "step-0000010"
    old.mkdir(parents=True)
    (old / "00.mp4").write_bytes(b"old")
    new = run / "samples" / "step-0000040"
    new.mkdir(parents=True)
    (new / "00.mp4").write_bytes(b"not really a video")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(new / "01.png")
    (new / "samples.json").write_text(json.dumps({"step": 40, "samples": [
        {"file": "00.mp4", "prompt": "A red circle moves.", "image": None, "seed": 0},
        {"file": "01.png", "prompt": "A sunset.", "image": "/data/cond.png", "seed": 1}]}))


def test_report_writes_plots_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    _generator_run(run)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    report = run / "report"
    assert f"report: {report / 'report.md'}" in out
    expected = {"loss.png", "loss_by_sigma.png", "val_loss_by_sigma.png", "val_action.png", "throughput.png",
                "lr.png", "grad_norm.png", "system.png"}
    written = {p.name for p in report.glob("*.png")}
    assert written == expected
    for name in written:
        with Image.open(report / name) as im:
            im.verify()
            assert im.format == "PNG"
    md = (report / "report.md").read_text()
    for name in expected:
        assert f"]({name})" in md
    assert "steps: 40" in md and "first 1" in md and "best 0.1897 at step 40" in md
    assert "skipped samples: 3 (too_short: 2, undecodable: 1)" in md and "skipped steps" in md and ": 1" in md
    assert "8 samples/s" in md and "4096 tokens/s" in md and "MFU (median): 31.0%" in md and "60.5 GiB" in md
    assert "Latest: step 40" in md
    assert "[00.mp4: \"A red circle moves.\", seed 0](../samples/step-0000040/00.mp4)" in md
    assert "![01.png](../samples/step-0000040/01.png)" in md and "/data/cond.png" in md


def test_reasoner_run_without_sigma_bins_or_validation(tmp_path):
    run = tmp_path / "reasoner"
    run.mkdir()
    rows = [{"step": s, "loss": 2.0 - s / 10, "lr": 1e-4, "grad_norm": None, "step_time_s": 1.0,
             "data_time_s": 0.0, "samples_per_s": 2.0, "tokens_per_s": 900.0, "modes": {"video": 2}}
            for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    written = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert written == {"loss.png", "throughput.png", "lr.png", "system.png"}  # data wait from the step times
    md = (tmp_path / "out" / "report.md").read_text()
    assert "still training" in md and "validation loss" not in md and "None yet" in md
    (run / "run_summary.json").write_text(json.dumps({"steps": 5, "stopped": "SIGTERM"}))
    assert main(["report", str(run)]) == 0
    assert "steps: 5 (stopped by SIGTERM)" in (run / "report" / "report.md").read_text()


def test_report_needs_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "has no metrics.jsonl" in err and "Traceback" not in err
    (tmp_path / "run" / "metrics.jsonl").write_text("\n")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "no metrics rows" in capsys.readouterr().err
