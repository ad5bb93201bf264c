"""The README.md model card every export writes: what this checkpoint is, how it was made, how to serve it.

Nothing in it names a path on the machine that exported it: local paths (the base checkpoint, data files)
appear as their last component only (`local:NAME`), so a card can be published as it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def public_name(value: str) -> str:
    """A local path becomes `local:<last component>`; hub ids and other strings stay as they are."""
    if isinstance(value, str) and (_ABSOLUTE.match(value) or value.startswith(("./", "../"))):
        return f"local:{Path(value.rstrip('/')).name}"
    return value


def scrub_paths(data):
    """`data` (dicts, lists, strings) with every local path replaced by `public_name`."""
    if isinstance(data, dict):
        return {k: scrub_paths(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub_paths(v) for v in data]
    return public_name(data) if isinstance(data, str) else data


def run_summary(run_dir: Path) -> dict:
    """Final / first training loss and data summary of a run, from the files the trainer writes."""
    run_dir = Path(run_dir)
    out: dict = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
        if losses:
            tail = losses[-min(len(losses), 20):]
            out.update(first_loss=losses[0], final_loss=tail[-1], final_loss_mean=sum(tail) / len(tail),
                       final_loss_steps=len(tail), steps_logged=len(losses))
        for key in ("val_loss", "validation_loss"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                out["validation_loss"] = vals[-1]
        for key in ("val_action_mae_policy", "val_action_mae_inverse_dynamics"):  # held-out, dataset units
            vals = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                out[key] = vals[-1][1]
                out[f"{key}_step"] = vals[-1][0]
    data_info = run_dir / "data_info.json"
    if data_info.is_file():
        info = json.loads(data_info.read_text())
        sources = info.get("sources") or []
        out["data"] = {"sources": [scrub_paths({k: s.get(k) for k in ("name", "kind", "size", "weight") if k in s})
                                   for s in sources],
                       "epoch_size": info.get("epoch_size"), "skipped": info.get("skipped")}
    return out


def _generator_call(prompt_kwargs: dict) -> str:
    args = "".join(f", {k}={v}" for k, v in prompt_kwargs.items())
    return f'video = pipe(prompt="A robot arm stacks two red cubes."{args}).video'


def _snippets(kind: str, repo: str, prompt_kwargs: dict, default_system: bool, *, prompt_text: str = "",
              lora_rank: int | None = None) -> str:
    """The load / serve snippets that work on export form `kind`. Generator snippets pass the trained prompt
    form explicitly (`prompt_kwargs`: use_system_prompt, templates, negative prompt); `prompt_text` says it in
    words for servers that take no such arguments."""
    send = f"\nSend prompts in the form it trained on: {prompt_text}." if prompt_text else ""
    if kind == "generator-adapter":
        return f"""### diffusers (adapter on the base pipeline)
```python
import torch
from diffusers import Cosmos3OmniPipeline
pipe = Cosmos3OmniPipeline.from_pretrained("BASE_MODEL", torch_dtype=torch.bfloat16).to("cuda")
pipe.transformer.load_lora_adapter("{repo}", weight_name="adapter_model.safetensors", adapter_name="finetune")
{_generator_call(prompt_kwargs)}
```
The prompt options are passed explicitly: the base pipeline's `default_use_system_prompt` need not be what this
finetune trained with.

### vLLM-Omni (adapter in its module names: the `vllm-omni/` folder)
```bash
vllm serve BASE_MODEL --omni --model-class-name Cosmos3OmniDiffusersPipeline --enable-lora \\
    --lora-modules finetune={repo}/vllm-omni
```{send}
"""
    if kind == "reasoner-adapter":
        return f"""### transformers + PEFT (this folder)
```python
from peft import PeftModel
from transformers import Cosmos3OmniForConditionalGeneration, Qwen3VLProcessor
model = Cosmos3OmniForConditionalGeneration.from_pretrained("BASE_MODEL", dtype="bfloat16", device_map="auto")
model = PeftModel.from_pretrained(model, "{repo}")
processor = Qwen3VLProcessor.from_pretrained("BASE_MODEL")  # AutoProcessor gives a bare tokenizer here
```

### vLLM (adapter in the Cosmos 3 class's names: the `vllm/` folder)
```bash
vllm serve BASE_MODEL --enable-lora --max-lora-rank {lora_rank} --lora-modules finetune={repo}/vllm
```
"""
    transformers_text = f"""### transformers (reasoner)
```python
from transformers import Cosmos3OmniForConditionalGeneration, Qwen3VLProcessor
model = Cosmos3OmniForConditionalGeneration.from_pretrained("{repo}", dtype="bfloat16", device_map="auto")
processor = Qwen3VLProcessor.from_pretrained("{repo}")  # AutoProcessor gives a bare tokenizer here
```"""
    chat_text = f"""### cosmos-train chat
