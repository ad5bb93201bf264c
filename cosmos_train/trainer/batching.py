"""Sample stream -> micro-batches: `train.batch_size` samples, or one token-budget pack.

Owns the bookkeeping a resumed run needs: how many samples this rank consumed, which sources proved
bad (counted once, not once per epoch), and the drawn samples still waiting in the packer's window.
"""

from __future__ import annotations

import dataclasses
import warnings


from cosmos_train.data import DecodeLog
from cosmos_train.data.dataset import check_marker, close_loader_workers, is_marker
from cosmos_train.data.packing import StreamingPacker
from cosmos_train.errors import UserError


class MicroBatcher:
    def __init__(self, stream, encode, objective, cfg, skips, reachable: set[str], consumed: int = 0,
                 skipped_sources: set[str] | None = None, keys=None, redraw=None, position=None):
        self.stream, self.encode, self.objective = stream, encode, objective
        # redraw(key) -> the same drawn sample again (draws are keyed): checkpoints then store the keys of the
        # samples waiting in the packer instead of their tensors
        self.redraw = redraw
        self._key_of: dict[int, tuple] = {}
        # The sampler's keys in stream order (a DataLoader keeps its sampler's order): each sample's randomness
        # is drawn from its own key, not from the rank's stream (results independent of the process count).
        self.keys = keys
        self.cfg, self.skips, self.reachable = cfg, skips, reachable
        self.consumed = consumed  # samples drawn from the stream by this process
        # position(drawn) -> the sampler's place as a checkpoint stores it ({"consumed", "prefix"}); None: consumed
        self.position = position
        self.skipped_sources = skipped_sources or set()
        self.decode_log = DecodeLog()  # what decoding did to each source's fps / length / size
        packing = cfg.train.packing
        self.packer = (StreamingPacker(packing.max_tokens, packing.lookahead, on_oversize=self._oversize)
                       if packing.enabled else None)

    def _unusable(self, source: str, reason: str, message: str) -> None:
        if source not in self.skipped_sources:  # count each bad sample once, not once per epoch
            self.skipped_sources.add(source)
            self.skips.add(reason, source, message)
        if self.reachable <= self.skipped_sources:
            self.close()
            raise UserError(f"every sample in {self.cfg.data.manifest} is unusable:\n{self.skips.summary()}")

    def _oversize(self, item, length: int) -> None:
        message = (f"{item.source}: {length} tokens exceed train.packing.max_tokens={self.packer.budget}; "
                   "skipped (raise the budget or lower the resolution / frame count)")
        if item.source not in self.skipped_sources:
            warnings.warn(message, stacklevel=2)
        self._unusable(item.source, "over_token_budget", message)

    def _next_drawn(self):
        while True:
            sample = next(self.stream)
            key = next(self.keys) if self.keys is not None else None
            self.consumed += 1
            if is_marker(sample):  # a bad sample met by the dataset (in a loader worker or here)
                if not sample.get("skip", True):
                    self.close()
                check_marker(sample)  # raises it as a clean error unless data.skip_bad_samples
                self._unusable(sample["source"], sample["skipped"], sample["message"])
                continue
            if isinstance(sample, dict):
                self.decode_log.add(sample.get("decode"))
            encoded = self.encode(sample)
            if key is None:
                return self.objective.draw(encoded)
            item = self.objective.draw(encoded, key)
            self._key_of[id(item)] = tuple(int(k) for k in key)
            return item

    def close(self) -> None:
        """Stop the stream's loader workers (when it has any); done before this batcher raises."""
        close_loader_workers(self.stream)

    def next(self) -> list:
        if self.packer is None:
            return [self._next_drawn() for _ in range(self.cfg.train.batch_size)]
        while not self.packer.ready():
            item = self._next_drawn()
            self.packer.add(item, self.objective.token_count(item))
        pack = self.packer.pop_pack()
        for item in pack or []:
            self._key_of.pop(id(item), None)
        return pack

    # ---- checkpoint state ------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """This rank's position: samples consumed and the samples still buffered for packing, as their sampler
        keys (re-drawn identically on resume) -- their tensors only when no key is known."""
        pending = []
        for order, item, length in ([] if self.packer is None else self.packer.pending()):
            key = self._key_of.get(id(item)) if self.redraw is not None else None
            pending.append({"order": order, "length": length, "key": list(key)} if key is not None else
                           {"order": order, "length": length, "item": dataclasses.asdict(item)})
        place = self.position(self.consumed) if self.position is not None else {"consumed": self.consumed}
        return {**place, "pending": pending}

    def load_rank_state(self, state: dict) -> None:
        """The samples waiting in the packer (the sampler's position is restored by the sampler itself)."""
        if self.position is None:
            self.consumed = state["consumed"]
        if self.packer is not None:
            restore = self.objective.restore_item  # dict (as saved) -> the objective's drawn-sample type
            entries = []
            for e in state["pending"]:
                if "key" in e:
                    if self.redraw is None:
                        raise ValueError("a checkpoint with pending sample keys needs a batcher that can redraw")
                    from cosmos_train.data.buckets import SampleKey

                    key = SampleKey(*e["key"])
                    item = self.redraw(key)
                    self._key_of[id(item)] = tuple(e["key"])
                else:  # older checkpoints stored the drawn tensors
                    item = restore(e["item"])
                entries.append((e["order"], item, e["length"]))
            self.packer.restore(entries)

    @staticmethod
    def tokens(batch, objective) -> int:
        return sum(objective.token_count(item) for item in batch)
