"""The run kinds, side by side: ``sl`` (critique→revise), ``prefs`` (AI preference labels by a
policy and a panel of judges), ``audit`` (judges vs human labels). Each is one
:class:`~factory.runs.RunKind` subclass registered by name with ``@register_kind``; importing this
package registers them all. A new kind is one module here with one decorated class (and its import
below)."""

from . import audit, prefs, sl  # noqa: F401  (registration)
