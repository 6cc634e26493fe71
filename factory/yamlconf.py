"""Load YAML config files into pydantic v2 models, with errors that point at ``file:line:col``.

PyYAML throws node positions away once it builds Python objects, and pydantic reports errors as
``loc`` tuples (``("principles", 2, "critique")``). This module keeps both ends: it composes the
YAML node tree, records the position of every value (and of every mapping key) under its ``loc``,
builds the data from the same tree, validates it, and maps each pydantic error back to a line.

Choices:
- Duplicate mapping keys are an error (YAML says keys are unique; PyYAML silently keeps the last).
- A missing field points at the mapping that lacks it; an unknown key points at the key itself and
  lists the allowed keys. Other errors point at the value; a ``loc`` deeper than the file (a union
  tag, a key that is not there) falls back to the closest enclosing node.
- Messages name the thing in words: the item of a list under key ``principles`` is called
  "principle #3 ('its-id')" (key minus a trailing "s", 1-based number, its ``id``/``name`` if any).
  A field's ``Field(description=...)`` is used as the hint of what to add or write.
- A validator can point below itself by raising :class:`ErrorAt` (a ``ValueError``) with a ``loc``
  relative to the field it validates, e.g. the second occurrence of a duplicate id.

Hostile input (alias bombs, deep nesting, huge files, Python tags) is bounded by
:mod:`factory.yamlsafe` while the YAML is composed; every case is a located ConfigError here.
"""

from __future__ import annotations

import contextvars
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .yamlsafe import DEFAULT, LARGE, MAX_BYTES, MAX_DEPTH, MAX_VALUES, BoundedLoader, FastBoundedLoader, Limits, Refused

T = TypeVar("T", bound=BaseModel)
Loc = tuple[Any, ...]

__all__ = [
    "DEFAULT", "LARGE", "Limits", "MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "ConfigError", "ErrorAt", "Issue", "Marks", "Pos", "error_at",
    "load_yaml_data", "load_yaml_model", "parse_yaml", "validate_data",
]


@dataclass(frozen=True)
class Issue:
    """One problem in a config file (``line``/``col`` are 1-based, None when unknown)."""

    path: str
    line: int | None
    col: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}:{self.col or 1}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; ``str(e)`` is one ``path:line:col: message`` per problem.

    ``path``/``line``/``col``/``message`` describe the first problem; ``issues`` holds them all.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None, col: int | None = None,
                 *, issues: list[Issue] | None = None):
        self.issues = issues or [Issue(str(path), line, col, message)]
        first = self.issues[0]
        self.path, self.line, self.col, self.message = first.path, first.line, first.col, first.message
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def many(cls, issues: list[Issue]) -> ConfigError:
        """One error for several issues, sorted by position."""
        issues = sorted(issues, key=lambda i: (i.line or 0, i.col or 0))
        return cls(issues[0].path, issues[0].message, issues[0].line, issues[0].col, issues=issues)

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (type(self).many, (self.issues,))


class ErrorAt(ValueError):
    """Raise inside a pydantic validator to point at a node below the validated value.

    ``loc`` is relative to the validated field (or model): in a ``principles`` field validator,
    ``ErrorAt((3, "id"), "duplicate id 'x'")`` points at ``principles[3].id``.
    """

    def __init__(self, loc: Loc | str | int, message: str):
        self.loc = loc if isinstance(loc, tuple) else (loc,)
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Pos:
    """Where a node starts (1-based), and where its mapping key starts when it has one."""

    line: int
    col: int
    key_line: int | None = None
    key_col: int | None = None


