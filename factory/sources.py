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


def _jsonl_records(path: Path, skips: list[Skip], source: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, object); undecodable or non-object lines become skips."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.append(Skip(lineno, f"line {lineno}: not valid UTF-8 (byte offset {e.start} "
                                          "in the line); re-encode the file as UTF-8", source))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                skips.append(Skip(lineno, f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})", source))
                continue
            if not isinstance(obj, dict):
                skips.append(Skip(lineno, f"line {lineno}: expected a JSON object, got {type(obj).__name__}", source))
                continue
            yield lineno, obj


def _open(spec: str | Path, split: str, data_dir: str | None, what: str
          ) -> tuple[str, Iterator[tuple[int, Any]], list[Skip]]:
    """Resolve ``spec`` into (source label, iterator of (row, record dict), skip list filled lazily)."""
    skips: list[Skip] = []
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            return _from_disk(path, split)
        if path.is_dir():
            files = sorted(str(f) for f in path.rglob("*.parquet"))
        else:
            files = [str(path)] if path.suffix == ".parquet" else []
        if files:  # a folder is read file by file in sorted order, ignoring non-parquet files
            try:
                rows = pq.read_table(files).to_pylist()
            except Exception as e:  # pyarrow raises several types for unreadable files
                raise SourceError(f"cannot read parquet {path}: {e}") from e
            return f"{path} (row = 0-based record index)", iter(enumerate(rows)), skips
        if path.is_dir():
            raise SourceError(f"{path} is a folder with neither parquet files nor a save_to_disk dataset; "
                              f"pass a JSONL file, a parquet file/folder or a saved dataset of {what}")
        source = f"{path} (row = 1-based line number)"
        return source, _jsonl_records(path, skips, source), skips
    if _looks_like_path(spec):
        raise SourceNotFoundError(f"{what} file not found: {path}; pass an existing JSONL(.gz) or parquet file, "
                                  "a folder saved with Dataset.save_to_disk, or a Hugging Face dataset name")
    try:
        import datasets

        ds = datasets.load_dataset(str(spec), data_dir=data_dir, split=split)
    except Exception as e:
        raise SourceError(f"could not load Hugging Face dataset {spec!r} (data_dir={data_dir!r}, split={split!r}): "
                          f"{e}; if you meant a local file, check the path") from e
    return f"hf:{spec}[{split}] (row = 0-based record index)", iter(enumerate(ds)), skips


def _from_disk(path: Path, split: str) -> tuple[str, Iterator[tuple[int, Any]], list[Skip]]:
    try:
        import datasets

        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SourceError(f"could not load saved dataset {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"saved dataset {path} has no split {split!r}; pass split= one of {sorted(ds)}")
        ds = ds[split]
    return f"{path}[{split}] (row = 0-based record index)", iter(enumerate(ds)), []


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


def read_prompts(spec: str | Path, *, field: str | None = None, split: str = "train",
                 data_dir: str | None = None, limit: int | None = None) -> tuple[pa.Table, list[Skip]]:
    """Read prompts (``prompt`` string or ``messages`` list, or ``field``) into PROMPT_SCHEMA.

    ``n_chars`` counts the characters of all message contents. ``limit`` stops after that many
    accepted prompts.
    """
    source, records, skips = _open(spec, split, data_dir, "prompts")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for row, rec in records:
        if limit is not None and len(rows) >= limit:
            break
        try:
            msgs = _prompt_messages(rec, field)
            pid = content_hash(msgs)
            if pid in seen:
                raise _Bad(f"duplicate of row {seen[pid]}")
        except _Bad as e:
            skips.append(Skip(row, f"row {row}: {e}", source))
            continue
        seen[pid] = row
        rows.append({"prompt_id": pid, "source_row": row, "n_chars": sum(len(m["content"]) for m in msgs),
                     "messages": json.dumps(msgs, ensure_ascii=False)})
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), skips


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


def read_pairs(spec: str | Path, *, format: Literal["auto", "hh-rlhf", "jsonl"] = "auto", split: str = "test",
               data_dir: str | None = None, limit: int | None = None) -> tuple[pa.Table, list[Skip]]:
    """Read preference pairs (hh-rlhf chosen/rejected transcripts or generic JSONL) into PAIR_SCHEMA.

    ``auto`` picks hh-rlhf when the first record that parsed has a ``chosen`` or ``rejected`` key.
    hh-rlhf chosen goes to position a or b by a hash bit of the pair's content (``swapped``), so the
    human label sits in a and b about equally often. Pairs with identical responses are skipped in
    both formats: they carry no preference.
    """
    if format not in ("auto", "hh-rlhf", "jsonl"):
        raise SourceError(f"unknown pairs format {format!r}; use auto, hh-rlhf or jsonl")
    source, records, skips = _open(spec, split, data_dir, "pairs")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for row, rec in records:
        if limit is not None and len(rows) >= limit:
            break
        if format == "auto":
            format = "hh-rlhf" if "chosen" in rec or "rejected" in rec else "jsonl"
        try:
            conv, a, b, choice, ann, conf, swapped = (_hh_pair if format == "hh-rlhf" else _jsonl_pair)(rec)
            if a == b:
                raise _Bad("identical responses")
            pid = content_hash(conv, a, b)
            if pid in seen:
                raise _Bad(f"duplicate of row {seen[pid]}")
        except _Bad as e:
            skips.append(Skip(row, f"row {row}: {e}", source))
            continue
        seen[pid] = row
        rows.append({"pair_id": pid, "source_row": row, "conversation": json.dumps(conv, ensure_ascii=False),
                     "response_a": a, "response_b": b, "human_choice": choice, "annotator": ann,
                     "confidence": conf, "swapped": swapped})
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), skips
