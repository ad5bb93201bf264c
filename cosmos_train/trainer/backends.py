"""Distributed back-ends: how the trained weights, their gradients and the optimizer state are spread over the
processes (recipe `train.distributed.backend`). The loop only talks to `Backend`:

    backend = make_backend(cfg, accelerator)
    optimizer, scheduler = backend.prepare(model, groups)   # wraps model.transformer, builds the optimizer
    with backend.accumulating(last_micro): backend.backward(loss)
    norm = backend.grad_norm(params, max_norm); backend.step() / backend.skip()
    backend.save_optimizer(dir) / backend.load_optimizer(dir, torch_state)   # checkpoints

- ddp: Accelerate's DDP (one full replica per process; optimizer state saved by rank 0 in optimizer.pt).
- fsdp2: torch's `fully_shard` per decoder layer; parameters, gradients and optimizer state sharded; bf16 compute
  over fp32 master weights with fp32 gradient reduction. The optimizer state is saved sharded with
  torch.distributed.checkpoint (every rank writes its shard; loading re-shards to any process count).
- zero2 / zero3: DeepSpeed (trainer/deepspeed_backend.py).

Accelerate's own FSDP / DeepSpeed plugins are not used: they take their settings from `accelerate config` / its
environment rather than the recipe, and do not size CPU (gloo) runs right, which the tests need.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.trainer.optim import build_optimizer

SHARDED_OPTIMIZER = "optimizer"  # checkpoint subdirectory of a sharded optimizer state (fsdp2, zero2, zero3)


def make_backend(cfg, accelerator) -> "Backend":
    name = cfg.train.distributed.backend
    if name == "ddp":
        return DDPBackend(cfg, accelerator)
    if name == "fsdp2":
        return FSDP2Backend(cfg, accelerator)
    from cosmos_train.trainer.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(cfg, accelerator)


def check_supported(cfg) -> None:
    """Held-out evaluation and the EMA of the trained weights: on the main process with ddp and zero2 (whole weights
    on every rank), on every rank with fsdp2 (the sharded model needs all of them for a forward); not yet with zero3:
    refused up front, naming the keys. A DeepSpeed JSON is checked here, before data and model load."""
    backend = cfg.train.distributed.backend
    if backend in ("ddp", "fsdp2"):
        return
    if cfg.train.distributed.deepspeed_config:  # a bad DeepSpeed JSON fails now, before data and model load
        from cosmos_train.trainer.deepspeed_backend import _import_deepspeed, build_config

        on_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
        _import_deepspeed(torch.device("cpu" if on_cpu else "cuda"))  # before DeepSpeed picks its accelerator
        build_config(cfg, torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32)
    if backend == "zero2":
        return
    clashes = []
    if cfg.train.ema_decay:
        clashes.append("train.ema_decay")
    if cfg.validation.every:
        clashes.append("validation.every")
    if cfg.action is not None and cfg.action.val_episodes > 0 and cfg.action.eval_windows > 0:
        clashes.append("action.eval_windows (with action.val_episodes > 0)")
    if clashes:
        raise UserError(f"train.distributed.backend={backend}: {', '.join(clashes)} need(s) the ddp, fsdp2 or zero2 "
                        f"back-end for now; set them to 0 / null, or use backend=fsdp2")


class Backend:
    name = "ddp"
    sharded = False  # True: the optimizer state is written by every rank, into SHARDED_OPTIMIZER/
    # True: a forward needs every rank (sharded weights): held-out evaluation runs on all of them, rank 0 writes
    evaluates_on_every_rank = False

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.module = self.optimizer = None

    def prepare(self, model, groups: list[dict]):
        """Wrap model.transformer (setting model.forward_module) and build the optimizer and lr schedule over the
        trained parameters -> (optimizer, lr_scheduler). The schedule is not prepared by Accelerate: it would step
        it once per process."""
        raise NotImplementedError

    def accumulating(self, last_micro: bool):
        """Context of one micro-step's forward and backward: gradients are only reduced across processes on the
        last micro-step of an optimizer step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self, params: list, max_grad_norm: float) -> float:
        """The global gradient norm (clipped to max_grad_norm when > 0): a non-finite one marks the step."""
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """No update this step: gradients dropped, the optimizer's moments and step count untouched."""
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_state_dict(self, model, cfg) -> dict:
        """The trained weights, whole, on the main process (an empty dict elsewhere): every rank calls it."""
        state = model.trainable_state_dict(cfg)
        return state if self.accelerator.is_main_process else {}

    def module_state_dict(self, model, cfg) -> dict:
        """What the module's own trained parameters hold now, whole, on the main process (every rank calls it):
        the EMA is exchanged into them to be saved. The trained weights themselves, except where the back-end keeps
        its fp32 masters elsewhere (DeepSpeed)."""
        return self.trainable_state_dict(model, cfg)

    def ema_parameters(self, params: list) -> list:
        """The parameters an EMA of `params` (as the model set them up) tracks once the back-end has wrapped them."""
        return params

    # ---- checkpoints ---------------------------------------------------------------------------
    def optimizer_state(self) -> dict | None:
        """The optimizer state to store in optimizer.pt (replicated back-ends), None when saved sharded."""
        return self.optimizer.state_dict()

    def save_optimizer(self, directory: Path) -> None:
        """Sharded back-ends: every rank writes its part of the optimizer state under `directory`."""

    def load_optimizer(self, checkpoint: Path, torch_state: dict) -> None:
        self.optimizer.load_state_dict(torch_state["optimizer"])


