"""Counting of skipped (bad) samples, so a run can say what it dropped and where."""

from __future__ import annotations

from collections import Counter


class SkipCounter:
    """Counts skipped samples per `BadSampleError.reason` and remembers the first few of each.

    Note: a DataLoader with ``num_workers > 0`` gives each worker process its own copy of the
    dataset (and of its counter); counts made there are not seen by the main process.
    """

    def __init__(self, keep_examples: int = 5):
        self.keep_examples = keep_examples
        self.by_reason: dict[str, int] = {}
        # reason -> [(source, message), ...] (first `keep_examples` only)
        self.examples: dict[str, list[tuple[str, str]]] = {}

    def add(self, reason: str, source: str, message: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.keep_examples:
            examples.append((source, message))

    def merge(self, other: "SkipCounter") -> None:
        """Add another counter's counts (e.g. manifest skips + dataset skips)."""
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
            examples = self.examples.setdefault(reason, [])
            for ex in other.examples.get(reason, []):
                if len(examples) < self.keep_examples:
                    examples.append(ex)

    def state_dict(self) -> dict:
        return {"by_reason": dict(self.by_reason), "examples": {k: [list(e) for e in v] for k, v in self.examples.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.by_reason = dict(state.get("by_reason", {}))
        self.examples = {k: [tuple(e) for e in v] for k, v in state.get("examples", {}).items()}

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:  # a counter is "truthy" only once something was skipped
        return self.total > 0

    def summary(self) -> str:
        """Multi-line human summary: total, then per reason (most frequent first) count, first sources
        and the first message."""
        if self.total == 0:
            return "no samples skipped"
        lines = [f"skipped {self.total} bad sample{'s' if self.total != 1 else ''}:"]
        for reason, n in sorted(Counter(self.by_reason).items(), key=lambda kv: (-kv[1], kv[0])):
            examples = self.examples.get(reason, [])
            sources = ", ".join(src for src, _ in examples)
            more = f", ... ({n - len(examples)} more)" if n > len(examples) else ""
            lines.append(f"  {reason}: {n}  [{sources}{more}]")
            if examples:
                lines.append(f"    e.g. {examples[0][1]}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, by_reason={self.by_reason!r})"
