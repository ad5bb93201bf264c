"""Recipe -> dataset + sampler: read every source, assign aspect buckets, mix by weight.

`build_generator_data(cfg, rank, world_size, start)` is what a trainer calls; it returns the
`GeneratorDataset`, a `BucketBatchSampler` (each list is ``train.batch_size`` keys of one bucket,
resumable from ``start`` = keys this rank consumed) and a `DataInfo` describing what was read.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

import numpy as np

from cosmos_train.data.buckets import Bucket, BucketBatchSampler, BucketSampler, assign_bucket
from cosmos_train.data.dataset import GeneratorDataset
from cosmos_train.data.hf import read_hf_dataset
from cosmos_train.data.manifest import ManifestRecord, read_manifest
from cosmos_train.data.media import probe_image, probe_video
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError


@dataclass
class SourceInfo:
    name: str  # label: the source's `name`, else its manifest path / dataset
    kind: str  # "manifest" or "hf_dataset"
    records: int  # usable records (after skips)
    weight: float | None  # as configured (None: by size)
    share: float  # fraction of the sample stream drawn from it
    first_index: int  # its records are dataset indices [first_index, first_index + records)


@dataclass
class DataInfo:
    """What `build_generator_data` read (JSON-able through `to_json`)."""

    sources: list[SourceInfo]
    buckets: dict[str, int]  # bucket label -> records
    skips: SkipCounter  # build-time skips: bad manifest lines / dataset rows, media that cannot be probed
    group_size: int
    epoch_size: int  # keys per mixed epoch (all ranks, before padding)
    per_rank_epoch: int  # keys per epoch on each rank (at most: groups are dealt round the ranks)
    aspect_buckets: bool = False
    fixed_size: tuple[int, int] | None = None
    source_sizes: np.ndarray | None = None  # int32 [N, 2]: each record's own (height, width) (buckets only)

    def summary(self) -> str:
        lines = [f"data: {sum(s.records for s in self.sources)} samples from {len(self.sources)} source"
                 f"{'s' if len(self.sources) != 1 else ''}"]
        for s in self.sources:
            w = "by size" if s.weight is None else f"weight {s.weight:g}"
            lines.append(f"  {s.name}: {s.records} records, {w} -> {s.share:.1%} of samples")
        if self.aspect_buckets:
            lines.append("  buckets: " + ", ".join(f"{k}: {n}" for k, n in
                                                   sorted(self.buckets.items(), key=lambda kv: -kv[1])))
        else:
            lines.append(f"  fixed size {self.fixed_size[0]}x{self.fixed_size[1]} (HxW)")
        if self.skips.total:
            lines.append("  " + self.skips.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [vars(s) for s in self.sources],
            "buckets": dict(self.buckets),
            "skipped": dict(self.skips.by_reason),
            "group_size": self.group_size,
            "epoch_size": self.epoch_size,
            "per_rank_epoch": self.per_rank_epoch,
            "aspect_buckets": self.aspect_buckets,
            "fixed_size": list(self.fixed_size) if self.fixed_size else None,
        }


class GeneratorData(NamedTuple):
    dataset: GeneratorDataset
    batch_sampler: BucketBatchSampler
    info: DataInfo

    @property
    def sampler(self) -> BucketSampler:
        """The flat key stream (``DataLoader(sampler=..., batch_size=None)``); aligned runs of
        ``group_size`` keys share a bucket."""
        return self.batch_sampler.sampler

    def record_info(self, index: int) -> dict[str, Any]:
        """What the build decided for dataset index `index` (JSON-able)."""
        rec = self.dataset.records[index]
        sizes = self.info.source_sizes
        return {"source": rec.source, "dataset": rec.dataset, "kind": "image" if rec.is_image else "video",
                "bucket": self.dataset.bucket_name(index), "size": list(self.dataset.size_of(index)),
                "source_size": [int(x) for x in sizes[index]] if sizes is not None else None}


# ------------------------------------------------------------------------------------------------


def source_specs(data_cfg) -> list:
    """The recipe's sources: ``data.sources``, or ``data.manifest`` as a single source."""
    if getattr(data_cfg, "sources", None):
        return list(data_cfg.sources)
    from cosmos_train.config.schema import DataSourceConfig

    if not data_cfg.manifest:
        raise UserError("data.manifest (or data.sources) is required")
    return [DataSourceConfig(manifest=data_cfg.manifest)]


def read_source(spec, skip_bad: bool = False, counter: SkipCounter | None = None) -> tuple[str, str, list]:
    """-> (label, kind, records) for one `DataSourceConfig`-like spec."""
    if spec.manifest is not None:
        label = spec.name or spec.manifest
        records = read_manifest(spec.manifest, skip_bad=skip_bad, counter=counter)
        if spec.name:  # relabel the records' dataset (sources stay manifest:line)
            records = [_with_dataset(r, label) for r in records]
        return label, "manifest", records
    label = spec.name or spec.hf_dataset
    records = read_hf_dataset(spec.hf_dataset, columns=spec.columns, split=spec.split, subset=spec.subset,
                              media_root=spec.media_root, cache_dir=spec.cache_dir, skip_bad=skip_bad,
                              counter=counter, name=label)
    return label, "hf_dataset", records


def _with_dataset(rec: ManifestRecord, label: str) -> ManifestRecord:
    return replace(rec, dataset=label)


def probe_size(rec: ManifestRecord) -> tuple[int, int]:
    """The record's own (height, width): from the manifest / dataset when given, else the file."""
    if rec.width is not None and rec.height is not None:
        return (rec.height, rec.width)
    media = rec.media if rec.media is not None else rec.path
    try:
        if rec.is_image:
            return probe_image(media)
        _, _, h, w = probe_video(media)
        return (h, w)
    except BadSampleError as e:
        raise BadSampleError(f"{rec.source}: {e}", e.reason) from None


