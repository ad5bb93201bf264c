"""Scale-out: a run's results do not depend on the back-end or the number of processes, and a run continues on
another number of processes (train.distributed, trainer/backends.py, BucketSampler.reshard)."""

import collections
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest

from cosmos_train.data.buckets import BucketSampler, SampleKey
from cosmos_train.errors import UserError

from .conftest import REPO, TINY_RECIPES

LAYOUT = ["a"] * 7 + ["b"] * 3 + ["c"] * 12 + ["a"] * 2  # 24 indices, 3 buckets


def _stream(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def _global_keys(sampler, lo, hi):
    """The keys of global groups lo .. hi-1 (the stream every layout of ranks deals out)."""
    n = sampler.groups_per_epoch
    return [SampleKey(int(i), int(p)) for k in range(lo, hi) for i, p in sampler.epoch_groups(k // n)[k % n]]


@pytest.mark.parametrize("group_size,old_world,new_world", [(1, 2, 3), (1, 3, 1), (2, 2, 1), (2, 1, 2), (1, 2, 5)])
def test_reshard_trains_every_key_once(group_size, old_world, new_world):
    """Old ranks consumed different amounts (some keys still pending in a packer, past an epoch end); after
    re-sharding, what the old ranks trained + what the new ranks are given first is exactly the global stream up
    to where the new layout starts, each group once; then 1 new process with N accumulation steps and N new
    processes keep dealing the same global groups."""
    def make(rank, world):
        return BucketSampler(LAYOUT, group_size=group_size, seed=5, rank=rank, world_size=world)

    old = [make(r, old_world) for r in range(old_world)]
    consumed = [group_size * (15 + 7 * r) for r in range(old_world)]  # uneven, whole groups, past epoch 0
    saved, trained = [], collections.Counter()
    for sampler, n in zip(old, consumed):
        drawn = _stream(sampler, n)
        pending = drawn[-1:] if group_size == 1 else []  # drawn, waiting in the packer: not trained yet
        trained.update(drawn[: n - len(pending)])
        saved.append({**sampler.position(n), "pending": [list(k) for k in pending]})
    new = [make(r, new_world) for r in range(new_world)]
    places = [s.reshard(saved) for s in new]
    assert len({p["base"] for p in places}) == 1
    end = places[0]["base"]
    assert end > old[0].groups_per_epoch  # the test crosses an epoch end
    given = collections.Counter(SampleKey(*k) for p in places for k in p["prefix"])
    assert trained + given == collections.Counter(_global_keys(old[0], 0, end))
    # the new ranks' own streams continue the global stream from `end`, dealt round them
    for s, place in zip(new, places):
        s.restore(place)
    own = [_stream(s, len(p["prefix"]) + 3 * group_size)[len(p["prefix"]):] for s, p in zip(new, places)]
    expected = _global_keys(old[0], end, end + 3 * new_world)
    for r in range(new_world):
        dealt = [expected[(g * new_world + r) * group_size:(g * new_world + r + 1) * group_size] for g in range(3)]
        assert own[r] == [k for group in dealt for k in group]
    # a sampler's position survives a save / restore on the same number of processes
    s = make(0, old_world)
    s.restore(places[0])
    again = make(0, old_world)
    again.restore(s.position(3))
    assert _stream(again, 4) == _stream(s, 7)[3:]


def test_one_process_with_accumulation_sees_the_global_batches_of_n_processes_across_epochs():
    """Rank r of N takes global groups r, r + N, ...: over several epochs (9 keys, not a multiple of 2), the
    micro-steps of 1 process are the ranks' batches of N processes, step by step."""
    one = _stream(BucketSampler(["x"] * 9, seed=1), 40)
    two = [_stream(BucketSampler(["x"] * 9, seed=1, rank=r, world_size=2), 20) for r in range(2)]
    assert one == [k for step in zip(*two) for k in step]


def test_resume_keeps_the_global_batch():
    from cosmos_train.config.load import load_recipe
    from cosmos_train.trainer.loop import _check_global_batch

    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", ["output_dir=/tmp/unused", "train.grad_accum_steps=2"])
    saved = {"train": {"grad_accum_steps": 1}}
    assert "keeps the global batch" in _check_global_batch(cfg, saved, {"num_processes": 2}, processes=1)[0]
    assert _check_global_batch(cfg, {"train": {"grad_accum_steps": 2}}, {"num_processes": 1}, processes=1) == []
    with pytest.raises(UserError, match=r"global batch of 2 .*set train.grad_accum_steps=1"):
        _check_global_batch(cfg, saved, {"num_processes": 2}, processes=2)
    with pytest.raises(UserError, match="divides 2"):
        _check_global_batch(cfg, saved, {"num_processes": 2}, processes=3)


def _run(cmd, tmp_path, nproc=1, timeout=300):
    env = dict(os.environ, COSMOS_TRAIN_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run(launcher + ["-m", "cosmos_train.cli", *cmd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"))


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:  # summation order differs (reduce-scatter vs accumulation); Adam magnifies it where a
        diff = (a[key] - b[key]).abs()  # gradient is ~0, so: a loose max, a tight mean
        assert diff.max() < 5e-4 and diff.mean() < 1e-6, (key, float(diff.max()), float(diff.mean()))


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The 1-process DDP reference runs (2 accumulation steps), one per recipe, shared by the back-ends."""
    runs = {}

    def get(recipe, common):
        key = tuple(common)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"one-{recipe}")
            _run(["train", *common, f"output_dir={root / 'run'}", "train.grad_accum_steps=2"], root)
            runs[key] = root / "run"
        return runs[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend,recipe", [("fsdp2", "t2v_lora"), ("zero3", "t2v_lora"), ("fsdp2", "t2v_full"),
                                            ("zero2", "t2v_full")])
def test_sharded_run_equals_one_process_and_resumes_on_another_count(tmp_path, one_process_runs, backend, recipe):
    """A sharded back-end on 2 processes = DDP on 1 process with 2 accumulation steps. LoRA: its sharded checkpoint
    (optimizer state written by both ranks, checksummed) resumes on 1 process to the same weights, and exports."""
    # 9 samples, 2 per step: LoRA runs past the end of the first epoch (step 5), on 2 processes and when resumed
    # on 1; full finetuning: the equality only (the rest is the same code)
    steps, every = (6, 3) if recipe == "t2v_lora" else (2, 2)
    common = [str(TINY_RECIPES / f"{recipe}.yaml"), f"train.max_steps={steps}", f"train.checkpoint_every={every}",
              "train.keep_checkpoints=3", "train.batch_size=1", "train.packing.enabled=false", "data.cache=off",
              "train.device=cpu", "train.warmup_steps=0", "train.lr=1e-2" if recipe == "t2v_lora" else "train.lr=1e-3"]
    one = one_process_runs(recipe, common)
    two, resumed = tmp_path / "two", tmp_path / "resumed"
    sharded = [*common, f"train.distributed.backend={backend}"]
    _run(["train", *sharded, f"output_dir={two}", "train.grad_accum_steps=1"], tmp_path, nproc=2)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    _assert_close(_weights(two, steps), _weights(one, steps))
    if recipe != "t2v_lora":
        return
    sums = json.loads((two / "checkpoints" / f"step-{every:07d}" / "checksums.json").read_text())["files"]
    parts = sorted(name for name in sums if name.startswith("optimizer/"))
    assert len(parts) >= 2, parts  # written by both ranks

    # interrupted after step 3 (a part of step 6's sharded optimizer state damaged: set aside), continued on 1
    shutil.copytree(two, resumed)
    part = resumed / "checkpoints" / f"step-{steps:07d}" / parts[-1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = _run(["train", *sharded, f"output_dir={resumed}", "train.grad_accum_steps=2", "--resume"], tmp_path)
    assert parts[-1] in proc.stdout and "resuming a run of 2 process(es) on 1" in proc.stdout
    assert (resumed / "checkpoints" / f"damaged-step-{steps:07d}").is_dir()
    _assert_close(_weights(resumed, steps), _weights(two, steps))
    assert _losses(resumed) == pytest.approx(_losses(two), rel=1e-5)

    # the sharded run exports like any other (the export verifies itself against diffusers)
    _run(["export", str(two), str(tmp_path / "export")], tmp_path)
    assert (tmp_path / "export" / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_sharded_run_validates_samples_and_keeps_an_ema_like_one_process(tmp_path, one_process_runs, backend):
    """Held-out loss, samples and the EMA of a sharded run: the same as a 1-process DDP run. fsdp2: every rank takes
    part in the forwards (rank 0 writes), with the base offloaded to CPU memory between uses
    (train.distributed.offload_params, the one-GPU path for a base larger than the GPU); zero2: rank 0 alone, over
    the whole weights every rank holds, its EMA tracking the module's copies of the fp32 masters."""
    from safetensors.torch import load_file

    common = [str(TINY_RECIPES / "t2v_lora.yaml"), "train.max_steps=4", "train.checkpoint_every=4",
              "train.batch_size=1", "train.packing.enabled=false", "data.cache=off", "train.device=cpu",
              "validation.every=2", f"validation.manifest={REPO / 'data' / 'samples' / 'manifest.jsonl'}",
              "validation.max_samples=2", "validation.prompts=[A red circle moves.]", "validation.sample_frames=9",
              "validation.sample_steps=2", "train.ema_decay=0.9"]
    one = one_process_runs("t2v_lora-validated", common)
    run = tmp_path / "sharded"
    _run(["train", *common, f"output_dir={run}", "train.grad_accum_steps=1", f"train.distributed.backend={backend}",
          *(["train.distributed.offload_params=true"] if backend == "fsdp2" else [])], tmp_path, nproc=2)

    def validation(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in rows if "val_loss" in r]

    assert len(validation(run)) == 2 and validation(run) == pytest.approx(validation(one), rel=1e-5)
    assert sorted(p.name for p in (run / "samples" / "step-0000004").iterdir()) == ["00.mp4", "samples.json"]
    ema = [load_file(str(d / "checkpoints" / "step-0000004" / "ema.safetensors")) for d in (run, one)]
    _assert_close(*ema)
    assert any(float((ema[0][k] - _weights(run, 4)[k]).abs().max()) > 1e-4 for k in ema[0])  # an average, not a copy


def test_every_rank_has_the_same_gradients_whatever_its_batch_holds(tiny_dir, tmp_path):
    """A rank whose batch has no sound still gets (zero) gradients for the sound heads: sharded back-ends reduce
    gradients tensor by tensor and abort / hang when ranks disagree on which exist."""
    from cosmos_train.config import load_recipe
    from cosmos_train.data import GeneratorDataset, read_manifest
    from cosmos_train.models import load_model
    from cosmos_train.objectives import build_objective

    cfg = load_recipe(TINY_RECIPES / "t2v_full.yaml", [f"model.pretrained={tiny_dir}", f"output_dir={tmp_path}"])
    model = load_model(cfg)
    model.setup_trainable(cfg)
    objective = build_objective(cfg, model, seed=0)
    h, w = cfg.pixel_size()
    sample = GeneratorDataset(read_manifest(cfg.data.manifest), cfg.data.num_frames, h, w, fps=cfg.data.fps)[0]
    heads = [n for n, p in model.transformer.named_parameters() if p.requires_grad and "audio_proj" in n]
    assert heads

    def grads():
        loss, _ = objective.loss([objective.draw(objective.encode(sample))])
        loss.backward()
        out = {n: p.grad for n, p in model.transformer.named_parameters() if p.requires_grad}
        model.transformer.zero_grad(set_to_none=True)
        return out

    before = grads()
    assert all(before[n] is None for n in heads)  # no sound in this batch: the heads are not in its graph
    model.anchor_trained_heads()
    after = grads()
    assert all(g is not None for g in after.values())
    assert all(float(after[n].abs().sum()) == 0.0 for n in heads)  # ... and now are, with zero gradients


@pytest.mark.parametrize("recipe,overrides,key", [
    ("t2v_lora.yaml", [], "train.packing.enabled"),
    ("t2v_sound.yaml", ["train.packing.enabled=false"], "generator.sound"),
    ("action_policy.yaml", ["train.packing.enabled=false"], "action.modes"),
    ("reasoner_caption.yaml", ["train.packing.enabled=false"], "objective"),
])
def test_zero3_refuses_what_makes_ranks_call_different_modules(recipe, overrides, key):
    """ZeRO-3 gathers a module's weights when it is called and aborts when ranks call different modules: recipes
    that would (packs, sound on some clips, mixed action modes, images on some conversations) are refused up front,
    naming the key; the same recipe is accepted with fsdp2."""
    from cosmos_train.config import load_recipe

    with pytest.raises(UserError, match=rf"'{key}'.*fsdp2"):
        load_recipe(TINY_RECIPES / recipe, ["train.distributed.backend=zero3", *overrides])
    load_recipe(TINY_RECIPES / recipe, ["train.distributed.backend=fsdp2", *overrides])


def test_deepspeed_refuses_what_runs_the_model_on_one_process():
    from cosmos_train.config import load_recipe
    from cosmos_train.trainer.backends import check_supported

    cfg = load_recipe(TINY_RECIPES / "t2v_lora.yaml", ["train.distributed.backend=zero3", "train.ema_decay=0.99",
                                                       "validation.every=5", "validation.prompts=[a cat]",
                                                       "train.packing.enabled=false"])
    with pytest.raises(UserError, match=r"backend=zero3: train.ema_decay, validation.every .*fsdp2"):
        check_supported(cfg)
    for backend in ("fsdp2", "zero2"):
        cfg.train.distributed.backend = backend
        check_supported(cfg)
