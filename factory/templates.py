"""Jinja templates that render chat message lists.

A template builds its messages with call blocks, so message boundaries come from the template's
structure, never from parsing text (a model output containing "assistant:" cannot start a turn):

    {% call message("system") %}You are a careful reviewer.{% endcall %}
    {% call message("user") %}{{ response | fence("response") }}{% endcall %}

The environment is sandboxed (templates cannot reach Python internals), bounded (output, loops and
numbers: :mod:`factory.jinjabounds`) and strict (an undefined
variable is an error naming the template and line). Untrusted text (user prompts, model outputs)
goes through ``fence``, which wraps it in <tag>…</tag> and neutralises any closing tag inside it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .jinjabounds import BoundedEnvironment, Bounded, _budget, budget
MAX_TEMPLATE_BYTES = 1 << 20  # 1 MiB: a template is a few KiB; past this it is data, not a prompt

ROLES = ("system", "user", "assistant")


class TemplateError(Exception):
    """A template that cannot be loaded or rendered, with file:line."""


def fence(text: Any, tag: str = "text") -> str:
    """Delimit untrusted text: ``<tag>`` … ``</tag>``, with inner closing tags neutralised, in any case
    and spacing (``</OPTION>``, ``</option >``, ``< /option>`` become ``<\\/OPTION>``, ``<\\/option >``,
    ``< \\/option>``)."""
    body = _closing(tag).sub(lambda m: m.group(0).replace("/", "\\/", 1), str(text))
    return f"<{tag}>\n{body}\n</{tag}>"


@lru_cache(maxsize=64)
def _closing(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*/\s*{re.escape(tag)}\s*>", re.IGNORECASE)


def transcript(messages: list[dict]) -> str:
    """A conversation as plain text with one fenced block per turn."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {fence(m['content'], 'turn')}" for m in messages)


@dataclass(frozen=True)
class Template:
    path: str
    source: str
    hash: str
    jinja: jinja2.Template

    def __reduce__(self):
        """Pickled as its path and source, compiled again on load (a render worker's copy:
        :mod:`factory.serve.render_pool`)."""
        return (template_from_source, (self.path, self.source))

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Render to a list of {role, content} messages."""
        out: list[dict[str, str]] = []

        def message(role: str, caller=None) -> str:
            if role not in ROLES:
                raise TemplateError(f"{self.path}: message role '{role}' is not one of {', '.join(ROLES)}")
            out.append({"role": role, "content": caller().strip()})
            return ""

        token = budget()
        try:
            self.jinja.render(message=message, **variables)
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{self.path}:{_line(e)}: {e.message}; pass it or remove it from the template") from None
        except Bounded as e:
            raise TemplateError(f"{self.path}:{_line(e)}: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.path}:{_line(e)}: {e}") from None
        except (OverflowError, RecursionError, MemoryError, ValueError) as e:  # range too big, a macro calling itself…
            what = "templates call each other too deeply" if isinstance(e, RecursionError) else str(e)[:300]
            raise TemplateError(f"{self.path}:{_line(e)}: {what}; the template cannot be rendered") from None
        finally:
            _budget.reset(token)
        if not out:
            raise TemplateError(f"{self.path}: rendered no messages; wrap text in {{% call message('user') %}}…{{% endcall %}}")
        return out


def _line(exc: BaseException) -> int | str:
    lineno = getattr(exc, "lineno", None)
    if lineno:
        return lineno
    tb = exc.__traceback__
    line: int | str = "?"
    while tb is not None:  # jinja rewrites tracebacks so template frames carry template lines
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@lru_cache(maxsize=1)
def _env() -> BoundedEnvironment:
    env = BoundedEnvironment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, autoescape=False
    )
    env.filters["fence"] = fence
    env.filters["transcript"] = transcript
    return env


@lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> Template:
    p = Path(path)
    try:
        if p.is_dir():
            raise TemplateError(f"{path}: is a folder; point the pipeline's `templates` at a .j2 file")
        with open(p, "rb") as f:
            raw = f.read(MAX_TEMPLATE_BYTES + 1)  # never more: the file may be huge, or endless (/dev/zero)
        if len(raw) > MAX_TEMPLATE_BYTES:
            line = raw[:MAX_TEMPLATE_BYTES].count(b"\n") + 1
            raise TemplateError(f"{path}:{line}: larger than {MAX_TEMPLATE_BYTES // 1024} KiB (the cap on a template "
                                "file); a template holds instructions, put data in the pipeline's inputs")
        source = raw.decode("utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{path}: template not found; check the path in the pipeline's `templates`") from None
    except OSError as e:
        raise TemplateError(f"{path}: cannot read the template ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TemplateError(f"{path}: not valid UTF-8 at byte {e.start}; re-save the file as UTF-8") from None
    try:
        compiled = _env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{path}:{e.lineno}: {e.message}") from None
    except RecursionError:
        raise TemplateError(f"{path}: nested too deeply to compile; simplify the template") from None
    compiled.filename = str(p)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Template(path=str(path), source=source, hash=digest, jinja=compiled)


def template_from_source(path: str, source: str) -> Template:
    """A template from its stored source (lineage: re-rendering what a row was sent)."""
    compiled = _env().from_string(source)
    compiled.filename = path  # as _load sets it
    return Template(path=path, source=source, hash=hashlib.sha256(source.encode()).hexdigest()[:16], jinja=compiled)


def load_template(path: str | Path) -> Template:
    p = Path(path)
    mtime = p.stat().st_mtime if p.exists() else 0.0
    return _load(str(path), mtime)