```bash
cosmos-train chat {repo} "Describe the video." --video clip.mp4
```"""
    if kind == "reasoner-transformers":  # a plain transformers directory: no pipeline, no released layout
        return transformers_text + "\n\n" + chat_text + "\n"
    generator_line = (f"\nThe pipeline's `default_use_system_prompt` is `{str(default_system).lower()}` here, as "
                      "trained; the call passes the prompt options explicitly all the same."
                      if kind == "generator-merged" else "")
    return f"""### diffusers (generator)
```python
import torch
from diffusers import Cosmos3OmniPipeline
pipe = Cosmos3OmniPipeline.from_pretrained("{repo}", torch_dtype=torch.bfloat16).to("cuda")
{_generator_call(prompt_kwargs)}
```{generator_line}

{transformers_text}

{chat_text if kind == "reasoner-merged" else ""}

### vLLM (reasoner serving)
```bash
vllm serve {repo}
```

### vLLM-Omni (generator serving)
```bash
vllm serve {repo} --omni --model-class-name Cosmos3OmniDiffusersPipeline
```{send}
""".replace("\n\n\n\n", "\n\n")


def write_model_card(out: Path, *, kind: str, cfg, recipe: dict, run_dir: Path, info: dict,
                     prompt_format: dict | None = None) -> None:
    """OUT/README.md. `kind`: generator-merged | reasoner-merged | generator-adapter | reasoner-adapter |
    reasoner-transformers."""
    summary = run_summary(run_dir)
    base = public_name(cfg.model.pretrained)
    repo = "THIS_DIRECTORY_OR_HUB_ID"
    trained = _what_trained(cfg)
    prompt_kwargs: dict = {}
    prompt_text = ""
    default_system = True
    if prompt_format and cfg.objective == "generator":
        from cosmos_train.models.prompt_format import PromptFormat

        fmt = PromptFormat.from_dict(prompt_format)
        default_system = fmt.use_system_prompt
        # every option explicit (as `cosmos-train generate` prompts): a base pipeline's defaults may differ
        prompt_kwargs = {**fmt.pipeline_kwargs(fmt.templates_on), "negative_prompt": '""'}
        prompt_text = f'{fmt.describe()}, negative prompt ""'
        if fmt.uncond_prompt == "empty" and fmt.templates_on:
            prompt_text += (" (the unconditional prompt trained as the bare empty prompt, without templates: "
                            "`cosmos-train generate` does this)")
    lines = ["---"]
    if _HUB_ID.fullmatch(base):  # the hub wants a repo id; a local base stays in the body only
        lines.append(f"base_model: {base}")
    lines += [
        "library_name: diffusers" if cfg.objective == "generator" else "library_name: transformers",
        f"tags: [cosmos3, cosmos_train, {cfg.objective}, {cfg.train.method}]",
        "---",
        f"# {cfg.objective.capitalize()} finetune of {base}",
        "",
        f"Exported by cosmos_train ({kind}) from checkpoint `{info.get('checkpoint')}` (step {info.get('step')}).",
        "",
        "## How it was made",
        f"- Base model: `{base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- Objective: {cfg.objective} ({'flow matching' if cfg.objective == 'generator' else 'next-token SFT'})",
        f"- What trained: {trained}",
    ]
    if prompt_format:
        lines.append(f"- Prompt format: `{json.dumps(prompt_format, sort_keys=True)}`: prompt it the same way "
                     "(`cosmos-train generate` does this by itself)")
    if "first_loss" in summary:
        lines.append(f"- First loss: {summary['first_loss']:.4f}")
    if "final_loss_mean" in summary:
        lines.append(f"- Final loss (mean of the last {summary['final_loss_steps']} logged steps): "
                     f"{summary['final_loss_mean']:.4f}")
    if "validation_loss" in summary:
        lines.append(f"- Validation loss: {summary['validation_loss']:.4f}")
    for mode in ("policy", "inverse_dynamics"):
        key = f"val_action_mae_{mode}"
        if key in summary:
            lines.append(f"- Held-out action error, {mode.replace('_', ' ')} (mean absolute error of de-normalized "
                         f"actions, step {summary[key + '_step']}): {summary[key]:.4f}")
    if info.get("action", {}).get("dataset"):
        d = info["action"]["dataset"]
        lines.append(f"- Data: LeRobot dataset `{d.get('name')}` ({d.get('codebase_version')}), episodes "
                     f"{d.get('episodes')}, {d.get('windows')} training windows")
    elif "data" in summary:
        lines.append(f"- Data: `{json.dumps(summary['data'], sort_keys=True)}`")
    if "verification_max_relative_difference" in info:
        lines.append(f"- Verified on export: max relative difference to the trained model "
                     f"{info['verification_max_relative_difference']:.2e}")
    if info.get("action"):
        lines += ["", _action_section(info["action"], repo,
                                      bool((prompt_format or {}).get("use_system_prompt", True))).strip()]
    snippets = _snippets(kind, repo, prompt_kwargs, default_system, prompt_text=prompt_text,
                         lora_rank=cfg.train.lora.rank)
    lines += ["", "## Load or serve it", "", snippets.strip(), "",
              f"Replace `{repo}` with this directory (or the hub id you publish it under)"
              + (f" and `BASE_MODEL` with the base checkpoint (`{base}`)." if "BASE_MODEL" in snippets else "."), "",
              "## Recipe", "", "```yaml", yaml.safe_dump(scrub_paths(_relevant(recipe)), sort_keys=False).strip(),
              "```", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))


def _action_section(a: dict, repo: str, use_system: bool = True) -> str:
    norm = a["normalization"]
    affine = a.get("denormalize") or {"scale": [1.0] * int(a["raw_action_dim"]), "center": [0.0] * int(a["raw_action_dim"])}
    scale = [round(v, 6) for v in affine["scale"]]
    center = [round(v, 6) for v in affine["center"]]
    new = (f"`{a['embodiment']}` is not one of diffusers' embodiments: register it before the call (the tables are "
           "read at call time)" if a.get("new_embodiment") else f"`{a['embodiment']}` is one of diffusers' embodiments")
    return f"""## World-action
