"""The preference run kind now lives in :mod:`factory.kinds.prefs`; kept importable."""

from .kinds.prefs import KIND, PrefsKind, load, run, sl_pairs_sql  # noqa: F401
from .store import Store  # noqa: F401

__all__ = ["KIND", "PrefsKind", "load", "run", "sl_pairs_sql", "Store"]
