"""Constitutions: named lists of principles, each a critique request, a revision request and a
comparison question, loaded from YAML (``constitutions/*.yaml``).

Choices:
- Text fields are stripped (YAML block scalars end with a newline) and must not be empty.
- ``hash`` / ``principle_hash`` are the first 16 hex digits of the sha256 of canonical JSON
  (sorted keys, compact) of the content fields after validation, so defaults written out or left
  implicit, key order and YAML style do not change them; the source path is not part of them.
  A principle's hash covers all its fields (tags and weight included) and nothing else, so editing
  one principle changes its own hash and the constitution's, not the other principles' hashes.
- ``version: 1`` (a whole number) is read as the text "1", so it hashes like ``version: "1"``;
  ``version: 1.0`` stays an error asking for quotes, because YAML reads 1.10 as the number 1.1.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from factory.yamlconf import ConfigError, ErrorAt, load_yaml_model

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


class Principle(BaseModel):
    """One principle: how to critique a reply, how to revise it, how to compare two replies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="a stable slug such as 'avoid-harm' (lowercase letters, digits, '-' or '_')")
    critique: str = Field(description="a critique request (asks the model to point out specific ways the "
                                      "assistant's last reply falls short of this principle)")
    revision: str = Field(description="a revision request (asks the model to rewrite the reply to fix "
                                      "the problems the critique found)")
    comparison: str = Field(description="a comparison question (used to judge which of two responses "
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
    def _check_text(cls, value: str, info: ValidationInfo) -> str:
        return _non_empty(cls, value, info)

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
        return content_hash(self.model_dump(mode="json"))


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

    @property
    def source(self) -> str | None:
        """The path this constitution was loaded from (None when built in code)."""
        return self._source

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    @cached_property
    def hash(self) -> str:
        """Content hash of name, version, description and all principles (not the source path; computed once)."""
        return content_hash(self.model_dump(mode="json"))

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
    constitution = load_yaml_model(path, Constitution, what="constitution")
    constitution._source = str(path)
    return constitution


def list_constitutions(dir: str | Path = DEFAULT_DIR) -> list[Path]:
    """The ``*.yaml``/``*.yml`` files in ``dir``, sorted by name."""
    folder = Path(dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
