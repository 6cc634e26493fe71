"""A YAML loader with limits, so that a hostile config file is an error and never a runaway.

PyYAML's safe loader still lets a few hundred bytes exhaust memory or the stack: aliases of
aliases expand exponentially ("billion laughs") wherever the data is walked, merge keys
(``<<: *x``) do the same to mappings, and nesting (or aliases of aliases) past Python's recursion
limit crashes the composer, the constructor or the validator. :class:`BoundedLoader` checks the
limits while the node graph is composed, before anything is constructed:

- Files over :data:`MAX_BYTES` are refused after reading at most that much, at the line where the
  limit is passed (a huge scalar, a data file given by mistake).
- Aliases stay allowed, so the ``<<: *defaults`` merge idiom works, but they are bounded while the
  document is composed: every value counts once per place it appears, aliases included, and a
  document past :data:`MAX_VALUES` is refused at the alias (or value) that passes the limit. This
  is the "billion laughs" defence; it also bounds merge keys, which expand aliased mappings.
  Sizes are counted per node once, so the check costs as much as the file, not its expansion.
- Nesting deeper than :data:`MAX_DEPTH` (aliases included) is refused at the value that passes it,
  before Python's recursion limit could be reached anywhere (composer, checks, pydantic).
- :class:`Limits` holds the caps; constitutions load with :data:`LARGE` (thousands of principles),
  which raises the value cap but keeps aliases to :data:`MAX_VALUES` repeated values: the bomb
  guard is the alias budget, the value cap only bounds plain size (each value is a few hundred
  bytes of memory at most).
- Documents are composed from libyaml's events when it is there (:class:`FastBoundedLoader`, ten
  times faster); a YAML syntax error in a file under 1 MiB is then reported by parsing again with
  the pure-Python loader, so messages and positions are the ones PyYAML has always given (a larger
  file gets libyaml's own message, at its position, rather than seconds of pure-Python parsing).
- An alias used inside its own anchor (a recursive structure) is refused at the alias.
- Explicit tags other than the plain-data ones (``!!str``, ``!!int``, …) are refused at the tag
  before anything is constructed: ``!!python/object…`` and custom ``!tags`` never run.

:class:`Refused` carries the YAML mark; :mod:`factory.yamlconf` turns it into ``file:line:col``.
The size cap is applied by the reader (:func:`factory.yamlconf.load_yaml_data`).
"""

from __future__ import annotations

import yaml

from dataclasses import dataclass

from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:
    from yaml._yaml import CParser
except ImportError:  # PyYAML built without libyaml: the pure-Python loader does everything
    CParser = None

MAX_BYTES = 8 << 20  # a config is a few KiB and a constitution of 5,000 principles about 2 MB; past this it is data
MAX_VALUES = 10_000  # values in a document, counting each alias as the values it repeats
MAX_DEPTH = 50  # levels of nesting (shipped configs use at most 5, and at most 263 values)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_BYTES
    max_values: int = MAX_VALUES  # every value once per place it appears, aliases included
    max_alias_values: int = MAX_VALUES  # values repeated by aliases (the "billion laughs" guard)
    max_depth: int = MAX_DEPTH


DEFAULT = Limits()
# constitutions: 5,000 principles are about 45,000 values and 2 MB; aliases stay at the default budget
LARGE = Limits(max_values=400_000)

_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class Refused(Exception):
    """Raised by :class:`BoundedLoader` at a YAML mark; turned into a located ConfigError."""

    def __init__(self, mark: yaml.Mark, message: str):
        self.mark, self.message = mark, message
        super().__init__(message)


