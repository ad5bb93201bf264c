"""Recipe loading: YAML file + `key.path=value` overrides -> a validated `RecipeConfig`.

Every problem is reported as a `UserError` naming the recipe file and the key path, before any
model is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from cosmos_train.config import schema as S
from cosmos_train.errors import UserError


def _omegaconf_error(where: str, err: OmegaConfBaseException) -> UserError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        hint = _did_you_mean(key)
        return UserError(f"{where}: unknown key '{key}'" + (f" (not a field of '{parent}')" if parent else "")
                         + (f"; did you mean '{hint}'?" if hint else ""))
    if isinstance(err, MissingMandatoryValue):
        return UserError(f"{where}: missing required value '{key}'")
    if isinstance(err, ValidationError):
        first_line = str(err).splitlines()[0]
        return UserError(f"{where}: wrong type for '{key}': {first_line}")
    return UserError(f"{where}: invalid value for '{key}': {str(err).splitlines()[0]}")


def _did_you_mean(key: str) -> str | None:
    """The closest valid key path at the same level, for a typo."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.structured(S.RecipeConfig)
    try:
        for part in parent.split(".") if parent else []:
            node = node[part]
        candidates = list(node.keys())
    except Exception:
        candidates = _dataclass_fields_at(parent)
        if candidates is None:
            return None
    match = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.6)
    return f"{parent}.{match[0]}" if match and parent else (match[0] if match else None)


def _section_type(path: str):
    """The dataclass of the recipe section at `path` (Optional sections unwrapped), or None."""
    import dataclasses
    import typing

    cls = S.RecipeConfig
    for part in path.split(".") if path else []:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    return cls if dataclasses.is_dataclass(cls) else None


def _dataclass_fields_at(path: str) -> list[str] | None:
    import dataclasses

    cls = _section_type(path)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else None


def _open_optional_sections(merged, key: str) -> None:
    """An override inside an optional section that is unset (`action.dataset=...` while `action` is null)
    first creates that section with its defaults."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        try:
            value = OmegaConf.select(merged, prefix, throw_on_missing=False)
        except OmegaConfBaseException:
            return
        if value is None and _section_type(prefix) is not None:
            OmegaConf.update(merged, prefix, {}, merge=True)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """`key.path=value` pairs; values are read as YAML (numbers, booleans, lists), keys may index lists
    (`data.sources.0.weight=2`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> S.RecipeConfig:
    """Load and validate a recipe. Relative data/model paths are resolved against the recipe file."""
    path = Path(path)
    where = str(path)
    base = OmegaConf.structured(S.RecipeConfig)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(_read_yaml(path)))
        if overrides:
            where = f"{path} (with overrides)"
            for key, value in _parse_overrides(overrides):
                _open_optional_sections(merged, key)
                OmegaConf.update(merged, key, value, merge=True)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise UserError(f"{where}: missing required value(s): {', '.join(missing)}")
        cfg: S.RecipeConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(where, err) from None
    except (TypeError, IndexError) as err:  # e.g. indexing past the end of a list in an override
        raise UserError(f"{where}: cannot apply overrides {overrides}: {err}") from None
    _resolve_paths(cfg, path.parent)
    validate(cfg, where)
    return cfg


def _resolve_paths(cfg: S.RecipeConfig, recipe_dir: Path) -> None:
    """Paths in a recipe that start with ./ or ../ are relative to the recipe file; others to the cwd."""
    def resolve(value: str) -> str:
        if value.startswith(("./", "../")):
            return str((recipe_dir / value).resolve())
        return value

    if cfg.data.manifest is not None:
        cfg.data.manifest = resolve(cfg.data.manifest)
    for source in cfg.data.sources:
        for key in ("manifest", "hf_dataset", "media_root", "cache_dir"):
            if getattr(source, key) is not None:
                setattr(source, key, resolve(getattr(source, key)))
    cfg.model.pretrained = resolve(cfg.model.pretrained)
    if cfg.action is not None:
        cfg.action.dataset = resolve(cfg.action.dataset)
    if cfg.train.distributed.deepspeed_config:
        cfg.train.distributed.deepspeed_config = resolve(cfg.train.distributed.deepspeed_config)
    _resolve_seeing_paths(cfg, resolve)


