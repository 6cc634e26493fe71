"""Pipeline keys overridden by a recipe's run step: ``set: {pairs.prompts.limit: 8, model: {step: sft}}``.

A dotted key must name a field of the pipeline's own config model (checked when the recipe loads,
error at the key's line in the recipe, with the closest names). The overridden pipeline is written
to the recipe's state folder and run like any other pipeline file.
"""

from __future__ import annotations

import copy
import difflib
import importlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..yamlconf import ConfigError, Issue, Marks, _type_at, _unwrap, load_yaml_data

# pipeline kind -> its config model (issue 23; the lead may move this to the kinds registry of issue 20)
PIPELINE_MODELS = {"sl": "factory.config:Pipeline", "prefs": "factory.config:PrefsPipeline",
                   "audit": "factory.audit.run:AuditPipeline"}


def pipeline_model(kind: str) -> type[BaseModel] | None:
    target = PIPELINE_MODELS.get(kind)
    if target is None:
        return None
    mod, name = target.split(":")
    return getattr(importlib.import_module(mod), name)


def has_path(tp: Any, parts: tuple) -> bool:
    """Whether the dotted ``parts`` name a field below type ``tp`` (any member of a union will do;
    below a ``dict`` or ``Any`` every key is allowed)."""
    import types
    import typing

    tp = _unwrap(tp)
    if not parts:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(has_path(a, parts) for a in typing.get_args(tp) if a is not type(None))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = next((f for n, f in tp.model_fields.items() if parts[0] in (n, f.alias)), None)
        return field is not None and has_path(field.annotation, parts[1:])
    return tp is Any or origin is dict


def _fields(tp: Any) -> list[str]:
    import types
    import typing

    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(dict.fromkeys(f for a in typing.get_args(tp) for f in _fields(a)))
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def check_overrides(path, marks: Marks, steps: dict) -> None:
    """Every run step's pipeline exists and every key it overrides is a field of that pipeline."""
    issues: list[Issue] = []
    for s in steps.values():
        if s.action != "run":
            continue
        loc = ("steps", s.index)
        try:
            data, _ = load_yaml_data(s.spec.run)
        except ConfigError as e:
            line, col = marks.find(loc + ("run",))
            issues.append(Issue(str(path), line, col, f"step '{s.id}': cannot read pipeline {s.spec.run}: {e.message}"))
            continue
        kind = data.get("kind", "sl") if isinstance(data, dict) else "sl"
        model = pipeline_model(kind)
        if model is None:
            line, col = marks.find(loc + ("run",))
            issues.append(Issue(str(path), line, col, f"step '{s.id}': {s.spec.run} is a '{kind}' file; a run step "
                                                      f"runs a pipeline of kind {', '.join(PIPELINE_MODELS)}"))
            continue
        unknown = set()
        for key in s.spec.set:
            parts = tuple(str(key).split("."))
            if not has_path(model, parts):
                unknown.add(key)
                parent = _type_at(model, parts[:-1]) if len(parts) > 1 else model
                close = difflib.get_close_matches(parts[-1], _fields(parent), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join('.'.join(parts[:-1] + (c,)) for c in close)}?" if close else ""
                line, col = marks.find(loc + ("set", key), key=True)
                issues.append(Issue(str(path), line, col, f"step '{s.id}': the {kind} pipeline {s.spec.run} has no "
                                                          f"key `{key}`{hint}"))
        issues.extend(_check_values(path, marks, s, data, model, loc, unknown))
    if issues:
        raise ConfigError.many(issues)


def _is_ref(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"step"}


def _get(data: Any, parts: tuple) -> Any:
    for p in parts:
        if not isinstance(data, dict) or p not in data:
            return None
        data = data[p]
    return data


def _overlaps(at: tuple, parts: tuple) -> bool:
    """An error at ``at`` concerns the override ``parts`` (one lies under the other; a union's error
    sits on the union itself, e.g. ``engine`` for ``engine.kind``)."""
    n = min(len(at), len(parts))
    return n > 0 and at[:n] == parts[:n]


def _check_values(path, marks: Marks, s, data: dict, model: type[BaseModel], loc: tuple, unknown: set) -> list[Issue]:
    """The overridden values against the pipeline's model: an error under an overridden key is
    reported at that key's line in the recipe (``{step: …}`` values are known only when they run)."""
    from pydantic import ValidationError

    from ..yamlconf import _data_loc

    refs = {k for k, v in s.spec.set.items() if _is_ref(v)}
    literal = {k: v for k, v in s.spec.set.items() if k not in refs and k not in unknown}
    filled = {k: _get(data, tuple(str(k).split("."))) for k in refs}
    merged = apply(data, {**literal, **{k: v if v is not None else "x" for k, v in filled.items()}})
    try:
        model.model_validate(merged)
        return []
    except ValidationError as e:
        errors = e.errors(include_url=False)
    out = []
    for err in errors:
        at, _ = _data_loc(tuple(err["loc"]), merged)
        key = next((k for k in literal if _overlaps(at, tuple(str(k).split(".")))), None)
        if key is None:
            continue  # not an overridden key: the pipeline file reports its own problems when it runs
        line, col = marks.find(loc + ("set", key))
        out.append(Issue(str(path), line, col, f"step '{s.id}': `{key}`: {err['msg']}"))
    return out


def apply(data: dict, overrides: dict[str, Any]) -> dict:
    """``data`` with each dotted key set (intermediate mappings created as needed)."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def materialise(pipeline: str | Path, overrides: dict[str, Any], out: Path) -> Path:
    """Write the pipeline with its overrides applied (values already resolved) to ``out``."""
    import yaml

    data, _ = load_yaml_data(pipeline)
    text = (f"# written by a recipe step from {pipeline}; edit the recipe, not this file\n"
            + yaml.safe_dump(apply(data, overrides), sort_keys=False, allow_unicode=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return out
