"""Reading user data into the factory: prompts and preference pairs, as pyarrow tables.

Every reader returns ``(table, skips)``. A record that cannot be used is never dropped silently:
it becomes a :class:`Skip` naming the row and what to fix. Only problems with the source as a
whole (missing file, dataset that will not load) raise :class:`SourceError`.

Row numbers: for JSONL files ``row`` is the 1-based line number (blank lines count as lines, so
it matches an editor); for Parquet files and Hugging Face datasets it is the 0-based record
index. ``Skip.source`` says which.

A spec is resolved in this order: an existing ``.parquet`` file or folder of parquet files is read
with pyarrow (no ``datasets`` cache needed); a folder written by ``Dataset.save_to_disk`` goes to
``datasets.load_from_disk``; any other existing file is read as JSONL (``.gz`` decompressed); a
spec that looks like a path (a ``Path``, a file suffix, or starting with ``/ . ~``) but does not
exist raises; anything else is a Hugging Face dataset name for ``datasets.load_dataset``.
"""

from __future__ import annotations

import gzip
import zlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa

from .store import content_key
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = {".jsonl", ".json", ".gz", ".parquet", ".ndjson"}


class SourceError(Exception):
    """A source that cannot be read at all, with what to pass instead."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A path that does not exist (also catchable as ``FileNotFoundError``)."""


@dataclass
class Skip:
    row: int | None
    reason: str
    source: str


content_hash = content_key  # one content-key scheme for the whole factory (factory.store)


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

    def _decode(self, lineno: int, raw: bytes, skips: list[Skip]) -> Any:
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
        if not isinstance(obj, dict):
            skips.append(Skip(lineno, f"line {lineno}: expected a JSON object, got {type(obj).__name__}", self.source))
            return None
        return obj

    def chunks(self, chunk_size: int, done: dict[int, dict] | None = None) -> Iterator[InputChunk]:
        done = done or {}
        gz = self.path.suffix == ".gz"
        index, lineno, offset = 0, 0, 0
        while index in done and "end" in done[index]:  # the longest finished prefix: seek past it
            offset, lineno = done[index]["end"], done[index]["last"]
            index += 1
        with (gzip.open if gz else open)(self.path, "rb") as fh:
            if offset:
                fh.seek(offset)
            raw_size = self.size
            while True:
                start, first = offset, lineno + 1
                lines = []
                try:
                    for raw in fh:
                        lineno += 1
                        offset += len(raw)
                        lines.append(raw)
                        if len(lines) == chunk_size:
                            break
                except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
                    raise SourceError(f"{self.path}: cannot read past line {lineno} ({type(e).__name__}: {e}); the "
                                      "file is truncated or corrupted: repair or re-download it (everything read "
                                      "before this point is kept; rerun to resume)") from None
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
        cur = self.store.con.cursor()
        try:
            res = cur.execute(self.sql, self.params)
            index, row = 0, 0
            while batch := res.fetchmany(chunk_size):
                if index not in done:
                    yield InputChunk(index, list(enumerate(batch, start=row)), [], {"first": row})
                index, row = index + 1, row + len(batch)
        finally:
            cur.close()


def open_source(spec: str | Path, split: str, data_dir: str | None, what: str) -> Reader:
    """Resolve ``spec`` (module docstring) into a :class:`Reader`; a source that cannot be read at
    all raises :class:`SourceError`."""
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
    if _looks_like_path(spec):
        raise SourceNotFoundError(f"{what} file not found: {path}; pass an existing JSONL(.gz) or parquet file, "
                                  "a folder saved with Dataset.save_to_disk, or a Hugging Face dataset name")
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


# ---------------------------------------------------------------- validation helpers