def anchor(model) -> None:
    """Every rank computes gradients for the same parameters each step, whatever its batch holds."""
    if hasattr(model, "anchor_trained_heads"):
        model.anchor_trained_heads()


class DDPBackend(Backend):
    def prepare(self, model, groups):
        from cosmos_train.models import adapter_class

        anchor(model)
        optimizer, scheduler = build_optimizer(groups, self.cfg.train)
        self.module, self.optimizer = self.accelerator.prepare(model.transformer, optimizer)
        model.forward_module = self.module
        self._find_unused = adapter_class(self.cfg).ddp_find_unused_parameters(self.cfg)
        return self.optimizer, scheduler

    def accumulating(self, last_micro):
        return contextlib.nullcontext() if last_micro else self.accelerator.no_sync(self.module)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def grad_norm(self, params, max_grad_norm):
        if max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_grad_norm))
        grads = [p.grad for p in params if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def ensure_process_group(device: torch.device) -> bool:
    """Sharding needs a process group even for one process (a plain `python` / `cosmos-train train` run):
    start a one-rank group on a free local port when the launcher did not. True when it started one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    return True


def rebuild_groups(groups: list[dict], before: dict[int, str], module: torch.nn.Module) -> list[dict]:
    """Optimizer groups over the parameters a wrapper put in place of the originals (matched by name)."""
    now = dict(module.named_parameters())
    return [{**g, "params": [now[before[id(p)]] for p in g["params"]]} for g in groups]


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a network (the generator transformer's, the reasoner's language model's), each sharded
    as one unit; the rest shards with the root. Each unit is gathered when it is called, so every rank must call
    the same units: the decoder layers run for every input, where the reasoner's vision blocks run only for
    samples with images (they gather with the root, which every forward enters)."""
    return [block for name, child in module.named_modules() if isinstance(child, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1] == "layers" for block in child]


def fully_shard_layers(transformer, device: torch.device, compute_dtype: torch.dtype, *, reshard: bool = True,
                       offload: bool = False) -> None:
    """FSDP2 over the current process group: each decoder layer one unit, the rest with the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # bf16 compute over fp32 master weights: trained fp32 parameters are gathered as the base's dtype, their
    # gradients reduced in fp32; an fp32 base computes in fp32.
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard}
    if offload:
        # every shard (frozen base and trained weights) in CPU memory, copied to the device one layer at a time;
        # the optimizer then steps on the CPU: the one-GPU way to train over a base larger than the GPU
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in shard_units(transformer):  # one all-gather / reduce-scatter unit per decoder layer
        fully_shard(layer, **options)
    fully_shard(transformer, **options)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor as a whole tensor (a collective: every rank calls it, in the same order); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class FSDP2Backend(Backend):
    name = "fsdp2"
    sharded = True
    evaluates_on_every_rank = True

    def prepare(self, model, groups):
        import warnings

        # FSDP2 warns that the transformer returns views (the per-sample predictions) because an in-place op on them
        # would skip its hooks; the losses use them out of place (fsdp2 runs are tested equal to DDP runs)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)
        device = self.accelerator.device
        ensure_process_group(device)
        transformer = model.transformer
        anchor(model)
        names = {id(p): n for n, p in transformer.named_parameters()}
        # Each rank initialized its own LoRA / new head rows; fully_shard keeps each rank's local values (DDP
        # broadcasts rank 0's): start every rank from rank 0's trained weights.
        if torch.distributed.get_world_size() > 1:
            with torch.no_grad():
                for group in groups:
                    for param in group["params"]:
                        torch.distributed.broadcast(param.data, src=0)  # on the device already
        dist = self.cfg.train.distributed
        fully_shard_layers(transformer, device, model.compute_dtype, reshard=dist.reshard_after_forward,
                           offload=dist.offload_params)
        self.module = transformer
        model.forward_module = transformer
        self.optimizer, scheduler = build_optimizer(rebuild_groups(groups, names, transformer), self.cfg.train)
        return self.optimizer, scheduler

    def accumulating(self, last_micro):
        # gradients stay unsharded and local until the last micro-step, then one reduce-scatter
        self.module.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def grad_norm(self, params, max_grad_norm):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return float(_whole(norm))

    def ema_parameters(self, params):
        # fully_shard put DTensor shards in place of the parameters, in the optimizer groups' order
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def trainable_state_dict(self, model, cfg):
        # gathered tensor by tensor; only the main process keeps them
        keep = self.accelerator.is_main_process
        state = {}
        for key, value in model.trainable_state_dict(cfg).items():
            whole = _whole(value).detach()
            if keep:
                state[key] = whole.cpu().contiguous()
        return state

    def optimizer_state(self):
        return None

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"optimizer": get_optimizer_state_dict(self.module, self.optimizer)}

    def save_optimizer(self, directory):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory))

    def load_optimizer(self, checkpoint, torch_state):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        directory = Path(checkpoint) / SHARDED_OPTIMIZER
        if not directory.is_dir():
            raise UserError(f"{checkpoint} has no sharded optimizer state ({SHARDED_OPTIMIZER}/): it was written by "
                            f"another back-end; resume with the run's train.distributed.backend")
        from torch.distributed.checkpoint import DefaultLoadPlanner

        state = self._state()  # the layout to read into; dcp re-shards the saved tensors to this process count
        # Partial: the layout has a state for every trained parameter, the checkpoint only for those that had a
        # gradient by then (e.g. not a modality's head that no batch used yet).
        dcp.load(state, checkpoint_id=str(directory), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=state["optimizer"])
