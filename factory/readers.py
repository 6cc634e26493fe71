"""Reading a source lazily, in chunks of raw records: JSONL (plain or gzip, with byte offsets to seek
past finished chunks), parquet files and folders, ``save_to_disk`` folders, Hub datasets in
streaming mode, and queries over the store. What the records mean (prompts, pairs) and how they are
validated is :mod:`factory.sources`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .store import content_key

FILE_SUFFIXES = {".jsonl", ".json", ".gz", ".parquet", ".ndjson"}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
BLOCK = 1 << 20  # bytes read (after decompression) at a time


def parse_size(text: str, what: str = "FACTORY_MAX_LINE_BYTES") -> int:
    """``"8MiB"``, ``"16MB"``, ``"65536"`` → bytes (binary units: MB = MiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or int(m.group(1)) < 1:
        raise SourceError(f"{what}={text!r} is not a size; write e.g. 8MiB, 512KiB or a number of bytes")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def max_line_bytes() -> int:
    """The longest JSONL line read (its ending included): 8 MiB, or ``FACTORY_MAX_LINE_BYTES``. A longer line
    is never held in memory whole: it is counted while it is read past and becomes a skip."""
    return parse_size(os.environ.get("FACTORY_MAX_LINE_BYTES", "8MiB"))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


class _Long(int):
    """A line longer than the cap: only its size in bytes (ending included) is kept."""


def _split_nl(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    last = parts.pop()
    out = [p + b"\n" for p in parts]
    if last:
        out.append(last)
    return out


def line_ends(head: bytes) -> str:
    """``"cr"`` when the first line of ``head`` ends with a lone ``\\r`` (old Mac files: every ``\\r``, ``\\n`` and
    ``\\r\\n`` then ends a line), else ``"nl"`` (lines end at ``\\n``; a ``\\r`` before it is stripped, one
    elsewhere is part of the line)."""
    r, n = head.find(b"\r"), head.find(b"\n")
    return "cr" if r != -1 and (n == -1 or r < n) and head[r + 1:r + 2] != b"\n" else "nl"


def bounded_lines(fh, cap: int, block: int = BLOCK, ends: str = "cr"):
    """The lines of a binary stream, each with its ending, read in blocks of ``block`` bytes (``ends``: see
    :func:`line_ends`): a line longer than ``cap`` bytes is yielded as :class:`_Long` (its size) and never
    held past ``cap + block`` bytes, so a decompressed stream costs at most that much however long its
    lines are."""
    split = _split_nl if ends == "nl" else (lambda data: data.splitlines(True))
    carry, dropped = b"", 0  # carry: the start of a line not yet ended; dropped: bytes of an over-long line read past
    while True:
        new = fh.read(block)
        if not new:
            if dropped or len(carry) > cap:
                yield _Long(dropped + len(carry))
            elif carry:
                yield carry
            return
        parts = split(carry + new if carry else new)
        # the last part is unfinished unless it ends with \n (a final \r may be half of \r\n)
        carry = b"" if parts[-1].endswith(b"\n") else parts.pop()
        if parts and dropped:
            yield _Long(dropped + len(parts[0]))
            dropped = 0
            parts = parts[1:]
        for line in parts:
            yield line if len(line) <= cap else _Long(len(line))
        if len(carry) > cap or (dropped and carry):
            cr = carry.endswith(b"\r")  # keep a final \r: it may end the line, or start its \r\n
            dropped += len(carry) - cr
            carry = b"\r" if cr else b""


class SourceError(Exception):
    """A source that cannot be read at all, with what to pass instead."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A path that does not exist (also catchable as ``FileNotFoundError``)."""


@dataclass
class Skip:
    row: int | None
    reason: str
    source: str


def _looks_like_path(spec: str | Path) -> bool:
    if isinstance(spec, Path):
        return True
    return spec.startswith(("/", ".", "~")) or any(spec.endswith(s) for s in FILE_SUFFIXES)


class Reader:
    """A source read lazily in chunks of ``chunk_size`` raw records (JSONL lines, parquet rows,
    dataset records). Chunk ``i`` always covers the same raw records of an unchanged input, so a
    restart can skip finished chunks (``done``: chunk index → the meta recorded when it finished)
    without decoding them: a JSONL file seeks past the longest finished prefix, a saved dataset
    slices, parquet skips whole batches. ``fingerprint`` identifies the input's content version
    (path, size, mtime); ``progress`` is the share read so far (None when unknown)."""

    def __init__(self, source: str, fingerprint: str | None):
        self.source = source
        self.fingerprint = fingerprint
        self.progress: float | None = 0.0

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        raise NotImplementedError


@dataclass
class InputChunk:
    index: int
    records: list[tuple[int, Any]]  # (row, decoded record)
    skips: list[Skip]  # rows of this chunk that could not even be decoded
    meta: dict  # where it lies in the input (byte offsets / rows), for skipping it on restart


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return content_key(str(path.resolve()), st.st_size, st.st_mtime_ns)


class _JsonlReader(Reader):
    def __init__(self, path: Path):
        super().__init__(f"{path} (row = 1-based line number)", _fingerprint(path))
        self.path = path
        self.size = path.stat().st_size
        self.cap = max_line_bytes()

    def _decode(self, lineno: int, raw: bytes, skips: list[Skip]) -> Any:
        if isinstance(raw, _Long):
            skips.append(Skip(lineno, f"line {lineno}: longer than the {_mib(self.cap)} line cap ({_mib(raw)}); "
                                      "split the record, or raise FACTORY_MAX_LINE_BYTES (e.g. 64MiB)", self.source))
            return None
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first row
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.append(Skip(lineno, f"line {lineno}: not valid UTF-8 (byte offset {e.start} "
                                      "in the line); re-encode the file as UTF-8", self.source))
            return None
        if not line.strip():
            return None
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            skips.append(Skip(lineno, f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})", self.source))
            return None
        except RecursionError:  # Python's own limit bounds the nesting json.loads follows (about 1,000 levels)
            skips.append(Skip(lineno, f"line {lineno}: JSON nested too deeply to read; flatten the record", self.source))
            return None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            skips.append(Skip(lineno, f"line {lineno}: invalid JSON: {str(e)[:200]}", self.source))
            return None
        if not isinstance(obj, dict):
            skips.append(Skip(lineno, f"line {lineno}: expected a JSON object, got {type(obj).__name__}", self.source))
            return None
        return obj

    def _damaged(self, lineno: int, e: BaseException) -> SourceError:
        return SourceError(f"{self.path}: cannot read past line {lineno} ({type(e).__name__}: {e}); the file is "
                           "truncated or corrupted: repair or re-download it (everything read before this point is "
                           "kept; rerun to resume)")

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        done = done or {}
        gz = self.path.suffix == ".gz"
        index, lineno, offset = 0, 0, 0
        while index in done and "end" in done[index]:  # the longest finished prefix: seek past it
            offset, lineno = done[index]["end"], done[index]["last"]
            index += 1
        with (gzip.open if gz else open)(self.path, "rb") as fh:
            try:
                ends = line_ends(fh.read(BLOCK))  # the file's convention, from its first line
                fh.seek(offset)
            except (EOFError, OSError, zlib.error) as e:
                raise self._damaged(lineno, e) from None
            stream = bounded_lines(fh, self.cap, ends=ends)
            raw_size = self.size
            while True:
                start, first = offset, lineno + 1
                lines = []
                try:
                    for raw in stream:
                        lineno += 1
                        offset += raw if isinstance(raw, _Long) else len(raw)
                        lines.append(raw)
                        if len(lines) == chunk_size:
                            break
                except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
                    raise self._damaged(lineno, e) from None
                if not lines:
                    self.progress = 1.0
                    return
                if not gz:
                    self.progress = min(offset / raw_size, 1.0) if raw_size else 1.0
                meta = {"start": start, "end": offset, "first": first, "last": lineno}
                if index not in done:
                    skips: list[Skip] = []
                    recs = [(first + i, obj) for i, raw in enumerate(lines)
                            if (obj := self._decode(first + i, raw, skips)) is not None]
                    yield InputChunk(index, recs, skips, meta)
                index += 1


class _ParquetReader(Reader):
    def __init__(self, path: Path, files: list[str]):
        super().__init__(f"{path} (row = 0-based record index)",
                         content_key([_fingerprint(Path(f)) for f in files]))
        try:
            self.files = [pq.ParquetFile(f) for f in files]
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise SourceError(f"cannot read parquet {path}: {e}") from e
        self.total = sum(f.metadata.num_rows for f in self.files)

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        done = done or {}
        index, row = 0, 0
        try:
            for f in self.files:
                for batch in f.iter_batches(batch_size=chunk_size):
                    n = batch.num_rows
                    if index not in done:
                        yield InputChunk(index, list(enumerate(batch.to_pylist(), start=row)), [],
                                         {"first": row, "last": row + n - 1})
                    index, row = index + 1, row + n
                    self.progress = row / self.total if self.total else 1.0
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read parquet {self.source.split(' (')[0]}: {e}; the file is truncated or "
                              "corrupted (rows before this point are kept)") from e


class _DatasetReader(Reader):
    """A ``datasets.Dataset`` (from ``save_to_disk``: random access) or an ``IterableDataset``
    (a Hub dataset in streaming mode: read in order, finished chunks skipped without decoding)."""

    def __init__(self, source: str, ds: Any, fingerprint: str | None):
        super().__init__(source, fingerprint)
        self.ds = ds
        try:
            self.total = len(ds)
        except TypeError:
            self.total = None
            self.progress = None

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        done = done or {}
        if self.total is not None:  # random access: slice only the chunks still to do
            for index, row in enumerate(range(0, self.total, chunk_size)):
                if index not in done:
                    part = self.ds[row:row + chunk_size]
                    if isinstance(part, dict):  # a Dataset slice is columnar
                        part = [dict(zip(part, vals)) for vals in zip(*part.values())]
                    recs = list(part)
                    yield InputChunk(index, list(enumerate(recs, start=row)), [], {"first": row})
                self.progress = min(row + chunk_size, self.total) / self.total if self.total else 1.0
            return
        index, buf, row = 0, [], 0
        for rec in self.ds:
            buf.append((row, rec))
            row += 1
            if len(buf) == chunk_size:
                if index not in done:
                    yield InputChunk(index, buf, [], {"first": buf[0][0]})
                index, buf = index + 1, []
        if buf and index not in done:
            yield InputChunk(index, buf, [], {"first": buf[0][0]})


class SqlReader(Reader):
    """Rows of a query over the store, read through a cursor of their own while the run writes with
    the main connection (DuckDB allows this within one process). Rows are ``(row number, tuple)``; the
    query must order its rows deterministically so chunk ``i`` is the same on a restart."""

    def __init__(self, store: Any, sql: str, source: str, params: list | None = None):
        super().__init__(source, None)
        self.store, self.sql, self.params = store, sql, params or []
        self.progress = None

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        done = done or {}
        with self.store.cursor() as cur:
            res = cur.execute(self.sql, self.params)
            index, row = 0, 0
            while batch := res.fetchmany(chunk_size):
                if index not in done:
                    yield InputChunk(index, list(enumerate(batch, start=row)), [], {"first": row})
                index, row = index + 1, row + len(batch)


def check_local(spec: str | Path, what: str) -> None:
    """Raise :class:`SourceNotFoundError` when ``spec`` names a local file or folder that is not there
    (anything else is taken for a Hugging Face dataset name). Pipelines call it when they are loaded,
    so `factory validate` and `factory run` say so before an engine starts."""
    if _looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise SourceNotFoundError(f"{what} file not found: {Path(spec).expanduser()}; pass an existing JSONL(.gz) or "
                                  "parquet file, a folder saved with Dataset.save_to_disk, or a Hugging Face dataset name")


def open_source(spec: str | Path, split: str, data_dir: str | None, what: str) -> Reader:
    """Resolve ``spec`` (module docstring) into a :class:`Reader`; a source that cannot be read at
    all raises :class:`SourceError`."""
    check_local(spec, what)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            return _from_disk(path, split)
        if path.is_dir():
            files = sorted(str(f) for f in path.rglob("*.parquet"))
        else:
            files = [str(path)] if path.suffix == ".parquet" else []
        if files:  # a folder is read file by file in sorted order, ignoring non-parquet files
            return _ParquetReader(path, files)
        if path.is_dir():
            raise SourceError(f"{path} is a folder with neither parquet files nor a save_to_disk dataset; "
                              f"pass a JSONL file, a parquet file/folder or a saved dataset of {what}")
        return _JsonlReader(path)
    try:
        import datasets

        ds = datasets.load_dataset(str(spec), data_dir=data_dir, split=split, streaming=True)
    except Exception as e:
        raise SourceError(f"could not load Hugging Face dataset {spec!r} (data_dir={data_dir!r}, split={split!r}): "
                          f"{e}; if you meant a local file, check the path") from e
    return _DatasetReader(f"hf:{spec}[{split}] (row = 0-based record index)", ds, None)


def _from_disk(path: Path, split: str) -> Reader:
    try:
        import datasets

        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SourceError(f"could not load saved dataset {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"saved dataset {path} has no split {split!r}; pass split= one of {sorted(ds)}")
        ds = ds[split]
    return _DatasetReader(f"{path}[{split}] (row = 0-based record index)", ds, _fingerprint(path))


