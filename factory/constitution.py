"""Constitutions: named lists of principles and few-shot demonstrations, loaded from YAML
(``constitutions/*.yaml``).

Principles by use: a principle has a critique and a revision request (SL-CAI: critique → revise), a
comparison question (RL-CAI: the judge), or all three. SL runs draw from :attr:`Constitution.sl_principles`,
judges from :attr:`Constitution.rl_principles`. ``examples:`` holds demonstrations (``kind: critique``,
a critique → revision of a reply; ``kind: comparison``, a labelled pair) that ``few_shot`` puts
before each request as earlier turns (:mod:`factory.fewshot`).

Choices:
- Text fields are stripped (YAML block scalars end with a newline) and must not be empty.
- ``hash`` / ``principle_hash`` are the first 16 hex digits of the sha256 of canonical JSON
  (sorted keys, compact) of the content fields after validation, so defaults written out or left
  implicit, key order and YAML style do not change them; the source path is not part of them.
  A principle's hash covers all its fields (tags and weight included) and nothing else, so editing
  one principle changes its own hash and the constitution's, not the other principles' hashes.
- Hashes leave out what is empty: a principle's missing critique/revision/comparison and an
  empty ``examples`` list are not in the dump, so every constitution written before these existed
  keeps its hash.
- ``version: 1`` (a whole number) is read as the text "1", so it hashes like ``version: "1"``;
  ``version: 1.0`` stays an error asking for quotes, because YAML reads 1.10 as the number 1.1.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationInfo,
                      field_validator, model_validator)

from factory.yamlconf import LARGE, ConfigError, ErrorAt, load_yaml_model

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DEFAULT_DIR = "constitutions"
_REPO_DIR = Path(__file__).resolve().parent.parent / DEFAULT_DIR


def content_hash(obj: Any) -> str:
    """First 16 hex digits of sha256 over canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _non_empty(cls: type[BaseModel], value: str, info: ValidationInfo) -> str:
    value = value.strip()
    if not value:
        hint = cls.model_fields[info.field_name].description or "a value"
        raise ValueError(f"must not be empty; write {hint}")
    return value


def _dump(model: BaseModel) -> dict:
    """What a hash covers: the validated fields, without the optional ones left empty (None)."""
    return model.model_dump(mode="json", exclude_none=True)


