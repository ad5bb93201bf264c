"""Model adapters. Trainers and exporters get a model through `load_model`, never a concrete class."""

from __future__ import annotations

import os
from pathlib import Path

from cosmos_train.config.schema import RecipeConfig

TINY = "tiny"  # `model.pretrained: tiny` is the built-in tiny random-weight checkpoint
TINY_VERSION = "v3"  # v3: the released layout (root index into transformer/ + vision_encoder/)


def cache_root() -> Path:
    return Path(os.environ.get("COSMOS_TRAIN_CACHE", Path.home() / ".cache" / "cosmos_train"))


def resolve_pretrained(pretrained: str) -> str:
    """`tiny` -> the built-in tiny checkpoint (written on first use); anything else unchanged."""
    if pretrained != TINY:
        return pretrained
    path = cache_root() / f"tiny-cosmos3-{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        import shutil
        import tempfile

        from cosmos_train.models.tiny import make_tiny

        # Built aside and renamed into place: concurrent ranks or an interrupted build never see half of it.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
        make_tiny(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def local_checkpoint_dir(cfg: RecipeConfig) -> Path:
    """The checkpoint as a local directory (a hub id resolves to its snapshot in the HF cache)."""
    path = Path(resolve_pretrained(cfg.model.pretrained))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.model.pretrained, revision=cfg.model.revision,
                                      local_files_only=cfg.model.local_files_only))
    except Exception as err:  # offline, unknown repo, gated repo: all user-fixable
        from cosmos_train.errors import UserError

        raise UserError(f"model.pretrained: could not fetch '{cfg.model.pretrained}': {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def load_model(cfg: RecipeConfig, *, for_encoding: bool = False):
    """The model adapter for a recipe's objective, loaded from `model.pretrained`.

    `for_encoding`: only what turns samples into cacheable inputs (no transformer weights).
    """
    if cfg.objective == "generator":
        from cosmos_train.models.generator import Cosmos3Generator

        m = cfg.model
        return Cosmos3Generator.from_pretrained(
            resolve_pretrained(m.pretrained), dtype=m.dtype, vae_dtype=m.vae_dtype, revision=m.revision,
            local_files_only=m.local_files_only, trust_remote_code=m.trust_remote_code,
            load_transformer=not for_encoding, load_sound=cfg.generator.sound != "off",
        )
    if cfg.objective == "reasoner":
        from cosmos_train.models.reasoner import load_reasoner

        return load_reasoner(cfg)
    raise ValueError(f"no model adapter for objective {cfg.objective!r}")


def adapter_class(cfg: RecipeConfig):
    """The adapter class (for what must be known before loading, e.g. DDP settings)."""
    if cfg.objective == "reasoner":
        from cosmos_train.models.reasoner import Cosmos3Reasoner

        return Cosmos3Reasoner
    from cosmos_train.models.generator import Cosmos3Generator

    return Cosmos3Generator
