"""Damaged files and bad input on the data side: latent-cache checksums (checked at open and at every read),
NaN / inf latents refused at prepare time, bad samples alike with and without loader workers, non-UTF-8
text inputs named by file and line, damaged LeRobot metadata and parquet files named by file."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cosmos_train.config import load_recipe
from cosmos_train.data import SkipCounter, read_manifest
from cosmos_train.data.dataset import MarkBadSamples
from cosmos_train.data.latent_cache import (
    FORMAT_VERSION,
    LatentCacheDataset,
    check_cache,
    read_index,
)
from cosmos_train.errors import BadSampleError, UserError

from .conftest import REPO, SAMPLES, TINY_RECIPES

RECIPE = TINY_RECIPES / "t2v_lora.yaml"
CLIPS = SAMPLES.parent / "clips"


def _manifest(tmp_path: Path, *extra: str, name: str = "manifest.jsonl") -> Path:
    """Two bundled clips (absolute paths) and the given extra lines."""
    lines = [json.dumps({"path": str(CLIPS / "red_circle.mp4"), "caption": "A red circle moves right."}),
             json.dumps({"path": str(CLIPS / "green_square.mp4"), "caption": "A green square moves down."}),
             *extra]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tiny_dir, out: Path, manifest: Path, *extra):
    return load_recipe(RECIPE, [f"model.pretrained={tiny_dir}", f"output_dir={out}", f"data.manifest={manifest}",
                                "data.num_frames=9", "train.max_steps=2", "train.checkpoint_every=2",
                                "data.shuffle=false", *extra])


# ---------------------------------------------------------------------------------------------------
# latent cache: checksums
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tiny_dir, tmp_path_factory):
    """A prepared cache of two clips: (its directory, the manifest)."""
    from cosmos_train.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    manifest = _manifest(root)
    path, skips = prepare(_cfg(tiny_dir, root / "run", manifest), device="cpu")
    assert skips.total == 0
    return path, manifest


@pytest.fixture()
def cache(prepared, tmp_path):
    """A private copy of the prepared cache (the tests damage it)."""
    copy = tmp_path / "cache"
    shutil.copytree(prepared[0], copy)
    return copy


def _data_offset(shard: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]


def _open(cache_dir: Path) -> LatentCacheDataset:
    index = check_cache(cache_dir, read_index(cache_dir, "my_recipe.yaml")["fingerprint"], "my_recipe.yaml")
    return LatentCacheDataset(cache_dir, index)


def test_cache_index_records_checksums_and_a_clean_cache_reads(cache):
    index = read_index(cache)
    assert index["format"] == FORMAT_VERSION == 4 and len(index["checksum"]) == 64
    shard = cache / "shard-00000.safetensors"
    assert index["shards"] == {shard.name: {"size": shard.stat().st_size}}
    entry = index["samples"][0]
    crc, shape = entry["crc32"]["latent"]
    assert isinstance(crc, int) and len(shape) == 4
    ds = _open(cache)
    assert [tuple(ds[i].latent.shape) for i in range(len(ds))] == [tuple(shape)] * 2


def test_flipped_bytes_in_a_shard_are_named_with_the_remedy(cache):
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    at = _data_offset(shard) + 64  # inside the first sample's latent: the file keeps its size
    data[at:at + 4] = bytes(b ^ 0x01 for b in data[at:at + 4])  # a small change: finite numbers, no NaN
    shard.write_bytes(bytes(data))
    ds = _open(cache)  # sizes match: opening is fine
    with pytest.raises(UserError) as err:
        [ds[i] for i in range(len(ds))]
    msg = str(err.value)
    assert str(shard) in msg and "does not match its checksum" in msg
    assert "re-run `cosmos-train prepare my_recipe.yaml`" in msg


@pytest.mark.parametrize("damage", ["truncated", "missing", "header", "index", "index_garbage"])
def test_damaged_cache_is_refused_when_opened(cache, damage):
    shard = cache / "shard-00000.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        expect = [str(shard), "bytes", "were written"]
    elif damage == "missing":
        shard.unlink()
        expect = [str(shard), "missing"]
    elif damage == "header":  # same size, damaged JSON header: caught when the shard is opened for reading
        data = bytearray(shard.read_bytes())
        data[10:14] = b"\xff\xff\xff\xff"
        shard.write_bytes(bytes(data))
        ds = _open(cache)
        with pytest.raises(UserError, match="cannot be opened") as err:
            ds[0]
        assert str(shard) in str(err.value) and "cosmos-train prepare my_recipe.yaml" in str(err.value)
        return
    elif damage == "index":  # a changed caption in index.json: its own checksum
        path = cache / "index.json"
        path.write_text(path.read_text().replace("red circle", "red square"))
        expect = ["index.json does not match its checksum"]
    else:
        (cache / "index.json").write_bytes(b"\x00\xff garbage")
        expect = ["index.json is unreadable"]
    with pytest.raises(UserError) as err:
        _open(cache)
    msg = str(err.value)
    assert all(e in msg for e in expect), msg
    assert "damaged" in msg and "re-run `cosmos-train prepare my_recipe.yaml`" in msg


def test_old_cache_without_checksums_still_reads_and_nan_is_never_used(cache, capsys):
    path = cache / "index.json"
    index = json.loads(path.read_text())
    index["format"] = 3
    for key in ("shards", "checksum"):
        index.pop(key)
    for e in index["samples"]:
        e.pop("crc32")
    path.write_text(json.dumps(index))
    ds = _open(cache)
    assert "has no checksums" in capsys.readouterr().out
    good = [ds[i].latent for i in range(len(ds))]
    # an old shard whose bytes turned into NaN: never trained on
    bad = dict(zip(["s0.latent", "s1.latent"], good))
    bad["s1.latent"] = bad["s1.latent"].clone()
    bad["s1.latent"][0, 0, 0, 0] = float("nan")
    save_file(bad, str(cache / "shard-00000.safetensors"))
    ds = _open(cache)
    assert torch.equal(ds[0].latent, good[0])
    with pytest.raises(UserError, match=r"sample s1 .*holds NaN / inf.*re-run `cosmos-train prepare"):
        ds[1]


def test_damaged_shard_stops_training_the_same_with_and_without_workers(prepared, cache, tiny_dir, tmp_path):
    from cosmos_train.trainer.loop import train

    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(b ^ 0x10 for b in data[-8:])  # the last sample's tail
    shard.write_bytes(bytes(data))
    messages = []
    for workers in (0, 1):
        cfg = _cfg(tiny_dir, tmp_path / f"run{workers}", prepared[1], f"data.cache_dir={cache}",
                   f"data.num_workers={workers}")
        with pytest.raises(UserError) as err:
            train(cfg)
        messages.append(str(err.value))
        assert not multiprocessing.active_children()  # the worker was stopped before the error was raised
    assert messages[0] == messages[1], messages
    assert str(shard) in messages[0] and "checksum" in messages[0] and "cosmos-train prepare" in messages[0]
    assert "Traceback" not in messages[1]


def test_prepare_refuses_non_finite_latents(tiny_dir, tmp_path, monkeypatch):
    """A NaN / inf latent is a bad sample: an error naming the source, or skipped and counted."""
    import cosmos_train.prepare as prep

    real = prep.build_objective

    def poisoned(*args, **kwargs):
        objective = real(*args, **kwargs)
        encode = objective.encode

        def encode_with_nan(sample):
            item = encode(sample)
            if "green_square" in sample["decode"]["media"]:
                item.latent[0, 0, 0, 0] = float("inf")
            return item

        objective.encode = encode_with_nan
        return objective

    monkeypatch.setattr(prep, "build_objective", poisoned)
    manifest = _manifest(tmp_path)
    with pytest.raises(BadSampleError, match=r"manifest.jsonl:2: the encoded latent holds 1 NaN / inf") as err:
        prep.prepare(_cfg(tiny_dir, tmp_path / "a", manifest), device="cpu")
    assert err.value.reason == "non_finite"
    assert not (tmp_path / "a" / "latent_cache").exists()
    path, skips = prep.prepare(_cfg(tiny_dir, tmp_path / "b", manifest, "data.skip_bad_samples=true"), device="cpu")
    assert skips.by_reason == {"non_finite": 1}
    index = read_index(path)
    assert [("skipped" in e) for e in index["samples"]] == [False, True]


# ---------------------------------------------------------------------------------------------------
# bad samples with and without loader workers
# ---------------------------------------------------------------------------------------------------


def _corrupt_manifest(tmp_path: Path) -> Path:
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    return _manifest(tmp_path, json.dumps({"path": str(tmp_path / "broken.mp4"), "caption": "A broken clip."}),
                     json.dumps({"path": str(tmp_path / "nowhere.mp4"), "caption": "A missing clip."}))


def test_bad_samples_train_the_same_with_and_without_workers(tiny_dir, tmp_path):
    from cosmos_train.trainer.loop import train

    small = ("data.cache=off", "train.packing.enabled=false", "train.batch_size=3")  # 3 draws a step: the bad
    # clip (line 3) is met in step 1
    manifest = _corrupt_manifest(tmp_path)
    # without data.skip_bad_samples: the same clean error (the manifest names the missing clip first)
    messages = []
    for workers in (0, 1):
        cfg = _cfg(tiny_dir, tmp_path / f"err{workers}", manifest, *small, f"data.num_workers={workers}")
        with pytest.raises(UserError) as err:
            train(cfg)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "manifest.jsonl:4" in messages[0] and "nowhere.mp4" in messages[0]
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:3]) + "\n")  # only the corrupt clip is bad
    messages = []
    for workers in (0, 1):
        cfg = _cfg(tiny_dir, tmp_path / f"bad{workers}", manifest, *small, f"data.num_workers={workers}")
        with pytest.raises(BadSampleError) as err:
            train(cfg)
        assert err.value.reason == "undecodable" and not multiprocessing.active_children()
        messages.append(str(err.value))
    assert messages[0] == messages[1], messages
    assert "manifest.jsonl:3" in messages[0] and "broken.mp4" in messages[0]
    # with it: the same counts
    manifest = _corrupt_manifest(tmp_path)
    for workers in (0, 1):
        cfg = _cfg(tiny_dir, tmp_path / f"skip{workers}", manifest, *small, f"data.num_workers={workers}",
                   "data.skip_bad_samples=true")
        train(cfg)
        summary = json.loads((tmp_path / f"skip{workers}" / "run_summary.json").read_text())
        assert summary["skipped"] == {"missing_file": 1, "undecodable": 1} and summary["steps"] == 2


def test_prepare_bad_sample_the_same_with_and_without_workers(tiny_dir, tmp_path):
    from cosmos_train.prepare import prepare

    manifest = _corrupt_manifest(tmp_path)
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:3]) + "\n")
    messages = []
    for workers in (0, 1):
        with pytest.raises(BadSampleError) as err:
            prepare(_cfg(tiny_dir, tmp_path / f"p{workers}", manifest, f"data.num_workers={workers}"), device="cpu")
        messages.append(str(err.value))
        assert not multiprocessing.active_children()
    assert messages[0] == messages[1] and "manifest.jsonl:3" in messages[0] and "broken.mp4" in messages[0]


class _Broken:
    """A dataset whose sample 1 is bad and sample 2 raises a plain UserError."""

    def __len__(self):
        return 3

    def source_of(self, key):
        return f"data.jsonl:{key + 1}"

    def load(self, key):
        if key == 1:
            raise BadSampleError("data.jsonl:2: undecodable", "undecodable")
        if key == 2:
            raise UserError("data.jsonl:3: something the user must fix")
        return {"source": "data.jsonl:1"}


@pytest.mark.parametrize("skip", [False, True])
def test_marker_protocol_through_a_real_worker(skip):
    """A worker never raises: it returns the marker (reason, source, message, skip), which the main process
    raises or counts (`MicroBatcher`) exactly as the dataset would without workers."""
    from cosmos_train.data.dataset import bad_sample_marker
    from cosmos_train.trainer.batching import MicroBatcher

    loader = torch.utils.data.DataLoader(MarkBadSamples(_Broken(), skip), batch_size=None, num_workers=1)
    samples = list(loader)
    assert samples[0] == {"source": "data.jsonl:1"}
    assert samples[1] == {"skipped": "undecodable", "source": "data.jsonl:2",
                          "message": "data.jsonl:2: undecodable", "skip": skip}
    assert samples[2]["skip"] is False and samples[2]["skipped"] == "error"  # never skipped

    class Cfg:  # what MicroBatcher reads
        class train:
            packing = type("P", (), {"enabled": False})
            batch_size = 1
        data = type("D", (), {"manifest": "data.jsonl"})

    skips = SkipCounter()
    batcher = MicroBatcher(iter(samples[1:2] + samples[:1]), lambda s: s, type("O", (), {"draw": staticmethod(
        lambda s: s)}), Cfg, skips, reachable={"data.jsonl:1", "data.jsonl:2"})
    if skip:
        assert batcher.next() == [{"source": "data.jsonl:1"}] and skips.by_reason == {"undecodable": 1}
    else:
        with pytest.raises(BadSampleError, match=r"^data.jsonl:2: undecodable$"):
            batcher.next()
    batcher = MicroBatcher(iter(samples[2:]), lambda s: s, None, Cfg, skips, reachable={"data.jsonl:3"})
    with pytest.raises(UserError, match=r"^data.jsonl:3: something the user must fix$"):
        batcher.next()
    assert bad_sample_marker(UserError("x"), "s", True)["skip"] is False


# ---------------------------------------------------------------------------------------------------
# text inputs that are not UTF-8
# ---------------------------------------------------------------------------------------------------


def test_manifest_line_not_utf8_names_file_line_byte_and_column(tmp_path):
    path = _manifest(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"path": "x.mp4", "caption": "caf\xe9 \xff"}\n')
    with pytest.raises(BadSampleError) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}:3: not valid UTF-8 (byte 0xe9 at column 34)")
    assert err.value.reason == "bad_json"
    counter = SkipCounter()
    assert len(read_manifest(path, skip_bad=True, counter=counter)) == 2 and counter.by_reason == {"bad_json": 1}


def test_conversations_not_utf8_or_not_an_object(tmp_path):
    from cosmos_train.data.conversations import read_conversations

    good = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    path = tmp_path / "conversations.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n[1, 2]\n"
                     + good.replace("Hello.", "Hall\xf6").encode("latin-1") + b"\n")
    with pytest.raises(BadSampleError, match=rf"^{path}:2: expected a JSON object, got list"):
        read_conversations(path)
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n"
                     + good.replace("Hello.", "Hall\xf6").encode("latin-1") + b"\n[1, 2]\n")
    with pytest.raises(BadSampleError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:2: not valid UTF-8 (byte 0xf6 at column ")
    counter = SkipCounter()
    assert len(read_conversations(path, skip_bad=True, counter=counter)) == 1  # the BOM line reads
    assert counter.by_reason == {"bad_json": 1, "bad_format": 1}


def test_hf_dataset_string_cells_not_utf8(tmp_path):
    from cosmos_train.data.hf import read_hf_dataset

    (tmp_path / "a.mp4").write_bytes(b"")
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"video": "a.mp4", "caption": "fine"}\n{"video": "a.mp4", "caption": "bad \xff"}\n')
    kw = dict(columns={"video": "video", "caption": "caption"}, cache_dir=str(tmp_path / "hf_cache"))
    with pytest.raises(BadSampleError, match=r"rows.jsonl:row 1: column 'caption' is not valid UTF-8 \(byte 0xff"):
        read_hf_dataset(str(path), **kw)
    counter = SkipCounter()
    assert len(read_hf_dataset(str(path), skip_bad=True, counter=counter, **kw)) == 1
    assert counter.by_reason == {"bad_record": 1}


# ---------------------------------------------------------------------------------------------------
# LeRobot: damaged metadata and parquet files
# ---------------------------------------------------------------------------------------------------

TINY_LEROBOT = REPO / "data" / "lerobot_tiny"
DATA_PARQUET = "data/chunk-000/file-000.parquet"
EPISODES_PARQUET = "meta/episodes/chunk-000/file-000.parquet"


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_middle(p: Path):
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    p.write_bytes(bytes(data))


DAMAGES = {
    "data_truncated": (DATA_PARQUET, _truncate, "damaged or not parquet"),
    "data_flipped": (DATA_PARQUET, _flip_middle, "damaged or not parquet"),
    "episodes_truncated": (EPISODES_PARQUET, _truncate, "damaged or not parquet"),
    "tasks_empty": ("meta/tasks.parquet", lambda p: p.write_bytes(b""), "damaged or not parquet"),
    "info_truncated": ("meta/info.json", _truncate, "not valid JSON"),
    "info_not_utf8": ("meta/info.json", lambda p: p.write_bytes(b'{"fps": "\xff"}'),
                      "info.json:1: not valid UTF-8 (byte 0xff at column 10)"),
    "info_a_list": ("meta/info.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object, got list"),
    "stats_truncated": ("meta/stats.json", _truncate, "not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_lerobot_files_are_named(tmp_path, damage):
    from cosmos_train.config import schema as S
    from cosmos_train.data.lerobot import LeRobotActionDataset

    rel, fn, words = DAMAGES[damage]
    root = tmp_path / "tiny_copy"
    shutil.copytree(TINY_LEROBOT, root)
    fn(root / rel)
    cfg = S.ActionConfig(dataset=str(root), cameras=["observation.images.top"], embodiment="pusht",
                         state_key="observation.state")
    with pytest.raises(UserError) as err:
        LeRobotActionDataset(cfg)
    msg = str(err.value)
    assert type(err.value) is UserError and str(root / rel) in msg and words in msg, msg


def test_lerobot_jsonl_not_utf8_names_line(tmp_path):
    from cosmos_train.data.lerobot import _read_jsonl

    path = tmp_path / "meta" / "episodes.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"episode_index": 0}\n{"tasks": ["caf\xe9"]}\n')
    with pytest.raises(UserError, match=rf"tiny: {path}:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        _read_jsonl(path, "tiny")
