"""Training objectives: a decoded sample in, a scalar loss out."""

from __future__ import annotations

from cosmos_train.config.schema import RecipeConfig


def build_objective(cfg: RecipeConfig, model, seed: int):
    if cfg.objective == "generator":
        from cosmos_train.objectives.generator import GeneratorObjective

        domain_id = model.embodiment(cfg).domain_id if cfg.action is not None else None
        return GeneratorObjective(model, cfg.generator, shift=cfg.flow_shift(), seed=seed, action_cfg=cfg.action,
                                  domain_id=domain_id)
    if cfg.objective == "reasoner":
        from cosmos_train.objectives.reasoner import ReasonerObjective

        budget = cfg.train.packing.max_tokens if cfg.train.packing.enabled else None
        return ReasonerObjective(model, cfg.reasoner, seed=seed, max_pack_tokens=budget)
    raise ValueError(f"no objective {cfg.objective!r}")
