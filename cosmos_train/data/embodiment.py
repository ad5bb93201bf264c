"""Embodiments: diffusers' action tables (name -> action domain id, name -> raw action width).

The tables live in ``diffusers/pipelines/cosmos/pipeline_cosmos3_omni.py``
(``_EMBODIMENT_TO_DOMAIN_ID``, ``_EMBODIMENT_TO_RAW_ACTION_DIM``). Importing that module takes seconds,
so when it is not imported yet the two dict literals are read from its source with `ast` (same values);
once it is imported the live tables are used (entries added at run time, as serving a new embodiment
with stock diffusers needs, are then seen).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from cosmos_train.errors import UserError

_PIPELINE_MODULE = "diffusers.pipelines.cosmos.pipeline_cosmos3_omni"


@functools.lru_cache(maxsize=1)
def _tables_from_source() -> tuple[dict, dict]:
    spec = importlib.util.find_spec("diffusers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("diffusers is not installed: cannot look up Cosmos 3 embodiments")
    path = Path(list(spec.submodule_search_locations)[0]) / "pipelines" / "cosmos" / "pipeline_cosmos3_omni.py"
    tree = ast.parse(path.read_text())
    found: dict[str, dict] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in ("_EMBODIMENT_TO_DOMAIN_ID", "_EMBODIMENT_TO_RAW_ACTION_DIM"):
                    found[t.id] = ast.literal_eval(node.value)
    if len(found) != 2:
        raise UserError(f"{path}: cannot find diffusers' embodiment tables (_EMBODIMENT_TO_DOMAIN_ID, "
                        "_EMBODIMENT_TO_RAW_ACTION_DIM); is this diffusers version too old for Cosmos 3 actions?")
    return found["_EMBODIMENT_TO_DOMAIN_ID"], found["_EMBODIMENT_TO_RAW_ACTION_DIM"]


def _tables() -> tuple[dict, dict]:
    module = sys.modules.get(_PIPELINE_MODULE)
    if module is not None and hasattr(module, "_EMBODIMENT_TO_DOMAIN_ID"):
        return dict(module._EMBODIMENT_TO_DOMAIN_ID), dict(module._EMBODIMENT_TO_RAW_ACTION_DIM)
    ids, dims = _tables_from_source()
    return dict(ids), dict(dims)


def known_embodiments() -> dict[str, int]:
    """diffusers' embodiment name -> action domain id (includes ``no_action``, domain 0)."""
    return _tables()[0]


def known_action_widths() -> dict[str, int]:
    """diffusers' embodiment name -> raw (unpadded) action width. Names without a fixed width
    (``libero``, ``no_action``) are absent: stock ``CosmosActionCondition`` rejects them."""
    return _tables()[1]


@dataclass(frozen=True)
class Embodiment:
    name: str
    domain_id: int
    raw_action_dim: int | None  # None: diffusers has no fixed width for it (libero)
    new: bool  # True: action.new_embodiment (head rows of its own at a free domain id)
    init_from: str | None = None  # new embodiments: copy head rows from this one (None: xavier init)


def resolve_embodiment(cfg_action) -> Embodiment:
    """The recipe's embodiment (`action.embodiment` / `action.new_embodiment`)."""
    new = getattr(cfg_action, "new_embodiment", None)
    if new is not None:
        return Embodiment(new.name, int(new.domain_id), int(new.raw_action_dim), True, new.init_from)
    ids, dims = _tables()
    name = cfg_action.embodiment
    if name not in ids or name == "no_action":
        raise UserError(f"invalid value for 'action.embodiment': unknown embodiment {name!r} (known: "
                        f"{', '.join(n for n in ids if n != 'no_action')}; or describe a new one in "
                        "action.new_embodiment)")
    return Embodiment(name, int(ids[name]), dims.get(name), False)


def check_domain_id(embodiment: Embodiment, num_domains: int) -> None:
    """A new embodiment's domain id must exist in the model's action heads (`num_domains` rows)."""
    if not 0 <= embodiment.domain_id < num_domains:
        raise UserError(f"invalid value for 'action.new_embodiment.domain_id': {embodiment.domain_id} (the model's "
                        f"action heads have {num_domains} domains: 0..{num_domains - 1})")