def _check(ok: bool, where: str, key: str, allowed: str, value) -> None:
    if not ok:
        raise UserError(f"{where}: invalid value for '{key}': {value!r} ({allowed})")


def validate(cfg: S.RecipeConfig, where: str = "recipe") -> None:
    """Range and consistency checks that types alone cannot express."""
    _check(cfg.objective in S.OBJECTIVES, where, "objective", f"one of {', '.join(S.OBJECTIVES)}", cfg.objective)
    if cfg.objective not in S.AVAILABLE_OBJECTIVES:
        raise UserError(f"{where}: objective '{cfg.objective}' is not available in this version yet "
                        f"(available: {', '.join(S.AVAILABLE_OBJECTIVES)})")
    if cfg.objective == "reasoner":
        from cosmos_train.objectives.reasoner import validate_reasoner_recipe

        validate_reasoner_recipe(cfg, where)
    _check(bool(cfg.output_dir.strip()), where, "output_dir", "a directory path", cfg.output_dir)
    _check(bool(cfg.model.pretrained.strip()), where, "model.pretrained", "a hub id or local directory",
           cfg.model.pretrained)
    for key in ("dtype", "vae_dtype"):
        value = getattr(cfg.model, key)
        _check(value in S.DTYPES, where, f"model.{key}", f"one of {', '.join(S.DTYPES)}", value)

    d = cfg.data
    _check(d.resolution in S.TIER_SIZES, where, "data.resolution", "one of 256, 480, 720", d.resolution)
    _check(d.num_frames >= 1 and (d.num_frames - 1) % 4 == 0, where, "data.num_frames",
           "a frame count of the form 4k+1: 1, 5, 9, ..., 93, ...", d.num_frames)
    for key in ("height", "width"):
        value = getattr(d, key)
        _check(value is None or (value > 0 and value % 16 == 0), where, f"data.{key}",
               "a positive multiple of 16 (the VAE's spatial factor)", value)
    _check(d.fps > 0, where, "data.fps", "must be > 0", d.fps)
    _check(d.num_workers >= 0, where, "data.num_workers", "must be >= 0", d.num_workers)
    _check(d.short_clips in S.SHORT_CLIPS, where, "data.short_clips", f"one of {', '.join(S.SHORT_CLIPS)}",
           d.short_clips)
    if d.aspect_buckets and (d.height is not None or d.width is not None):
        raise UserError(f"{where}: data.aspect_buckets=true conflicts with data.height/data.width (a fixed size, "
                        "no buckets): set one or the other")
    if d.manifest is None and not d.sources and cfg.action is None:
        raise UserError(f"{where}: missing required value 'data.manifest' (or 'data.sources', a list of sources)")
    if d.manifest is not None and d.sources:
        raise UserError(f"{where}: give 'data.manifest' (one source) or 'data.sources', not both")
    _check(d.manifest is None or bool(d.manifest.strip()), where, "data.manifest", "a JSONL file path", d.manifest)
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if (src.manifest is None) == (src.hf_dataset is None):
            raise UserError(f"{where}: '{key}' needs exactly one of 'manifest' or 'hf_dataset'")
        _check(bool((src.manifest or src.hf_dataset).strip()), where, key, "a path or dataset id",
               src.manifest or src.hf_dataset)
        _check(src.weight is None or (math.isfinite(src.weight) and src.weight >= 0), where, f"{key}.weight",
               "a number >= 0", src.weight)
        if src.manifest is not None:
            hf_only = [k for k in ("subset", "media_root", "cache_dir") if getattr(src, k) is not None]
            hf_only += ["split"] if src.split != "train" else []
            hf_only += ["columns"] if src.columns != S.HFColumns() else []
            if hf_only:
                raise UserError(f"{where}: '{key}': {', '.join(hf_only)} only apply to an hf_dataset source")
        _check(bool(src.columns.caption), where, f"{key}.columns.caption", "a column name", src.columns.caption)
    weights = [src.weight for src in d.sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise UserError(f"{where}: 'data.sources': set 'weight' on every source or on none "
                        f"(none: each source in proportion to its size); got {weights}")
    if weights and all(w is not None for w in weights) and sum(weights) <= 0:
        raise UserError(f"{where}: 'data.sources': the weights sum to 0")
    # YAML reads a bare `off` / `on` as a boolean
    d.cache = {"False": "off", "false": "off", "True": "auto", "true": "auto"}.get(d.cache, d.cache)
    _check(d.cache in ("auto", "require", "off"), where, "data.cache", "auto, require or off", d.cache)

    g = cfg.generator
    probs = {m: getattr(g.modes, m) for m in S.GENERATION_MODES}
    for mode, p in probs.items():
        _check(0.0 <= p <= 1.0, where, f"generator.modes.{mode}", "a probability in [0, 1]", p)
    _check(math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6), where, "generator.modes",
           f"probabilities must sum to 1 (they sum to {sum(probs.values()):g})", probs)
    if d.num_frames == 1:
        _check(probs["t2i"] == 1.0, where, "generator.modes",
               "with data.num_frames=1 only t2i is possible: set generator.modes.t2i=1 and the others to 0", probs)
    _check(g.sigma_sampling in S.SIGMA_SAMPLINGS, where, "generator.sigma_sampling",
           f"one of {', '.join(S.SIGMA_SAMPLINGS)}", g.sigma_sampling)
    _check(g.logit_std > 0, where, "generator.logit_std", "must be > 0", g.logit_std)
    _check(g.shift is None or g.shift > 0, where, "generator.shift", "must be > 0", g.shift)
    _check(0.0 <= g.text_dropout < 1.0, where, "generator.text_dropout", "a probability in [0, 1)", g.text_dropout)
    _check(0.0 <= g.template_dropout <= 1.0, where, "generator.template_dropout", "a probability in [0, 1]",
           g.template_dropout)
    _check(g.uncond_prompt in S.UNCOND_PROMPTS, where, "generator.uncond_prompt",
           f"one of {', '.join(S.UNCOND_PROMPTS)}", g.uncond_prompt)
    if str(g.sound).lower() in ("false", "no"):  # YAML reads a bare `off` as false
        g.sound = "off"
    _check(g.sound in S.SOUND_MODES, where, "generator.sound", f"one of {', '.join(S.SOUND_MODES)}", g.sound)
    for key in ("vision", "sound", "action"):
        value = getattr(g.loss_weights, key)
        _check(math.isfinite(value) and value >= 0, where, f"generator.loss_weights.{key}", "a number >= 0", value)
    latent_frames = (d.num_frames - 1) // 4 + 1
    if probs["v2v"] > 0:
        _check(1 <= g.v2v_condition_frames < latent_frames, where, "generator.v2v_condition_frames",
               f"between 1 and {latent_frames - 1} latent frames for data.num_frames={d.num_frames}",
               g.v2v_condition_frames)

    if cfg.action is not None:
        validate_action(cfg, where)

    t = cfg.train
    _check(t.method in S.FINETUNE_METHODS, where, "train.method", "lora or full", t.method)
    _check(t.full_trainable in S.FULL_TRAINABLE, where, "train.full_trainable", "gen or all", t.full_trainable)
    _check(t.lora.rank > 0, where, "train.lora.rank", "must be > 0", t.lora.rank)
    _check(t.lora.alpha > 0, where, "train.lora.alpha", "must be > 0", t.lora.alpha)
    _check(0.0 <= t.lora.dropout < 1.0, where, "train.lora.dropout", "in [0, 1)", t.lora.dropout)
    _check(len(t.lora.target_modules) > 0 and all(isinstance(m, str) for m in t.lora.target_modules), where,
           "train.lora.target_modules", "a non-empty list of module names", t.lora.target_modules)
    _check(t.max_steps > 0, where, "train.max_steps", "must be > 0", t.max_steps)
    _check(t.lr > 0, where, "train.lr", "must be > 0", t.lr)
    _check(t.weight_decay >= 0, where, "train.weight_decay", "must be >= 0", t.weight_decay)
    for key in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, key) < 1, where, f"train.{key}", "in [0, 1)", getattr(t, key))
    _check(t.lr_schedule in S.LR_SCHEDULES, where, "train.lr_schedule", f"one of {', '.join(S.LR_SCHEDULES)}",
           t.lr_schedule)
    _check(t.warmup_steps >= 0, where, "train.warmup_steps", "must be >= 0", t.warmup_steps)
    _check(0 <= t.min_lr_ratio <= 1, where, "train.min_lr_ratio", "in [0, 1]", t.min_lr_ratio)
    _check(t.batch_size > 0, where, "train.batch_size", "must be > 0", t.batch_size)
    _check(t.packing.max_tokens > 0, where, "train.packing.max_tokens", "must be > 0", t.packing.max_tokens)
    _check(t.packing.lookahead >= 1, where, "train.packing.lookahead", "must be >= 1", t.packing.lookahead)
    _check(t.grad_accum_steps > 0, where, "train.grad_accum_steps", "must be > 0", t.grad_accum_steps)
    _check(t.max_grad_norm >= 0, where, "train.max_grad_norm", "must be >= 0 (0 disables clipping)",
           t.max_grad_norm)
    _check(t.checkpoint_every > 0, where, "train.checkpoint_every", "must be > 0", t.checkpoint_every)
    _check(t.keep_checkpoints > 0, where, "train.keep_checkpoints", "must be > 0", t.keep_checkpoints)
    _check(t.log_every > 0, where, "train.log_every", "must be > 0", t.log_every)
    _check(t.max_nonfinite_steps >= 1, where, "train.max_nonfinite_steps",
           "must be >= 1 (1: stop at the first non-finite step)", t.max_nonfinite_steps)
    _check(t.device in ("auto", "cpu", "cuda"), where, "train.device", "auto, cpu or cuda", t.device)
    quantize = cfg.model.quantize_base
    _check(quantize in ("none", "int8", "fp8"), where, "model.quantize_base", "none, int8 or fp8", quantize)
    if quantize != "none":
        _check(t.method == "lora", where, "model.quantize_base",
               "int8 / fp8 only with train.method=lora: the quantized base stays frozen", quantize)
        _check(cfg.objective == "generator", where, "model.quantize_base",
               "int8 / fp8 only for objective: generator; the reasoner trains over its unquantized base", quantize)
        _check(t.distributed.backend == "ddp", where, "model.quantize_base",
               "int8 / fp8 only with train.distributed.backend=ddp (one GPU, or DDP)", quantize)
        _check(quantize != "fp8" or t.device != "cpu", where, "model.quantize_base",
               "fp8 needs a GPU with float8 support (compute capability 8.9+); on the CPU use int8", quantize)
    d = t.distributed
    _check(d.backend in S.DISTRIBUTED_BACKENDS, where, "train.distributed.backend",
           f"one of {', '.join(S.DISTRIBUTED_BACKENDS)}", d.backend)
    _check(not d.offload_optimizer or d.backend in ("zero2", "zero3"), where, "train.distributed.offload_optimizer",
           "only with backend zero2 or zero3", d.offload_optimizer)
    _check(not d.offload_params or d.backend in ("zero3", "fsdp2"), where, "train.distributed.offload_params",
           "only with backend zero3 or fsdp2", d.offload_params)
    _check(not d.deepspeed_config or d.backend in ("zero2", "zero3"), where, "train.distributed.deepspeed_config",
           "only with backend zero2 or zero3", d.deepspeed_config)
    if d.backend == "zero3":
        _check_zero3(cfg, where)
    _check(cfg.logging.wandb_mode in ("offline", "online"), where, "logging.wandb_mode", "offline or online",
           cfg.logging.wandb_mode)
    validate_seeing(cfg, where)


