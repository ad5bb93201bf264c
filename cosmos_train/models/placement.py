"""Which parts of a model sit on the accelerator while training, and bringing parts over for a while.

A plan maps dotted part names of a component tree (`"transformer"`, `"transformer.lm_head"`, `"vae.decoder"`) to
True (the accelerator) or False (CPU). `apply_plan` carries it out; a frozen module that must stay on the CPU
inside a module that goes to the accelerator is *parked*: taken out of its parent's module tree (still readable
as `parent.<name>`), because every wrapper the trainer uses moves the whole tree it is given (Accelerate's
`prepare_model` calls `model.to(device)`, FSDP2's `fully_shard` and DeepSpeed move the module's states), and DDP
refuses a module whose parameters are on two device types.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

_PARKED = "_cosmos_train_parked"  # {name: module} on the parent, for unpark


def park(parent: nn.Module, name: str) -> nn.Module:
    """Take `parent.<name>` out of `parent`'s module tree (parameters(), state_dict(), to(), wrappers no longer see
    it); `parent.<name>` still returns it. Idempotent."""
    parked = parent.__dict__.setdefault(_PARKED, {})
    if name in parked:
        return parked[name]
    module = parent._modules.pop(name)
    parked[name] = module
    object.__setattr__(parent, name, module)  # a plain attribute: readable, not registered
    return module


def unpark(parent: nn.Module, name: str) -> None:
    """Put a parked module back into its parent's tree (as loaded: state_dict() has its keys again)."""
    module = parent.__dict__.get(_PARKED, {}).pop(name, None)
    if module is None:
        return
    del parent.__dict__[name]
    parent.add_module(name, module)


def is_parked(parent: nn.Module, name: str) -> bool:
    return name in parent.__dict__.get(_PARKED, {})


def device_of(module: nn.Module) -> torch.device | None:
    return next((t.device for t in (*module.parameters(), *module.buffers())), None)


def apply_plan(plan: dict[str, bool], resolve: Callable[[str], nn.Module | None], device) -> None:
    """Move every part of `plan` (parents before their children, so a child's own entry wins)."""
    cpu = torch.device("cpu")
    for name in sorted(plan, key=lambda n: n.count(".")):
        module = resolve(name)
        if module is not None:
            module.to(device if plan[name] else cpu)


@contextlib.contextmanager
def brought_to(modules: list[nn.Module | None], device) -> Iterator[None]:
    """`modules` on `device` for the block, each back where it was afterwards."""
    moved = [(m, device_of(m)) for m in modules if m is not None]
    for module, _ in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, was in moved:
            if was is not None:
                module.to(was)
