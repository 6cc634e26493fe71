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

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from .readers import InputChunk, Reader, Skip, SourceError, SourceNotFoundError, SqlReader, open_source  # noqa: F401
from .store import content_key

ROLES = ("system", "user", "assistant")


content_hash = content_key  # one content-key scheme for the whole factory (factory.store)


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


def row_problem(e: BaseException) -> str:
    """What was wrong with one row, from whatever its parsing or checking raised."""
    if isinstance(e, _Bad):
        return str(e)
    if isinstance(e, UnicodeError) and "surrogate" in str(e):
        bad = getattr(e, "object", "")[getattr(e, "start", 0):getattr(e, "end", 0)]
        return (f"holds a lone surrogate {bad.encode('unicode_escape').decode()!s} (half of a UTF-16 pair, not a character); "
                "the row is skipped: fix or remove that \\u escape")
    if isinstance(e, RecursionError):
        return "nested too deeply to check; flatten the record"
    return f"could not be read ({type(e).__name__}: {str(e)[:200]})"


def text_limit(max_model_len: int) -> int:
    """The most characters a row's texts may hold and still fit ``max_model_len`` tokens. The longest token
    of the embedded model's vocabulary is 81 characters (a newline and 80 spaces); CHARS_PER_TOKEN leaves
    room for others, so a longer row could never fit and is skipped before it is stored."""
    return max_model_len * CHARS_PER_TOKEN


CHARS_PER_TOKEN = 128


def row_chars(r: dict) -> int:
    """Characters of a parsed prompt or pair row's texts (a pair's conversation counted as its JSON)."""
    if "n_chars" in r:
        return r["n_chars"]
    return sum(len(r.get(k) or "") for k in ("conversation", "response_a", "response_b"))


def parse_chunk(chunk: InputChunk, parse, source: str, key: str) -> tuple[list[dict], list[Skip]]:
    """Validate a chunk's records with ``parse(row, record)``; bad ones become skips (with the
    chunk's undecodable rows), duplicates inside the chunk too (across chunks the store finds them)."""
    rows, skips, seen = [], list(chunk.skips), {}
    for row, rec in chunk.records:
        try:
            r = parse(row, rec)
            if r[key] in seen:
                raise _Bad(f"duplicate of row {seen[r[key]]}")
        except Exception as e:  # noqa: BLE001 - whatever one row does, it is that row's skip
            skips.append(Skip(row, f"row {row}: {row_problem(e)}", source))
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