def _check_zero3(cfg: S.RecipeConfig, where: str) -> None:
    """ZeRO-3 gathers each module's parameters when it is called and needs every rank to call the same modules in
    the same order each step (it records the first step's order and checks it across ranks). Cosmos 3's forward
    calls some modules only for some inputs (the sound heads, the vision tower, an extra time embedding for noisy
    actions), and packs differ per rank: what would make ranks diverge is refused here, pointing to fsdp2."""
    fix = "or use train.distributed.backend=fsdp2, which has no such limit"
    _check(not cfg.train.packing.enabled, where, "train.packing.enabled",
           f"false with train.distributed.backend=zero3 (packs of different make-up per rank); {fix}",
           cfg.train.packing.enabled)
    _check(cfg.objective != "reasoner", where, "objective",
           "not reasoner with train.distributed.backend=zero3 (samples with and without images call different "
           "modules); use backend fsdp2 or zero2", cfg.objective)
    _check(cfg.generator.sound != "auto", where, "generator.sound",
           f"off or require with train.distributed.backend=zero3 (clips with and without sound call different "
           f"modules); {fix}", cfg.generator.sound)
    if cfg.action is not None:
        modes = cfg.action.modes
        used = [m for m in S.ACTION_MODES if getattr(modes, m) > 0]
        _check(len(used) == 1, where, "action.modes",
               f"a single mode with train.distributed.backend=zero3 (modes with noisy and clean actions call "
               f"different modules); {fix}", {m: getattr(modes, m) for m in S.ACTION_MODES})