def probe_sizes(records: Sequence[ManifestRecord], threads: int | None = None) -> list:
    """`probe_size` of every record, in order; a bad one gives its `BadSampleError` instead."""

    def one(rec):
        try:
            return probe_size(rec)
        except BadSampleError as e:
            return e

    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(records) < 4:
        return [one(r) for r in records]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, records, chunksize=16))


def build_generator_data(
    cfg,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    *,
    counter: SkipCounter | None = None,
    group_size: int | None = None,
) -> GeneratorData:
    """Everything a generator trainer needs from `cfg.data` (a `RecipeConfig`).

    - reads every source (``data.sources``, or ``data.manifest``); bad lines / rows are counted in
      `counter` with ``data.skip_bad_samples``, else raise;
    - with aspect buckets (``data.use_buckets()``), probes each record's size (or takes the
      ``width`` / ``height`` the source gives) and assigns the nearest bucket of ``data.resolution``;
      unprobeable media are skipped (counted) or raise like other bad samples;
    - builds the `GeneratorDataset` (``data.num_frames``, ``data.fps``, ``data.short_clips``,
      captions seeded by ``train.seed``) and a `BucketBatchSampler` over a `BucketSampler`
      (groups of ``group_size`` = ``train.batch_size`` keys of one bucket, sources mixed by weight,
      ``data.shuffle``, seed ``train.seed``, this rank's shard, resumed at ``start`` keys).

    Every rank must call it with the same recipe (the layout is deterministic).
    """
    d = cfg.data
    skip_bad = bool(d.skip_bad_samples)
    counter = counter if counter is not None else SkipCounter()
    group_size = int(group_size or cfg.train.batch_size)

    labels, kinds, weights, per_source = [], [], [], []
    for spec in source_specs(d):
        label, kind, records = read_source(spec, skip_bad=skip_bad, counter=counter)
        labels.append(label)
        kinds.append(kind)
        weights.append(spec.weight)
        per_source.append(records)

    use_buckets = d.use_buckets()
    buckets_per_source: list[list[Bucket | None]] = []
    src_sizes_per_source: list[list] = []
    interned: dict[Bucket, Bucket] = {}  # one object per bucket (millions of records share them)
    if use_buckets:
        for s, records in enumerate(per_source):
            kept, kept_buckets, kept_sizes = [], [], []
            for rec, size in zip(records, probe_sizes(records)):
                if isinstance(size, BadSampleError):
                    if not skip_bad:
                        raise size
                    counter.add(size.reason, rec.source, str(size))
                    continue
                kept.append(rec)
                kept_sizes.append(size)
                bucket = assign_bucket(size[0], size[1], d.resolution)
                kept_buckets.append(interned.setdefault(bucket, bucket))
            if not kept:
                raise UserError(f"data source {labels[s]}: no usable samples\n{counter.summary()}")
            per_source[s] = kept
            buckets_per_source.append(kept_buckets)
            src_sizes_per_source.append(kept_sizes)
    else:
        for records in per_source:
            buckets_per_source.append([None] * len(records))
            src_sizes_per_source.append([None] * len(records))

    records: list[ManifestRecord] = [r for rs in per_source for r in rs]
    all_buckets = [b for bs in buckets_per_source for b in bs]
    all_src_sizes = [sz for ss in src_sizes_per_source for sz in ss]
    source_indices, first = [], 0
    for rs in per_source:
        source_indices.append(range(first, first + len(rs)))
        first += len(rs)

    if use_buckets:
        size_of = {b: b.size for b in interned}
        name_of = {b: b.name for b in interned}
        sizes = [size_of[b] for b in all_buckets]
        names = [name_of[b] for b in all_buckets]
        dataset = GeneratorDataset(records, d.num_frames, fps=d.fps, sizes=sizes, bucket_names=names,
                                   short_clips=d.short_clips, seed=cfg.train.seed, sound=cfg.generator.sound)
        keys: list = sizes
        fixed = None
    else:
        fixed = cfg.pixel_size()
        dataset = GeneratorDataset(records, d.num_frames, fixed[0], fixed[1], fps=d.fps,
                                   short_clips=d.short_clips, seed=cfg.train.seed, sound=cfg.generator.sound)
        keys = [fixed] * len(records)

    use_weights = len(per_source) > 1 and all(w is not None for w in weights)
    sampler = BucketSampler(
        keys,
        group_size=group_size,
        sources=source_indices,
        weights=weights if use_weights else None,
        shuffle=d.shuffle,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        start=start,
    )
    total_q = float(sum(sampler.source_quotas)) or 1.0
    info = DataInfo(
        sources=[SourceInfo(name=labels[s], kind=kinds[s], records=len(per_source[s]), weight=weights[s],
                            share=float(sampler.source_quotas[s]) / total_q, first_index=source_indices[s].start)
                 for s in range(len(per_source))],
        buckets=dict(Counter(dataset.bucket_name(i) for i in range(len(records)))),
        skips=counter,
        group_size=group_size,
        epoch_size=sampler.epoch_size,
        per_rank_epoch=sampler.per_epoch,
        aspect_buckets=use_buckets,
        fixed_size=fixed,
        source_sizes=np.asarray(all_src_sizes, dtype=np.int32).reshape(-1, 2) if use_buckets else None,
    )
    return GeneratorData(dataset, BucketBatchSampler(sampler), info)
