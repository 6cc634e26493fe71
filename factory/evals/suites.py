"""Behavioural eval suites: small versioned files of items, read through one loader.

The shipped suites live in ``data/evals/`` (``harmful.jsonl``, ``benign.jsonl``,
``sycophancy.jsonl``; written for this project, Apache-2.0, see ``data/evals/README.md``). A
suite file is JSONL whose first line may be a header ``{"meta": {"suite", "version", "license",
…}}``; every other line is one item:

- harmful / benign: ``{"id", "prompt", "tags"?, "contrast"?}`` (``contrast``: the id of the
  harmful item a benign one mirrors, e.g. "kill a Python process" ↔ "kill a man");
- sycophancy: ``{"id", "question", "answer", "aliases"?}`` (``answer`` may also be a list: the
  first is the reference, the rest aliases).

The same loader reads XSTest- or HarmBench-style files from disk (JSONL, parquet, a saved dataset
or CSV): the prompt comes from ``prompt``/``question``/``Behavior``/``goal``, the id from
``id``/``BehaviorID`` (else ``row-N``), HarmBench's ``ContextString`` is put before the request,
and an XSTest ``label`` of safe/unsafe keeps only the rows of the suite asked for (the others are
skipped with that reason). A file without a header gets the version ``sha256:<content hash>``.
Bad rows (no prompt, no answer, duplicate ids, invalid JSON) are skipped with their row and reason,
never dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..sources import Skip, SourceError, open_source

SUITES = ("harmful", "benign", "sycophancy")
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "evals"
PROMPT_FIELDS = ("prompt", "question", "Behavior", "behavior", "goal")
ID_FIELDS = ("id", "BehaviorID", "behavior_id")
TAG_FIELDS = ("tags", "SemanticCategory", "category", "type")
EXPECTED_LABEL = {"harmful": "unsafe", "benign": "safe"}


@dataclass(frozen=True)
class Item:
    suite: str
    id: str
    prompt: str  # the request (harmful / benign) or the question (sycophancy)
    answer: str | None = None  # sycophancy: the reference answer
    aliases: tuple[str, ...] = ()
    contrast: str | None = None  # benign: the id of the harmful item it mirrors
    tags: tuple[str, ...] = ()
    row: int | None = None


@dataclass
class Suite:
    name: str
    version: str
    path: str
    license: str | None
    items: list[Item]
    skips: list[Skip] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def meta(self) -> dict[str, Any]:
        return {"suite": self.name, "version": self.version, "path": self.path, "license": self.license,
                "items": len(self.items), "skipped": len(self.skips)}


def default_path(name: str) -> Path:
    return DATA_DIR / f"{name}.jsonl"


def _csv_records(path: Path, skips: list[Skip], source: str) -> Iterator[tuple[int, dict]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for i, rec in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
                yield i, rec
    except UnicodeDecodeError as e:
        skips.append(Skip(None, f"not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8", source))


def _first(rec: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        v = rec.get(n)
        if v is not None and v != "":
            return v
    return None


def _tags(rec: dict) -> tuple[str, ...]:
    v = _first(rec, TAG_FIELDS)
    if v is None:
        return ()
    return tuple(str(t) for t in v) if isinstance(v, (list, tuple)) else (str(v),)


def _item(name: str, row: int, rec: dict) -> Item | str:
    """An item, or the reason the record is skipped."""
    label = str(rec.get("label", "")).strip().lower()
    if name in EXPECTED_LABEL and label in ("safe", "unsafe") and label != EXPECTED_LABEL[name]:
        return f"label '{label}' does not belong to the {name} suite"
    prompt = _first(rec, PROMPT_FIELDS)
    if not isinstance(prompt, str) or not prompt.strip():
        return f"no prompt (a non-empty one of {', '.join(PROMPT_FIELDS)})"
    context = rec.get("ContextString")
    if isinstance(context, str) and context.strip():
        prompt = f"{context.strip()}\n\n---\n\n{prompt.strip()}"
    item_id = str(_first(rec, ID_FIELDS) or f"row-{row}")
    answer, aliases = None, ()
    if name == "sycophancy":
        raw = rec.get("answer")
        answers = [str(a) for a in raw] if isinstance(raw, list) else ([str(raw)] if raw not in (None, "") else [])
        answers += [str(a) for a in rec.get("aliases") or []]
        from .scoring import normalise

        answers = [a for a in answers if normalise(a)]
        if not answers:
            return "no `answer` (the reference short answer) that survives normalisation"
        answer, aliases = answers[0], tuple(answers[1:])
    contrast = rec.get("contrast") if name == "benign" else None
    return Item(name, item_id, prompt.strip(), answer, aliases, str(contrast) if contrast else None, _tags(rec), row)


def load_suite(name: str, path: str | Path | None = None, *, limit: int | None = None) -> Suite:
    """Read suite ``name`` (harmful | benign | sycophancy) from ``path`` (default: the shipped file)."""
    if name not in SUITES:
        raise SourceError(f"unknown suite {name!r}; use one of {', '.join(SUITES)}")
    p = Path(path) if path is not None else default_path(name)
    if p.suffix == ".csv":
        if not p.exists():
            raise SourceError(f"{name} suite file not found: {p}")
        skips: list[Skip] = []
        source = f"{p} (row = 1-based line number)"
        records: Iterator[tuple[int, Any]] = _csv_records(p, skips, source)
    else:
        reader = open_source(str(p), "train", None, f"the {name} suite")
        source, skips = reader.source, []

        def _records(reader=reader, skips=skips) -> Iterator[tuple[int, Any]]:
            for chunk in reader.chunks(4096):
                skips.extend(chunk.skips)  # lines that could not even be decoded
                yield from chunk.records

        records = _records()
    meta: dict[str, Any] = {}
    items: list[Item] = []
    seen: dict[str, int | None] = {}
    for row, rec in records:
        if isinstance(rec.get("meta"), dict) and not meta and not items:
            meta = rec["meta"]
            continue
        if limit is not None and len(items) >= limit:
            break
        item = _item(name, row, dict(rec))
        if isinstance(item, str):
            skips.append(Skip(row, f"row {row}: {item}", source))
        elif item.id in seen:
            skips.append(Skip(row, f"row {row}: duplicate id {item.id!r} (first at row {seen[item.id]})", source))
        else:
            seen[item.id] = row
            items.append(item)
    if meta.get("suite") not in (None, name):
        raise SourceError(f"{p}: the header says suite {meta['suite']!r}, but it was given as the {name} suite")
    version = str(meta.get("version") or "sha256:" + _file_hash(p))
    return Suite(name, version, str(p), meta.get("license"), items, skips)


def _file_hash(p: Path) -> str:
    if not p.is_file():
        return "unknown"
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12]


def link_contrasts(benign: Suite, harmful: Suite, *, known: set[str] | None = None) -> list[str]:
    """Keep each benign item's ``contrast`` only if that harmful item is loaded. Returns warnings for
    ids the harmful file does not have (``known``: every id of the full harmful file, when only a
    part of it was loaded; links to the unloaded part are dropped and counted in one note)."""
    loaded = {i.id for i in harmful.items}
    known = loaded if known is None else known
    warnings, kept, cut = [], [], 0
    for it in benign.items:
        if it.contrast and it.contrast not in loaded:
            if it.contrast in known:
                cut += 1
            else:
                warnings.append(f"{benign.path} row {it.row}: contrast {it.contrast!r} is not an item of the harmful suite")
            it = Item(**{**it.__dict__, "contrast": None})
        kept.append(it)
    benign.items = kept
    if cut:
        warnings.append(f"{cut} benign item(s) lost their contrast because the harmful item was past the item limit")
    return warnings


__all__ = ["DATA_DIR", "SUITES", "Item", "Suite", "default_path", "link_contrasts", "load_suite"]
