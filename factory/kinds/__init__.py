"""The run kinds, side by side, and their registry: ``sl`` (critique→revise), ``prefs`` (AI
preference labels by a policy and a panel of judges), ``audit`` (judges vs human labels).

Each kind is one :class:`~factory.runs.RunKind` subclass in a module of this package, registered by
name with ``@register_kind``; ``factory run``, ``validate``, ``render`` and ``show`` find kinds here
and nowhere else. A new kind is one module with one decorated class, imported at the bottom of this
file. The kinds sit above the run lifecycle (:mod:`factory.runs`), which they use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import Loaded, RunKind, Summary, execute
from ..store import StoreError

KINDS: dict[str, RunKind] = {}  # kind name -> the kind


def register_kind(cls: type[RunKind]) -> type[RunKind]:
    """Register a run kind (a :class:`RunKind` subclass with a ``name``): one decorator per kind."""
    KINDS[cls.name] = cls()
    return cls


def kind_of(path: str | Path) -> str:
    from ..yamlconf import load_yaml_data

    data, _ = load_yaml_data(path)
    kind = data.get("kind", "sl") if isinstance(data, dict) else "sl"
    return kind if isinstance(kind, str) else "sl"


def get_kind(name: str) -> RunKind:
    if name not in KINDS:
        raise StoreError(f"unknown pipeline kind '{name}'; use one of {', '.join(KINDS)}")
    return KINDS[name]


def load(path: str | Path) -> tuple[RunKind, Loaded]:
    """The kind of the pipeline file at ``path`` and the pipeline, loaded and checked."""
    k = get_kind(kind_of(path))
    return k, k.load(path)


def run(path: str | Path, **kw: Any) -> Summary:
    """Run (or resume) the pipeline at ``path``, whatever its kind (see :func:`factory.runs.execute`). A
    ``standalone`` kind (a recipe: many runs) brings its own lifecycle."""
    standalone = get_kind(kind_of(path))
    if getattr(standalone, "standalone", False):
        return standalone.run_path(path, **kw)
    kind, lp = load(path)
    return execute(kind, lp, **kw)


def render_example(path: str | Path, stage: str, example: int) -> list[dict]:
    """The messages one example of any pipeline kind sends (``factory render``)."""
    kind, lp = load(path)
    return kind.render(lp, stage, example)


from . import audit, prefs, sl  # noqa: E402,F401  (each registers its kind)
from ..recipes.kind import RecipeKind  # noqa: E402  (a recipe sits above the kinds it runs: imported lazily by it)

register_kind(RecipeKind)
