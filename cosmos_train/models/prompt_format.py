"""The generator's prompt format: which of the pipeline's own prompt options a finetune trains with.

`Cosmos3OmniPipeline.tokenize_prompt` turns a caption into tokens with three switches: the system prompt,
the duration template and the resolution template (the unconditional prompt gets the inverse templates).
Users prompt in different forms (the public Cosmos 3 README turns both templates off and passes an empty
negative prompt), so the form is a recipe choice (`generator.*`), recorded in the export
(`cosmos_train_export.json` `prompt_format`, `model_index.json` `default_use_system_prompt`) and used by
`cosmos-train generate`. Tokens always come from the pipeline's own `tokenize_prompt`; this module only
decides its arguments.

A "template form" is one boolean, `templates_on`: True is the recipe's template flags (or both templates
on, when the recipe turns both off), False is both templates off. `template_dropout` trains a share of
samples on the other form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cosmos_train.config.schema import UNCOND_PROMPTS

# `Cosmos3OmniPipeline.__init__`'s default, which applies when model_index.json does not set it
PIPELINE_DEFAULT_USE_SYSTEM_PROMPT = True


@dataclass(frozen=True)
class PromptFormat:
    use_system_prompt: bool
    duration_template: bool = True
    resolution_template: bool = True
    template_dropout: float = 0.0
    uncond_prompt: str = "pipeline"  # pipeline | empty (see GeneratorConfig.uncond_prompt)

    @property
    def templates_on(self) -> bool:
        """The recipe's own template form (True unless both templates are off)."""
        return self.duration_template or self.resolution_template

    def pipeline_kwargs(self, templates_on: bool) -> dict:
        """`tokenize_prompt` / pipeline `__call__` keyword arguments for the conditional prompt of a form."""
        if not templates_on:
            duration = resolution = False
        elif self.templates_on:
            duration, resolution = self.duration_template, self.resolution_template
        else:  # the recipe trains without templates; its other form is the pipeline's default (both on)
            duration = resolution = True
        return {"use_system_prompt": self.use_system_prompt, "add_duration_template": duration,
                "add_resolution_template": resolution}

    def uncond_kwargs(self, templates_on: bool) -> dict:
        """`tokenize_prompt` keyword arguments whose unconditional ids (negative prompt "") are what CFG
        dropout trains on: the same form (`pipeline`), or always the bare empty prompt (`empty`)."""
        return self.pipeline_kwargs(templates_on and self.uncond_prompt == "pipeline")

    def describe(self, templates_on: bool | None = None) -> str:
        """One line: the form used (the recipe's own form unless `templates_on` says otherwise)."""
        kw = self.pipeline_kwargs(self.templates_on if templates_on is None else templates_on)
        templates = [name for name, key in (("duration", "add_duration_template"),
                                            ("resolution", "add_resolution_template")) if kw[key]]
        return (f"system prompt {'on' if kw['use_system_prompt'] else 'off'}, templates "
                f"{' + '.join(templates) if templates else 'off'}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptFormat":
        """From `to_dict` output; keys this version does not know are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("use_system_prompt"), bool):
            raise ValueError(f"prompt_format: 'use_system_prompt' must be true or false, got {data!r}")
        for key in ("duration_template", "resolution_template"):
            if key in values and not isinstance(values[key], bool):
                raise ValueError(f"prompt_format: '{key}' must be true or false, got {values[key]!r}")
        if values.get("uncond_prompt", "pipeline") not in UNCOND_PROMPTS:
            raise ValueError(f"prompt_format: 'uncond_prompt' must be one of {', '.join(UNCOND_PROMPTS)}, "
                             f"got {values['uncond_prompt']!r}")
        return cls(**values)


def resolve_prompt_format(generator_cfg, checkpoint_default_use_system_prompt: bool) -> PromptFormat:
    """The recipe's prompt format; `generator.use_system_prompt: null` takes the checkpoint's default."""
    use_system_prompt = generator_cfg.use_system_prompt
    if use_system_prompt is None:
        use_system_prompt = bool(checkpoint_default_use_system_prompt)
    return PromptFormat(
        use_system_prompt=bool(use_system_prompt), duration_template=bool(generator_cfg.duration_template),
        resolution_template=bool(generator_cfg.resolution_template),
        template_dropout=float(generator_cfg.template_dropout), uncond_prompt=str(generator_cfg.uncond_prompt),
    )


def default_use_system_prompt_of(model_index: dict | None) -> bool:
    """`default_use_system_prompt` of a parsed model_index.json (the pipeline's default when absent)."""
    value = (model_index or {}).get("default_use_system_prompt")
    return PIPELINE_DEFAULT_USE_SYSTEM_PROMPT if value is None else bool(value)


def read_model_index(pretrained: str, *, revision: str | None = None, local_files_only: bool = False) -> dict:
    """A checkpoint's model_index.json: from a local directory, or from the hub (HF cache first).

    Raises OSError / ValueError (json) as diffusers' loaders do; callers turn them into a UserError."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return json.loads((path / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        downloaded = hf_hub_download(pretrained, "model_index.json", revision=revision,
                                     local_files_only=local_files_only)
    except EntryNotFoundError as err:  # not an OSError in every huggingface_hub version
        raise FileNotFoundError(str(err) or f"{pretrained} has no model_index.json") from None
    return json.loads(Path(downloaded).read_text())


def checkpoint_default_use_system_prompt(pretrained_dir_or_id: str, *, revision: str | None = None,
                                         local_files_only: bool = False) -> bool:
    """The checkpoint's `default_use_system_prompt` (model_index.json; True when the key is absent).

    Accepts a local directory, a hub id or `tiny`; an unreadable checkpoint is a UserError."""
    import os

    from cosmos_train.errors import UserError
    from cosmos_train.models import resolve_pretrained

    pretrained = resolve_pretrained(str(pretrained_dir_or_id))
    local_files_only = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return default_use_system_prompt_of(read_model_index(pretrained, revision=revision,
                                                             local_files_only=local_files_only))
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise UserError(f"model.pretrained: could not read model_index.json of '{pretrained}': {first}") from None
