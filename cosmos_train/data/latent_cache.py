"""Latent cache: every sample VAE-encoded once (normalized as the pipeline normalizes) with its captions,
fps and pixel shape, stored as safetensors shards plus a JSON index.

Prompt token ids are not cached: the objective builds them at draw time with the pipeline's
`tokenize_prompt` (the prompt format, `generator.use_system_prompt` / templates / `template_dropout` /
`uncond_prompt`, is a draw-time choice and changing it needs no re-encode).

The cache is keyed by a fingerprint of everything that decides its contents: the data (records, file
sizes and modification times, captions, windows), the VAE weights and config, and the shaping settings
(tier, pixel size, frame count, fps). Training uses a matching cache automatically and refuses a stale
one, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cosmos_train.errors import UserError

INDEX = "index.json"
FORMAT_VERSION = 3  # 3: no prompt ids (built at draw time)
READABLE_FORMATS = (2, 3)  # format 2's prompt ids are ignored; its latents are the same


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def hash_directory(path: Path, suffixes=(".json", ".safetensors", ".txt", ".jinja", ".model")) -> str:
    """Content hash of a model component directory (weights and configs)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(f.relative_to(path).as_posix().encode())
        _hash_file(f, h)
    return h.hexdigest()[:16]


def data_fingerprint(records) -> str:
    """Records as the cache sees them: what each is, and the size/mtime of its media file."""
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            stat = (st.st_size, int(st.st_mtime))
        except OSError:
            stat = None
        h.update(json.dumps([str(r.path), stat, r.caption, getattr(r, "captions", None), r.fps, r.start_frame,
                             r.end_frame, getattr(r, "start_time", None), getattr(r, "end_time", None)],
                            default=str).encode())
    return h.hexdigest()[:16]


def describe_changes(expected: dict, found: dict) -> list[str]:
    return [f"{key}: cache has {found.get(key)!r}, recipe needs {value!r}"
            for key, value in expected.items() if found.get(key) != value]


class LatentCacheWriter:
    """Collects encoded samples and writes shards; `finish()` renames the cache into place atomically."""

    def __init__(self, cache_dir: Path, fingerprint: dict, shard_size: int = 256):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.cache_dir.name}.", dir=self.cache_dir.parent))
        self.fingerprint = fingerprint
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self.skipped: list[dict] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._shard = 0

    def add(self, item, captions: list[str] | None = None) -> None:
        """`item`: a LatentSample (cosmos_train.objectives.generator); `captions`: every caption of the
        record, when it has several (one is drawn per epoch at training time)."""
        key = f"s{len(self.entries)}"
        captions = list(captions or [item.caption])
        self._pending[f"{key}.latent"] = item.latent.float().contiguous()
        sound = getattr(item, "sound", None)
        if sound is not None:  # the clip's sound latent, cached with its video latent
            self._pending[f"{key}.sound"] = sound.float().contiguous()
        self.entries.append({"key": key, "shard": f"shard-{self._shard:05d}.safetensors",
                             "captions": captions,
                             "fps": item.fps, "num_frames": item.num_frames, "height": item.height,
                             "width": item.width, "source": item.source, "sound": sound is not None})
        if len(self.entries) % self.shard_size == 0:
            self._flush()

    def add_skipped(self, source: str, reason: str, message: str, in_dataset: bool = True) -> None:
        """A bad sample. `in_dataset`: it holds a dataset index (an entry keeps cache and dataset indices
        aligned); manifest lines dropped before the dataset was built only go into the report."""
        record = {"source": source, "reason": reason, "message": message}
        self.skipped.append(record)
        if in_dataset:
            self.entries.append({"skipped": reason, "source": source, "message": message})

    def _flush(self) -> None:
        if self._pending:
            save_file(self._pending, str(self.tmp / f"shard-{self._shard:05d}.safetensors"))
            self._pending = {}
            self._shard += 1

    def finish(self) -> Path:
        self._flush()
        index = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "samples": self.entries,
                 "skipped": self.skipped}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        os.replace(self.tmp, self.cache_dir)
        return self.cache_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_index(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"latent cache index {path} is unreadable ({err}); delete {cache_dir} and re-run prepare")


def check_cache(cache_dir: Path, fingerprint: dict, recipe: str = "RECIPE") -> dict | None:
    """The cache index if it matches; None if there is no cache; UserError if it is stale."""
    index = read_index(cache_dir)
    if index is None:
        return None
    changes = describe_changes(fingerprint, index.get("fingerprint", {}))
    if index.get("format") not in READABLE_FORMATS:
        changes.insert(0, f"cache format {index.get('format')} (this version reads "
                          f"{', '.join(map(str, READABLE_FORMATS))})")
    if changes:
        raise UserError(
            f"the latent cache at {cache_dir} is stale for this recipe:\n  " + "\n  ".join(changes)
            + f"\nre-run `cosmos-train prepare {recipe}` (it replaces the cache), or set data.cache=off to "
            "encode online"
        )
    return index


class LatentCacheDataset(torch.utils.data.Dataset):
    """Map-style dataset over a prepared cache; items are `LatentSample`s (memory-mapped reads)."""

    def __init__(self, cache_dir: Path, index: dict, caption_seed: int = 0):
        self.cache_dir = Path(cache_dir)
        self.caption_seed = caption_seed
        self.entries = index["samples"]
        self.skipped = index.get("skipped", [])
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.cache_dir / shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, key):
        """`key`: an index, or a `SampleKey(index, epoch)` (the epoch picks among several captions)."""
        from cosmos_train.data.manifest import caption_for
        from cosmos_train.objectives.generator import LatentSample

        index, epoch = (key, 0) if isinstance(key, int) else (key[0], key[1])
        e = self.entries[index]
        if "skipped" in e:  # counted by the trainer, like a bad sample met online
            return {"skipped": e["skipped"], "source": e["source"], "message": e["message"]}
        f = self._open(e["shard"])
        captions = e["captions"]
        caption = caption_for(SimpleNamespace(caption_candidates=tuple(captions), source=e["source"]), epoch,
                              self.caption_seed)
        return LatentSample(
            latent=f.get_tensor(f"{e['key']}.latent"), caption=caption, fps=e["fps"],
            num_frames=e["num_frames"], height=e["height"], width=e["width"], source=e["source"],
            sound=f.get_tensor(f"{e['key']}.sound") if e.get("sound") else None,
        )

    def __getstate__(self):  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