- Embodiment {new}: domain {a['domain_id']}, {a['raw_action_dim']} action channels ({', '.join(a['action_keys'])}),
  camera(s) {', '.join(a['cameras'])}, chunks of {a['chunk_size']} actions ({a['chunk_size'] + 1} frames) at
  {a['fps']:g} fps, view point `{a['view_point']}`, action canvas tier {a['resolution_tier']}.
- Actions are **normalized** (`{norm.get('method')}`, statistics in `cosmos_train_export.json` under
  `action.normalization`): diffusers does not normalize, so normalize the actions you give (forward dynamics) and
  de-normalize the ones it returns (policy, inverse dynamics): raw = normalized x scale + center per channel
  (`action.denormalize` in `cosmos_train_export.json`; normalize with (raw - center) / scale). `cosmos-train
  generate` does both.

```bash
cosmos-train generate {repo} "your task" --action policy --image first_frame.png --out policy.mp4
cosmos-train generate {repo} "your task" --action forward_dynamics --image first_frame.png --actions actions.json
cosmos-train generate {repo} "your task" --action inverse_dynamics --video clip.mp4
```

```python
import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos import pipeline_cosmos3_omni as cosmos3
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from PIL import Image
cosmos3._EMBODIMENT_TO_DOMAIN_ID["{a['embodiment']}"] = {a['domain_id']}
cosmos3._EMBODIMENT_TO_RAW_ACTION_DIM["{a['embodiment']}"] = {a['raw_action_dim']}
pipe = Cosmos3OmniPipeline.from_pretrained("{repo}", dtype=torch.bfloat16).to("cuda")
first_frame = Image.open("first_frame.png").convert("RGB")   # the camera view(s) the finetune was trained on
out = pipe(prompt="your task", fps={a['fps']:g}, use_system_prompt={use_system},
           generator=torch.Generator().manual_seed(0), action=CosmosActionCondition(
               mode="policy", chunk_size={a['chunk_size']}, domain_name="{a['embodiment']}",
               resolution_tier={a['resolution_tier']}, image=first_frame, view_point="{a['view_point']}"))
normalized = out.action[0][:, :{a['raw_action_dim']}].float().cpu().numpy()
scale, center = np.array({scale}), np.array({center})
actions = normalized * scale + center   # de-normalized: the dataset's own units
```

"""


def _relevant(recipe: dict) -> dict:
    """The recipe without the sections that do not apply to this run (the saved recipe has every default)."""
    out = dict(recipe)
    if out.get("objective") == "reasoner":
        out.pop("generator", None)
        out.pop("action", None)
    else:
        out.pop("reasoner", None)
    if out.get("action"):  # an action run: clips and modes come from the action section
        out["generator"] = {k: v for k, v in (out.get("generator") or {}).items() if k != "modes"}
        out["data"] = {k: v for k, v in (out.get("data") or {}).items()
                       if k in ("skip_bad_samples", "num_workers", "shuffle", "cache")}
    elif "action" in out:
        out.pop("action")
    return out


def _what_trained(cfg) -> str:
    t = cfg.train
    if cfg.objective == "reasoner":
        r = cfg.reasoner
        parts = [f"language: {r.language or t.method}", f"vision: {r.vision}", f"merger: {r.merger}"]
        lora = f" (LoRA rank {t.lora.rank}, alpha {t.lora.alpha})" if "lora" in (r.language or t.method, r.vision) else ""
        return ", ".join(parts) + lora
    if t.method == "lora":
        return (f"LoRA rank {t.lora.rank}, alpha {t.lora.alpha} on {', '.join(t.lora.target_modules)} "
                "(generation pathway; the reasoner's language model is unchanged)" if t.lora.target_modules else "LoRA")
    return ("full finetuning of the generation pathway, time embedder and latent projections" if
            t.full_trainable == "gen" else "full finetuning of every weight but lm_head (understanding pathway "
            "included: the reasoner's language model changed too)")
