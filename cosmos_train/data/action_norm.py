"""Action (and state) normalization: one affine map per channel, its statistics, and its JSON form.

Cosmos 3 has no normalization anywhere at inference (diffusers feeds raw actions to the model and
returns the model's outputs as they are), so whatever training applied must travel with the run and
every export and be applied around the pipeline: `ActionNormalizer.to_dict()` is that record.

Methods (per channel; ``x`` is one raw value):

- ``quantile``: q01..q99 -> -1..1, i.e. ``(x - (q01 + q99) / 2) / ((q99 - q01) / 2)``; values outside
  the 1-99% range go past +-1 unless ``clamp`` is set (the official trainer's default for LIBERO/DROID).
- ``mean_std``: ``(x - mean) / std``.
- ``min_max``: min..max -> -1..1.
- ``none``: identity.

A channel whose spread is 0 (constant data: q01 == q99, std == 0, min == max) is only centred (its
scale is 1), so it maps to 0 rather than to inf/NaN. ``clamp`` limits normalized values to
``[-clamp, clamp]``; `denormalize` never clamps, so ``denormalize(normalize(x)) == x`` (to float
precision) wherever ``normalize`` did not clamp.

Statistics come from a LeRobot ``meta/stats.json`` (`from_stats`: per key ``{min, max, mean, std, count,
q01, q10, q50, q90, q99}`` as lists) or from the data itself (`compute`). Several keys are concatenated
in the given order (``D = sum of their widths``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from cosmos_train.errors import UserError

NORMALIZATION_METHODS = ("none", "quantile", "mean_std", "min_max")
# the statistics each method needs (lower, upper) / (centre, spread)
_NEEDS = {"none": (), "quantile": ("q01", "q99"), "mean_std": ("mean", "std"), "min_max": ("min", "max")}
STAT_NAMES = ("min", "max", "mean", "std", "q01", "q10", "q50", "q90", "q99")
_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
_EPS = 1e-8
FORMAT = "cosmos_train.action_norm/1"


def _as_vector(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: not a list of numbers ({e})") from None
    return arr


def compute_stats(x: np.ndarray) -> dict[str, list[float]]:
    """LeRobot-style statistics of rows ``x`` [N, D] (rows with a non-finite value are left out):
    min, max, mean, std (population), count, q01, q10, q50, q90, q99 (exact quantiles, linear)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) == 0:
        raise UserError("cannot compute statistics: no finite rows")
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    qs = np.quantile(x, list(_QUANTILES.values()), axis=0)
    out.update({name: qs[i] for i, name in enumerate(_QUANTILES)})
    result = {k: [float(v) for v in vals] for k, vals in out.items()}
    result["count"] = [int(len(x))]
    return result


