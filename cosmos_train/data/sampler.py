"""A resumable, seeded, rank-sharded sampler: an endless stream of dataset indices.

The stream is a pure function of (seed, rank, world size), so a position is just the number of
samples consumed; a checkpoint stores that count and a resumed run continues with the next unseen
sample even when DataLoader workers had prefetched past it.
"""

from __future__ import annotations

import torch


class ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start  # samples of this rank's stream already consumed

    @property
    def per_epoch(self) -> int:
        return -(-self.num_samples // self.world_size)

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        # Pad so every rank gets the same count, then take this rank's stride.
        order = order + order[: self.per_epoch * self.world_size - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        epoch, position = divmod(self.start, self.per_epoch)
        while True:
            order = self.epoch_order(epoch)
            yield from order[position:]
            epoch, position = epoch + 1, 0
