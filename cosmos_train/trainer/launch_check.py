"""Refuse a launch that started a different number of processes than it was asked for.

`accelerate launch --cpu --num_processes 2 ...` starts ONE process and says nothing (with `--cpu` Accelerate
always uses its single-process launcher); without a GPU and without `train.device=cpu`, `torchrun` or
`accelerate launch --multi_gpu` start N processes that each see a run of 1 and train alone, all writing the
same output_dir. Both look like a working run. The trainer calls

    check_process_count(accelerator.num_processes)

right after it creates the Accelerator. What the launcher was asked for comes from, in order:

1. `COSMOS_TRAIN_EXPECTED_PROCESSES` (exported by launch/torchrun.sh, launch/multinode.sh and so
   launch/slurm.sbatch: processes per node x nodes);
2. the parent process's command line (Linux /proc; skipped elsewhere): `accelerate launch` with
   `--num_processes N` (or `num_processes` of its `--config_file` when the flag is absent), `torchrun` /
   `python -m torch.distributed.run` with `--nproc_per_node N` (x `--nnodes M` when M is a plain integer).
   The launchers' own argument parsers read the command line, so every spelling they accept is understood.

A known count that differs from `world_size` is a UserError naming the fix. Then the launcher's `WORLD_SIZE`
(when set) must equal `world_size` too. When nothing is known, nothing is checked.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..errors import UserError

ENV_EXPECTED = "COSMOS_TRAIN_EXPECTED_PROCESSES"


@dataclass
class Expected:
    """A process count the launch asked for, and how it was asked (for the message)."""
    count: int
    launcher: str  # "accelerate launch" | "torchrun" | "launch/*.sh"
    asked: str  # the flags or setting that asked for it, as the user wrote them
    accelerate_cpu: bool = False  # accelerate launch with --cpu, or use_cpu in a config file that starts one process


def read_parent_cmdline(pid: Optional[int] = None) -> Optional[list[str]]:
    """argv of process `pid` (default: this process's parent) from /proc, or None where that is not readable."""
    pid = os.getppid() if pid is None else pid
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0")]
    while args and args[-1] == "":
        args.pop()
    return args or None


def _launcher_args(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """("accelerate" | "torchrun" | None, the launcher's own arguments) for a process command line."""
    argv = list(argv)
    if not argv:
        return None, []
    name = os.path.basename(argv[0])
    if name.startswith("python") or name == "pypy3":  # the interpreter running a script or -m module
        i = 1
        while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "-c"):
            i += 2 if argv[i] in ("-W", "-X", "-Q") else 1  # interpreter options; these take a value
        if i >= len(argv) or argv[i] == "-c":
            return None, []
        if argv[i] == "-m":
            if i + 1 >= len(argv):
                return None, []
            module, rest = argv[i + 1], argv[i + 2:]
            if module in ("torch.distributed.run", "torch.distributed.elastic.multiprocessing.run"):
                return "torchrun", rest
            if module == "accelerate.commands.launch":
                return "accelerate", rest
            if module == "accelerate.commands.accelerate_cli" and rest[:1] == ["launch"]:
                return "accelerate", rest[1:]
            return None, []
        name, argv = os.path.basename(argv[i]), argv[i:]  # a console script run by path
    if name == "torchrun":
        return "torchrun", argv[1:]
    if name == "accelerate-launch":
        return "accelerate", argv[1:]
    if name == "accelerate" and argv[1:2] == ["launch"]:
        return "accelerate", argv[2:]
    return None, []


def _parse(parser, args: Sequence[str]):
    """parse_known_args without argparse's exit and usage output; None when the arguments do not parse."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_known_args(list(args))[0]
        except (SystemExit, Exception):
            return None


def _flag(args: Sequence[str], *names: str) -> Optional[str]:
    """How the user wrote flag `names` (`--num_processes 2` or `--num_processes=2`), for messages."""
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return f"{a} {args[i + 1]}"
            if a.startswith(n + "="):
                return a
    return None


def _from_torchrun(args: Sequence[str]) -> Optional[Expected]:
    try:
        from torch.distributed.run import get_args_parser
    except Exception:
        return None
    ns = _parse(get_args_parser(), args)
    if ns is None or not str(ns.nproc_per_node).isdigit():  # "gpu", "cpu", "auto": decided at launch
        return None
    nproc = int(ns.nproc_per_node)
    nnodes = "1" if getattr(ns, "standalone", False) else str(ns.nnodes)
    if ":" in nnodes:  # "1:1" is torchrun's default; "2:4" is elastic, not a fixed count
        lo, _, hi = nnodes.partition(":")
        if lo != hi:
            return None
        nnodes = lo
    if not nnodes.isdigit():
        return None
    asked = _flag(args, "--nproc_per_node", "--nproc-per-node") or f"--nproc_per_node {nproc}"
    if int(nnodes) != 1:
        asked += " x " + (_flag(args, "--nnodes") or f"--nnodes {nnodes}")
    return Expected(nproc * int(nnodes), "torchrun", asked)


def _from_accelerate(args: Sequence[str], cwd: Path) -> Optional[Expected]:
    try:
        from accelerate.commands.launch import launch_command_parser
    except Exception:
        return None
    ns = _parse(launch_command_parser(), args)
    if ns is None:
        return None
    count, asked = ns.num_processes, _flag(args, "--num_processes", "--num-processes")
    cpu, multi = bool(ns.cpu), bool(ns.multi_gpu or ns.use_deepspeed or ns.use_fsdp)
    n_machines = ns.num_machines or 1
    machines = _flag(args, "--num_machines", "--num-machines") or f"{n_machines} machines"
    if ns.config_file:
        conf = _read_yaml(cwd / ns.config_file)
        if count is None and isinstance(conf.get("num_processes"), int):
            count, asked = conf["num_processes"], f"num_processes: {conf['num_processes']} in {ns.config_file}"
        cpu = cpu or conf.get("use_cpu") is True
        multi = multi or str(conf.get("distributed_type", "")).upper() in (
            "MULTI_GPU", "DEEPSPEED", "FSDP", "MEGATRON_LM")
        if ns.num_machines is None and isinstance(conf.get("num_machines"), int):
            n_machines, machines = conf["num_machines"], f"num_machines: {conf['num_machines']}"
    if not isinstance(count, int) or count < 1:
        return None
    asked = asked or f"--num_processes {count}"
    # accelerate's num_processes counts all machines (it starts num_processes // num_machines on each)
    if n_machines > 1:
        asked += f" over {machines}"
    # --cpu always takes accelerate's single-process launcher; use_cpu from the config file only without a
    # multi-process distributed_type (accelerate's launch_command)
    return Expected(count, "accelerate launch", asked, accelerate_cpu=bool(ns.cpu) or (cpu and not multi))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def expected_processes(env: Optional[Mapping[str, str]] = None,
                       parent_cmdline: Optional[Callable[[], Optional[Sequence[str]]]] = None,
                       cwd: Optional[Path] = None) -> Optional[Expected]:
    """What the launch asked for (see the module docstring), or None when nothing says."""
    env = os.environ if env is None else env
    value = env.get(ENV_EXPECTED, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"{ENV_EXPECTED}={value!r} is not a process count: unset it, or set it to the number "
                            "of processes the launch starts (processes per node x nodes)")
        return Expected(int(value), "launch/*.sh", f"{ENV_EXPECTED}={value}")
    argv = (parent_cmdline or read_parent_cmdline)()
    if not argv:
        return None
    launcher, args = _launcher_args(argv)
    if launcher == "torchrun":
        return _from_torchrun(args)
    if launcher == "accelerate":
        return _from_accelerate(args, Path.cwd() if cwd is None else Path(cwd))
    return None


ALTERNATIVES = ("`accelerate launch --multi_gpu --num_processes {n} -m cosmos_train.cli train RECIPE ...` "
                "(--multi_gpu is Accelerate's torchrun launcher; on a machine without GPUs add train.device=cpu) "
                "or `launch/torchrun.sh RECIPE {n} ...`")


def check_process_count(world_size: int, *, env: Optional[Mapping[str, str]] = None,
                        parent_cmdline: Optional[Callable[[], Optional[Sequence[str]]]] = None,
                        cwd: Optional[Path] = None) -> None:
    """Raise UserError when this run has `world_size` processes (Accelerator.num_processes) but the launcher was
    asked for a different number, or started a different number (WORLD_SIZE). `env`, `parent_cmdline` (returns
    the parent's argv) and `cwd` (where a relative --config_file is found) are for tests."""
    env = os.environ if env is None else env
    started = env.get("WORLD_SIZE", "").strip()
    started_text = f"WORLD_SIZE={started}" if started else "WORLD_SIZE unset"
    exp = expected_processes(env, parent_cmdline, cwd)

    if exp is not None and exp.count != world_size:
        head = (f"{exp.launcher} was asked for {exp.count} processes ({exp.asked}) but this run has {world_size} "
                f"({started_text})")
        if started.isdigit() and int(started) == exp.count:  # they were started, but do not form one run
            raise UserError(f"{head}: each process trains alone. {_alone_hint()}")
        if exp.launcher == "accelerate launch" and not started:
            if exp.accelerate_cpu:
                why = "with --cpu (or use_cpu: true in its config file), Accelerate runs one process whatever " \
                      "num_processes says"
            else:
                why = "Accelerate starts several processes only with --multi_gpu (or distributed_type: MULTI_GPU " \
                      "in its --config_file, as in launch/accelerate_config.yaml) or when it sees 2 or more GPUs"
            raise UserError(f"{head}: {why}. For {exp.count} processes use {ALTERNATIVES.format(n=exp.count)}.")
        if exp.launcher == "launch/*.sh":
            raise UserError(f"{head}. {ENV_EXPECTED} is exported by launch/*.sh for the processes they start: "
                            f"unset it when launching another way, or start {exp.count} processes.")
        raise UserError(f"{head}. Launch with the process count you want, e.g. "
                        f"{ALTERNATIVES.format(n=exp.count)}.")

    if started.isdigit() and int(started) != world_size:
        raise UserError(f"the launcher started {started} processes (WORLD_SIZE={started}) but this run has "
                        f"{world_size}: each process trains alone. {_alone_hint()}")


def _alone_hint() -> str:
    return ("Accelerate joins the processes into one run over NCCL on GPUs, or over gloo with train.device=cpu; "
            "with train.device=auto on a machine without a usable GPU it does not: set train.device=cpu there "
            "(or check that every process sees its GPU).")
