"""Latent cache: every sample VAE-encoded once (normalized as the pipeline normalizes) with its captions,
fps and pixel shape, stored as safetensors shards plus a JSON index.

Prompt token ids are not cached: the objective builds them at draw time with the pipeline's
`tokenize_prompt` (the prompt format, `generator.use_system_prompt` / templates / `template_dropout` /
`uncond_prompt`, is a draw-time choice and changing it needs no re-encode).

The cache is keyed by a fingerprint of everything that decides its contents: the data (records, file
sizes and modification times, captions, windows), the VAE weights and config, and the shaping settings
(tier, pixel size, frame count, fps). Training uses a matching cache automatically and refuses a stale
one, naming what changed.

Integrity (format 4): the index records each shard's size and, per sample, the CRC32 and shape of every
cached tensor, and carries a SHA-256 of its own contents. `check_cache` (when training opens the cache)
checks the index's hash and that every shard is there with its recorded size (a stat per shard);
`LatentCacheDataset` checks each tensor's CRC32, shape and finiteness every time it reads it (about 1 ms per
MB; the bytes are read anyway). A damaged cache is a `UserError` naming the file and the remedy (re-run
`cosmos-train prepare RECIPE`), never trained on. Caches of formats 2 and 3 (no checksums) are still read:
their shards are only caught when unreadable, truncated or holding NaN / inf.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cosmos_train.errors import UserError

INDEX = "index.json"
FORMAT_VERSION = 4  # 4: checksums (shard sizes, per-tensor CRC32, index SHA-256); 3: no prompt ids
READABLE_FORMATS = (2, 3, 4)  # format 2's prompt ids are ignored; 2 and 3 have no checksums
CHECKSUMMED_FORMATS = (4,)
TENSORS = ("latent", "sound")  # the cached tensors of a sample (`{key}.{name}` in its shard)


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes as stored (contiguous float32)."""
    return zlib.crc32(memoryview(t.detach().contiguous().numpy()).cast("B"))


def _index_digest(index: dict) -> str:
    body = {k: v for k, v in index.items() if k not in ("checksum", "recipe")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _remedy(recipe: str) -> str:
    return f"re-run `cosmos-train prepare {recipe}` (it rebuilds the cache), or set data.cache=off to encode online"


def damaged(cache_dir, what: str, recipe: str = "RECIPE") -> UserError:
    """The error for a damaged cache file: names it and the remedy."""
    return UserError(f"the latent cache at {cache_dir} is damaged: {what}; {_remedy(recipe)}")


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN / inf. A sum first (NaN and inf propagate through it; about 15x cheaper than
    an element-wise test); only a non-finite sum, which finite values can also overflow to, is looked at closely."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite_latents(item, source: str) -> None:
    """BadSampleError (``non_finite``) when an encoded sample's latents hold NaN / inf (never cached)."""
    from cosmos_train.errors import BadSampleError

    for name in TENSORS:
        t = getattr(item, name, None)
        if t is not None and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise BadSampleError(f"{source}: the encoded {name} holds {bad} NaN / inf value(s) of {t.numel()} (the "
                                 "decoded media or the VAE produced non-finite numbers)", "non_finite")


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
        self.shards: dict[str, dict] = {}  # shard file -> {"size": bytes}

    def add(self, item, captions: list[str] | None = None) -> None:
        """`item`: a LatentSample (cosmos_train.objectives.generator); `captions`: every caption of the
        record, when it has several (one is drawn per epoch at training time)."""
        key = f"s{len(self.entries)}"
        captions = list(captions or [item.caption])
        latent = item.latent.float().contiguous()
        self._pending[f"{key}.latent"] = latent
        checks = {"latent": [tensor_crc32(latent), list(latent.shape)]}
        sound = getattr(item, "sound", None)
        if sound is not None:  # the clip's sound latent, cached with its video latent
            sound = sound.float().contiguous()
            self._pending[f"{key}.sound"] = sound
            checks["sound"] = [tensor_crc32(sound), list(sound.shape)]
        self.entries.append({"key": key, "shard": f"shard-{self._shard:05d}.safetensors",
                             "captions": captions,
                             "fps": item.fps, "num_frames": item.num_frames, "height": item.height,
                             "width": item.width, "source": item.source, "sound": sound is not None,
                             "crc32": checks})
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
            name = f"shard-{self._shard:05d}.safetensors"
            save_file(self._pending, str(self.tmp / name))
            self.shards[name] = {"size": (self.tmp / name).stat().st_size}
            self._pending = {}
            self._shard += 1

    def finish(self) -> Path:
        self._flush()
        index = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "shards": self.shards,
                 "samples": self.entries, "skipped": self.skipped}
        index["checksum"] = _index_digest(index)
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        from cosmos_train.export.staging import normalize_permissions

        normalize_permissions(self.tmp)  # mkdtemp / safetensors write owner-only: a shared cache_dir needs the umask
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        os.replace(self.tmp, self.cache_dir)
        return self.cache_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_index(cache_dir: Path, recipe: str = "RECIPE") -> dict | None:
    """The cache's index (None without one); a damaged index is a UserError naming it and the remedy."""
    path = Path(cache_dir) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        raise damaged(cache_dir, f"{path.name} is unreadable ({err})", recipe) from None
    if not isinstance(index, dict) or not isinstance(index.get("samples"), list):
        raise damaged(cache_dir, f"{path.name} is not a cache index (no sample list)", recipe)
    if index.get("format") in CHECKSUMMED_FORMATS and index.get("checksum") != _index_digest(index):
        raise damaged(cache_dir, f"{path.name} does not match its checksum", recipe)
    return index


