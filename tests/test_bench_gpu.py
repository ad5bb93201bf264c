"""bench/gpu_train.py (the GPU benchmark of issue #9) runs on CPU with the tiny config and writes its table."""

import importlib.util

from .conftest import REPO


def test_gpu_benchmark_runs_on_cpu_with_the_tiny_config(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--frames", "9", "--tiers", "256",
                       "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| lora") or line.startswith("| full")]
    # lora / lora-int8 (LoRA over an int8 base) / full / full-fsdp2 x grad ckpt on/off x packed on/off
    assert len(rows) == 16 and not any("failed" in r for r in rows)
    assert sum(r.startswith("| full-fsdp2 |") for r in rows) == 4
    assert sum(r.startswith("| lora-int8 |") for r in rows) == 4
    packed = [r for r in rows if r.split("|")[5].strip() == "True"]
    single = [r for r in rows if r.split("|")[5].strip() == "False"]
    assert all(int(p.split("|")[6]) > int(s.split("|")[6]) for p, s in zip(packed, single))  # two clips per pack


def test_packed_attention_memory_is_linear_in_samples_without_flex():
    """The benchmark's attention table on CPU: per-sample SDPA's largest tensor grows linearly with the samples in a
    pack, the dense-mask reference's quadratically (its [S, S] masks)."""
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch

    rows = bench.attention_memory((True, None, "cpu", torch.float32), [1, 4], 256, 9, "cpu")
    mb = {(r["backend"], r["samples"]): r["largest_mb"] for r in rows}
    assert mb["sdpa", 4] <= 4 * mb["sdpa", 1] * 1.01
    assert mb["sdpa_dense", 4] > 6 * mb["sdpa_dense", 1] and mb["sdpa_dense", 4] > 2 * mb["sdpa", 4]
    assert "| sdpa | 4 |" in bench.attention_table(rows)
