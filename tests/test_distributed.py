"""Two-process DDP training on CPU (gloo) through torchrun, the way launch/torchrun.sh runs it.

Both ranks build the tiny checkpoint into an empty cache at the same time, train a few LoRA steps
on different samples, and only rank 0 writes checkpoints and metrics.
"""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, TINY_RECIPES

pytestmark = pytest.mark.slow

STEPS, EVERY, NPROC = 4, 2, 2


def test_two_process_torchrun(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = dict(os.environ, COSMOS_TRAIN_CACHE=str(cache), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           "-m", "cosmos_train.cli", "train", str(TINY_RECIPES / "t2v_lora.yaml"), f"output_dir={run_dir}",
           f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.batch_size=1",
           "train.grad_accum_steps=1", "train.device=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"run directory: {run_dir}" in proc.stdout

    # The concurrent first-use build left exactly one complete tiny checkpoint and no temp directories.
    assert [p.name for p in cache.iterdir()] == ["tiny-cosmos3-v3"]
    assert (cache / "tiny-cosmos3-v3" / "model_index.json").is_file()

    # One checkpoint per saved step, written once (no leftover temp directories from a second writer).
    ckpt_root = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == [f"step-{s:07d}" for s in range(EVERY, STEPS + 1, EVERY)]
    for step in range(EVERY, STEPS + 1, EVERY):
        state = json.loads((ckpt_root / f"step-{step:07d}" / "state.json").read_text())
        assert state["step"] == step
        # one entry per rank; packing draws a lookahead window ahead, so at least one sample per step
        assert len(state["samples_consumed"]) == NPROC and min(state["samples_consumed"]) >= step

    # Only rank 0 logs: one line per optimizer step.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == STEPS