class Marks(dict):
    """``loc`` tuple → :class:`Pos` for every node of a YAML document; ``written`` holds, per loc, the
    text of scalars YAML read as numbers (``0.10`` is the float 0.1: hints quote what was written)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.written: dict[Loc, str] = {}

    def find(self, loc: Loc, *, key: bool = False) -> tuple[int, int]:
        """Position of ``loc`` (of its key with ``key=True``), else of its closest ancestor."""
        for n in range(len(loc), -1, -1):
            pos = self.get(tuple(loc[:n]))
            if pos is not None:
                if key and n == len(loc) and pos.key_line is not None:
                    return pos.key_line, pos.key_col or 1
                return pos.line, pos.col
        return 1, 1


def error_at(path: str | Path, marks: Marks, loc: Loc, message: str, *, key: bool = False) -> ConfigError:
    """A :class:`ConfigError` pointing at ``loc``, for checks made after loading (cross-file refs)."""
    line, col = marks.find(loc, key=key)
    return ConfigError(path, message, line, col)


# ---------------------------------------------------------------------------------- parsing

_YAML_HINTS = {
    "mapping values are not allowed here": "a value containing ': ' must be quoted, or the indentation is off",
    "that cannot start any token": "indent with spaces, not tabs, and quote values starting with @ or `",
    "could not find expected ':'": "check the indentation, or add the missing ':' after the key",
    "found undefined alias": "define the anchor (&name) before using *name",
}


def _yaml_error(path: str, e: yaml.YAMLError, text: str) -> ConfigError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        message = f"invalid YAML: {e.problem or e.context}"
        if "'\\t'" in message and mark is not None:
            return ConfigError(path, "a tab character where YAML needs spaces (to indent, and after ':' or "
                                     "'-'); use spaces, not tabs (tabs are fine only inside quoted text)",
                               mark.line + 1, mark.column + 1)
        if e.context and e.problem and e.context_mark is not None:
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        hint = next((h for k, h in _YAML_HINTS.items() if k in message), None)
        if hint:
            message += f"; {hint}"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        return ConfigError(path, message, line, col)
    if isinstance(e, yaml.reader.ReaderError):  # a control character YAML does not allow
        before = text[: e.position]
        line, col = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        return ConfigError(path, f"invalid character U+{e.character:04X} in YAML; remove it", line, col)
    return ConfigError(path, f"invalid YAML: {e}")


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_STR_TAG = "tag:yaml.org,2002:str"


def _record(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, marks: Marks, issues: list[Issue],
            path: str, key_mark: yaml.Mark | None, stack: set[int]) -> None:
    """Record positions under ``loc`` and collect duplicate keys (before construction, which
    flattens merge keys in place)."""
    marks[loc] = Pos(node.start_mark.line + 1, node.start_mark.column + 1,
                     key_mark.line + 1 if key_mark else None, key_mark.column + 1 if key_mark else None)
    if isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS:
        marks.written[loc] = node.value
    if id(node) in stack:  # a recursive alias; its positions are already recorded
        return
    stack.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merged keys fall back to the enclosing mapping's position
            key = key_node.value if key_node.tag == _STR_TAG else loader.construct_object(key_node)
            if key in seen:
                issues.append(Issue(path, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                    f"duplicate key '{key}' (first set on line {seen[key].line + 1}); "
                                    "keep only one of them"))
                continue
            seen[key] = key_node.start_mark
            _record(loader, value_node, loc + (key,), marks, issues, path, key_node.start_mark, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(loader, item, loc + (i,), marks, issues, path, None, stack)
    stack.discard(id(node))


def parse_yaml(text: str, path: str | Path = "<string>", limits: Limits = DEFAULT) -> tuple[Any, Marks]:
    """Parse one YAML document into plain data plus the :class:`Marks` of its nodes."""
    if FastBoundedLoader is not None:
        try:
            return _parse(FastBoundedLoader, text, str(path), limits)
        except _Invalid as e:  # a syntax error: let the Python parser say where and what, as it always has
            if len(text) > _REPARSE_MAX:
                raise _yaml_error(str(path), e.error, text) from None
    return _parse(BoundedLoader, text, str(path), limits)


_REPARSE_MAX = 1 << 20  # pure-Python parsing runs at about 1 MB/s


class _Invalid(Exception):
    """libyaml refused the text; the pure-Python parser reports it."""

    def __init__(self, error: yaml.YAMLError):
        self.error = error


def _parse(loader_cls, text: str, path: str, limits: Limits) -> tuple[Any, Marks]:
    fast = loader_cls is FastBoundedLoader
    marks = Marks({(): Pos(1, 1)})
    try:
        loader = loader_cls(text, limits)  # the Python one checks for unprintable characters right away
    except yaml.YAMLError as e:
        if fast:
            raise _Invalid(e) from None
        raise _yaml_error(path, e, text) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, marks
        issues: list[Issue] = []
        _record(loader, node, (), marks, issues, path, None, set())
        if issues:
            raise ConfigError.many(issues)
        return loader.construct_document(node), marks
    except yaml.YAMLError as e:
        if fast:
            raise _Invalid(e) from None
        raise _yaml_error(path, e, text) from None
    except Refused as e:
        raise ConfigError(path, e.message, e.mark.line + 1, e.mark.column + 1) from None
    finally:
        loader.dispose()


def top_level_keys(path: str | Path) -> set | None:
    """The keys of a YAML file's top-level mapping, from libyaml's event stream (no values are built,
    no alias expanded: cheap whatever the file holds); None when the file is not a readable mapping
    of plain keys or is past the size cap (the caller's full load then says why)."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            return None
        loader = yaml.CSafeLoader if FastBoundedLoader is not None else yaml.SafeLoader
        keys, depth, expect_key = set(), 0, False
        for event in yaml.parse(raw.decode("utf-8-sig"), Loader=loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if depth == 0 and not isinstance(event, yaml.MappingStartEvent):
                    return None
                if depth == 1:
                    expect_key = not expect_key
                depth += 1
                if depth == 1:
                    expect_key = True
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
                if depth == 0:
                    return keys
            elif depth == 1 and isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                if expect_key:
                    if not isinstance(event, yaml.ScalarEvent):
                        return None
                    keys.add(event.value)
                expect_key = not expect_key
            elif depth == 0 and isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                return None
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def load_yaml_data(path: str | Path, limits: Limits = DEFAULT) -> tuple[Any, Marks]:
    """Read a UTF-8 YAML file; return its data and :class:`Marks`, or raise :class:`ConfigError`."""
    shown = str(path)
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(limits.max_bytes + 1)  # never more: the file may be huge, or endless (/dev/zero)
    except FileNotFoundError:
        raise ConfigError(shown, f"file not found; check the path (relative paths start at {Path.cwd()})") from None
    except IsADirectoryError:
        raise ConfigError(shown, "is a directory; give the path of a .yaml file") from None
    except OSError as e:
        raise ConfigError(shown, f"cannot read file: {e.strerror or e}") from None
    if len(raw) > limits.max_bytes:
        head = raw[:limits.max_bytes]
        line = head.count(b"\n") + 1
        col = len(head[head.rfind(b"\n") + 1:].decode("utf-8", "replace"))
        raise ConfigError(shown, f"the file is larger than {limits.max_bytes // 1024} KiB (it passes the limit here); "
                                 "a config is a few KiB: put data (prompts, pairs, long texts) in its own "
                                 "file and give its path", line, col)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:start].count(b"\n") + 1
        col = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise ConfigError(shown, f"not valid UTF-8 (byte 0x{raw[start]:02x}); save the file as UTF-8",
                          line, col) from None
    data, marks = parse_yaml(text, shown, limits)
    overlay = OVERLAY.get()  # issue 25: factory.run(path, **overrides) (factory.api.overridden)
    return (overlay(p, data), marks) if overlay is not None else (data, marks)


# A function (path, data) -> data applied to every file load_yaml_data reads in this context: how
# the Python API's ``factory.run(path, **overrides)`` changes a pipeline without writing a file.
OVERLAY: contextvars.ContextVar[Any] = contextvars.ContextVar("factory_yaml_overlay", default=None)


# ------------------------------------------------------------------------------- validation

def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` from a type annotation."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_member(tp: Any, seg: Any) -> bool:
    """Whether union member ``tp`` is the one pydantic names ``seg`` (class name or Literal tag)."""
    if getattr(tp, "__name__", None) == seg:
        return True
    return _is_model(tp) and any(
        typing.get_origin(_unwrap(f.annotation)) is typing.Literal and seg in typing.get_args(_unwrap(f.annotation))
        for f in tp.model_fields.values())


def _type_at(model: type[BaseModel], loc: Loc) -> Any:
    """The annotation at ``loc`` inside ``model`` (None when it cannot be followed)."""
    tp: Any = model
    for seg in loc:
        tp = _unwrap(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):  # pydantic adds the member's name/tag to loc
            tp = next((a for a in map(_unwrap, args) if _is_member(a, seg)), None)
            continue
        if _is_model(tp) and isinstance(seg, str):
            field = next((f for n, f in tp.model_fields.items() if seg in (n, f.alias)), None)
            tp = field.annotation if field else None
        elif origin in (list, tuple, set, frozenset) and isinstance(seg, int):
            tp = args[0] if args else None
        elif origin is dict:
            tp = args[1] if len(args) == 2 else None
        else:
            return None
        if tp is None:
            return None
    return _unwrap(tp)


def _data_loc(loc: Loc, data: Any, *, keep_last: bool = False) -> tuple[Loc, tuple | None]:
    """Drop ``loc`` segments that are not in the data (union member names/tags; the last one is
    kept with ``keep_last``, for a missing key). Also return the first union branch taken below a
    node, ``(loc of the node, member)``, or None."""
    out: list[Any] = []
    branch = None
    for i, seg in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(data, dict) and seg in data:
            data = data[seg]
        elif isinstance(data, list) and isinstance(seg, int) and 0 <= seg < len(data):
            data = data[seg]
        elif not (last and keep_last):
            if not last and branch is None:
                branch = (tuple(out), seg)
            continue
        out.append(seg)
    return tuple(out), branch


def _prune_unions(errors: list[dict], data: Any) -> list[dict]:
    """For a value that matched no member of a union of models, keep only the errors of the
    member with the fewest (the likely intended one); pydantic reports every member's errors."""
    counts: dict[Loc, dict[Any, int]] = {}
    for err in errors:
        branch = _data_loc(tuple(err["loc"]), data)[1]
        if branch:
            counts.setdefault(branch[0], {}).setdefault(branch[1], 0)
            counts[branch[0]][branch[1]] += 1
    best = {node: min(members, key=members.get) for node, members in counts.items()}
    return [err for err in errors if (b := _data_loc(tuple(err["loc"]), data)[1]) is None or best[b[0]] == b[1]]


def _singular(key: Any) -> str:
    key = str(key)
    return key[:-1] if key.endswith("s") and not key.endswith("ss") else f"{key} item"


def _describe(loc: Loc, data: Any) -> str:
    """Words for a location: ``principle #3 ('avoid-harm') `critique``` ; '' for the top level."""
    parts: list[str] = []
    keys: list[str] = []

    def flush() -> None:
        if keys:
            parts.append("`" + ".".join(keys) + "`")
            keys.clear()

    i = 0
    while i < len(loc):
        seg = loc[i]
        child = data.get(seg) if isinstance(data, dict) else None
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(seg, int):
            flush()
            parts.append(f"item #{seg + 1}")
            data = data[seg] if isinstance(data, list) and 0 <= seg < len(data) else None
            i += 1
        elif isinstance(nxt, int) and isinstance(child, list):
            flush()
            item = child[nxt] if 0 <= nxt < len(child) else None
            label = f"{_singular(seg)} #{nxt + 1}"
            ident = next((item[k] for k in ("id", "name") if isinstance(item, dict)
                          and isinstance(item.get(k), str) and item[k].strip()), None)
            parts.append(f"{label} ('{ident}')" if ident else label)
            data = item
            i += 2
        else:
            keys.append(str(seg))
            data = child
            i += 1
    flush()
    return " ".join(parts)


def _shown(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"{text!r} (text)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_EXPECTED = {
    "string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list (lines starting with '- ')", "tuple_type": "a list", "set_type": "a list",
    "dict_type": "a mapping (key: value lines)", "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)", "finite_number": "a finite number",
}
_CONSTRAINTS = {
    "greater_than": "must be greater than {gt}", "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}", "less_than_equal": "must be at most {le}",
    "too_short": "must have at least {min_length} item(s)", "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "string_pattern_mismatch": "must match the pattern {pattern}",
    "literal_error": "must be one of {expected}", "enum": "must be one of {expected}",
}


def _message(err: dict, model: type[BaseModel], data: Any, what: str, marks: Marks | None = None
             ) -> tuple[Loc, bool, str]:
    """``(data loc, point at key?, message)`` for one pydantic error entry."""
    kind, raw_loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    loc = _data_loc(raw_loc, data, keep_last=kind == "missing")[0]
    top = f"the {what}"
    if kind == "missing" and loc:
        container = _describe(loc[:-1], data) or top
        field = _field(model, raw_loc)
        hint = f"add {field.description}" if field is not None and field.description else "add this required key"
        return loc[:-1], False, f"{container} has no `{loc[-1]}`; {hint}"
    if kind == "extra_forbidden" and loc:
        container = _describe(loc[:-1], data)
        parent = _type_at(model, raw_loc[:-1])
        allowed = [f.alias or n for n, f in parent.model_fields.items()] if _is_model(parent) else []
        message = f"unknown key '{loc[-1]}'"
        if elsewhere := _other_members_with(model, raw_loc):
            message += f" (`{loc[-1]}` belongs to {elsewhere})"
        if allowed:
            message += f"; allowed keys: {', '.join(allowed)}"
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
        return loc, True, f"{container}: {message}" if container else message
    where = _describe(loc, data) or top
    if kind == "value_error" and isinstance(ctx.get("error"), ErrorAt):
        inner: ErrorAt = ctx["error"]
        loc = _data_loc(raw_loc + inner.loc, data)[0]
        return loc, False, f"{_describe(loc, data) or top}: {inner.message}"
    if kind in ("value_error", "assertion_error") and ctx.get("error") is not None:
        return loc, False, f"{where}: {ctx['error']}"
    if kind in ("model_type", "dict_type") and not loc and _is_model(model):
        keys = ", ".join(f.alias or n for n, f in model.model_fields.items())
        return loc, False, f"{top} must be a mapping with keys {keys}; got {_shown(err.get('input'))}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "")).strip("'")
        if kind == "union_tag_not_found":
            return loc, False, f"{where} has no `{disc}`; add it to say which kind of entry this is"
        loc = _data_loc(loc + (disc,), data)[0]
        return loc, False, (f"{_describe(loc, data) or top} must be one of {ctx.get('expected_tags')}; "
                            f"got {_shown(ctx.get('tag'))}")
    if kind in _EXPECTED:
        expected = " or ".join(dict.fromkeys(err.get("expected") or [_EXPECTED[kind]]))
        written = marks.written.get(loc) if marks is not None else None  # 0.10 as typed, not 0.1
        shown = f"{written} (a number)" if written is not None else _shown(err.get("input"))
        message = f"{where} must be {expected}; got {shown}"
        if kind == "string_type" and isinstance(err.get("input"), (int, float, bool)):
            message += f"; put it in quotes: \"{written if written is not None else err['input']}\""
        return loc, False, message
    if kind in _CONSTRAINTS:
        ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
        try:
            phrase = _CONSTRAINTS[kind].format(**ctx)
        except (KeyError, IndexError):
            phrase = err["msg"]
        return loc, False, f"{where} {phrase}; got {_shown(err.get('input'))}"
    return loc, False, f"{where}: {err['msg']}"


def _other_members_with(model: type[BaseModel], raw_loc: Loc) -> str:
    """For an unknown key inside one member of a tagged union (``engine.vllm.base_url``), the tags of
    the other members that do have it, in words ("kind: openai, not kind: vllm"); '' when none."""
    if len(raw_loc) < 2:
        return ""
    union, tag, key = _type_at(model, raw_loc[:-2]), raw_loc[-2], raw_loc[-1]
    if typing.get_origin(union) not in (typing.Union, types.UnionType):
        return ""
    members = [m for m in map(_unwrap, typing.get_args(union)) if _is_model(m)]
    chosen = next((m for m in members if _is_member(m, tag)), None)
    disc = next((n for n, f in (chosen.model_fields.items() if chosen else ())
                 if typing.get_origin(_unwrap(f.annotation)) is typing.Literal and tag in typing.get_args(_unwrap(f.annotation))), None)
    if disc is None:
        return ""
    tags = [typing.get_args(_unwrap(m.model_fields[disc].annotation))[0] for m in members
            if m is not chosen and disc in m.model_fields and key in m.model_fields
            and typing.get_origin(_unwrap(m.model_fields[disc].annotation)) is typing.Literal]
    return f"{' / '.join(f'{disc}: {t}' for t in tags)}, not {disc}: {tag}" if tags else ""


def _field(model: type[BaseModel], loc: Loc):
    """The pydantic FieldInfo at ``loc`` (None when not found)."""
    parent = _type_at(model, loc[:-1])
    if not _is_model(parent):
        return None
    return next((f for n, f in parent.model_fields.items() if loc[-1] in (n, f.alias)), None)


def validate_data(data: Any, marks: Marks, model: type[T], path: str | Path, *, what: str = "file") -> T:
    """``model.model_validate(data)``, turning a ValidationError into a located ConfigError."""
    if data is None and _is_model(model):
        required = [f.alias or n for n, f in model.model_fields.items() if f.is_required()]
        raise ConfigError(path, f"the {what} is empty; it needs the keys {', '.join(required)}", 1, 1)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors, merged = [], {}
        for err in _prune_unions(e.errors(include_url=False), data):
            if err["type"] in _EXPECTED:  # a scalar union gives one error per member: merge them
                loc = _data_loc(tuple(err["loc"]), data)[0]
                if loc in merged:
                    merged[loc]["expected"].append(_EXPECTED[err["type"]])
                    continue
                err = merged[loc] = dict(err, expected=[_EXPECTED[err["type"]]])
            errors.append(err)
        issues = []
        for err in errors:
            loc, key, message = _message(err, model, data, what, marks)
            line, col = marks.find(loc, key=key)
            issues.append(Issue(str(path), line, col, message))
        raise ConfigError.many(issues) from None


def load_yaml_model(path: str | Path, model: type[T], *, what: str = "file", limits: Limits = DEFAULT) -> T:
    """Read, parse and validate a YAML file into ``model``; every failure is a :class:`ConfigError`.

    ``what`` names the file's kind in messages ("the constitution has no `name`; ...").
    """
    data, marks = load_yaml_data(path, limits)
    return validate_data(data, marks, model, path, what=what)
