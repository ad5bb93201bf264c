"""LoRA over a quantized frozen base (`model.quantize_base`, cosmos_train/models/quantize.py) on the tiny model:
the int8 base predicts like the unquantized one, PEFT's torchao LoRA layer trains over it, and the run exports
into the base's own precision."""

import sys

import pytest
import torch
from safetensors import safe_open

from cosmos_train.config import load_recipe
from cosmos_train.errors import UserError
from cosmos_train.export.adapters import ADAPTER_WEIGHTS
from cosmos_train.export.generator import _predict, export_run
from cosmos_train.models import load_model
from cosmos_train.models.quantize import is_quantized, quantize_frozen_base
from cosmos_train.objectives import build_objective
from cosmos_train.trainer.loop import train
from cosmos_train.trainer.optim import build_optimizer

from .conftest import TINY_RECIPES


def _cfg(tiny_dir, out, *overrides, recipe="t2v_lora.yaml"):
    return load_recipe(TINY_RECIPES / recipe, [f"model.pretrained={tiny_dir}", f"output_dir={out}", *overrides])


def _rel(reference, other):
    return float((reference - other).norm() / reference.norm())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_base_predicts_like_the_unquantized_base(tiny_dir, tmp_path, dtype):
    cfg = _cfg(tiny_dir, tmp_path / "run", f"model.dtype={dtype}")
    reference_model, quantized_model = load_model(cfg), load_model(cfg)
    reference = _predict(reference_model)
    names = quantize_frozen_base(quantized_model.transformer, "int8")
    transformer = quantized_model.transformer
    # the decoder layers' Linear weights (both pathways) are int8 now; the latent / timestep projections are not
    assert "layers.0.self_attn.add_q_proj" in names and "layers.1.mlp.down_proj" in names
    assert all(is_quantized(transformer.get_submodule(n).weight) for n in names)
    assert transformer.layers[0].mlp_moe_gen.gate_proj.weight.qdata.dtype == torch.int8
    for kept in ("proj_in", "proj_out", "time_embedder.linear_1", "audio_proj_out"):
        assert not is_quantized(transformer.get_submodule(kept).weight) and kept not in names
    assert transformer.time_embedder.linear_1.weight.dtype == torch.float32  # as diffusers keeps it

    error = _rel(reference, _predict(quantized_model))
    assert 0 < error < 0.02, error  # quantized (not bit-identical), and close: a broken scale would be O(1) off


def _lora_steps(cfg, steps):
    """A few optimizer steps on one fixed draw, through the model adapter's own setup (quantize, then LoRA)."""
    from cosmos_train.data import GeneratorDataset, read_manifest

    model = load_model(cfg)
    groups = model.setup_trainable(cfg)
    optimizer, _ = build_optimizer(groups, cfg.train)
    objective = build_objective(cfg, model, seed=0)
    h, w = cfg.pixel_size()
    dataset = GeneratorDataset(read_manifest(cfg.data.manifest), cfg.data.num_frames, h, w, fps=cfg.data.fps)
    drawn = objective.draw(objective.encode(dataset[0]))
    named = dict(model.transformer.named_parameters())
    before = {n: (p.dequantize() if is_quantized(p) else p).detach().clone() for n, p in named.items()}
    losses, grads = [], []
    for _ in range(steps):
        loss, _ = objective.loss([drawn])
        loss.backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in named.items() if p.grad is not None})
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    after = {n: (p.dequantize() if is_quantized(p) else p).detach() for n, p in named.items()}
    return model, losses, grads, before, after


def test_lora_trains_over_the_int8_base_and_only_lora_changes(tiny_dir, tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    cfg = _cfg(tiny_dir, tmp_path / "run", "model.quantize_base=int8", "train.lr=1e-2", "generator.text_dropout=0")
    model, losses, grads, before, after = _lora_steps(cfg, 6)
    transformer = model.transformer
    # PEFT put its torchao LoRA layer on every target, over the int8 weight
    targets = [m for n, m in transformer.named_modules() if n.endswith("self_attn.add_q_proj")]
    assert targets and all(isinstance(m, TorchaoLoraLinear) and is_quantized(m.base_layer.weight) for m in targets)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if n in trainable)
    # gradients reach lora_B at once and lora_A once B is no longer zero
    assert any(v > 0 for n, v in grads[0].items() if "lora_B" in n)
    assert any(v > 0 for n, v in grads[1].items() if "lora_A" in n)
    assert set(grads[-1]) <= trainable
    assert losses[-1] < 0.9 * losses[0], losses
    for name, value in before.items():  # the base (int8 weights dequantized, and the rest) is bit-identical
        if name not in trainable:
            assert torch.equal(after[name], value), name
    for kind in ("lora_A", "lora_B"):  # both adapter halves learned
        assert any(not torch.equal(after[n], before[n]) for n in trainable if kind in n), kind

    # DDP can wrap it: the int8 weights (which cannot be broadcast) are on DDP's ignore list
    import torch.distributed as dist

    ignored = set(transformer._ddp_params_and_buffers_to_ignore)
    assert "layers.0.self_attn.add_q_proj.base_layer.weight" in ignored and not ignored & trainable
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.nn.parallel.DistributedDataParallel(transformer)
    finally:
        dist.destroy_process_group()