class Principle(BaseModel):
    """One principle: how to critique a reply and revise it (SL), how to compare two replies (RL), or both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="a stable slug such as 'avoid-harm' (lowercase letters, digits, '-' or '_')")
    critique: str | None = Field(None, description="a critique request (asks the model to point out specific ways the "
                                 "assistant's last reply falls short of this principle)")
    revision: str | None = Field(None, description="a revision request (asks the model to rewrite the reply to fix "
                                 "the problems the critique found)")
    comparison: str | None = Field(None, description="a comparison question (used to judge which of two responses "
                                   "better follows this principle)")
    tags: list[str] = Field(default_factory=list, description="a list of short tags such as [harm, safety]")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False,
                          description="the pooling weight (how much this principle counts in a preference label), greater than 0 (default 1.0)")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty; write a stable slug such as 'avoid-harm'")
        if not ID_PATTERN.match(value):
            raise ValueError(f"'{value}' is not a valid id; use lowercase letters, digits, '-' or '_', "
                             "starting with a letter or digit (e.g. 'avoid-harm')")
        return value

    @field_validator("critique", "revision", "comparison")
    @classmethod
    def _check_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _non_empty(cls, value, info)

    @model_validator(mode="after")
    def _a_use(self) -> "Principle":
        # SL needs both requests; a lone one is a mistake, not a third kind of principle
        if (self.critique is None) != (self.revision is None):
            has, lacks = ("critique", "revision") if self.revision is None else ("revision", "critique")
            raise ErrorAt(has, f"has a `{has}` but no `{lacks}`; add {type(self).model_fields[lacks].description} "
                               f"(SL runs need both), or remove the `{has}`")
        if self.critique is None and self.comparison is None:
            raise ErrorAt((), f"principle '{self.id}' has no `critique`/`revision` and no `comparison`; add a "
                              "critique and a revision request (for SL runs), a comparison question (for judges), "
                              "or all three")
        return self

    @property
    def sl(self) -> bool:
        """Usable by SL runs: it has a critique and a revision request."""
        return self.critique is not None

    @property
    def rl(self) -> bool:
        """Usable by judges: it has a comparison question."""
        return self.comparison is not None

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, tags: list[str]) -> list[str]:
        for i, tag in enumerate(tags):
            if not tag.strip():
                raise ErrorAt(i, "tag must not be empty; remove it or write a word such as 'harm'")
        return [t.strip() for t in tags]

    @cached_property
    def hash(self) -> str:
        """Content hash of this principle alone (models are frozen: computed once)."""
        return content_hash(_dump(self))


_TURN = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant|User|System):[ \t]?", re.IGNORECASE)
_ROLE = {"human": "user", "user": "user", "assistant": "assistant", "system": "system"}


def parse_transcript(text: str) -> list[dict]:
    """``"Human: …\n\nAssistant: …"`` (hh-rlhf style) → ``[{role, content}, …]``; ValueError when it
    does not start with a speaker or a turn is empty."""
    text = text.strip()
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"must start with 'Human:' (or be a list of {{role, content}}); got {parts[0].strip()[:40]!r}")
    turns = [{"role": _ROLE[who.lower()], "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise ValueError("has no turns; write 'Human: …' (and 'Assistant: …') turns")
    for i, t in enumerate(turns):
        if not t["content"]:
            raise ValueError(f"turn {i + 1} ({t['role']}) is empty")
    return turns


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"] = Field(description="system, user or assistant")
    content: str = Field(min_length=1, description="the turn's text")

    @field_validator("role", mode="before")
    @classmethod
    def _human(cls, v: Any) -> Any:
        return _ROLE.get(v.lower(), v) if isinstance(v, str) else v


def _conversation(value: Any) -> Any:
    if isinstance(value, str):
        return parse_transcript(value)
    return value


Conversation = Annotated[list[Turn], BeforeValidator(_conversation), Field(min_length=1)]


class _Example(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _strip_text(cls, value: Any, info: ValidationInfo) -> Any:
        return _non_empty(cls, value, info) if isinstance(value, str) and info.field_name != "kind" else value

    @cached_property
    def hash(self) -> str:
        return content_hash(_dump(self))


class CritiqueExample(_Example):
    """A critique → revision demonstration: the conversation ends with the reply that is critiqued."""

    kind: Literal["critique"]
    conversation: Conversation = Field(description='the conversation, ending with the assistant\'s reply: '
                                       '"Human: …\\n\\nAssistant: …" or a list of {role, content}')
    critique: str = Field(description="the demonstrated critique of the last reply")
    revision: str = Field(description="the demonstrated revision of the last reply")
    principle: str | None = Field(None, description="the id of the principle whose requests it answers")
    critique_request: str | None = Field(None, description="the critique request shown, when no principle names it")
    revision_request: str | None = Field(None, description="the revision request shown, when no principle names it")

    @field_validator("conversation")
    @classmethod
    def _ends_with_reply(cls, turns: list[Turn]) -> list[Turn]:
        if turns[-1].role != "assistant" or len(turns) < 2:
            raise ValueError("must end with the assistant's reply that the critique is about (and have the "
                             "human's request before it)")
        return turns


class ComparisonExample(_Example):
    """A labelled pair for the judge."""

    kind: Literal["comparison"]
    conversation: Conversation = Field(description='the conversation before the two responses: "Human: …" or a '
                                       'list of {role, content}')
    response_a: str = Field(description="the first response")
    response_b: str = Field(description="the second response")
    preferred: Literal["a", "b"] = Field(description="a or b: the better response")
    rationale: str | None = Field(None, description="a short reason, shown by the cot judge mode")
    principle: str | None = Field(None, description="the id of the principle whose question it answers")
    question: str | None = Field(None, description="the comparison question shown, when no principle names it")

    @field_validator("preferred", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


EXAMPLE_KINDS = {"critique": CritiqueExample, "comparison": ComparisonExample}


def _example_tag(value: Any) -> str | None:
    # the class names as tags: never a data key (`critique` is both a kind and a field), and how
    # factory.yamlconf finds a union member, so errors point at the right key with the field's hint
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return EXAMPLE_KINDS[kind].__name__ if kind in EXAMPLE_KINDS else None


Example = Annotated[Annotated[CritiqueExample, Tag("CritiqueExample")] |
                    Annotated[ComparisonExample, Tag("ComparisonExample")], Discriminator(_example_tag)]


class UnknownPrinciple(KeyError):
    """A principle id that the constitution does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Constitution(BaseModel):
    """A named, versioned list of principles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="a short name such as 'harmless'")
    version: str = Field(description="a version string in quotes such as \"1.0\" (a whole number such as 1 "
                                     "is accepted and read as text)")
    description: str = Field("", description="one or two sentences on what this constitution is for")
    principles: list[Principle] = Field(min_length=1, description="a list of principles (at least one)")
    examples: list[Example] = Field(default_factory=list, description="few-shot demonstrations (kind: critique "
                                    "or comparison)")
    _source: str | None = PrivateAttr(None)

    @field_validator("version", mode="before")
    @classmethod
    def _whole_number_version(cls, value: Any) -> Any:
        # `version: 1` is common and lossless as text; a float is not (1.10 reads as 1.1), so it
        # stays an error that asks for quotes.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("name", "version")
    @classmethod
    def _check_text(cls, value: str, info: ValidationInfo) -> str:
        return _non_empty(cls, value, info)

    @field_validator("description")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("principles")
    @classmethod
    def _unique_ids(cls, principles: list[Principle]) -> list[Principle]:
        first: dict[str, int] = {}
        for i, p in enumerate(principles):
            if p.id in first:
                raise ErrorAt((i, "id"), f"duplicate id '{p.id}' (already used by principle "
                                         f"#{first[p.id] + 1}); give every principle a unique id")
            first[p.id] = i
        return principles

    @field_validator("examples", mode="before")
    @classmethod
    def _example_kinds(cls, examples: Any) -> Any:
        kinds = " or ".join(f"kind: {k}" for k in EXAMPLE_KINDS)
        for i, ex in enumerate(examples if isinstance(examples, list) else []):
            if not isinstance(ex, dict):
                raise ErrorAt(i, f"must be a mapping with {kinds}")
            if "kind" not in ex:
                raise ErrorAt(i, f"has no `kind`; add {kinds}")
            if ex["kind"] not in EXAMPLE_KINDS:
                raise ErrorAt((i, "kind"), f"must be one of {', '.join(repr(k) for k in EXAMPLE_KINDS)}; "
                                           f"got {ex['kind']!r}")
        return examples

    @model_validator(mode="after")
    def _example_principles(self) -> "Constitution":
        by_id = {p.id: p for p in self.principles}
        for i, ex in enumerate(self.examples):
            if ex.principle is None:
                continue
            p = by_id.get(ex.principle)
            if p is None:
                raise ErrorAt(("examples", i, "principle"), f"no principle '{ex.principle}' in this constitution; "
                              f"use one of its ids ({', '.join(list(by_id)[:8])}…) or remove `principle`")
            need, has = ("critique and revision", p.sl) if ex.kind == "critique" else ("comparison", p.rl)
            if not has:
                raise ErrorAt(("examples", i, "principle"), f"principle '{ex.principle}' has no {need}, which a "
                              f"{ex.kind} demonstration shows; name a principle with a {need}")
        return self

    @property
    def source(self) -> str | None:
        """The path this constitution was loaded from (None when built in code)."""
        return self._source

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    @cached_property
    def hash(self) -> str:
        """Content hash of name, version, description, all principles and examples (not the source path;
        computed once). No examples: the dump has no ``examples`` key, as before examples existed."""
        data = _dump(self)
        if not data.get("examples"):
            data.pop("examples", None)
        return content_hash(data)

    @cached_property
    def sl_principles(self) -> list[Principle]:
        """The principles SL runs draw from (critique and revision)."""
        return [p for p in self.principles if p.sl]

    @cached_property
    def rl_principles(self) -> list[Principle]:
        """The principles judges draw from (comparison)."""
        return [p for p in self.principles if p.rl]

    def examples_of(self, kind: str) -> list[CritiqueExample | ComparisonExample]:
        return [e for e in self.examples if e.kind == kind]

    def counts(self) -> str:
        """``"17 principles (17 SL: critique+revision, 17 RL: comparison), 2 examples (1 critique, 1 comparison)"``."""
        n, sl, rl = len(self.principles), len(self.sl_principles), len(self.rl_principles)
        text = f"{n} principles ({sl} SL: critique+revision, {rl} RL: comparison)"
        if self.examples:
            text += (f", {len(self.examples)} examples ({len(self.examples_of('critique'))} critique, "
                     f"{len(self.examples_of('comparison'))} comparison)")
        return text

    def principle(self, id: str) -> Principle:
        for p in self.principles:
            if p.id == id:
                return p
        raise UnknownPrinciple(f"constitution '{self.name}' has no principle '{id}'; "
                               f"known ids: {', '.join(self.ids)}")

    def principle_hash(self, id: str) -> str:
        return self.principle(id).hash


def find_constitution(name: str | Path, dir: str | Path = DEFAULT_DIR) -> Path:
    """``name`` as a path if it exists, else ``<dir>/<name>.yaml`` (then the repo's constitutions/)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    for folder in (Path(dir), _REPO_DIR):
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    known = ", ".join(p.stem for p in list_constitutions(dir)) or "none"
    raise ConfigError(str(name), f"no such constitution file or name; known names in {dir}/: {known}")


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution (a path, or a name like ``harmless``); raises ConfigError."""
    path = find_constitution(path)
    # LARGE: thousands of principles load; the alias-bomb guard is the same as for any config
    constitution = load_yaml_model(path, Constitution, what="constitution", limits=LARGE)
    constitution._source = str(path)
    return constitution



def list_constitutions(dir: str | Path = DEFAULT_DIR) -> list[Path]:
    """The ``*.yaml``/``*.yml`` files in ``dir``, sorted by name."""
    folder = Path(dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
