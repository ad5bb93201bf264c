"""A launch that starts a different number of processes than asked is refused (cosmos_train.trainer.launch_check).

Unit tests feed fake parent command lines and environments; one test runs the real `accelerate launch --cpu
--num_processes 2`, which starts one process; a slow one runs the alternative the message names, which starts two.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cosmos_train.errors import UserError
from cosmos_train.trainer.launch_check import (ENV_EXPECTED, check_process_count, expected_processes,
                                               read_parent_cmdline)

from .conftest import REPO

PY, ACC, TR = "/venv/bin/python3", "/venv/bin/accelerate", "/venv/bin/torchrun"
MOD = ["-m", "cosmos_train.cli", "train", "recipes/tiny/t2v_lora.yaml"]


def check(world_size, argv=None, env=None, cwd=None):
    check_process_count(world_size, env=env or {}, parent_cmdline=lambda: argv, cwd=cwd)


def refused(world_size, argv=None, env=None, cwd=None) -> str:
    with pytest.raises(UserError) as e:
        check(world_size, argv, env, cwd)
    return str(e.value)


# --- accelerate launch ------------------------------------------------------------------------------------


def test_accelerate_cpu_started_one_process():
    msg = refused(1, [PY, ACC, "launch", "--cpu", "--num_processes", "2", *MOD])
    assert "accelerate launch was asked for 2 processes (--num_processes 2) but this run has 1 (WORLD_SIZE unset)" \
        in msg
    assert "with --cpu" in msg
    # the working alternatives, with the count filled in
    assert "accelerate launch --multi_gpu --num_processes 2" in msg and "train.device=cpu" in msg
    assert "launch/torchrun.sh RECIPE 2" in msg


@pytest.mark.parametrize("flags", [["--num_processes=3"], ["--num-processes", "3"], ["--num-processes=3"]])
def test_accelerate_flag_spellings(flags):
    msg = refused(1, [PY, ACC, "launch", "--cpu", *flags, *MOD])
    assert "asked for 3 processes" in msg and flags[0] in msg
    check(3, [PY, ACC, "launch", "--cpu", *flags, *MOD], env={"WORLD_SIZE": "3"})


@pytest.mark.parametrize("prefix", [[PY, ACC, "launch"], [ACC, "launch"], ["/venv/bin/accelerate-launch"],
                                    [PY, "-m", "accelerate.commands.launch"],
                                    [PY, "-u", "-m", "accelerate.commands.accelerate_cli", "launch"]])
def test_accelerate_command_forms(prefix):
    assert "asked for 4 processes" in refused(1, [*prefix, "--num_processes", "4", *MOD])


def test_accelerate_without_multi_gpu_hint():
    msg = refused(1, [PY, ACC, "launch", "--num_processes", "2", *MOD])  # <= 1 GPU visible: one process
    assert "only with --multi_gpu" in msg and "with --cpu" not in msg


def test_accelerate_matching_count_passes():
    check(2, [PY, ACC, "launch", "--multi_gpu", "--num_processes", "2", *MOD], env={"WORLD_SIZE": "2"})
    check(1, [PY, ACC, "launch", "--cpu", "--num_processes", "1", *MOD])
    check(1, [PY, ACC, "launch", *MOD])  # no count asked: nothing to compare


def test_accelerate_num_machines_counts_all_processes():
    argv = [PY, ACC, "launch", "--multi_gpu", "--num_processes", "16", "--num_machines", "2", *MOD]
    check(16, argv, env={"WORLD_SIZE": "16"})  # accelerate's --num_processes is the total over machines
    assert "(--num_processes 16 over --num_machines 2)" in refused(8, argv, env={"WORLD_SIZE": "8"})


def test_script_arguments_are_not_launcher_flags():
    # flags after the training script belong to the script
    check(2, [PY, ACC, "launch", "--multi_gpu", "--num_processes", "2", *MOD, "--num_processes", "7"],
          env={"WORLD_SIZE": "2"})
    check(2, [PY, TR, "--nproc_per_node", "2", *MOD, "--nproc_per_node", "7"], env={"WORLD_SIZE": "2"})


def test_accelerate_config_file(tmp_path):
    (tmp_path / "multi.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 4\nuse_cpu: false\n")
    argv = [PY, ACC, "launch", "--config_file", "multi.yaml", *MOD]
    msg = refused(1, argv, cwd=tmp_path)  # relative to the launch's working directory
    assert "asked for 4 processes (num_processes: 4 in multi.yaml)" in msg
    check(4, argv, env={"WORLD_SIZE": "4"}, cwd=tmp_path)
    # the flag wins over the file
    check(2, [PY, ACC, "launch", "--config_file", str(tmp_path / "multi.yaml"), "--num_processes", "2", *MOD],
          env={"WORLD_SIZE": "2"})
    # a CPU config with a single-process distributed_type: accelerate starts one process
    (tmp_path / "cpu.yaml").write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    msg = refused(1, [PY, ACC, "launch", "--config_file", str(tmp_path / "cpu.yaml"), *MOD])
    assert "asked for 2 processes" in msg and "use_cpu: true" in msg
    # an unreadable or missing file: nothing known
    check(1, [PY, ACC, "launch", "--config_file", str(tmp_path / "missing.yaml"), *MOD])


def test_the_shipped_accelerate_configs_are_understood():
    for name in ("accelerate_config.yaml", "accelerate_multinode.yaml"):
        path = REPO / "launch" / name
        import yaml

        n = yaml.safe_load(path.read_text())["num_processes"]
        exp = expected_processes({}, lambda: [PY, ACC, "launch", "--config_file", str(path), *MOD])
        assert exp is not None and exp.count == n and not exp.accelerate_cpu, name
    # on the second machine of the multi-node file, a run of 8 is refused: 16 over both machines were asked for
    path = REPO / "launch" / "accelerate_multinode.yaml"
    argv = [PY, ACC, "launch", "--config_file", str(path), "--machine_rank", "1", *MOD]
    check(16, argv, env={"WORLD_SIZE": "16"})
    assert "(num_processes: 16 in " in refused(8, argv, env={"WORLD_SIZE": "8"})
    assert "over num_machines: 2)" in refused(8, argv, env={"WORLD_SIZE": "8"})


# --- torchrun -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [[PY, TR], [TR], [PY, "-m", "torch.distributed.run"]])
def test_torchrun_nproc_times_nnodes(prefix):
    argv = [*prefix, "--nnodes=2", "--node_rank=0", "--nproc_per_node=4", "--rdzv_endpoint=n0:29500", *MOD]
    check(8, argv, env={"WORLD_SIZE": "8"})
    msg = refused(4, argv, env={"WORLD_SIZE": "4"})
    assert "torchrun was asked for 8 processes (--nproc_per_node=4 x --nnodes=2) but this run has 4" in msg


def test_torchrun_standalone_and_spellings():
    assert "asked for 2 processes (--nproc-per-node 2)" in refused(
        1, [PY, TR, "--standalone", "--nproc-per-node", "2", *MOD])


@pytest.mark.parametrize("flags", [["--nproc_per_node", "gpu"], ["--nproc_per_node", "auto"],
                                   ["--nnodes", "1:4", "--nproc_per_node", "2"]])
def test_torchrun_counts_decided_at_launch_are_not_checked(flags):
    check(3, [PY, TR, *flags, *MOD])


# --- launch/*.sh, WORLD_SIZE, nothing known -------------------------------------------------------------------


def test_expected_processes_env_comes_first():
    argv = [PY, TR, "--nproc_per_node", "4", *MOD]
    check(8, argv, env={ENV_EXPECTED: "8", "WORLD_SIZE": "8"})  # the scripts' count wins over the command line
    msg = refused(4, argv, env={ENV_EXPECTED: "8", "WORLD_SIZE": "4"})
    assert f"asked for 8 processes ({ENV_EXPECTED}=8)" in msg and "unset it" in msg
    with pytest.raises(UserError, match=f"{ENV_EXPECTED}='two' is not a process count"):
        check(1, None, env={ENV_EXPECTED: "two"})


def test_processes_that_do_not_join_are_refused():
    # torchrun started 2 (WORLD_SIZE=2) but Accelerate saw a run of 1 in each (train.device=auto without a GPU)
    msg = refused(1, [PY, TR, "--standalone", "--nproc_per_node", "2", *MOD], env={"WORLD_SIZE": "2"})
    assert "each process trains alone" in msg and "train.device=cpu" in msg
    msg = refused(1, None, env={"WORLD_SIZE": "2"})  # no launcher known: WORLD_SIZE alone says it
    assert "started 2 processes (WORLD_SIZE=2) but this run has 1" in msg and "train.device=cpu" in msg


@pytest.mark.parametrize("argv", [None, [], ["/bin/bash"], [PY, "-m", "cosmos_train.cli", "train", "r.yaml"],
                                  [PY, "-m", "pytest", "--num_processes", "2"], [PY, "-c", "pass"]])
def test_nothing_known_nothing_checked(argv):
    check(1, argv)
    check(3, argv)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="no /proc")
def test_read_parent_cmdline_reads_proc():
    assert read_parent_cmdline(os.getpid())[:1] == [Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()]
    assert read_parent_cmdline(2 ** 22 + 12345) is None  # no such process


def test_launch_scripts_export_the_expected_count(tmp_path):
    """launch/torchrun.sh and multinode.sh export NPROC x NNODES (a fake torchrun on PATH prints it)."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\necho "$' + ENV_EXPECTED + ' $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    env.pop(ENV_EXPECTED, None)
    out = subprocess.run(["bash", "launch/torchrun.sh", "r.yaml", "3", "train.max_steps=2"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("3 ") and "--nproc_per_node=3" in out and out.rstrip().endswith("train.max_steps=2")
    env.update(MASTER_ADDR="n0", NNODES="2", NODE_RANK="1")
    out = subprocess.run(["bash", "launch/multinode.sh", "r.yaml", "4"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("8 ") and "--nnodes=2" in out and "--nproc_per_node=4" in out


# --- launch/deepspeed/*.json ----------------------------------------------------------------------------------

DS_JSONS = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def _no_auto(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            _no_auto(v, f"{where}.{k}")
    else:
        assert value != "auto", f"{where} is 'auto': DeepSpeed without Accelerate does not resolve it"


@pytest.mark.parametrize("name", sorted(DS_JSONS))
def test_shipped_deepspeed_json_parses_with_deepspeed(name):
    import json

    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    data = json.loads((REPO / "launch" / "deepspeed" / name).read_text())
    # only ZeRO tuning: batch sizes, accumulation, clipping, precision and the optimizer come from the recipe
    assert set(data) == {"zero_optimization"}, sorted(data)
    _no_auto(data, name)
    zero = DeepSpeedZeroConfig(**data["zero_optimization"])  # extra="forbid": an unknown key is an error
    assert int(zero.stage) == DS_JSONS[name] == data["zero_optimization"]["stage"]
    offload = name.endswith("_offload.json")
    assert (zero.offload_optimizer is not None) == offload and (zero.offload_param is not None) == offload
    if offload:
        for part in (zero.offload_optimizer, zero.offload_param):
            assert part.device == OffloadDeviceEnum.cpu and part.pin_memory

    # and the whole config, with the keys the trainer fills from the recipe, parses as DeepSpeed's own config
    from deepspeed.runtime.config import DeepSpeedConfig

    full = DeepSpeedConfig(dict(data, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2,
                                gradient_clipping=1.0, bf16={"enabled": True}, zero_allow_untested_optimizer=True))
    assert full.zero_optimization_stage == DS_JSONS[name] and full.train_batch_size == 2


def test_deepspeed_zero_config_rejects_unknown_keys():
    """The check above means something: a misspelt key does not parse."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(Exception, match="stage3_prefetch_bucket"):
        DeepSpeedZeroConfig(stage=3, stage3_prefetch_bucket=1)


# --- the real launcher -------------------------------------------------------------------------------------------


SCRIPT = textwrap.dedent("""
    import sys
    from accelerate import Accelerator
    from cosmos_train.errors import UserError
    from cosmos_train.trainer.launch_check import check_process_count

    accelerator = Accelerator(cpu=True)
    try:
        check_process_count(accelerator.num_processes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"ok {accelerator.process_index}/{accelerator.num_processes}")
""")


def _launch(tmp_path, *flags):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("no accelerate console script next to this interpreter")
    env = {k: v for k, v in os.environ.items() if k not in (ENV_EXPECTED, "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([str(accelerate), "launch", *flags, str(script)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_real_accelerate_launch_cpu_two_processes(tmp_path):
    """accelerate launch --cpu --num_processes 2 really starts one process, silently; the check refuses it."""
    one = _launch(tmp_path, "--cpu", "--num_processes", "2")
    assert one.returncode != 0, one.stdout + one.stderr
    assert "accelerate launch was asked for 2 processes (--num_processes 2) but this run has 1 (WORLD_SIZE unset)" \
        in one.stderr, one.stderr[-3000:]
    assert "--multi_gpu --num_processes 2" in one.stderr
    assert "ok" not in one.stdout.split()


@pytest.mark.slow
def test_real_accelerate_launch_the_alternative_starts_two(tmp_path):
    """The alternative the message names (--multi_gpu: Accelerate's torchrun launcher; the processes join over gloo
    as the recipe's train.device=cpu makes them) starts two processes on a machine without GPUs, and passes."""
    two = _launch(tmp_path, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    # the two ranks share one stdout: their lines may interleave mid-line, so count what each one printed
    assert two.stdout.count("ok") == 2 and "0/2" in two.stdout and "1/2" in two.stdout, two.stdout