def _tag_shown(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


class _Bounded:
    """The limits, checked while the node graph is composed (mixed into a loader before its composer).

    PyYAML shares one node between an anchor and its aliases; ``_anchored`` holds each finished
    anchored node's expanded size and depth, so an alias costs a lookup, not an expansion.
    """

    def _bounds(self, limits: Limits) -> None:
        self.limits = limits
        self._anchored: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (expanded size, height)
        self._total = 0
        self._reach = 0  # the deepest level reached (aliases expanded) in the collection being composed
        self._aliased = 0
        self._depth = 0

    def _count(self, mark: yaml.Mark, n: int, alias: str | None) -> None:
        lim = self.limits
        self._total += n
        if alias is not None:
            self._aliased += n
        cap = lim.max_alias_values if alias is not None and self._aliased > lim.max_alias_values else (
            lim.max_values if self._total > lim.max_values else None)
        if cap is None:
            return
        if alias is not None:
            raise Refused(mark, f"the alias *{alias} repeats {n} values and takes this file past "
                                 f"{cap} values (nested aliases multiply; this is how an "
                                 "'alias bomb' works); write the values out or use fewer nested aliases")
        raise Refused(mark, f"this file has more than {cap} values; a config is small: put data "
                             "(prompts, pairs) in its own file and give its path")

    def _deeper(self, mark: yaml.Mark, levels: int, alias: str | None) -> None:
        limit = self.limits.max_depth
        if self._depth + levels > limit:
            if alias is not None:
                raise Refused(mark, f"the alias *{alias} nests {levels} levels here, past the limit of "
                                     f"{limit} levels (aliases of aliases nest deeper each time); "
                                     "write the values out or use fewer nested aliases")
            raise Refused(mark, f"nested more than {limit} levels deep; a config needs a few levels: "
                                 "check for unclosed [ or { or runaway indentation")

    def compose_node(self, parent, index):
        event = self.peek_event()
        cls = event.__class__
        if cls is yaml.AliasEvent:
            node = self.anchors.get(event.anchor)
            if node is not None:
                done = self._anchored.get(id(node))
                if done is None:  # its anchor is still open: the alias is inside it
                    raise Refused(event.start_mark, f"the alias *{event.anchor} is used inside its own "
                                                     f"anchor &{event.anchor}, which makes an endless "
                                                     "structure; refer to a value defined before it")
                size, height = done
                self._deeper(event.start_mark, height, event.anchor)
                self._count(event.start_mark, size, event.anchor)
                if self._depth + height > self._reach:
                    self._reach = self._depth + height
            return super().compose_node(parent, index)  # an undefined alias is PyYAML's error
        tag = event.tag
        if tag is not None and tag != "!" and tag not in _PLAIN_TAGS:
            shown = _tag_shown(tag)
            what = ("Python object tags are never loaded" if "python/" in tag
                    else "only plain data is allowed (text, numbers, true/false, lists, mappings)")
            raise Refused(event.start_mark, f"the tag {shown} is not allowed: {what}; remove the tag")
        depth = self._depth + 1
        if depth > self.limits.max_depth:
            self._deeper(event.start_mark, 1, None)
        self._total += 1
        if self._total > self.limits.max_values:
            self._count(event.start_mark, 0, None)
        if cls is yaml.ScalarEvent:
            if depth > self._reach:
                self._reach = depth
            node = super().compose_node(parent, index)
            if event.anchor is not None:
                self._anchored[id(node)] = (1, 1)
            return node
        # a collection: its expanded size is what was counted while composing it (aliases included),
        # its height how deep that went; kept for anchored nodes only (what aliases repeat)
        total, reach = self._total, self._reach
        self._reach = self._depth = depth
        node = super().compose_node(parent, index)
        self._depth = depth - 1
        if event.anchor is not None:
            self._anchored[id(node)] = (1 + self._total - total, 1 + self._reach - depth)
        if reach > self._reach:
            self._reach = reach
        return node


class BoundedLoader(_Bounded, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader with the limits checked while the node graph is composed."""

    def __init__(self, text: str, limits: Limits = DEFAULT):
        yaml.SafeLoader.__init__(self, text)
        self._bounds(limits)


if CParser is not None:
    class FastBoundedLoader(_Bounded, Composer, CParser, SafeConstructor, Resolver):
        """libyaml's parser (events) with the Python composer, so the same limits apply node by node."""

        def __init__(self, text: str, limits: Limits = DEFAULT):
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._bounds(limits)
else:
    FastBoundedLoader = None
