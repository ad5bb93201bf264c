"""Hugging Face `datasets` source: dataset rows -> `ManifestRecord`s.

``read_hf_dataset(spec, columns=...)`` accepts

- a local Parquet file (``*.parquet``), loaded with ``datasets.load_dataset("parquet", ...)``
  (converted once into the datasets cache, then memory-mapped; ``cache_dir`` picks the cache),
- a local Arrow file (``*.arrow``), memory-mapped with ``Dataset.from_file`` (no copy),
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped),
- any other local directory of data files (``datasets.load_dataset(dir)``: its usual layout rules
  for Parquet/Arrow/JSON/CSV files and split names),
- a hub id (``org/name``), when the hub can be reached.

Columns (all names configurable, see `HFColumnNames`): the media column (``video`` and/or
``image``) holds per row a path string (relative paths are relative to ``media_root``, default: the
dataset's folder; the extension says image or video), raw bytes (the column says image or video),
or a ``{"bytes", "path"}`` struct as written by the ``datasets.Image`` / ``datasets.Video``
features. Bytes are never loaded up front: each row's bytes are read from the memory-mapped table
when the sample is decoded (PyAV / PIL read them from a BytesIO). The caption column holds a string
or a list of strings (several captions, one per epoch). Optional ``fps``, ``start_frame`` /
``end_frame``, ``start_time`` / ``end_time`` and ``width`` / ``height`` columns mean what the
manifest keys of the same name mean; a null cell is an absent key.

Every row problem is a `BadSampleError` whose message starts with ``<dataset>:row <i>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from cosmos_train.data.manifest import ManifestRecord, parse_record
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

_AUTO_MEDIA_COLUMNS = ("video", "image")
_OPTIONAL_KEYS = ("fps", "start_frame", "end_frame", "start_time", "end_time", "width", "height")


@dataclass
class HFColumnNames:
    """Column names (None: not used). Mirrors `config.schema.HFColumns`."""

    video: str | None = None
    image: str | None = None
    caption: str = "caption"
    fps: str | None = None
    start_frame: str | None = None
    end_frame: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    width: str | None = None
    height: str | None = None

    @classmethod
    def from_any(cls, columns: Any) -> "HFColumnNames":
        if columns is None:
            return cls()
        if isinstance(columns, cls):
            return columns
        if not isinstance(columns, Mapping):
            columns = {f.name: getattr(columns, f.name) for f in fields(cls) if hasattr(columns, f.name)}
        unknown = sorted(set(columns) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown column key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**dict(columns))


class HFTable:
    """A loaded dataset's rows, for reading single media cells lazily (picklable: the dataset
    pickles by file path when memory-mapped)."""

    def __init__(self, ds, label: str):
        self.ds = ds
        self.label = label
        self._table = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_table"] = None
        return state

    def _get_table(self):
        if self._table is None:
            if getattr(self.ds, "_indices", None) is None:
                self._table = self.ds.data  # datasets Table (memory-mapped or in memory), row i = row i
            else:
                self._table = self.ds.with_format("arrow")
        return self._table

    def column(self, name: str):
        """The whole column as an Arrow ChunkedArray (zero copy when memory-mapped)."""
        table = self._get_table()
        if hasattr(table, "column"):
            return table.column(name)
        return table.select_columns([name])[:][name]

    def cell(self, row: int, name: str):
        table = self._get_table()
        if hasattr(table, "column"):
            return table.column(name)[row].as_py()
        return table[row].column(name)[0].as_py()


class HFMedia:
    """In-memory media: one bytes cell of an `HFTable`, read when the sample is decoded."""

    def __init__(self, table: HFTable, row: int, column: str):
        self.table, self.row, self.column = table, row, column
        self.name = f"{table.label}:row {row} ({column})"

    def read(self) -> bytes:
        value = self.table.cell(self.row, self.column)
        if isinstance(value, dict):
            value = value.get("bytes")
        if value is None:
            raise BadSampleError(f"{self.name}: no media bytes in this cell", "undecodable")
        return bytes(value)

    def __repr__(self) -> str:
        return f"HFMedia({self.name!r})"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_LOCAL_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def _looks_local(spec: str) -> bool:
    """True for anything that is not shaped like a hub id (``name`` or ``org/name``)."""
    return not _HUB_ID.match(spec) or Path(spec).suffix.lower() in _LOCAL_SUFFIXES


def load_hf_dataset(spec: str, split: str = "train", subset: str | None = None, cache_dir: str | None = None):
    """-> (datasets.Dataset, default media root or None). Raises UserError naming the dataset."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise UserError("Hugging Face dataset sources need the `datasets` package (pip install datasets)") from None

    path = Path(os.path.expanduser(spec))
    what = f"hf_dataset {spec}"
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            root = str(path.parent.resolve())
            if suffix == ".arrow":
                return datasets.Dataset.from_file(str(path)), root
            builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(suffix)
            if builder is None:
                raise UserError(f"{what}: unsupported file type {suffix!r} (use .parquet, .arrow, .jsonl or .csv, "
                                "or a dataset directory)")
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir), root
        if path.is_dir():
            root = str(path.resolve())
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise UserError(f"{what}: no split {split!r} (splits: {', '.join(ds)})")
                    ds = ds[split]
                return ds, root
            return datasets.load_dataset(str(path), name=subset, split=split, cache_dir=cache_dir), root
        if _looks_local(spec):
            raise UserError(f"{what}: not found (no such file or directory: {path})")
        return datasets.load_dataset(spec, name=subset, split=split, cache_dir=cache_dir), None
    except UserError:
        raise
    except (ValueError, KeyError) as e:
        raise UserError(f"{what}: cannot load split {split!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - hub / IO problems: say which dataset
        hint = " (offline? set HF_HUB_OFFLINE=0 and check the id, or use a local copy)" if not path.exists() else ""
        raise UserError(f"{what}: cannot load ({type(e).__name__}: {e}){hint}") from None


def _arrow_kind(arr) -> str:
    """'string', 'binary', 'struct' (bytes/path), or 'other' for a ChunkedArray's type."""
    import pyarrow as pa

    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "binary"
    if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}:
        return "struct"
    return "other"


