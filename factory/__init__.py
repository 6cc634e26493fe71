"""cai-factory: a Constitutional AI / RLAIF data factory.

The Python API (:mod:`factory.api`) is re-exported here and imported on first use, so
``import factory`` stays instant::

    import factory
    s = factory.run("pipelines/demo.yaml")
    factory.open(s.db).revisions(s.run_id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if __import__("os").environ.get("FACTORY_QUIET_VLLM") == "1":  # a vLLM worker of a quiet run (api.quiet_engines)
    __import__("logging").getLogger("vllm").setLevel(40)  # ERROR

_API = ("run", "open", "audit", "export", "Database", "Audit", "ApiError", "summary_dict")

if TYPE_CHECKING:  # pragma: no cover
    from .api import ApiError, Audit, Database, audit, export, open, run, summary_dict  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'factory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = list(_API)