class _Bad(ValueError):
    """A record problem; the message becomes the skip reason after ``row N: ``."""


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    """Validate a chat list and return it normalised to [{role, content}], ending with a user turn."""
    if not isinstance(value, list):
        raise _Bad(f"`{name}` must be a list of {{role, content}} objects, got {type(value).__name__}")
    if not value:
        raise _Bad(f"empty `{name}` list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _Bad(f"{name}[{i}] must be an object with `role` and `content`")
        if m["role"] not in ROLES:
            raise _Bad(f"{name}[{i}] has role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str):
            raise _Bad(f"{name}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise _Bad(f"`{name}` must end with a user turn (the last is {out[-1]['role']})")
    for i, m in enumerate(out):
        if not m["content"].strip():
            raise _Bad("empty prompt" if i == len(out) - 1 else f"{name}[{i}] has empty content")
    return out


def _prompt_messages(rec: dict, field: str | None) -> list[dict[str, str]]:
    if field is not None:
        if field not in rec:
            raise _Bad(f"no `{field}` field; add one or pass a different field")
        names = [field]
    else:
        names = [k for k in ("prompt", "messages") if k in rec]
        if not names:
            raise _Bad("no `prompt` or `messages` field; add one")
        if len(names) == 2:
            raise _Bad("has both `prompt` and `messages`; keep one")
    name, value = names[0], rec[names[0]]
    if isinstance(value, str) and name != "messages":  # a named `field` may hold either shape
        if not value.strip():
            raise _Bad("empty prompt")
        return [{"role": "user", "content": value}]
    if name == "prompt":
        raise _Bad(f"`prompt` must be a string, got {type(value).__name__}")
    return _messages(value, name)


# ---------------------------------------------------------------- prompts

PROMPT_SCHEMA = pa.schema([("prompt_id", pa.string()), ("source_row", pa.int64()),
                           ("messages", pa.string()), ("n_chars", pa.int64())])


def prompt_row(row: int, rec: Any, field: str | None) -> dict:
    """One prompt record → a PROMPT_SCHEMA row; raises _Bad with the reason."""
    msgs = _prompt_messages(rec, field)
    return {"prompt_id": content_hash(msgs), "source_row": row, "n_chars": sum(len(m["content"]) for m in msgs),
            "messages": json.dumps(msgs, ensure_ascii=False)}


def parse_chunk(chunk: InputChunk, parse, source: str, key: str) -> tuple[list[dict], list[Skip]]:
    """Validate a chunk's records with ``parse(row, record)``; bad ones become skips (with the
    chunk's undecodable rows), duplicates inside the chunk too (across chunks the store finds them)."""
    rows, skips, seen = [], list(chunk.skips), {}
    for row, rec in chunk.records:
        try:
            r = parse(row, rec)
            if r[key] in seen:
                raise _Bad(f"duplicate of row {seen[r[key]]}")
        except _Bad as e:
            skips.append(Skip(row, f"row {row}: {e}", source))
            continue
        seen[r[key]] = row
        rows.append(r)
    return rows, skips


def _read_all(spec, parse, what: str, split: str, data_dir: str | None, limit: int | None, schema: pa.Schema,
              key: str) -> tuple[pa.Table, list[Skip]]:
    """The whole source as one table (small inputs: renders, human sets, tests). Runs stream instead."""
    reader = open_source(spec, split, data_dir, what)
    rows: list[dict] = []
    skips: list[Skip] = []
    seen: dict[str, int] = {}
    for chunk in reader.chunks(4096):
        got, bad = parse_chunk(chunk, parse, reader.source, key)
        skips.extend(bad)
        for r in got:
            if limit is not None and len(rows) >= limit:  # rows after the limit are not looked at
                last = rows[-1]["source_row"]
                return (pa.Table.from_pylist(rows, schema=schema),
                        sorted((k for k in skips if (k.row or 0) < last), key=lambda s: s.row or 0))
            if r[key] in seen:
                skips.append(Skip(r["source_row"], f"row {r['source_row']}: duplicate of row {seen[r[key]]}", reader.source))
                continue
            seen[r[key]] = r["source_row"]
            rows.append(r)
    return pa.Table.from_pylist(rows, schema=schema), sorted(skips, key=lambda s: s.row or 0)


def read_prompts(spec: str | Path, *, field: str | None = None, split: str = "train",
                 data_dir: str | None = None, limit: int | None = None) -> tuple[pa.Table, list[Skip]]:
    """Read prompts (``prompt`` string or ``messages`` list, or ``field``) into PROMPT_SCHEMA.

    ``n_chars`` counts the characters of all message contents. ``limit`` stops after that many
    accepted prompts.
    """
    return _read_all(spec, lambda row, rec: prompt_row(row, rec, field), "prompts", split, data_dir, limit,
                     PROMPT_SCHEMA, "prompt_id")


# ---------------------------------------------------------------- pairs

PAIR_SCHEMA = pa.schema([("pair_id", pa.string()), ("source_row", pa.int64()), ("conversation", pa.string()),
                         ("response_a", pa.string()), ("response_b", pa.string()),
                         ("human_choice", pa.string()), ("annotator", pa.string()),
                         ("confidence", pa.float64()), ("swapped", pa.bool_())])

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
CHOICES = {"a": "a", "b": "b", "A": "a", "B": "b", "response_a": "a", "response_b": "b"}


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into chat turns.

    A turn starts at a blank line followed by ``Human:``/``Assistant:``; its text runs to the
    next such marker, so single newlines and mid-line "Human:" stay inside the turn. Each turn's
    text is stripped of surrounding whitespace.
    """
    parts = _TURN.split(text.strip())
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _hh_pair(rec: dict) -> tuple[list, str, str, str, str | None, float | None, bool]:
    turns = {}
    for key in ("chosen", "rejected"):
        if not isinstance(rec.get(key), str):
            raise _Bad(f"`{key}` must be a transcript string, got {type(rec.get(key)).__name__}")
        try:
            turns[key] = parse_transcript(rec[key])
        except ValueError as e:
            raise _Bad(f"{key}: {e}") from None
        if len(turns[key]) < 2 or turns[key][-1]["role"] != "assistant":
            raise _Bad(f"{key} transcript does not end with an Assistant turn after a Human turn")
    ch, rj = turns["chosen"], turns["rejected"]
    if ch[:-1] != rj[:-1]:
        k = next((i for i, (x, y) in enumerate(zip(ch[:-1], rj[:-1])) if x != y), min(len(ch), len(rj)) - 1)
        raise _Bad(f"chosen and rejected transcripts do not share a conversation prefix (they differ at turn {k + 1})")
    conv = ch[:-1]
    if conv[-1]["role"] != "user":
        raise _Bad("the final Assistant turn does not follow a Human turn")
    for key, t in turns.items():
        if not t[-1]["content"]:
            raise _Bad(f"empty final response in {key}")
    chosen, rejected = ch[-1]["content"], rj[-1]["content"]
    # Content-derived (not row-derived) bit, so the assignment survives reordering the file.
    swapped = int(content_hash(conv, chosen, rejected), 16) & 1 == 1
    a, b = (rejected, chosen) if swapped else (chosen, rejected)
    return conv, a, b, "b" if swapped else "a", None, None, swapped


def _jsonl_pair(rec: dict) -> tuple[list, str, str, str | None, str | None, float | None, bool]:
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise _Bad("`prompt` must be a non-empty string")
        conv = [{"role": "user", "content": rec["prompt"]}]
    elif "conversation" in rec or "messages" in rec:
        name = "conversation" if "conversation" in rec else "messages"
        conv = _messages(rec[name], name)
    else:
        raise _Bad("no `prompt`, `conversation` or `messages` field; add one")
    resp = []
    for key in ("response_a", "response_b"):
        if key not in rec:
            raise _Bad(f"missing `{key}` field")
        if not isinstance(rec[key], str):
            raise _Bad(f"`{key}` must be a string, got {type(rec[key]).__name__}")
        if not rec[key].strip():
            raise _Bad(f"empty {key}")
        resp.append(rec[key])
    raw = rec.get("human_choice", rec.get("choice"))
    choice = None
    if raw is not None:
        if isinstance(raw, int) and not isinstance(raw, bool) and raw in (0, 1):
            choice = "ab"[raw]
        elif isinstance(raw, str) and raw in CHOICES:
            choice = CHOICES[raw]
        else:
            raise _Bad(f"unknown choice value {raw!r}; use a or b")
    ann = rec.get("annotator", rec.get("annotator_id"))
    if ann is not None and (isinstance(ann, bool) or not isinstance(ann, (str, int))):
        raise _Bad(f"annotator must be a string, got {type(ann).__name__}")
    conf = rec.get("confidence")
    if conf is not None:
        ok = isinstance(conf, (int, float)) and not isinstance(conf, bool) and math.isfinite(conf)
        if not ok or not 0 <= conf <= 1:
            raise _Bad(f"confidence must be a number between 0 and 1, got {conf!r}")
        conf = float(conf)
    return conv, resp[0], resp[1], choice, None if ann is None else str(ann), conf, False


def pair_parser(format: str):
    """``parse(row, record)`` for pairs; ``auto`` picks hh-rlhf when the first record that parsed has a
    ``chosen`` or ``rejected`` key (decided once, then fixed for the whole source)."""
    if format not in ("auto", "hh-rlhf", "jsonl"):
        raise SourceError(f"unknown pairs format {format!r}; use auto, hh-rlhf or jsonl")
    state = {"format": format}

    def parse(row: int, rec: dict) -> dict:
        if state["format"] == "auto":
            state["format"] = "hh-rlhf" if "chosen" in rec or "rejected" in rec else "jsonl"
        conv, a, b, choice, ann, conf, swapped = (_hh_pair if state["format"] == "hh-rlhf" else _jsonl_pair)(rec)
        if a == b:
            raise _Bad("identical responses")
        return {"pair_id": content_hash(conv, a, b), "source_row": row, "conversation": json.dumps(conv, ensure_ascii=False),
                "response_a": a, "response_b": b, "human_choice": choice, "annotator": ann,
                "confidence": conf, "swapped": swapped}

    return parse


def read_pairs(spec: str | Path, *, format: Literal["auto", "hh-rlhf", "jsonl"] = "auto", split: str = "test",
               data_dir: str | None = None, limit: int | None = None) -> tuple[pa.Table, list[Skip]]:
    """Read preference pairs (hh-rlhf chosen/rejected transcripts or generic JSONL) into PAIR_SCHEMA.

    hh-rlhf chosen goes to position a or b by a hash bit of the pair's content (``swapped``), so the
    human label sits in a and b about equally often. Pairs with identical responses are skipped in
    both formats: they carry no preference.
    """
    return _read_all(spec, pair_parser(format), "pairs", split, data_dir, limit, PAIR_SCHEMA, "pair_id")
