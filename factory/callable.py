"""``factory.audit(...)`` and ``factory.export(...)`` are API functions, while ``factory.audit`` and
``factory.export`` are also submodules: once a submodule is imported, Python sets it as the
package's attribute, hiding the function. :func:`make_callable` lets such a module be called as the
API function of the same name (``factory.api``), so both spellings keep working."""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make the module ``module_name`` (``factory.audit``, ``factory.export``) call ``factory.api.<last part>``."""
    sys.modules[module_name].__class__ = _CallableModule
