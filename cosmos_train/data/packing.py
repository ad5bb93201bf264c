"""Grouping samples into packs under a token budget (for packed generator forwards).

A sample costs `sample_token_count` tokens: its text prompt plus its vision patches. Packs are
planned by an anchored best-fit-decreasing over a lookahead window:

- the oldest pending sample always opens the next pack (order is kept approximately: a sample is
  pulled forward by at most `lookahead` positions, so shuffling still matters, and nothing starves);
- the rest of the pack is filled from the window largest-first, each time with the largest pending
  sample that still fits (best fit for the remaining room);
- a sample larger than the budget on its own is never packed: it is reported (index / callback) so
  the caller can warn with the sample's name; nothing loops forever.

`plan_packs` plans a whole list; `StreamingPacker` / `iter_packs` do the same on a stream (the same
packs for the same input). Efficiency = real tokens / (num_packs * budget).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence


def sample_token_count(num_text_tokens: int, latent_shape: Sequence[int], patch_size: int = 2) -> int:
    """Tokens one sample puts in the joint sequence: text + T * ceil(H/p) * ceil(W/p) vision patches
    (`latent_shape` is the latent's (..., T, H, W), as `build_vision_sequence` counts it)."""
    t, h, w = (int(x) for x in latent_shape[-3:])
    return int(num_text_tokens) + t * math.ceil(h / patch_size) * math.ceil(w / patch_size)


def packing_efficiency(total_tokens: int, num_packs: int, budget: int) -> float:
    """Real tokens / (num_packs * budget); 1.0 for no packs."""
    return total_tokens / (num_packs * budget) if num_packs else 1.0


class StreamingPacker:
    """Buffers up to `lookahead` pending items and emits packs (lists of items) whose token total is
    at most `budget`.

        packer = StreamingPacker(budget=8192, lookahead=64, on_oversize=lambda item, n: warn(...))
        for item, n in stream:
            packer.add(item, n)
            while packer.ready():
                train_on(packer.pop_pack())
        for pack in packer.flush():
            train_on(pack)

    `lookahead=None` means an unbounded window (only `flush` emits packs). Oversize items are passed to
    `on_oversize(item, length)` (default: a warning) and recorded in `oversize`.
    """

    def __init__(self, budget: int, lookahead: int | None = 64,
                 on_oversize: Callable[[Any, int], None] | None = None):
        if int(budget) <= 0:
            raise ValueError(f"packing budget must be positive, got {budget}")
        if lookahead is not None and int(lookahead) < 1:
            raise ValueError(f"packing lookahead must be >= 1 or None, got {lookahead}")
        self.budget = int(budget)
        self.lookahead = None if lookahead is None else int(lookahead)
        self.on_oversize = on_oversize
        self._pending: list[tuple[int, Any, int]] = []  # (arrival order, item, length), oldest first
        self._arrivals = 0
        self.oversize: list[tuple[Any, int]] = []
        self.num_packs = 0
        self.packed_tokens = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: Any, length: int) -> bool:
        """Queue one item; returns False (and reports it) if it alone exceeds the budget."""
        length = int(length)
        if length <= 0:
            raise ValueError(f"sample length must be positive, got {length}")
        if length > self.budget:
            self.oversize.append((item, length))
            if self.on_oversize is not None:
                self.on_oversize(item, length)
            else:
                warnings.warn(f"sample of {length} tokens exceeds the packing budget of {self.budget} tokens; "
                              "skipped", stacklevel=2)
            return False
        self._pending.append((self._arrivals, item, length))
        self._arrivals += 1
        return True

    def ready(self) -> bool:
        """A full window is buffered: `pop_pack` now gives the same pack it would with more input."""
        return self.lookahead is not None and len(self._pending) >= self.lookahead

    def pop_pack(self) -> list[Any] | None:
        """Emit the next pack from the current window (None when nothing is pending)."""
        if not self._pending:
            return None
        window = self._pending if self.lookahead is None else self._pending[: self.lookahead]
        anchor = window[0]
        chosen = [anchor]
        room = self.budget - anchor[2]
        # Largest first (ties: oldest first); each pick is the largest pending item that still fits.
        for entry in sorted(window[1:], key=lambda e: (-e[2], e[0])):
            if room <= 0:
                break
            if entry[2] <= room:
                chosen.append(entry)
                room -= entry[2]
        taken = {e[0] for e in chosen}
        self._pending = [e for e in self._pending if e[0] not in taken]
        chosen.sort(key=lambda e: e[0])  # arrival order inside the pack
        self.num_packs += 1
        self.packed_tokens += sum(e[2] for e in chosen)
        return [e[1] for e in chosen]

    def pending(self) -> list[tuple[int, Any, int]]:
        """Buffered (arrival order, item, length) entries, oldest first: what a checkpoint must keep."""
        return list(self._pending)

    def restore(self, pending: list[tuple[int, Any, int]]) -> None:
        """Refill the window from `pending()` output (resuming a run)."""
        self._pending = sorted(pending, key=lambda e: e[0])
        self._arrivals = max([self._arrivals] + [e[0] + 1 for e in self._pending])

    def flush(self) -> Iterator[list[Any]]:
        """Emit every pending item (end of stream / epoch)."""
        while self._pending:
            yield self.pop_pack()

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs emitted * budget)."""
        return packing_efficiency(self.packed_tokens, self.num_packs, self.budget)


def iter_packs(stream: Iterable[tuple[Any, int]], budget: int, lookahead: int | None = 64,
               on_oversize: Callable[[Any, int], None] | None = None,
               packer: StreamingPacker | None = None) -> Iterator[list[Any]]:
    """Packs (lists of items) from a stream of `(item, length)`; oversize items go to `on_oversize`.
    Pass your own `packer` to read its `efficiency` / `oversize` afterwards."""
    if packer is None:  # not `packer or ...`: an empty packer has len 0 and is falsy
        packer = StreamingPacker(budget, lookahead, on_oversize)
    for item, length in stream:
        packer.add(item, length)
        while packer.ready():
            yield packer.pop_pack()
    yield from packer.flush()


def plan_packs(lengths: Sequence[int], budget: int,
               lookahead: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Plan packs of sample indices under `budget` tokens.

    Returns `(packs, skipped)`: every index appears in exactly one pack, except the `skipped` ones
    (a single sample longer than the budget; the caller warns with the sample's name). Deterministic;
    `lookahead=None` uses the whole list as the window. Same packs as `iter_packs` with that lookahead.
    """
    skipped: list[int] = []
    packer = StreamingPacker(budget, lookahead, on_oversize=lambda i, n: skipped.append(i))
    packs = list(iter_packs(((i, n) for i, n in enumerate(lengths)), budget, lookahead, packer=packer))
    return packs, skipped


def plan_efficiency(lengths: Sequence[int], packs: Sequence[Sequence[int]], budget: int) -> float:
    """Efficiency of a plan: real tokens packed / (num_packs * budget)."""
    return packing_efficiency(sum(int(lengths[i]) for p in packs for i in p), len(packs), budget)