class _NotUTF8:
    """A string cell whose bytes are not UTF-8 (Arrow's JSON / CSV readers do not check): a bad row."""

    def __init__(self, err: UnicodeDecodeError):
        self.byte = err.object[err.start] if err.start < len(err.object) else None
        self.column = err.start + 1

    def error(self, source: str, column: str) -> BadSampleError:
        byte = f"byte 0x{self.byte:02x}" if self.byte is not None else "a byte"
        return BadSampleError(f"{source}: column {column!r} is not valid UTF-8 ({byte} at column {self.column})",
                              "bad_record")


def _to_pylist(arr) -> list:
    """`arr.to_pylist()`, with `_NotUTF8` for the cells whose strings are not valid UTF-8."""
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:
        out = []
        for scalar in arr:
            try:
                out.append(scalar.as_py())
            except UnicodeDecodeError as err:
                out.append(_NotUTF8(err))
        return out


def _media_column_info(table: HFTable, name: str):
    """-> (paths: list[str | None], has_bytes: list[bool]) without materializing the bytes."""
    import pyarrow.compute as pc

    arr = table.column(name)
    kind = _arrow_kind(arr)
    if kind == "string":
        return _to_pylist(arr), [False] * len(arr)
    if kind == "binary":
        return [None] * len(arr), pc.is_valid(arr).to_pylist()
    if kind == "struct":
        paths = _to_pylist(pc.struct_field(arr, "path"))
        has_bytes = pc.is_valid(pc.struct_field(arr, "bytes")).to_pylist()
        return paths, has_bytes
    raise UserError(f"hf_dataset {table.label}: column {name!r} has type {arr.type}; a media column holds "
                    "path strings, bytes, or {bytes, path} structs (datasets.Image / datasets.Video)")


