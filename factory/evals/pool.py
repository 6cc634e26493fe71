"""Engines for evaluations that visit several models one after another.

``EnginePool.get(name)`` returns the caller's engine for that model name when one was given (the
caller closes it) or builds one from the ``EngineSpec`` (the pool closes it: ``release(name)``
as soon as that model is done, so two vLLM engines are not held at once, or on exit).
"""

from __future__ import annotations


def same_model(a: str, b: str) -> bool:
    """Whether two model names (alias, folder, hub id) resolve to the same model."""
    from ..models import ModelError, resolve

    if a == b:
        return True
    try:
        return resolve(a, pull=False) == resolve(b, pull=False)
    except ModelError:
        return False


class EnginePool:
    def __init__(self, spec=None, given: dict | None = None):
        from ..config import VLLMEngineSpec

        self.spec = spec or VLLMEngineSpec()
        self.given = dict(given or {})
        self.owned: dict[str, object] = {}

    def get(self, name: str):
        if name in self.given:
            return self.given[name]
        if name not in self.owned:
            from ..engines import make_engine

            self.owned[name] = make_engine(self.spec, name)
        return self.owned[name]

    def release(self, name: str) -> None:
        engine = self.owned.pop(name, None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        for name in list(self.owned):
            self.release(name)

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["EnginePool", "same_model"]
