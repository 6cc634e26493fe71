"""The SL-CAI run kind now lives in :mod:`factory.kinds.sl`; kept importable."""

from .kinds.sl import KIND, SLKind, load, run  # noqa: F401
from .store import StoreError  # noqa: F401

__all__ = ["KIND", "SLKind", "load", "run", "StoreError"]