def verify_shards(cache_dir: Path, index: dict, recipe: str = "RECIPE") -> None:
    """Every shard the index names exists (and, with checksums, has its recorded size): one stat per shard.
    The tensors themselves are checked as they are read (`LatentCacheDataset`)."""
    cache_dir = Path(cache_dir)
    recorded = index.get("shards") if index.get("format") in CHECKSUMMED_FORMATS else None
    needed = sorted({e["shard"] for e in index["samples"] if isinstance(e, dict) and "shard" in e})
    for shard in needed:
        path = cache_dir / shard
        try:
            size = path.stat().st_size
        except OSError:
            raise damaged(cache_dir, f"shard {path} is missing", recipe) from None
        if recorded is None:
            continue
        if shard not in recorded:
            raise damaged(cache_dir, f"{INDEX} names shard {shard} but records no checksum for it", recipe)
        if size != recorded[shard]["size"]:
            raise damaged(cache_dir, f"shard {path} has {size} bytes, {recorded[shard]['size']} were written "
                                     "(truncated or overwritten)", recipe)


def check_cache(cache_dir: Path, fingerprint: dict, recipe: str = "RECIPE") -> dict | None:
    """The cache index if it matches; None if there is no cache; UserError if it is stale or damaged
    (index checksum, missing shards, shard sizes; see `verify_shards`)."""
    index = read_index(cache_dir, recipe)
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
    verify_shards(cache_dir, index, recipe)
    if index.get("format") not in CHECKSUMMED_FORMATS:
        print(f"note: the latent cache at {cache_dir} (format {index.get('format')}) has no checksums, so a damaged "
              f"shard is caught only when unreadable or holding NaN / inf; `cosmos-train prepare {recipe}` "
              "rebuilds it with checksums")
    index["recipe"] = recipe  # for the remedy in messages about shards damaged later (not stored)
    return index


class LatentCacheDataset(torch.utils.data.Dataset):
    """Map-style dataset over a prepared cache; items are `LatentSample`s (memory-mapped reads)."""

    def __init__(self, cache_dir: Path, index: dict, caption_seed: int = 0):
        self.cache_dir = Path(cache_dir)
        self.caption_seed = caption_seed
        self.entries = index["samples"]
        self.skipped = index.get("skipped", [])
        self.recipe = index.get("recipe", "RECIPE")
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.cache_dir / shard), framework="pt")
            except Exception as err:  # safetensors' own errors (a damaged header) are not OSErrors
                raise damaged(self.cache_dir, f"shard {self.cache_dir / shard} cannot be opened "
                                              f"({type(err).__name__}: {err})", self.recipe) from None
        return self._handles[shard]

    def _tensor(self, e: dict, name: str) -> torch.Tensor:
        """One cached tensor, checked: readable, CRC32 and shape as written (format 4), finite."""
        shard = self.cache_dir / e["shard"]
        where = f"shard {shard}, sample {e['key']} ({e['source']})"
        try:
            t = self._open(e["shard"]).get_tensor(f"{e['key']}.{name}")
        except UserError:
            raise
        except Exception as err:
            raise damaged(self.cache_dir, f"{where}: {name} unreadable ({type(err).__name__}: {err})",
                          self.recipe) from None
        check = e.get("crc32", {}).get(name)
        if check is not None:
            crc, shape = check
            if list(t.shape) != list(shape):
                raise damaged(self.cache_dir, f"{where}: {name} has shape {list(t.shape)}, {shape} was written",
                              self.recipe)
            if tensor_crc32(t) != crc:
                raise damaged(self.cache_dir, f"{where}: {name} does not match its checksum", self.recipe)
        if not all_finite(t):  # prepare never writes NaN / inf
            raise damaged(self.cache_dir, f"{where}: {name} holds NaN / inf", self.recipe)
        return t

    def __getitem__(self, key):
        """`key`: an index, or a `SampleKey(index, epoch)` (the epoch picks among several captions).

        A damaged shard raises its `UserError`; in a DataLoader worker it comes back as a marker that is
        never skipped (`cosmos_train.data.dataset.bad_sample_marker`), which the trainer raises."""
        from cosmos_train.data.dataset import bad_sample_marker

        try:
            return self._load(key)
        except UserError as err:
            if torch.utils.data.get_worker_info() is None:
                raise
            index = key if isinstance(key, int) else key[0]
            return bad_sample_marker(err, self.entries[index].get("source", ""), skip=False)

    def _load(self, key):
        from cosmos_train.data.manifest import caption_for
        from cosmos_train.objectives.generator import LatentSample

        index, epoch = (key, 0) if isinstance(key, int) else (key[0], key[1])
        e = self.entries[index]
        if "skipped" in e:  # counted by the trainer, like a bad sample met online
            return {"skipped": e["skipped"], "source": e["source"], "message": e["message"]}
        captions = e["captions"]
        caption = caption_for(SimpleNamespace(caption_candidates=tuple(captions), source=e["source"]), epoch,
                              self.caption_seed)
        return LatentSample(
            latent=self._tensor(e, "latent"), caption=caption, fps=e["fps"],
            num_frames=e["num_frames"], height=e["height"], width=e["width"], source=e["source"],
            sound=self._tensor(e, "sound") if e.get("sound") else None,
        )

    def __getstate__(self):  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
