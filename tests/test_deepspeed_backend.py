"""DeepSpeed ZeRO-2 / ZeRO-3 back-end (trainer/deepspeed_backend.py) on CPU (gloo), at the Backend level.

The slow tests run this file as a driver (`python tests/test_deepspeed_backend.py ...`, under torchrun for two
processes): it builds the tiny generator as the trainer does, trains a few LoRA steps on fixed samples through
the `Backend` calls the loop makes, and writes weights / optimizer moments for the tests to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny" / "t2v_lora.yaml"
LR = 1e-2


# ---- the driver (run as a script) -------------------------------------------------------------------------------

def _driver(argv: list[str]) -> None:
    import argparse

    from accelerate import Accelerator

    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", required=True)  # comma-separated zero2 / zero3 / plain (torch AdamW: reference)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip", type=int, default=0)  # this step is skipped (as the loop does for a non-finite loss)
    ap.add_argument("--save-at", type=int, default=0)  # write a checkpoint after this step
    ap.add_argument("--load", default="")  # resume from <load>/<backend>/ckpt (its step is in state.json)
    ap.add_argument("--out", required=True)  # results in <out>/<backend>/
    ap.add_argument("--no-coalesce", action="store_true")  # DeepSpeed's reduction after every micro-step
    ap.add_argument("--pack", action="store_true")  # two samples per micro-step in one packed forward
    ap.add_argument("--extra", nargs="*", default=[])  # recipe overrides
    args = ap.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    for name in args.backends.split(","):  # one process group, one DeepSpeed engine after the other
        _run(name, args, accelerator)


def _run(name: str, args, accelerator) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from cosmos_train.config import load_recipe
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective
    from cosmos_train.objectives.generator import LatentSample
    from cosmos_train.trainer.backends import SHARDED_OPTIMIZER, make_backend

    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "train.device=cpu", f"train.lr={LR}", "train.warmup_steps=0",
                               f"train.grad_accum_steps={args.accum}", "train.packing.enabled=false",
                               f"train.distributed.backend={'ddp' if name == 'plain' else name}", *args.extra])
    torch.manual_seed(0)  # LoRA A init: the same on every rank and in every run
    model = load_model(cfg)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    groups = model.setup_trainable(cfg)
    params = [p for g in groups for p in g["params"]]
    model.to(accelerator.device)
    objective = build_objective(cfg, model, seed=0)

    start, ckpt = 0, Path(args.load) / name / "ckpt"
    if args.load:  # as the loop resumes: trained weights into the model before prepare
        start = json.loads((ckpt / "state.json").read_text())["step"]
        model.load_trainable_state_dict(cfg, load_file(str(ckpt / "trainable.safetensors")))
    backend = None if name == "plain" else make_backend(cfg, accelerator)
    if backend is None:
        from cosmos_train.trainer.optim import build_optimizer

        optimizer, scheduler = build_optimizer(groups, cfg.train)
    else:
        backend.coalesce = not args.no_coalesce
        optimizer, scheduler = backend.prepare(model, groups)
    if args.load:
        torch_state = torch.load(ckpt / "torch_state.pt", weights_only=False)
        if backend is None:
            optimizer.load_state_dict(torch_state["optimizer"])
        else:
            backend.load_optimizer(ckpt, torch_state)
        scheduler.load_state_dict(torch_state["lr_scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # as the loop does after a load
            group["lr"] = lr

    def moments():  # whole master weights and Adam moments through DeepSpeed's fragment API (collectives)
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        found = {}
        for n, p in model.transformer.named_parameters():
            if p.requires_grad:
                for key in ("exp_avg", "exp_avg_sq"):
                    found[f"{n}/{key}"] = safe_get_full_optimizer_state(p, key).reshape(-1).cpu()
                found[f"{n}/fp32"] = safe_get_full_fp32_param(p).reshape(-1).cpu()
        return found

    if args.pack:  # as the loop does, after prepare
        model.install_packed_attention()
    if args.load and backend is not None:
        loaded = moments()
        if rank == 0:
            save_file(loaded, str(out / "moments_loaded.safetensors"))

    # fixed samples: a random latent per global sample index (as if encoded), drawn with its index as key
    gen = torch.Generator().manual_seed(1)
    latents = [torch.randn(48, 5, 8, 8, generator=gen) for _ in range(32)]

    def sample(index):
        item = LatentSample(latent=latents[index], caption=f"sample {index}", fps=24.0, num_frames=17, height=64,
                            width=64)
        return objective.draw(item, key=index)

    def batch(index):
        return [sample(index), sample(index + 16)] if args.pack else [sample(index)]

    log = []
    model.transformer.train()
    for step in range(start, args.steps):
        losses = []
        for micro in range(args.accum):
            # the global batch in the same order for any process count: micro-step major, rank minor
            index = step * world * args.accum + micro * world + rank
            if backend is None:
                loss, _ = objective.loss(batch(index), packed=args.pack)
                (loss / args.accum).backward()
            else:
                with backend.accumulating(last_micro=micro == args.accum - 1):
                    loss, _ = objective.loss(batch(index), packed=args.pack)
                    backend.backward(loss / args.accum)
            losses.append(float(loss.detach()))
        skip = args.skip == step + 1
        if backend is None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            norm = backend.grad_norm(params, cfg.train.max_grad_norm)
            backend.skip() if skip else backend.step()
        scheduler.step()
        log.append({"step": step + 1, "losses": losses, "grad_norm": norm})
        if args.save_at == step + 1:
            save = out / "ckpt"
            if backend is None:
                weights, torch_state = model.trainable_state_dict(cfg), {"optimizer": optimizer.state_dict()}
            else:
                weights, torch_state = backend.trainable_state_dict(model, cfg), {}
                backend.save_optimizer(save / SHARDED_OPTIMIZER)  # every rank
                saved = moments()
                if rank == 0:
                    save_file(saved, str(out / "moments_saved.safetensors"))
            if rank == 0:
                torch.save({**torch_state, "lr_scheduler": scheduler.state_dict()}, save / "torch_state.pt")
                save_file(weights, str(save / "trainable.safetensors"))
                (save / "state.json").write_text(json.dumps({"step": step + 1}))
    weights = model.trainable_state_dict(cfg) if backend is None else backend.trainable_state_dict(model, cfg)
    if rank == 0:
        save_file(weights, str(out / "final.safetensors"))
        (out / "log.json").write_text(json.dumps(log))
    if world > 1:
        torch.distributed.barrier()


# ---- the tests ----------------------------------------------------------------------------------------------------

STEPS, SKIP, SAVE = 4, 2, 2  # step 2 is skipped (no update), its checkpoint resumed elsewhere


def _launch(args: list[str], nproc: int, tiny_dir, tmp) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1 else [sys.executable])
    cmd = [*head, str(Path(__file__)), *args, "--extra", f"model.pretrained={tiny_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """ref: 1 process, plain torch AdamW, 2 accumulation steps. two: 2 processes x 1 micro-step, ZeRO-2 and
    ZeRO-3, saved after step 2. one: 1 process x 2 micro-steps resuming the 2-process checkpoints, saved after
    step 3. back: ZeRO-3 on 2 processes resuming the 1-process checkpoint. The same global batches throughout."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("ds")
    common = ["--steps", str(STEPS), "--skip", str(SKIP)]
    _launch(["--backends", "plain", "--accum", "2", *common, "--out", str(root / "ref")], 1, tiny_dir, root)
    _launch(["--backends", "zero2,zero3", "--accum", "1", *common, "--save-at", str(SAVE), "--out",
             str(root / "two")], 2, tiny_dir, root)
    _launch(["--backends", "zero2,zero3", "--accum", "2", *common, "--save-at", str(SAVE + 1), "--load",
             str(root / "two"), "--out", str(root / "one")], 1, tiny_dir, root)
    _launch(["--backends", "zero3", "--accum", "1", *common, "--load", str(root / "one"), "--out",
             str(root / "back")], 2, tiny_dir, root)
    return root


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:  # summation order differs (reduce vs accumulation); Adam magnifies it where a gradient is ~0,
        diff = (a[key] - b[key]).abs()  # so: a loose max, a tight mean
        assert diff.max() < 5e-4 and diff.mean() < 1e-6, (what, key, float(diff.max()), float(diff.mean()))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_train_as_one_process_with_accumulation(runs, stage):
    from safetensors.torch import load_file

    ref = load_file(str(runs / "ref" / "plain" / "final.safetensors"))
    two = load_file(str(runs / "two" / stage / "final.safetensors"))
    # the trained weights under the model's own keys (PEFT naming), whole, fp32 masters
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in two) and ".default." not in "".join(two)
    assert all(v.dtype == ref[k].dtype and v.shape == ref[k].shape for k, v in two.items())
    assert any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)  # they did train (B starts at 0)
    # step 2 was skipped: equal to the reference only if nothing (weights, moments, step count) moved then
    _close(two, ref, f"{stage} 2 processes vs 1 process x 2 micro-steps")
    logs = {n: json.loads((runs / n / b / "log.json").read_text()) for n, b in (("ref", "plain"), ("two", stage))}
    for a, b in zip(logs["ref"], logs["two"]):  # rank 0 logs its own sample: the first of each global batch
        assert b["losses"][0] == pytest.approx(a["losses"][0], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # global, before clipping


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_optimizer_state_reshards_between_process_counts(runs, stage):
    from safetensors.torch import load_file

    def read(*parts):
        return load_file(str(runs.joinpath(*parts)))

    # written by 2 processes (one file each, the frozen base not in them), read by 1: the same master weights and
    # Adam moments, and training on from there lands where the uninterrupted runs did
    written = runs / "two" / stage / "ckpt" / "optimizer"
    assert sorted(p.name for p in written.iterdir()) == ["deepspeed_optimizer.json", "rank-00000.safetensors",
                                                         "rank-00001.safetensors"]
    meta = json.loads((written / "deepspeed_optimizer.json").read_text())
    assert meta["world_size"] == 2 and meta["group_steps"] == [1.0]  # 2 steps, one skipped
    assert all("lora_" in name for name in meta["params"])
    saved, loaded = read("two", stage, "moments_saved.safetensors"), read("one", stage, "moments_loaded.safetensors")
    assert saved.keys() == loaded.keys() and len(saved) == 3 * len(meta["params"])
    for key in saved:
        assert torch_equal(saved[key], loaded[key]), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("/exp_avg_sq"))
    _close(read("one", stage, "final.safetensors"), read("ref", "plain", "final.safetensors"), "resumed on 1")
    if stage == "zero3":  # and back: written by 1 process, read by 2
        saved = read("one", stage, "moments_saved.safetensors")
        loaded = read("back", stage, "moments_loaded.safetensors")
        assert saved.keys() == loaded.keys()
        for key in saved:
            assert torch_equal(saved[key], loaded[key]), key
        _close(read("back", stage, "final.safetensors"), read("ref", "plain", "final.safetensors"), "resumed on 2")


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _cfg(tmp_path, text: str | None, name="ds.json"):
    from cosmos_train.config import load_recipe

    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    return load_recipe(RECIPE, ["train.distributed.backend=zero3", "train.packing.enabled=false",
                               f"train.distributed.deepspeed_config={path}"]), path


