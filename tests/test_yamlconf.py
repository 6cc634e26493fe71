"""factory.yamlconf: YAML → pydantic with file:line:col errors (expected positions counted by hand)."""

from __future__ import annotations

import pytest
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.yamlconf import ConfigError, ErrorAt, error_at, load_yaml_data, load_yaml_model, parse_yaml


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: str = Field(description="the stage kind, e.g. 'generate'")
    batch_size: int = Field(8, gt=0)


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    seed: int = 0
    stages: list[Stage]

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[Stage]) -> list[Stage]:
        names = [s.name for s in stages]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ErrorAt((i, "name"), f"duplicate stage name '{n}'")
        return stages


def write(tmp_path, text: str | bytes, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def fail(path, model=Pipeline, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_yaml_model(path, model, **kw)
    return info.value


GOOD = """\
name: demo
seed: 3
stages:
  - name: gen
    kind: generate
  - name: crit
    kind: critique
    batch_size: 4
"""


def test_valid_file_loads(tmp_path):
    p = load_yaml_model(write(tmp_path, GOOD), Pipeline)
    assert p.name == "demo" and p.seed == 3
    assert [(s.name, s.kind, s.batch_size) for s in p.stages] == [("gen", "generate", 8), ("crit", "critique", 4)]


def test_marks_record_values_and_keys(tmp_path):
    data, marks = load_yaml_data(write(tmp_path, GOOD))
    assert data["stages"][1]["batch_size"] == 4
    assert marks.find(("stages", 1, "batch_size")) == (8, 17)
    assert marks.find(("stages", 1, "batch_size"), key=True) == (8, 5)
    assert marks.find(("stages", 1)) == (6, 5)  # the item mapping starts at its first key
    assert marks.find(("stages", 1, "nope", 3)) == (6, 5)  # deepest existing ancestor


def test_unknown_key_points_at_key_and_lists_allowed(tmp_path):
    text = GOOD.replace("    batch_size: 4\n", "    batchsize: 4\n")
    e = fail(write(tmp_path, text))
    assert (e.line, e.col) == (8, 5)
    assert e.message == ("stage #2 ('crit'): unknown key 'batchsize'; allowed keys: name, kind, batch_size "
                         "(did you mean 'batch_size'?)")
    assert str(e) == f"{tmp_path / 'p.yaml'}:8:5: {e.message}"


def test_unknown_top_level_key(tmp_path):
    e = fail(write(tmp_path, "name: x\nstages: []\ncolour: red\n"))
    assert (e.line, e.col) == (3, 1)
    assert e.message == "unknown key 'colour'; allowed keys: name, seed, stages"


def test_missing_field_points_at_parent_mapping_with_hint(tmp_path):
    text = "name: demo\nstages:\n  - name: gen\n    kind: generate\n  - name: crit\n"
    e = fail(write(tmp_path, text))
    assert (e.line, e.col) == (5, 5)
    assert e.message == "stage #2 ('crit') has no `kind`; add the stage kind, e.g. 'generate'"


def test_missing_top_level_field(tmp_path):
    e = fail(write(tmp_path, "# comment\nname: demo\n"), what="pipeline")
    assert (e.line, e.col) == (2, 1)
    assert e.message == "the pipeline has no `stages`; add this required key"


def test_wrong_types_and_constraints(tmp_path):
    text = "name: demo\nseed: abc\nstages:\n  - name: gen\n    kind: [a]\n    batch_size: 0\n"
    e = fail(write(tmp_path, text))
    assert [(i.line, i.col) for i in e.issues] == [(2, 7), (5, 11), (6, 17)]
    assert e.issues[0].message == "`seed` must be a whole number; got 'abc' (text)"
    assert e.issues[1].message == "stage #1 ('gen') `kind` must be text; got a list"
    assert e.issues[2].message == "stage #1 ('gen') `batch_size` must be greater than 0; got 0 (a number)"
    assert len(str(e).splitlines()) == 3


def test_number_where_text_expected_suggests_quotes(tmp_path):
    e = fail(write(tmp_path, "name: 1.0\nstages: []\n"))
    assert (e.line, e.col) == (1, 7)
    assert e.message == '`name` must be text; got 1.0 (a number); put it in quotes: "1.0"'


def test_validator_error_at_points_below_the_field(tmp_path):
    text = "name: d\nstages:\n  - name: a\n    kind: k\n  - name: b\n    kind: k\n  - kind: k\n    name: a\n"
    e = fail(write(tmp_path, text))
    assert (e.line, e.col) == (8, 11)
    assert e.message == "stage #3 ('a') `name`: duplicate stage name 'a'"


def test_malformed_yaml_uses_problem_mark(tmp_path):
    e = fail(write(tmp_path, "name: demo\nseed: a: b\n"))
    assert (e.line, e.col) == (2, 8)
    assert e.message.startswith("invalid YAML: mapping values are not allowed here")
    e = fail(write(tmp_path, "name: demo\nstages: [1, 2\nseed: 3\n"))
    assert e.line == 3 and "invalid YAML" in e.message


def test_tab_indentation(tmp_path):
    e = fail(write(tmp_path, "name: demo\nstages:\n\t- name: x\n"))
    assert (e.line, e.col) == (3, 1)
    assert "not tabs" in e.message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    text = "name: demo\nstages:\n  - name: a\n    kind: k\n    name: b\nname: again\n"
    e = fail(write(tmp_path, text))
    assert [(i.line, i.col) for i in e.issues] == [(5, 5), (6, 1)]
    assert e.issues[0].message == "duplicate key 'name' (first set on line 3); keep only one of them"
    assert e.issues[1].message == "duplicate key 'name' (first set on line 1); keep only one of them"


def test_merge_keys_are_not_duplicates(tmp_path):
    text = "base: &b {kind: k, batch_size: 2}\nstages:\n  - <<: *b\n    name: x\n    batch_size: 3\n"
    data, _ = parse_yaml(text)
    assert data["stages"] == [{"kind": "k", "batch_size": 3, "name": "x"}]


def test_missing_file(tmp_path):
    e = fail(tmp_path / "nope.yaml")
    assert e.path == str(tmp_path / "nope.yaml") and e.line is None
    assert str(e).startswith(f"{tmp_path / 'nope.yaml'}: file not found; check the path")


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in fail(tmp_path).message


def test_non_utf8_reports_line_of_bad_byte(tmp_path):
    e = fail(write(tmp_path, b"name: demo\nstages: []\nseed: caf\xe9\n"))
    assert (e.line, e.col) == (3, 10)
    assert e.message == "not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_utf8_bom_and_unicode_text_are_fine(tmp_path):
    p = load_yaml_model(write(tmp_path, "\ufeffname: café ☕\nstages: []\n".encode()), Pipeline)
    assert p.name == "café ☕"


def test_control_character_is_located(tmp_path):
    e = fail(write(tmp_path, "name: demo\nstages: []\nseed: 1\x07\n"))
    assert (e.line, e.col) == (3, 8)
    assert "invalid character" in e.message


def test_empty_file_and_wrong_top_level(tmp_path):
    e = fail(write(tmp_path, "# only a comment\n"), what="pipeline")
    assert (e.line, e.message) == (1, "the pipeline is empty; it needs the keys name, stages")
    e = fail(write(tmp_path, "- a\n- b\n"))
    assert (e.line, e.col) == (1, 1)
    assert e.message == "the file must be a mapping with keys name, seed, stages; got a list"


def test_error_at_for_later_checks(tmp_path):
    path = write(tmp_path, GOOD)
    _, marks = load_yaml_data(path)
    e = error_at(path, marks, ("stages", 0, "kind"), "unknown stage kind")
    assert str(e) == f"{path}:5:11: unknown stage kind"
    assert isinstance(e, Exception) and e.line == 5


class KindA(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["a"]
    x: int


class KindB(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["b"]
    y: str


class Unions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plain: list[KindA | KindB] = []
    tagged: list[Annotated[KindA | KindB, Field(discriminator="kind")]] = []
    k: int | str = 1


def test_scalar_union_errors_are_merged(tmp_path):
    e = fail(write(tmp_path, "k: [1]\n"), Unions)
    assert [str(i) for i in e.issues] == [f"{tmp_path / 'p.yaml'}:1:4: `k` must be a whole number or text; got a list"]


def test_union_of_models_reports_the_closest_member_only(tmp_path):
    e = fail(write(tmp_path, "plain:\n  - kind: a\n    x: nope\n"), Unions)
    assert [(i.line, i.col, i.message) for i in e.issues] == [
        (3, 8, "plain item #1 `x` must be a whole number; got 'nope' (text)")]


def test_discriminated_union(tmp_path):
    e = fail(write(tmp_path, "tagged:\n  - kind: b\n    z: 1\n  - kind: c\n  - y: q\n"), Unions)
    assert [(i.line, i.col, i.message) for i in e.issues] == [
        (2, 5, "tagged item #1 has no `y`; add this required key"),
        (3, 5, "tagged item #1: unknown key 'z'; allowed keys: kind, y"),
        (4, 11, "tagged item #2 `kind` must be one of 'a', 'b'; got 'c' (text)"),
        (5, 5, "tagged item #3 has no `kind`; add it to say which kind of entry this is"),
    ]


def test_nested_dict_of_models(tmp_path):
    class Opt(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float

    class Train(BaseModel):
        model_config = ConfigDict(extra="forbid")
        optim: dict[str, Opt]

    e = fail(write(tmp_path, "optim:\n  adam: {lr: 1e-3, lrr: 2}\n"), Train)
    assert (e.line, e.col) == (2, 20)
    assert e.message == "`optim.adam`: unknown key 'lrr'; allowed keys: lr (did you mean 'lr'?)"


def test_config_error_survives_pickling(tmp_path):
    import pickle

    e = fail(write(tmp_path, "name: 1\nstages: 3\n"))
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.issues == e.issues and (again.line, again.col) == (1, 7)
