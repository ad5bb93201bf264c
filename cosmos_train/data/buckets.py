"""Resolution tiers, aspect-ratio buckets, and a resumable, rank-sharded, weighted bucketing sampler.

Bucket sizes
------------
Every size is Cosmos 3's own inference canvas: the ``"256"``, ``"480"`` and ``"720"`` entries of
``_ACTION_RESOLUTION_BINS`` in diffusers' ``pipelines/cosmos/pipeline_cosmos3_omni.py`` (the table
``Cosmos3OmniPipeline`` uses to pick the canvas for an input's aspect ratio). That table is keyed by
``height / width`` and holds ``(height, width)``; ``tests/test_data_sources.py`` checks that the copy
below matches it entry for entry. The five entries per tier, from widest to tallest, are named after
the aspect ratio they stand for:

=========  ===================  ===================  ===================
aspect     tier 256 (H x W)     tier 480 (H x W)     tier 720 (H x W)
=========  ===================  ===================  ===================
16:9       192 x 320  (key 0.6)  480 x 832 (0.5769)   720 x 1280 (0.5625)
4:3        256 x 320  (0.8)      544 x 736 (0.7391)   832 x 1104 (0.7536)
1:1        256 x 256  (1.0)      640 x 640 (1.0)      960 x 960  (1.0)
3:4        320 x 256  (1.25)     736 x 544 (1.3529)   1104 x 832 (1.3269)
9:16       320 x 192  (1.6667)   832 x 480 (1.7333)   1280 x 720 (1.7778)
=========  ===================  ===================  ===================

Note the 256 tier's "16:9" canvas is really 3:5 and its "4:3" canvas 4:5: that is what the table
(and so inference) uses. The pipeline's default text-to-video size (720 x 1280) is the 720 tier's
16:9 entry; ``config.schema.TIER_SIZES`` (the fixed-size default per tier) is each tier's 16:9 entry.

Assignment (`assign_bucket`) is the pipeline's own rule (``VideoProcessor.classify_height_width_bin``):
the entry whose ``height / width`` is nearest to the source's ``height / width``.

Sampler
-------
`BucketSampler` turns per-index bucket keys (and optionally several weighted sources) into an
endless stream of `SampleKey(index, epoch)` such that, on every rank, each aligned run of
``group_size`` consecutive keys (positions ``[k * group_size, (k + 1) * group_size)`` of the rank's
stream) shares one bucket. `BucketBatchSampler` yields those runs as lists (a DataLoader
``batch_sampler``). The stream is a pure function of (seed, rank, world_size) and the data layout, so
a position is just the number of keys consumed (``start``).

One *epoch* of the mixed stream has ``epoch_size`` keys before padding (default: the number of
indices; with weights at least 1000); see `BucketSampler` for how it is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, NamedTuple, Sequence

import numpy as np
import torch

ASPECTS = ("16:9", "4:3", "1:1", "3:4", "9:16")

# tier -> aspect -> (height, width): diffusers' _ACTION_RESOLUTION_BINS["256" | "480" | "720"]
# (pipelines/cosmos/pipeline_cosmos3_omni.py), renamed by the aspect ratio each entry stands for.
BUCKET_SIZES: dict[int, dict[str, tuple[int, int]]] = {
    256: {"16:9": (192, 320), "4:3": (256, 320), "1:1": (256, 256), "3:4": (320, 256), "9:16": (320, 192)},
    480: {"16:9": (480, 832), "4:3": (544, 736), "1:1": (640, 640), "3:4": (736, 544), "9:16": (832, 480)},
    720: {"16:9": (720, 1280), "4:3": (832, 1104), "1:1": (960, 960), "3:4": (1104, 832), "9:16": (1280, 720)},
}
MIN_WEIGHTED_EPOCH = 1000
# the order diffusers' table lists them in (1:1, 4:3, 3:4, 16:9, 9:16): ties resolve as `min` does there
_TABLE_ORDER = ("1:1", "4:3", "3:4", "16:9", "9:16")


@dataclass(frozen=True)
class Bucket:
    tier: int
    aspect: str  # "16:9", "4:3", "1:1", "3:4", "9:16"; "fixed" for a recipe's fixed size
    height: int
    width: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def name(self) -> str:
        if self.aspect == "fixed":
            return f"fixed {self.height}x{self.width}"
        return f"{self.tier}p {self.aspect}"

    def __str__(self) -> str:
        return f"{self.height}x{self.width} ({self.name})"


def tier_buckets(tier: int) -> list[Bucket]:
    if tier not in BUCKET_SIZES:
        raise ValueError(f"resolution tier must be one of {sorted(BUCKET_SIZES)}, got {tier!r}")
    return [Bucket(tier, a, *BUCKET_SIZES[tier][a]) for a in ASPECTS]


def assign_bucket(source_height: int, source_width: int, tier: int) -> Bucket:
    """The bucket of `tier` whose height / width is nearest to the source's (the pipeline's rule)."""
    if source_height <= 0 or source_width <= 0:
        raise ValueError(f"source size must be positive, got {source_height}x{source_width}")
    if tier not in BUCKET_SIZES:
        raise ValueError(f"resolution tier must be one of {sorted(BUCKET_SIZES)}, got {tier!r}")
    ar = source_height / source_width
    sizes = BUCKET_SIZES[tier]
    aspect = min(_TABLE_ORDER, key=lambda a: abs(sizes[a][0] / sizes[a][1] - ar))
    return Bucket(tier, aspect, *sizes[aspect])


# ------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------


class SampleKey(NamedTuple):
    """What the bucket sampler yields and `GeneratorDataset` accepts as an index."""

    index: int  # dataset index
    epoch: int  # this record's pass number in its stream (selects its caption, see `caption_for`)


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, proportional to `shares` (Hamilton's method, ties -> lower index)."""
    shares = np.asarray(shares, dtype=np.float64)
    if total == 0 or shares.sum() <= 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = shares / shares.sum() * total
    base = np.floor(exact + 1e-9).astype(np.int64)
    rest = int(total - base.sum())
    if rest > 0:
        order = np.argsort(-(exact - base), kind="stable")
        base[order[:rest]] += 1
    elif rest < 0:  # float noise only
        order = np.argsort(exact - base, kind="stable")
        for i in order[: -rest]:
            base[i] -= 1
    return base


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 63) for k in keys])