@pytest.mark.parametrize("text, message", [
    ('{"zero_optimization": {"stage": 3,', "not valid JSON"),
    (None, "cannot read it"),
    ('["zero_optimization"]', "must hold a JSON object"),
    ('{"zero_optimisation": {"stage": 3}}', "unknown DeepSpeed config key 'zero_optimisation' (did you mean "
                                             "'zero_optimization'?)"),
    ('{"zero_optimization": {"offload_optimiser": {"device": "cpu"}}}', "offload_optimiser"),
    ('{"gradient_accumulation_steps": 4}', "train.grad_accum_steps"),
    ('{"zero_optimization": {"stage": 2}}', "train.distributed.backend"),
    ('{"optimizer": {"type": "Adam"}}', "the optimizer is the trainer's AdamW"),
])
def test_bad_deepspeed_config_is_a_user_error_naming_the_file(tmp_path, text, message):
    import torch

    from cosmos_train.errors import UserError

    pytest.importorskip("deepspeed")
    from cosmos_train.trainer.deepspeed_backend import build_config

    cfg, path = _cfg(tmp_path, text)
    with pytest.raises(UserError) as err:
        build_config(cfg, torch.float32)
    assert f"train.distributed.deepspeed_config: {path}" in str(err.value) and message in str(err.value)


def test_deepspeed_config_merges_over_the_recipe(tmp_path):
    import torch

    pytest.importorskip("deepspeed")
    from cosmos_train.trainer.backends import make_backend
    from cosmos_train.trainer.deepspeed_backend import DeepSpeedBackend, build_config

    cfg, _ = _cfg(tmp_path, '{"zero_optimization": {"reduce_bucket_size": 1000000, "stage": 3}, '
                            '"gradient_clipping": 1, "bf16": {"enabled": true}}')
    config = build_config(cfg, torch.bfloat16)
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000000}  # merged, section by section
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 1.0
    assert config["gradient_accumulation_steps"] == cfg.train.grad_accum_steps
    assert config["zero_allow_untested_optimizer"] is True
    cfg.train.distributed.deepspeed_config = None
    cfg.train.distributed.offload_optimizer = cfg.train.distributed.offload_params = True
    zero = build_config(cfg, torch.float32)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    backend = make_backend(cfg, accelerator=None)
    assert isinstance(backend, DeepSpeedBackend) and backend.name == "zero3" and backend.sharded


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _driver(sys.argv[1:])