class ActionNormalizer:
    """Per-channel affine normalization of concatenated feature keys (see module docstring).

    Attributes: ``method``, ``keys`` (feature names, concatenated in this order), ``widths`` (per key),
    ``clamp`` (None or a bound), ``stats`` (per key, the statistics that define the map, as lists),
    ``source`` (where the statistics came from, for records), ``center`` / ``scale`` (float64 [D]).
    """

    def __init__(self, method: str, keys: Sequence[str], widths: Sequence[int],
                 stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None, clamp: float | None = None,
                 source: str | None = None):
        if method not in NORMALIZATION_METHODS:
            raise UserError(f"unknown action normalization {method!r} (one of {', '.join(NORMALIZATION_METHODS)})")
        if clamp is not None and not (math.isfinite(clamp) and clamp > 0):
            raise UserError(f"action normalization clamp must be a number > 0, got {clamp!r}")
        if len(keys) != len(widths) or not keys:
            raise ValueError(f"keys {list(keys)} and widths {list(widths)} must be non-empty and of equal length")
        self.method = method
        self.keys = list(keys)
        self.widths = [int(w) for w in widths]
        self.clamp = None if clamp is None else float(clamp)
        self.source = source
        stats = stats or {}
        self.stats: dict[str, dict[str, list[float]]] = {}
        centers, scales = [], []
        for key, width in zip(self.keys, self.widths):
            s = {name: _as_vector(stats[key][name], f"{source or 'stats'}: '{key}' {name}").tolist()
                 for name in _NEEDS[method]} if _NEEDS[method] else {}
            self.stats[key] = s
            if method == "none":
                c, h = np.zeros(width), np.ones(width)
            else:
                a, b = (np.asarray(s[n], dtype=np.float64) for n in _NEEDS[method])
                if method == "mean_std":
                    c, h = a, b.copy()
                else:
                    c, h = (a + b) / 2.0, (b - a) / 2.0
            h = np.where(np.abs(h) < _EPS, 1.0, h)
            centers.append(c)
            scales.append(h)
        self.center = np.concatenate(centers)
        self.scale = np.concatenate(scales)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_stats(cls, stats: Mapping, keys: Sequence[str], method: str, clamp: float | None = None, *,
                   widths: Sequence[int] | None = None, name: str = "stats") -> "ActionNormalizer":
        """From LeRobot ``meta/stats.json`` content (``{key: {min: [...], max: [...], q01: [...], ...}}``).
        ``widths`` (per key) are checked against the statistics; ``name`` (e.g. the dataset) goes into
        error messages. Missing keys / statistics and non-finite values are `UserError`s naming the key."""
        if method not in NORMALIZATION_METHODS:
            raise UserError(f"unknown action normalization {method!r} (one of {', '.join(NORMALIZATION_METHODS)})")
        found_widths = []
        for i, key in enumerate(keys):
            if method == "none":
                if widths is not None:
                    found_widths.append(int(widths[i]))
                    continue
                if key not in stats:
                    raise UserError(f"{name}: no statistics for '{key}' (needed for its width); pass widths")
            if key not in stats or not isinstance(stats[key], Mapping):
                have = ", ".join(map(str, stats)) or "none"
                raise UserError(f"{name}: no statistics for '{key}' (stats have: {have})")
            entry = stats[key]
            needs = _NEEDS[method] or tuple(n for n in ("min", "mean", "max") if n in entry)[:1]
            missing = [n for n in needs if n not in entry]
            if missing:
                hint = ("; datasets written by LeRobot before quantile statistics existed lack them: set "
                        "action.stats: computed" if method == "quantile" else "")
                raise UserError(f"{name}: statistics of '{key}' have no {', '.join(missing)} (needed for "
                                f"{method} normalization; they have {', '.join(entry)}){hint}")
            sizes = set()
            for n in needs:
                v = _as_vector(entry[n], f"{name}: statistics of '{key}' {n}")
                bad = np.flatnonzero(~np.isfinite(v))
                if bad.size:
                    raise UserError(f"{name}: statistics of '{key}' {n} are not finite at channel(s) "
                                    f"{bad.tolist()}: {v.tolist()}")
                sizes.add(v.size)
            if len(sizes) != 1:
                raise UserError(f"{name}: statistics of '{key}' have different widths {sorted(sizes)}")
            width = sizes.pop()
            if widths is not None and int(widths[i]) != width:
                raise UserError(f"{name}: statistics of '{key}' have width {width}, the data has {widths[i]}")
            found_widths.append(width)
        return cls(method, keys, found_widths, stats=stats, clamp=clamp, source=name)

    @classmethod
    def compute(cls, source, keys: Sequence[str], method: str, clamp: float | None = None, *,
                episodes: Sequence[int] | None = None, name: str | None = None) -> "ActionNormalizer":
        """Statistics computed from the data itself (what ``action.stats: computed`` and `prepare` use).

        ``source``: a LeRobot dataset directory (its rows of ``keys``; ``episodes`` selects episodes, e.g.
        the training split), or arrays: ``{key: [N, D_key]}`` (or one [N, D] array for a single key).
        Rows with a non-finite value are left out."""
        if isinstance(source, (str, os.PathLike)):
            from cosmos_train.data.lerobot import LeRobotSource

            src = LeRobotSource(source)
            columns = src.read_columns(keys, episodes=episodes)
            arrays = {k: np.concatenate([columns[e][k] for e in columns]) if columns else np.zeros((0, src.width(k)))
                      for k in keys}
            name = name or src.name
            n_eps = len(columns)
            where = f"{name} ({n_eps} episode{'s' if n_eps != 1 else ''})"
        else:
            if not isinstance(source, Mapping):
                if len(keys) != 1:
                    raise ValueError("one array given for several keys: pass {key: array}")
                source = {keys[0]: source}
            arrays = {k: np.asarray(source[k], dtype=np.float64) for k in keys}
            where = name or "arrays"
        stats, widths = {}, []
        for k in keys:
            x = arrays[k]
            x = x.reshape(len(x), -1) if x.ndim != 1 else x[:, None]
            widths.append(x.shape[1])
            if method == "none":
                continue
            try:
                stats[k] = compute_stats(x)
            except UserError:
                raise UserError(f"{where}: cannot compute statistics of '{k}': no finite rows") from None
        return cls(method, keys, widths, stats=stats, clamp=clamp, source=f"computed from {where}")

    # ---- the map -----------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return int(sum(self.widths))

    def _params(self, x):
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (torch.as_tensor(self.center, dtype=dtype, device=x.device),
                    torch.as_tensor(self.scale, dtype=dtype, device=x.device), dtype)
        dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32
        return self.center.astype(dtype), self.scale.astype(dtype), dtype

    def _check_width(self, x) -> None:
        if x.shape[-1] != self.width:
            parts = ", ".join(f"{k}:{w}" for k, w in zip(self.keys, self.widths))
            raise ValueError(f"expected {self.width} channels ({parts}), got shape {tuple(x.shape)}")

    def normalize(self, x):
        """Raw -> normalized (then clamped when ``clamp`` is set). Tensor in, tensor out (same device;
        float dtype kept); ndarray in, ndarray out. The last dimension is the channel."""
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        self._check_width(x)
        c, s, dtype = self._params(x)
        y = (x.to(dtype) - c) / s if isinstance(x, torch.Tensor) else (x.astype(dtype) - c) / s
        if self.clamp is not None:
            y = y.clamp(-self.clamp, self.clamp) if isinstance(y, torch.Tensor) else np.clip(y, -self.clamp, self.clamp)
        return y

    def denormalize(self, x):
        """Normalized -> raw (no clamping)."""
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        self._check_width(x)
        c, s, dtype = self._params(x)
        return x.to(dtype) * s + c if isinstance(x, torch.Tensor) else x.astype(dtype) * s + c

    # ---- records -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able record (stored with the run and in every export)."""
        return {"format": FORMAT, "method": self.method, "clamp": self.clamp, "keys": list(self.keys),
                "widths": list(self.widths), "stats": {k: dict(v) for k, v in self.stats.items()},
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ActionNormalizer":
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise UserError(f"action normalization record has format {fmt!r}; this version reads {FORMAT!r}")
        return cls(d["method"], d["keys"], d["widths"], stats=d.get("stats") or {}, clamp=d.get("clamp"),
                   source=d.get("source"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActionNormalizer":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return (f"ActionNormalizer(method={self.method!r}, keys={self.keys}, widths={self.widths}, "
                f"clamp={self.clamp})")
