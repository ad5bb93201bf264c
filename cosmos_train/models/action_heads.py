"""The action heads of Cosmos3OmniTransformer: what trains in them, and how a new embodiment's rows start.

`action_proj_in` / `action_proj_out` are diffusers' `DomainAwareLinear`: one weight per embodiment domain,
stored as rows of an `nn.Embedding` (`fc`: [num_domains, in * out] applied as `x @ W` with W viewed [in, out];
`bias`: [num_domains, out]). PEFT's LoRA cannot wrap them, so an action run trains them directly, ONLY the
rows of the domains it uses (a gradient hook zeroes the others, and they get no weight decay), together with
`action_modality_embed`, in their own optimizer group (`action.head_lr_multiplier`, official 5x).

A new embodiment's rows start as the official trainer starts fresh ones (xavier-uniform on the [in, out]
weight, zero bias), or as a copy of a named existing embodiment's rows. The library default would be N(0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEADS = ("action_proj_in", "action_proj_out")
HEAD_PARAMS = tuple(f"{h}.{p}.weight" for h in HEADS for p in ("fc", "bias"))
EMBED_PARAM = "action_modality_embed"
ACTION_PARAMS = HEAD_PARAMS + (EMBED_PARAM,)
ACTION_HEADS_FILE = "action_heads.safetensors"  # beside a LoRA-only export of an action run


def is_action_param(name: str) -> bool:
    return name in ACTION_PARAMS


@torch.no_grad()
def init_domain_rows(transformer: nn.Module, domain_id: int, copy_from: int | None = None,
                     generator: torch.Generator | None = None) -> None:
    """Start domain `domain_id`'s head rows: a copy of domain `copy_from`'s, or xavier-uniform weights and zero
    bias (deterministic for a given `generator`)."""
    for name in HEADS:
        head = getattr(transformer, name)
        if copy_from is not None:
            head.fc.weight[domain_id] = head.fc.weight[copy_from]
            head.bias.weight[domain_id] = head.bias.weight[copy_from]
            continue
        bound = math.sqrt(6.0 / (head.input_size + head.output_size))
        row = torch.rand(head.fc.weight.shape[1], generator=generator, dtype=torch.float32) * 2 * bound - bound
        head.fc.weight[domain_id] = row.to(head.fc.weight.dtype)
        head.bias.weight[domain_id] = 0


def _keep_rows(rows: list[int]):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        mask[rows] = 1
        return grad * mask
    return hook


def _cast_in(module, args):
    x, domain_id = args
    return x.to(module.fc.weight.dtype), domain_id


def _cast_out(module, args, output):
    return output.to(module._ct_out_dtype) if getattr(module, "_ct_out_dtype", None) is not None else output


def enable_action_heads(transformer: nn.Module, domain_ids: list[int]) -> list[nn.Parameter]:
    """Make the action heads' rows of `domain_ids` and the action modality embedding trainable (fp32).
    Returns the parameters (for their own optimizer group, without weight decay)."""
    params = []
    base_dtype = transformer.embed_tokens.weight.dtype
    for name in HEADS:
        head = getattr(transformer, name)
        for table in (head.fc, head.bias):
            table.weight.data = table.weight.data.float()
            table.weight.requires_grad_(True)
            if not getattr(table.weight, "_ct_row_hook", False):
                table.weight.register_hook(_keep_rows(sorted(set(domain_ids))))
                table.weight._ct_row_hook = True
            params.append(table.weight)
        if base_dtype != torch.float32 and not getattr(head, "_ct_cast_hooks", False):
            # fp32 rows inside a bf16 network: compute the head in fp32, hand the network its own dtype back
            head._ct_out_dtype = base_dtype
            head.register_forward_pre_hook(_cast_in)
            head.register_forward_hook(_cast_out)
            head._ct_cast_hooks = True
    embed = getattr(transformer, EMBED_PARAM)
    embed.data = embed.data.float()
    embed.requires_grad_(True)
    params.append(embed)
    return params


def action_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The action heads' tables and the modality embedding (what an action run's checkpoint adds to its LoRA)."""
    own = dict(transformer.named_parameters())
    return {name: own[name].detach().cpu().contiguous() for name in ACTION_PARAMS if name in own}


def load_action_heads(transformer: nn.Module, path) -> None:
    """Put an exported `action_heads.safetensors` into a (stock diffusers) transformer."""
    from safetensors.torch import load_file

    tables = load_file(str(path))
    unknown = sorted(set(tables) - set(ACTION_PARAMS))
    if unknown:
        raise ValueError(f"{path}: not action-head tensors: {unknown[:3]}")
    own = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, value in tables.items():
            own[name].copy_(value.to(own[name].dtype))
