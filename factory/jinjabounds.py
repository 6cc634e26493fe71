"""A sandboxed Jinja environment with bounds, so a runaway template is an error, never a hang or a
MemoryError (issue 22). Per render:

- at most ``MAX_OUTPUT`` characters of output in all (literal text and ``{{ … }}`` alike, counted as
  they are produced, call blocks included), and no single string past it (``*``, ``+``, ``~``,
  ``%``, ``replace``, ``format`` and width arguments are checked before they build one);
- at most ``MAX_ITERATIONS`` loop iterations in all (every ``{% for %}``, however nested), and
  ``range`` no longer than Jinja's own sandbox allows;
- numbers past ``MAX_INT_BITS`` bits (``10 ** 10 ** 10``) are refused before they are computed.

Each refusal raises :class:`Bounded` (a ``SecurityError``), which the template layer reports as
``file:line``. The bounds leave rendering unchanged: the counting filters return what they are
given, so a template that stays inside them renders byte for byte as before.
"""

from __future__ import annotations

import contextvars
import functools
import re
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_OUTPUT = 32 << 20  # characters rendered per template render
MAX_ITERATIONS = 1_000_000  # loop iterations per render
MAX_INT_BITS = 1 << 16
_WIDTH = re.compile(r"\d{4,}")  # a width or precision in a format string worth checking


class Bounded(SecurityError):
    """A template passed one of the render bounds."""


class _Budget:
    __slots__ = ("chars", "steps")

    def __init__(self) -> None:
        self.chars = 0
        self.steps = 0


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("factory_template_budget", default=None)


def budget() -> contextvars.Token:
    """Start a fresh budget for one render (``_budget.reset(token)`` after it)."""
    return _budget.set(_Budget())


def _current() -> _Budget:
    b = _budget.get()
    if b is None:  # rendered outside Template.render (e.g. a test): a budget of its own
        b = _Budget()
        _budget.set(b)
    return b


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_OUTPUT:
        raise Bounded(f"{what} would be {n:,} characters, past the {MAX_OUTPUT:,}-character cap on a rendered "
                      "template; render less")


@jinja2.pass_context
def _out(context: Any, value: Any) -> Any:
    """Every piece of output passes here (the parse step wraps it): counted against the render's cap."""
    text = value if isinstance(value, str) else str(value)
    b = _current()
    b.chars += len(text)
    if b.chars > MAX_OUTPUT:
        raise Bounded(f"the rendered output passed {MAX_OUTPUT:,} characters; render less (a loop that "
                      "repeats too much text?)")
    return value


@jinja2.pass_context
def _loop(context: Any, iterable: Any) -> Any:
    """Every ``{% for %}``'s iterable passes here: iterations counted against the render's cap."""
    b = _current()

    def counted():
        for item in iterable:
            b.steps += 1
            if b.steps > MAX_ITERATIONS:
                raise Bounded(f"loops ran more than {MAX_ITERATIONS:,} iterations in one render; loop over less")
            yield item

    return counted()


@jinja2.pass_context
def _joined(context: Any, value: Any) -> Any:
    """The result of a ``~`` concatenation (its parts were each within the cap: at most twice it)."""
    _check_size(_size(value), "a joined string")
    return value


def _check_args(args: tuple, kwargs: dict, what: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT:
            raise Bounded(f"{what}: the argument {a:,} is past the {MAX_OUTPUT:,} cap on a rendered template")
        if isinstance(a, str) and len(a) > MAX_OUTPUT:
            _check_size(len(a), what)


def _check_format(fmt: Any, what: str) -> None:
    if isinstance(fmt, str):
        for m in _WIDTH.finditer(fmt):
            if int(m.group()) > MAX_OUTPUT:
                raise Bounded(f"{what}: the width {m.group()} is past the {MAX_OUTPUT:,} cap on a rendered template")


def _check_replace(value: Any, args: tuple, kwargs: dict, what: str) -> None:
    new = args[1] if len(args) > 1 else kwargs.get("new")
    if isinstance(value, str) and isinstance(new, str) and new:
        _check_size(len(value) * max(1, len(new)), what)


def _guard_filter(name: str, func: Any) -> Any:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs, f"filter {name}")
        value_at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        rest = args[value_at:]
        if name == "replace" and rest:
            _check_replace(rest[0], rest[1:], kwargs, "filter replace")
        if name == "format" and rest:
            _check_format(rest[0], "filter format")
        return func(*args, **kwargs)

    return guarded


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with the module's bounds."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters.update({"_bounded_out": _out, "_bounded_loop": _loop, "_bounded_join": _joined})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _check_size(_size(seq) * max(n, 0), f"{type(seq).__name__} * {n}")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    max(left.bit_length(), 1) * right > MAX_INT_BITS and abs(left) > 1:
                raise Bounded(f"{left} ** {right} is a number too large to compute in a template")
        elif operator == "%":
            _check_format(left, "%-formatting")
        elif operator == "+":
            _check_size(_size(left) + _size(right), "a concatenation")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = {"safe_range": "range"}.get(getattr(__obj, "__name__", ""), getattr(__obj, "__name__", "a call"))
        _check_args(args, kwargs, name)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function of its own
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            if name == "replace":
                _check_replace(owner, args, kwargs, "replace")
            elif name in ("format", "format_map"):
                _check_format(owner, name)
        return super().call(__context, __obj, *args, **kwargs)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Wrap every loop's iterable, every piece of output and every ``~`` in the counting filters."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_bounded_loop", [], [], None, None, lineno=loop.lineno)
        for node in [tree, *tree.find_all(nodes.Node)]:
            for field in node.fields:
                value = getattr(node, field, None)
                if isinstance(value, nodes.Concat):
                    setattr(node, field, _joined_node(value))
                elif isinstance(value, list):
                    value[:] = [_joined_node(v) if isinstance(v, nodes.Concat) else v for v in value]
        for out in tree.find_all(nodes.Output):
            out.nodes = [nodes.Filter(nodes.Const(n.data) if isinstance(n, nodes.TemplateData) else n, "_bounded_out",
                                      [], [], None, None, lineno=n.lineno) for n in out.nodes]
        return tree


def _joined_node(concat: nodes.Concat) -> nodes.Filter:
    return nodes.Filter(concat, "_bounded_join", [], [], None, None, lineno=concat.lineno)
