"""DeepSpeed ZeRO stage 2 / 3 (recipe `train.distributed.backend: zero2 | zero3`), behind the `Backend` interface.

- The engine wraps model.transformer; the optimizer is ours (trainer.optim.build_optimizer: torch AdamW with the
  recipe's per-group lrs), handed to DeepSpeed as its client optimizer, and the LambdaLR schedule stays ours: the
  loop steps it once per optimizer step (DeepSpeed gets no scheduler). ZeRO keeps the group dicts of our
  optimizer, so the schedule's lr reaches the partitioned update.
- Precision: an fp32 base trains in fp32; a bf16 base uses DeepSpeed's bf16 mode, where the module computes in
  bf16 (trained fp32 parameters included: DeepSpeed casts them) over fp32 master weights and fp32 optimizer state
  kept by ZeRO, as fsdp2 does. The frozen base is not touched (bf16 stays bf16).
- Accumulation: ZeRO 2/3 reduce-scatter each backward by default (their gradient partitioning needs it;
  `engine.no_sync` refuses them). Over the micro-steps of an optimizer step the backward passes run inside
  `engine.coalesce_grad_reduction()`: gradients stay local and one reduction runs after the last micro-step.
  The price: until then every rank holds whole gradients of the trained parameters, as DDP does (nothing for
  LoRA; for a full finetune that ZeRO-3 barely fits, `coalesce = False` goes back to DeepSpeed's reduce-scatter
  into the partitioned gradients after every micro-step).
- Non-finite steps: `skip()` runs DeepSpeed's own overflow path (gradients dropped, no update, fp32 weights and
  moments untouched; the engine counts it in `skipped_steps`), whatever the gradients hold.
- Checkpoints: every rank writes whole tensors (fp32 master, Adam moments) of a share of the trained parameters
  through DeepSpeed's fragment API (deepspeed.utils.safe_get_full_*), and any process count reads them back
  (safe_set_full_*): a checkpoint re-shards to another number of processes. The frozen base is never written.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import warnings
from pathlib import Path

import torch

from cosmos_train.errors import UserError
from cosmos_train.trainer.backends import SHARDED_OPTIMIZER, Backend, anchor, ensure_process_group
from cosmos_train.trainer.optim import build_optimizer

OPTIMIZER_META = "deepspeed_optimizer.json"  # in SHARDED_OPTIMIZER/: layout, step counts, which file holds what
FORMAT = "cosmos_train.deepspeed.fragments.v1"
FP32 = "fp32"  # the tensor key of a master weight in the shard files (optimizer state keys: exp_avg, ...)


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator once, at first use: a CPU run must say so before (on a machine with CUDA it
    # would pick CUDA; without, it warns on every rank that it found none)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's own collectives call torch's deprecated all_gather_into_tensor / reduce_scatter_tensor: a
    # FutureWarning per call, i.e. several per step, that the user can do nothing about
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as err:
        raise UserError("train.distributed.backend=zero2/zero3 needs DeepSpeed: pip install 'cosmos-train[deepspeed]' "
                        f"({err})") from None
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "coalesce_grad_reduction"):  # one reduction per optimizer step needs it
        raise UserError(f"train.distributed.backend=zero2/zero3 needs deepspeed>=0.19.8 (installed: "
                        f"{deepspeed.__version__}): pip install -U 'cosmos-train[deepspeed]'")
    if device.type == "cpu":
        # On CPU DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op on first use (a C++
        # toolchain and over a minute, then cached); gloo does the same job. Its op table is read only there and
        # is probed lazily (compiler subprocesses): marking the op unavailable skips both.
        table = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
        table["deepspeed_shm_comm"] = False
    return deepspeed


# ---- the DeepSpeed config ---------------------------------------------------------------------------------------

def generated_config(cfg, compute_dtype: torch.dtype) -> dict:
    """The DeepSpeed config the recipe implies (before the user's JSON is merged over it)."""
    dist = cfg.train.distributed
    stage = 3 if dist.backend == "zero3" else 2
    if compute_dtype == torch.float16:
        raise UserError(f"model.dtype=float16 is not supported with train.distributed.backend={dist.backend} "
                        "(no loss scaling here): use bfloat16 or float32")
    zero = {"stage": stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": float(cfg.train.max_grad_norm) if cfg.train.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # our torch AdamW: ZeRO partitions its state; offload runs its update on the CPU copy (no DeepSpeedCPUAdam,
        # which would need a compiled op)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,  # the loop logs; DeepSpeed's own progress lines stay off
        "wall_clock_breakdown": False,
    }


# What the recipe decides: the JSON may repeat these values but not change them (the loop, the lr schedule and
# the checkpoints follow the recipe).
_OWNED = {
    "train_batch_size": "train.batch_size x train.grad_accum_steps x processes",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "zero_optimization.stage": "train.distributed.backend",
    "optimizer": "train.lr / train.weight_decay / train.adam_* (the optimizer is the trainer's AdamW)",
    "scheduler": "train.lr_schedule / train.warmup_steps (the schedule is the trainer's)",
}


def _known_top_level_keys() -> set[str]:
    """Top-level keys DeepSpeed reads: the string constants of its config modules (DeepSpeed ignores unknown
    top-level keys, so a misspelt section would otherwise do nothing)."""
    import importlib

    keys = set()
    for name in ("deepspeed.runtime.constants", "deepspeed.runtime.zero.constants", "deepspeed.monitor.constants",
                 "deepspeed.profiling.constants", "deepspeed.autotuning.constants", "deepspeed.elasticity.constants",
                 "deepspeed.compression.constants", "deepspeed.runtime.data_pipeline.constants",
                 "deepspeed.runtime.activation_checkpointing.config", "deepspeed.runtime.swap_tensor.constants",
                 "deepspeed.nebula.constants", "deepspeed.checkpoint.constants", "deepspeed.comm.constants",
                 "deepspeed.runtime.compiler", "deepspeed.inference.config"):
        try:
            module = importlib.import_module(name)
        except Exception:  # a module a DeepSpeed version lacks
            continue
        keys |= {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v.islower()}
    return keys | {"zero_optimization", "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler",
                   "activation_checkpointing", "aio", "comms_logger", "compile", "data_types", "checkpoint",
                   "tensor_parallel", "timers", "torch_autocast", "weight_quantization", "hybrid_engine",
                   "compression_training", "data_efficiency", "curriculum_learning", "elasticity", "autotuning",
                   "nebula", "pipeline", "sparse_attention", "amp", "zero_allow_untested_optimizer",
                   "zero_force_ds_cpu_optimizer", "communication_data_type", "seq_parallel_communication_data_type",
                   "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "dump_state",
                   "memory_breakdown", "disable_allgather", "graph_harvesting", "use_data_before_expert_parallelism",
                   "dataloader_drop_last", "steps_per_print", "wall_clock_breakdown", "zenflow",
                   "managed_gradient_accumulation", "gradient_accumulation_dtype"}


def read_user_config(path: str) -> dict:
    """The recipe's `train.distributed.deepspeed_config` JSON, as a dict (UserError naming the file)."""
    where = f"train.distributed.deepspeed_config: {path}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"{where}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: must hold a JSON object (DeepSpeed config keys), not {type(data).__name__}")
    return data


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[f"{prefix}{key}"] = value
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(cfg, compute_dtype: torch.dtype) -> dict:
    """The generated config with the user's JSON merged over it, checked: unknown top-level keys, values the
    recipe owns, and DeepSpeed's own validation of the sections, each a UserError naming the file."""
    config = generated_config(cfg, compute_dtype)
    path = cfg.train.distributed.deepspeed_config
    if not path:
        return config
    user = read_user_config(path)
    where = f"train.distributed.deepspeed_config: {path}"
    known = _known_top_level_keys()
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: unknown DeepSpeed config key '{key}'{hint}")
    generated, given = _flat(config), _flat(user)
    for key, recipe_key in _OWNED.items():
        if key in given and (key not in generated or given[key] != generated[key]):
            if key in generated and isinstance(generated[key], float) and isinstance(given[key], (int, float)) \
                    and float(given[key]) == generated[key]:
                continue
            raise UserError(f"{where}: '{key}' is set by the recipe ({recipe_key}; here "
                            f"{generated.get(key, 'unset')!r}), the JSON has {given[key]!r}: remove it from the "
                            "JSON or change the recipe")
    merged = merge(config, user)
    try:  # DeepSpeed's own parsing: pydantic sections reject unknown keys and bad values
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(json.loads(json.dumps(merged)))
    except UserError:
        raise
    except Exception as err:  # pydantic.ValidationError, AssertionError, ValueError, ...
        first = " ".join(str(err).split())[:600]
        raise UserError(f"{where}: DeepSpeed rejects the merged config: {first}") from None
    return merged


# ---- the back-end ---------------------------------------------------------------------------------------------

class DeepSpeedBackend(Backend):
    sharded = True
    coalesce = True  # one gradient reduction per optimizer step (False: one per micro-step, partitioned memory)

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self.name = cfg.train.distributed.backend
        self.stage = 3 if self.name == "zero3" else 2
        self.engine = None
        self.ds_config = None
        self._coalescing = None  # ExitStack over engine.coalesce_grad_reduction() while micro-steps accumulate
        self._trained = []  # (name, parameter) of the trained parameters, in module order (collective order)
        self._keyed = None  # model.trainable_state_dict key -> trained parameter

    # ---- setup -------------------------------------------------------------------------------------
    def prepare(self, model, groups):
        device = self.accelerator.device
        deepspeed = _import_deepspeed(device)  # missing / too old: a UserError
        # the user's JSON is checked (DeepSpeed's own parser among others) before any engine is built
        self.ds_config = build_config(self.cfg, model.compute_dtype)
        # A process group even for one plain process (gloo on CPU); DeepSpeed adopts an existing one, but insists
        # on LOCAL_RANK, which only launchers set.
        ensure_process_group(device)
        os.environ.setdefault("LOCAL_RANK", str(self.accelerator.local_process_index))
        optimizer, scheduler = build_optimizer(groups, self.cfg.train)
        transformer = model.transformer
        anchor(model)  # every rank reduces the same gradients, whatever its batch holds
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer,
                                                          config=self.ds_config, dist_init_required=False)
        self.engine, self.module, self.optimizer = engine, engine, ds_optimizer
        # The boundary is ours (accumulating / step), not DeepSpeed's micro-step counter: the loop calls
        # step() once per optimizer step, not once per micro-step.
        engine.set_gradient_accumulation_boundary(True)
        self._trained = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        model.forward_module = engine  # engine(**kwargs) runs transformer.forward(**kwargs) under ZeRO's hooks
        return ds_optimizer, scheduler

    # ---- one optimizer step ------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulating(self, last_micro):
        engine = self.engine
        if self.coalesce and not last_micro and self._coalescing is None:
            # first micro-step of several: keep gradients local until the last one (one reduction per step)
            stack = contextlib.ExitStack()
            stack.enter_context(engine.coalesce_grad_reduction())
            self._coalescing = stack
        engine.set_gradient_accumulation_boundary(last_micro)
        try:
            yield
        finally:
            if last_micro:
                stack, self._coalescing = self._coalescing, None
                if stack is not None:
                    stack.close()  # the one reduction of the summed gradients
                engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss):
        # the loop already divides by train.grad_accum_steps
        self.engine.backward(loss, scale_wrt_gas=False)

    def grad_norm(self, params, max_grad_norm):
        """The global norm of the reduced gradients (before clipping: DeepSpeed clips in step() to
        gradient_clipping = train.max_grad_norm, as clip_grad_norm_ does). A collective."""
        from deepspeed.runtime.utils import combine_grad_norm_groups, is_invalid_grad_norm

        opt = self.engine.optimizer
        if self.stage == 3:
            norm = combine_grad_norm_groups(opt._get_norm_groups())
        else:
            norm = opt.scaled_global_norm()
        # DeepSpeed reports an inf / NaN group norm as -1 (or inf): non-finite to the loop
        return float("nan") if is_invalid_grad_norm(norm) else float(norm) / float(opt.loss_scale)

    def step(self):
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clip, update, zero the gradients

    def skip(self):
        """No update: DeepSpeed's overflow path (gradients dropped, master weights, moments and step count
        untouched), taken whatever the gradients hold (the loop may skip for a non-finite loss alone)."""
        opt = self.engine.optimizer
        patched = {}
        if self.stage == 3:
            def forced(update_scale=True):
                opt.overflow = True
                return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True
            patched["_overflow_check_and_loss_scale_update"] = forced
        else:
            patched["check_overflow"] = lambda partition_gradients=True: setattr(opt, "overflow", True)
            patched["check_grad_overflow"] = True
        saved = {k: opt.__dict__[k] for k in patched if k in opt.__dict__}
        opt.__dict__.update(patched)
        try:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.step()
        finally:
            for key in patched:
                opt.__dict__.pop(key, None)
            opt.__dict__.update(saved)
        if not opt.overflow:  # a DeepSpeed whose step no longer takes these paths: fail loudly, not silently
            raise RuntimeError("DeepSpeedBackend.skip: DeepSpeed applied the update it was asked to skip")

    # ---- whole tensors ---------------------------------------------------------------------------------
    def _full_fp32(self, param) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)  # a collective (all-reduce / all-gather of the fragments)
        return value.detach().reshape(self._shape(param))

    def _shape(self, param) -> torch.Size:
        return param.ds_shape if hasattr(param, "ds_shape") else param.shape

    def module_state_dict(self, model, cfg):
        # ZeRO-2 keeps whole copies of the weights in the module (the fp32 masters are the optimizer's partitions)
        if self.stage != 2:
            raise NotImplementedError("an EMA under ZeRO-3 (partitioned module weights)")
        return model.trainable_state_dict(cfg) if self.accelerator.is_main_process else {}

    def trainable_state_dict(self, model, cfg):
        """The fp32 master weights (not the module's bf16 copies), whole, under model.trainable_state_dict's
        keys (PEFT naming for LoRA); every rank takes part, the main process keeps them."""
        import deepspeed

        keep = self.accelerator.is_main_process
        if self._keyed is None:  # the trained set never changes: worked out once
            self._keyed = self._keys_to_params(model, cfg)
        keyed = self._keyed
        state = {}
        for key, param in keyed.items():  # module order on every rank: the same collectives in the same order
            value = self._full_fp32(param) if param is not None else None
            if keep and value is not None:
                state[key] = value.cpu().contiguous()
        missing = [k for k, p in keyed.items() if p is None]
        if missing:  # keys that are not trained parameters (none today): the module's own (gathered) values
            with deepspeed.zero.GatheredParameters(list(model.transformer.parameters()),
                                                   enabled=self.stage == 3):
                whole = model.trainable_state_dict(cfg)
            if keep:
                state.update({k: whole[k].cpu().contiguous() for k in missing})
        return state

    def _keys_to_params(self, model, cfg) -> dict:
        """model.trainable_state_dict's keys -> the trained parameter each one is (None: not one of them).
        PEFT drops the adapter name from a LoRA parameter's name; other keys are parameter names."""
        from cosmos_train.trainer.adapters import ADAPTER_NAME

        import warnings

        with warnings.catch_warnings():  # PEFT warns about the empty ZeRO-3 partitions: only the keys are used
            warnings.simplefilter("ignore")
            keys = list(model.trainable_state_dict(cfg))  # keys only (under ZeRO-3 the values are empty partitions)
        by_key = {}
        for name, param in self._trained:
            for key in (name, name.replace(f".{ADAPTER_NAME}", "")):
                if key in keys:
                    by_key[key] = param
                    break
        return {k: by_key.get(k) for k in keys}

    # ---- checkpoints --------------------------------------------------------------------------------
    def optimizer_state(self):
        return None

    def _flats(self) -> list[tuple[int, torch.Tensor, torch.optim.Optimizer]]:
        """(param group index, flat fp32 partition, the torch optimizer holding its state) on this rank: our
        AdamW inside ZeRO steps flat partitions (stage 2: one per group; stage 3: sub-groups, whose list of
        the optimizer's group params is emptied between steps, and with a partial offload a GPU-side copy of
        the optimizer for some of them)."""
        opt = self.engine.optimizer
        if self.stage == 2:
            return [(i, p, opt.optimizer) for i, g in enumerate(opt.optimizer.param_groups) for p in g["params"]]
        devices = getattr(opt, "subgroup_to_device", None) or {}
        backup = getattr(opt, "backup_optimizer", None)
        return [(opt.sub_group_to_group_id[j], flat,
                 backup if backup is not None and devices.get(j, "cpu") != "cpu" else opt.optimizer)
                for j, flat in enumerate(opt.fp32_partitioned_groups_flat)]

    def _state_keys(self) -> tuple[list[str], list[float]]:
        """The optimizer's per-element state keys (exp_avg, exp_avg_sq) and each param group's step count
        (the same on every rank: all partitions step together)."""
        keys, steps = [], [0.0] * len(self.engine.optimizer.param_groups)
        for group, flat, inner in self._flats():
            state = inner.state.get(flat, {})
            if "step" in state:
                steps[group] = float(state["step"])
            for key, value in state.items():
                if torch.is_tensor(value) and value.numel() == flat.numel() and key not in keys:
                    keys.append(key)
        return keys, steps

    def _owners(self, world: int) -> dict[str, int]:
        """Which rank writes which parameter: largest first to the least loaded rank (balanced file sizes)."""
        load, owner = [0] * world, {}
        for name, param in sorted(self._trained, key=lambda np: (-self._shape(np[1]).numel(), np[0])):
            rank = min(range(world), key=lambda r: (load[r], r))
            owner[name] = rank
            load[rank] += self._shape(param).numel()
        return owner

    def save_optimizer(self, directory):
        """Every rank: whole fp32 master weights and optimizer moments of its share of the trained parameters
        (rank-NNNNN.safetensors); rank 0 adds the layout and step counts (deepspeed_optimizer.json)."""
        from deepspeed.utils import safe_get_full_optimizer_state
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        keys, steps = self._state_keys()
        owners = self._owners(world)
        mine = {}
        for name, param in self._trained:  # the same order on every rank: each call is a collective
            for key in [FP32, *keys]:  # one whole tensor on the device at a time
                value = (self._full_fp32(param) if key == FP32 else
                         safe_get_full_optimizer_state(param, key).detach().reshape(self._shape(param)))
                if owners[name] == rank:
                    mine[f"{name}/{key}"] = value.cpu().contiguous()
                del value
        save_file(mine, str(directory / f"rank-{rank:05d}.safetensors"))
        if rank == 0:
            meta = {"format": FORMAT, "stage": self.stage, "world_size": world, "state_keys": keys,
                    "group_steps": steps, "params": {n: list(self._shape(p)) for n, p in self._trained},
                    "files": {n: f"rank-{r:05d}.safetensors" for n, r in owners.items()}}
            (directory / OPTIMIZER_META).write_text(json.dumps(meta, indent=1))

    def load_optimizer(self, checkpoint, torch_state):
        """Master weights, moments and step counts from a checkpoint written by any number of processes."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        from safetensors import safe_open

        directory = Path(checkpoint) / SHARDED_OPTIMIZER
        meta_path = directory / OPTIMIZER_META
        if not meta_path.is_file():
            raise UserError(f"{checkpoint} has no DeepSpeed optimizer state ({SHARDED_OPTIMIZER}/{OPTIMIZER_META}): "
                            "it was written by another back-end; resume with the run's train.distributed.backend")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: unknown optimizer state format {meta.get('format')!r}")
        mine = {n: list(self._shape(p)) for n, p in self._trained}
        if mine != meta["params"]:
            differ = (sorted(set(mine) ^ set(meta["params"]))
                      or [n for n in mine if mine[n] != meta["params"].get(n)])[:3]
            raise UserError(f"{checkpoint}: its optimizer state is for other trained parameters than this recipe's "
                            f"({differ or 'shapes differ'}): resume with the run's recipe")
        keys = meta["state_keys"]
        if keys:
            self._init_state(keys, meta["group_steps"])
        files = {}
        try:
            for name, param in self._trained:
                file = meta["files"][name]
                if file not in files:
                    files[file] = safe_open(str(directory / file), framework="pt")
                reader = files[file]
                device = self._fragment_device(param)
                safe_set_full_fp32_param(param, reader.get_tensor(f"{name}/{FP32}").to(device))
                for key in keys:
                    safe_set_full_optimizer_state(param, reader.get_tensor(f"{name}/{key}").to(device), key)
        finally:
            files.clear()
        self._refresh_module_weights()

    def _fragment_device(self, param) -> torch.device:
        return torch.device(self.engine.device) if not self.cfg.train.distributed.offload_optimizer else \
            torch.device("cpu")

    def _init_state(self, keys: list[str], steps: list[float]) -> None:
        """Before the first step ZeRO's optimizer has no state to write into: create it (zeros, the saved
        step counts) and let DeepSpeed link its fragments to it."""
        if len(steps) != len(self.engine.optimizer.param_groups):
            raise UserError(f"the checkpoint's optimizer has {len(steps)} parameter group(s), this recipe "
                            f"{len(self.engine.optimizer.param_groups)}: resume with the run's recipe")
        for group, flat, inner in self._flats():
            state = inner.state[flat]
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            previous = state.get("step")
            state["step"] = (torch.tensor(steps[group], dtype=previous.dtype, device=previous.device)
                             if torch.is_tensor(previous) else torch.tensor(steps[group], dtype=torch.float32))
        opt = self.engine.optimizer
        if self.stage == 2:
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _refresh_module_weights(self) -> None:
        """The module's (bf16) weights from the restored fp32 masters (they were cast from the weights the loop
        loaded before prepare; this makes them exactly the masters' rounding)."""
        opt = self.engine.optimizer
        if self.stage == 2:
            opt.update_lp_params()
        else:
            for sub_group in range(len(opt.fp16_groups)):
                if opt.fp16_partitioned_groups_flat[sub_group] is not None:
                    opt.fp16_partitioned_groups_flat[sub_group].data.copy_(
                        opt.fp32_partitioned_groups_flat[sub_group].data)
                    opt._unflatten_partitioned_parameters(sub_group)