def validate_action(cfg: S.RecipeConfig, where: str = "recipe") -> None:
    """The `action:` section. Checks that need the dataset (keys, widths, NaNs) happen when it is opened
    (`cosmos_train.data.lerobot.LeRobotActionDataset`)."""
    from cosmos_train.data.embodiment import known_embodiments

    a = cfg.action
    if cfg.objective != "generator":
        raise UserError(f"{where}: the 'action' section applies to objective: generator (got objective: "
                        f"{cfg.objective})")
    _check(bool(a.dataset.strip()), where, "action.dataset", "a LeRobot dataset directory", a.dataset)
    _check(len(a.cameras) > 0 and all(isinstance(c, str) and c for c in a.cameras), where, "action.cameras",
           "a non-empty list of video feature keys, e.g. [observation.images.top]", a.cameras)
    _check(len(set(a.cameras)) == len(a.cameras), where, "action.cameras", "each camera once", a.cameras)
    _check(len(a.action_keys) > 0 and all(isinstance(k, str) and k for k in a.action_keys), where,
           "action.action_keys", "a non-empty list of feature keys, e.g. [action]", a.action_keys)
    _check(len(set(a.action_keys)) == len(a.action_keys), where, "action.action_keys", "each key once",
           a.action_keys)
    _check(a.state_key is None or bool(a.state_key.strip()), where, "action.state_key", "a feature key or null",
           a.state_key)
    _check(a.chunk_size >= 4 and a.chunk_size % 4 == 0, where, "action.chunk_size",
           "a multiple of 4 (the Wan VAE encodes 1 + chunk_size/4 latent frames from chunk_size + 1 frames)",
           a.chunk_size)
    _check(a.fps is None or (math.isfinite(a.fps) and a.fps > 0), where, "action.fps", "must be > 0", a.fps)
    _check(a.window_stride is None or a.window_stride >= 1, where, "action.window_stride", "must be >= 1",
           a.window_stride)
    _check(a.val_episodes >= 0, where, "action.val_episodes", "must be >= 0", a.val_episodes)
    _check(a.view_point in S.ACTION_VIEW_POINTS, where, "action.view_point",
           f"one of {', '.join(S.ACTION_VIEW_POINTS)}", a.view_point)
    _check(a.normalization in S.ACTION_NORMALIZATIONS, where, "action.normalization",
           f"one of {', '.join(S.ACTION_NORMALIZATIONS)}", a.normalization)
    _check(a.stats in S.ACTION_STATS, where, "action.stats", f"one of {', '.join(S.ACTION_STATS)}", a.stats)
    _check(a.clamp is None or (math.isfinite(a.clamp) and a.clamp > 0), where, "action.clamp",
           "a number > 0 or null", a.clamp)
    _check(math.isfinite(a.head_lr_multiplier) and a.head_lr_multiplier > 0, where, "action.head_lr_multiplier",
           "must be > 0", a.head_lr_multiplier)
    _check(a.resolution_tier in S.ACTION_TIERS, where, "action.resolution_tier",
           f"one of {', '.join(map(str, S.ACTION_TIERS))}", a.resolution_tier)
    _check(a.eval_windows >= 0, where, "action.eval_windows", "must be >= 0", a.eval_windows)
    _check(a.eval_steps >= 1, where, "action.eval_steps", "must be >= 1", a.eval_steps)
    probs = {m: getattr(a.modes, m) for m in S.ACTION_MODES}
    for mode, p in probs.items():
        _check(0.0 <= p <= 1.0, where, f"action.modes.{mode}", "a probability in [0, 1]", p)
    _check(math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6), where, "action.modes",
           f"probabilities must sum to 1 (they sum to {sum(probs.values()):g})", probs)

    known = known_embodiments()  # diffusers' name -> domain id table
    new = a.new_embodiment
    if new is not None:
        _check(bool(new.name.strip()), where, "action.new_embodiment.name", "a name", new.name)
        if new.name in known:
            raise UserError(f"{where}: invalid value for 'action.new_embodiment.name': {new.name!r} is already an "
                            f"embodiment of the checkpoint (domain {known[new.name]}); set action.embodiment: "
                            f"{new.name} without new_embodiment, or pick another name")
        _check(new.raw_action_dim >= 1, where, "action.new_embodiment.raw_action_dim", "must be >= 1",
               new.raw_action_dim)
        _check(new.domain_id in S.FREE_ACTION_DOMAIN_IDS, where, "action.new_embodiment.domain_id",
               "a domain id no released embodiment uses: "
               + ", ".join(map(str, S.FREE_ACTION_DOMAIN_IDS)), new.domain_id)
        if new.init_from is not None and (new.init_from not in known or new.init_from == "no_action"):
            raise UserError(f"{where}: invalid value for 'action.new_embodiment.init_from': {new.init_from!r} is "
                            f"not a known embodiment (known: {', '.join(n for n in known if n != 'no_action')})")
        if a.embodiment != new.name:
            raise UserError(f"{where}: invalid value for 'action.embodiment': {a.embodiment!r}; with "
                            f"action.new_embodiment set it must be its name ({new.name!r})")
    elif a.embodiment not in known or a.embodiment == "no_action":
        raise UserError(f"{where}: invalid value for 'action.embodiment': unknown embodiment {a.embodiment!r} "
                        f"(known: {', '.join(n for n in known if n != 'no_action')}; or describe a new one "
                        "in action.new_embodiment)")