def test_int8_run_exports_in_the_base_precision(tiny_dir, tmp_path):
    from diffusers import Cosmos3OmniPipeline, Cosmos3OmniTransformer

    cfg = _cfg(tiny_dir, tmp_path / "run", "model.quantize_base=int8", "train.max_steps=3", "train.checkpoint_every=3",
               "train.lr=1e-2", "train.warmup_steps=0")
    run_dir = train(cfg)
    merged = export_run(run_dir, tmp_path / "merged")  # each export verifies itself against diffusers
    adapter = export_run(run_dir, tmp_path / "lora", lora_only=True)
    assert merged["trained_over_quantized_base"] == adapter["trained_over_quantized_base"] == "int8"
    assert (tmp_path / "lora" / ADAPTER_WEIGHTS).is_file()

    # every stored tensor of the merged transformer has the base's dtype (nothing int8 / float8 on disk)
    def dtypes(directory):
        out = {}
        for shard in directory.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        return out

    base_dtypes, merged_dtypes = dtypes(tiny_dir / "transformer"), dtypes(tmp_path / "merged" / "transformer")
    assert merged_dtypes == base_dtypes and set(merged_dtypes.values()) == {"F32"}
    reloaded = Cosmos3OmniTransformer.from_pretrained(str(tmp_path / "merged" / "transformer"))
    assert not any(is_quantized(p) for p in reloaded.parameters())
    assert reloaded.layers[0].self_attn.add_q_proj.weight.dtype == torch.float32

    # merged == unquantized base + the exported adapter, and the finetune is in there
    base_cfg = _cfg(tiny_dir, tmp_path / "x")
    base = load_model(base_cfg)
    v_base = _predict(base)
    pipe = Cosmos3OmniPipeline.from_pretrained(str(tmp_path / "merged"))
    base.pipe.transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name=ADAPTER_WEIGHTS)
    v_lora = _predict(base)
    v_merged = _predict(base, pipe.transformer)
    assert _rel(v_base, v_merged) > 1e-3
    assert torch.allclose(v_merged, v_lora, atol=1e-4)


def test_quantize_base_recipe_errors(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"model\.quantize_base.*train\.method=lora"):
        _cfg(tiny_dir, out, "model.quantize_base=int8", recipe="t2v_full.yaml")
    with pytest.raises(UserError, match=r"model\.quantize_base.*fp8 needs a GPU"):
        _cfg(tiny_dir, out, "model.quantize_base=fp8")  # the tiny recipe trains on train.device=cpu
    with pytest.raises(UserError, match=r"model\.quantize_base.*none, int8 or fp8"):
        _cfg(tiny_dir, out, "model.quantize_base=int4")
    with pytest.raises(UserError, match=r"model\.quantize_base.*objective: generator"):
        _cfg(tiny_dir, out, "model.quantize_base=int8", recipe="reasoner_caption.yaml")
    with pytest.raises(UserError, match=r"model\.quantize_base.*backend=ddp"):
        _cfg(tiny_dir, out, "model.quantize_base=int8", "train.distributed.backend=fsdp2")

    model = load_model(_cfg(tiny_dir, out))
    if not torch.cuda.is_available():  # fp8 with train.device=auto: refused when the model is set up
        cfg = _cfg(tiny_dir, out, "model.quantize_base=fp8", "train.device=auto")
        with pytest.raises(UserError, match=r"model\.quantize_base: fp8 needs a GPU with float8 support"):
            model.setup_trainable(cfg)
    cfg = _cfg(tiny_dir, out, "model.quantize_base=int8")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(UserError, match=r"model\.quantize_base: int8 needs torchao.*cosmos-train\[quant\]"):
        model.setup_trainable(cfg)