class BucketSampler(torch.utils.data.Sampler):
    """Endless, seeded, resumable, rank-sharded stream of `SampleKey` grouped by bucket.

    Args:
        buckets: bucket key of every dataset index (any hashable, e.g. the target (H, W)).
        group_size: keys that must share a bucket (the per-rank batch, e.g. ``train.batch_size``).
        sources: the dataset indices of each source (default: one source with every index).
        weights: sampling weight of each source (fraction of the stream ~ weight / sum of weights);
            None: proportional to the sources' sizes (plain concatenation).
        shuffle: shuffle within and across buckets (False: index order, groups in bucket order).
        seed, rank, world_size: the stream is a pure function of these and the layout.
        start: keys of this rank's stream already consumed.
        epoch_size: keys per epoch (default: the number of indices in the sources;
            with weights at least `MIN_WEIGHTED_EPOCH`, so per-epoch quota rounding stays < 0.1%).

    One epoch ``e``:

    1. Quotas: source ``s`` gets ``q_s`` keys (largest-remainder rounding of
       ``epoch_size * w_s / sum(w)``), split over its buckets in proportion to the bucket sizes
       (again largest remainder), so every (source, bucket) *stratum* gets a fixed ``q_sb`` per epoch
       and every epoch has the same number of keys per bucket.
    2. Each stratum is an endless stream of its indices, one seeded permutation per pass; epoch
       ``e`` takes positions ``[e * q_sb, (e + 1) * q_sb)`` of it. A key's ``epoch`` field is its pass
       number in that stream (= ``e`` for an unweighted single source), which picks its caption.
    3. Per bucket, keys are shuffled and cut into groups of ``group_size``; a bucket's last group is
       filled up with keys from the start of the same bucket (repeats). Groups are shuffled across
       buckets (``torch.randperm`` seeded with ``seed + e``).
    4. The epochs' groups, one after the other, are ONE global stream, the same whatever the number of
       processes; rank ``r`` takes its groups ``base + r, base + r + W, ...`` of it (``base`` 0, or where a run
       that continued on another number of processes started, see `reshard`). So N processes and one process
       with N accumulation steps train the same global batches, across epoch ends too.

    With one source, no weights, one bucket and ``group_size=1`` this is a seeded permutation per
    epoch, rank-strided. With no weights every index appears in every epoch, once. A stratum whose quota rounds
    to 0 is never drawn.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        *,
        group_size: int = 1,
        sources: Sequence[Sequence[int]] | None = None,
        weights: Sequence[float] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        epoch_size: int | None = None,
    ):
        n = len(buckets)
        if n <= 0:
            raise ValueError("the dataset is empty")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.group_size = group_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        # keys handed to this rank when a run resumed on another process count (see `reshard`): drawn first
        self.prefix: list[SampleKey] = []
        self.base = 0  # the global group this layout of ranks starts at (`reshard`)

        # bucket ids in order of first appearance (independent of hashing)
        ids: dict[Hashable, int] = {}
        bucket_id = np.array([ids.setdefault(b, len(ids)) for b in buckets], dtype=np.int64)
        self.bucket_keys = list(ids)
        nb = len(ids)

        if sources is None:
            sources = [range(n)]
        self.sources = [np.asarray(list(s), dtype=np.int64) for s in sources]
        if not self.sources:
            raise ValueError("no sources")
        for s, idx in enumerate(self.sources):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"source {s} has indices outside [0, {n})")
        sizes = np.array([len(s) for s in self.sources], dtype=np.float64)
        if weights is None:
            w = sizes
        else:
            if len(weights) != len(self.sources):
                raise ValueError(f"{len(weights)} weights for {len(self.sources)} sources")
            w = np.asarray(weights, dtype=np.float64)
            if np.any(~np.isfinite(w)) or np.any(w < 0):
                raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
            w = np.where(sizes > 0, w, 0.0)
        if w.sum() <= 0:
            raise ValueError("every source is empty or has weight 0")
        if epoch_size is None:  # weighted: long enough that quota rounding stays below 0.1%
            epoch_size = int(sizes.sum()) if weights is None else max(int(sizes.sum()), MIN_WEIGHTED_EPOCH)
        self.epoch_size = int(epoch_size)
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
        self.source_quotas = _largest_remainder(w, self.epoch_size)

        # strata: (source, bucket) -> sorted member indices and per-epoch quota
        self._strata: list[tuple[int, int, np.ndarray, int]] = []  # (source, bucket, members, quota)
        for s, idx in enumerate(self.sources):
            members = [np.sort(idx[bucket_id[idx] == b]) for b in range(nb)]
            counts = np.array([len(m) for m in members], dtype=np.float64)
            quotas = _largest_remainder(counts, int(self.source_quotas[s]))
            for b in range(nb):
                if len(members[b]) and quotas[b] > 0:
                    self._strata.append((s, b, members[b], int(quotas[b])))
        self.bucket_counts = np.zeros(nb, dtype=np.int64)  # keys per bucket per epoch
        for _, b, _, q in self._strata:
            self.bucket_counts[b] += q
        self.groups_per_epoch = int(sum(math.ceil(c / group_size) for c in self.bucket_counts if c > 0))

    # -- the plan ---------------------------------------------------------------------------------

    @property
    def per_epoch(self) -> int:
        """Keys per epoch on each rank (at most: with groups not a multiple of the ranks, some get one group less)."""
        return -(-self.groups_per_epoch // self.world_size) * self.group_size

    def _stratum_draw(self, s: int, b: int, members: np.ndarray, quota: int, epoch: int):
        m = len(members)
        pos = np.arange(epoch * quota, (epoch + 1) * quota, dtype=np.int64)
        passes, offsets = np.divmod(pos, m)
        out = np.empty(quota, dtype=np.int64)
        for p in np.unique(passes):
            sel = passes == p
            if self.shuffle:
                perm = _rng(self.seed, s, b, int(p), 0x5EED).permutation(m)
                out[sel] = members[perm[offsets[sel]]]
            else:
                out[sel] = members[offsets[sel]]
        return out, passes

    def epoch_groups(self, epoch: int) -> np.ndarray:
        """All ranks' groups of `epoch`, in stream order: int64 array [groups_per_epoch, group_size, 2]
        of (index, pass); global group k is row k % groups_per_epoch of epoch k // groups_per_epoch."""
        G = self.group_size
        per_bucket: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for s, b, members, quota in self._strata:
            per_bucket.setdefault(b, []).append(self._stratum_draw(s, b, members, quota, epoch))
        groups = []
        for b in sorted(per_bucket):
            idx = np.concatenate([d[0] for d in per_bucket[b]])
            ps = np.concatenate([d[1] for d in per_bucket[b]])
            order = np.lexsort((ps, idx))  # canonical order, then shuffle
            idx, ps = idx[order], ps[order]
            if self.shuffle and G > 1:
                perm = _rng(self.seed, int(epoch), b, 0xB0C).permutation(len(idx))
                idx, ps = idx[perm], ps[perm]
            c = len(idx)
            n_groups = -(-c // G)
            take = np.arange(n_groups * G) % c  # the last group wraps to the bucket's start
            groups.append(np.stack([idx[take], ps[take]], axis=-1).reshape(n_groups, G, 2))
        all_groups = np.concatenate(groups, axis=0)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            all_groups = all_groups[torch.randperm(len(all_groups), generator=g).numpy()]
        return all_groups

    def _mine(self, k: int) -> bool:
        return k >= self.base and (k - self.base) % self.world_size == self.rank

    def epoch_order(self, epoch: int) -> list[SampleKey]:
        """This rank's keys of `epoch` (its groups of the global stream that fall in that epoch)."""
        n = self.groups_per_epoch
        rows = self.epoch_groups(epoch)
        return [SampleKey(int(i), int(p)) for row in range(n) if self._mine(epoch * n + row) for i, p in rows[row]]

    def __iter__(self):
        yield from self.prefix
        j, within = divmod(self.start, self.group_size)  # this rank's j-th group: global base + rank + j * W
        epoch, rows = -1, None
        while True:
            e, row = divmod(self.base + self.rank + j * self.world_size, self.groups_per_epoch)
            if e != epoch:
                epoch, rows = e, self.epoch_groups(e)
            for i, p in rows[row][within:]:
                yield SampleKey(int(i), int(p))
            j, within = j + 1, 0


    # -- resuming on another number of processes ------------------------------------------------

    def position(self, drawn: int) -> dict:
        """This rank's place after drawing `drawn` keys (its prefix first), as a checkpoint stores it:
        {"consumed": keys of its own stream consumed, "prefix": prefix keys not drawn yet, "base"}."""
        rest = self.prefix[drawn:]
        return {"consumed": self.start + max(0, drawn - len(self.prefix)), "prefix": [list(k) for k in rest],
                "base": self.base}

    def restore(self, position: dict) -> None:
        self.start = int(position["consumed"])
        self.prefix = [SampleKey(*k) for k in position.get("prefix", [])]
        self.base = int(position.get("base", 0))

    def reshard(self, saved: list[dict]) -> dict:
        """This rank's position when a run saved by ``len(saved)`` processes continues on ``world_size``.

        `saved`: each old rank's {"consumed", "prefix", "base", "pending"} (pending: keys drawn but not trained
        yet, e.g. waiting in the packer). Every key no old rank trained is trained once: the old ranks' pending
        and prefix keys, then the global groups below the furthest one consumed that no old rank consumed; these
        are dealt to the new ranks group by group (rank r takes r, r + world_size, ...), and the new layout of
        ranks starts its own groups after the furthest one consumed."""
        old_world, G, n = len(saved), self.group_size, self.groups_per_epoch
        base = int(saved[0].get("base", 0))
        leftover: list[list[SampleKey]] = []
        for state in saved:  # drawn, not trained: one key each (pending only exist with group_size 1)
            leftover += [[SampleKey(*k)] for k in state.get("pending", [])]
        for state in saved:
            prefix = [SampleKey(*k) for k in state.get("prefix", [])]
            leftover += [prefix[i:i + G] for i in range(0, len(prefix), G)]
        done = [int(state["consumed"]) // G for state in saved]  # whole groups of each old rank's own stream
        end = max([base + r + (d - 1) * old_world + 1 for r, d in enumerate(done) if d > 0] or [base])
        rows, epoch = None, -1
        for k in range(base, end):
            r, j = (k - base) % old_world, (k - base) // old_world
            if j < done[r]:
                continue
            e, row = divmod(k, n)
            if e != epoch:
                epoch, rows = e, self.epoch_groups(e)
            leftover.append([SampleKey(int(i), int(p)) for i, p in rows[row]])
        mine = [key for group in leftover[self.rank::self.world_size] for key in group]
        return {"consumed": 0, "prefix": [list(k) for k in mine], "base": end}


class BucketBatchSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler``: `BucketSampler`'s stream cut into its same-bucket groups.

    Each list has ``group_size`` keys of one bucket; when ``sampler.start`` is not a multiple of
    ``group_size`` the first list is the rest of the group it falls in. Endless."""

    def __init__(self, sampler: BucketSampler):
        self.sampler = sampler

    @property
    def group_size(self) -> int:
        return self.sampler.group_size

    def __iter__(self):
        G = self.sampler.group_size
        stream = iter(self.sampler)
        n = G - self.sampler.start % G
        while True:
            yield [next(stream) for _ in range(n)]
            n = G