def recipe_to_yaml(cfg: S.RecipeConfig) -> str:
    """The resolved recipe; the section of the objective it does not use is left out (defaults on reload)."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg))
    for objective in S.OBJECTIVES:
        if objective != cfg.objective:
            data.pop(objective, None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def save_recipe(cfg: S.RecipeConfig, path: str | Path) -> None:
    Path(path).write_text(recipe_to_yaml(cfg))


def load_saved_recipe(path: str | Path) -> S.RecipeConfig:
    """Reload a resolved recipe written by `save_recipe` (paths are already absolute)."""
    merged = OmegaConf.merge(OmegaConf.structured(S.RecipeConfig), OmegaConf.create(_read_yaml(Path(path))))
    return OmegaConf.to_object(merged)


# ---- seeing the run: validation, trackers, EMA, warm start ----------------------------------------------------


def _resolve_seeing_paths(cfg: S.RecipeConfig, resolve) -> None:
    v = cfg.validation
    if v.manifest is not None:
        v.manifest = resolve(v.manifest)
    v.images = [resolve(i) if i else i for i in v.images]
    if cfg.train.init_from is not None:
        cfg.train.init_from = resolve(cfg.train.init_from)


def validate_seeing(cfg: S.RecipeConfig, where: str = "recipe") -> None:
    """The `validation:` section, `logging.trackers`, `train.ema_decay`, `train.init_from`."""
    v = cfg.validation
    _check(v.every >= 0, where, "validation.every", "steps between validations, >= 0 (0: off)", v.every)
    _check(v.max_samples >= 1, where, "validation.max_samples", "must be >= 1", v.max_samples)
    _check(v.manifest is None or bool(v.manifest.strip()), where, "validation.manifest", "a JSONL file path",
           v.manifest)
    _check(len(v.sigma_quantiles) > 0 and all(isinstance(q, (int, float)) and 0.0 < q < 1.0
                                              for q in v.sigma_quantiles),
           where, "validation.sigma_quantiles", "a non-empty list of quantiles in (0, 1)", v.sigma_quantiles)
    _check(len(set(v.sigma_quantiles)) == len(v.sigma_quantiles), where, "validation.sigma_quantiles",
           "each quantile once", v.sigma_quantiles)
    _check(all(isinstance(p, str) and p.strip() for p in v.prompts), where, "validation.prompts",
           "a list of non-empty prompts", v.prompts)
    _check(len(v.images) <= len(v.prompts), where, "validation.images",
           f"at most one conditioning image per prompt ({len(v.prompts)} prompt(s)); \"\" for none", v.images)
    _check(v.sample_frames is None or (v.sample_frames >= 1 and (v.sample_frames - 1) % 4 == 0), where,
           "validation.sample_frames", "a frame count of the form 4k+1 (1: images)", v.sample_frames)
    _check(v.sample_steps >= 1, where, "validation.sample_steps", "must be >= 1", v.sample_steps)
    _check(math.isfinite(v.sample_guidance) and v.sample_guidance >= 0, where, "validation.sample_guidance",
           "a number >= 0 (1: no classifier-free guidance)", v.sample_guidance)
    if cfg.objective == "reasoner" and (v.prompts or v.images):
        raise UserError(f"{where}: 'validation.prompts' / 'validation.images' generate videos: they apply to "
                        "objective: generator (a reasoner run's validation is its held-out loss on "
                        "validation.manifest)")
    if cfg.action is not None and v.manifest is not None:
        raise UserError(f"{where}: 'validation.manifest' does not apply to action runs: their held-out data are the "
                        "last action.val_episodes episodes")
    if v.every > 0:
        if cfg.action is not None:
            if cfg.action.val_episodes <= 0:
                raise UserError(f"{where}: validation.every={v.every} on an action run needs held-out episodes: set "
                                "action.val_episodes > 0")
        elif v.manifest is None and not v.prompts:
            what = "validation.manifest (held-out conversations)" if cfg.objective == "reasoner" else \
                "validation.manifest (held-out clips) and/or validation.prompts (samples)"
            raise UserError(f"{where}: validation.every={v.every} but nothing to validate: set {what}, "
                            "or validation.every=0")

    lg = cfg.logging
    for i, name in enumerate(lg.trackers):
        _check(name in S.TRACKERS, where, f"logging.trackers[{i}]", f"one of {', '.join(S.TRACKERS)}", name)
    _check(len(set(lg.trackers)) == len(lg.trackers), where, "logging.trackers", "each tracker once", lg.trackers)

    t = cfg.train
    _check(t.ema_decay is None or (math.isfinite(t.ema_decay) and 0.0 < t.ema_decay < 1.0), where,
           "train.ema_decay", "a decay in (0, 1), e.g. 0.999, or null (off)", t.ema_decay)
    _check(t.init_from is None or bool(t.init_from.strip()), where, "train.init_from",
           "a run or checkpoint directory, or null", t.init_from)