def read_hf_dataset(
    spec: str,
    *,
    columns: Any = None,
    split: str = "train",
    subset: str | None = None,
    media_root: str | None = None,
    cache_dir: str | None = None,
    skip_bad: bool = False,
    counter: SkipCounter | None = None,
    name: str | None = None,
) -> list[ManifestRecord]:
    """Rows of a Hugging Face dataset -> `ManifestRecord`s (see the module docstring).

    Like `read_manifest`: with ``skip_bad`` bad rows are counted in `counter` and dropped,
    otherwise the first raises `BadSampleError` (``<dataset>:row <i>: ...``); an empty dataset or
    one whose rows are all bad raises `UserError`.
    """
    cols = HFColumnNames.from_any(columns)
    label = name or spec
    counter = counter if counter is not None else SkipCounter()
    ds, default_root = load_hf_dataset(spec, split=split, subset=subset, cache_dir=cache_dir)
    table = HFTable(ds, label)
    available = list(ds.column_names)

    media_cols = [c for c in (cols.video, cols.image) if c]
    if not media_cols:
        media_cols = [c for c in _AUTO_MEDIA_COLUMNS if c in available]
        if not media_cols:
            raise UserError(f"hf_dataset {label}: no media column: set columns.video or columns.image "
                            f"(columns: {', '.join(available)})")
        is_image_col = {c: c == "image" for c in media_cols}
    else:
        is_image_col = {c: c == cols.image and c != cols.video for c in media_cols}
    wanted = {"caption": cols.caption, **{k: getattr(cols, k) for k in _OPTIONAL_KEYS}}
    for key, col in [*((f"columns.{k}", v) for k, v in wanted.items()), *(("media", c) for c in media_cols)]:
        if col and col not in available:
            raise UserError(f"hf_dataset {label}: no column {col!r} ({key}); columns: {', '.join(available)}")

    n = len(ds)
    if n == 0:
        raise UserError(f"hf_dataset {label} has no rows")
    media_info = {c: _media_column_info(table, c) for c in media_cols}
    values = {k: _to_pylist(table.column(c)) for k, c in wanted.items() if c}
    if media_root is not None:
        root = Path(os.path.expanduser(media_root)).resolve()
    elif default_root is not None:
        root = Path(default_root)
    else:
        root = Path.cwd()

    records: list[ManifestRecord] = []
    for row in range(n):
        source = f"{label}:row {row}"
        try:
            media = media_col = raw_path = None
            for c in media_cols:
                paths, has_bytes = media_info[c]
                if isinstance(paths[row], _NotUTF8):
                    raise paths[row].error(source, c)
                if has_bytes[row]:
                    media_col, media = c, HFMedia(table, row, c)
                    raw_path = paths[row] or f"{label}:row {row} ({c})"
                    break
                if paths[row]:
                    media_col, raw_path = c, paths[row]
                    break
            if media_col is None:
                raise BadSampleError(f"{source}: no media (column(s) {', '.join(media_cols)} are empty)",
                                     "missing_file")
            obj: dict[str, Any] = {"path": raw_path}
            for key, vals in values.items():
                v = vals[row]
                if v is None:
                    continue
                if isinstance(v, _NotUTF8):
                    raise v.error(source, wanted[key])
                if key == "caption":
                    obj["captions" if isinstance(v, (list, tuple)) else "caption"] = list(v) if isinstance(
                        v, (list, tuple)) else v
                else:
                    obj[key] = v
            records.append(parse_record(obj, root, source, dataset=label, media=media,
                                        media_is_image=is_image_col[media_col]))
        except BadSampleError as e:
            if not skip_bad:
                raise
            counter.add(e.reason, source, str(e))
    if not records:
        raise UserError(f"hf_dataset {label}: all {n} rows are bad\n{counter.summary()}")
    return records
