"""factory.constitution: shipped constitutions, located errors for bad ones, content hashes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from factory.constitution import (
    Constitution, Principle, UnknownPrinciple, find_constitution, list_constitutions, load_constitution,
)
from factory.yamlconf import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def fail(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    return info.value


# Line numbers below are counted by hand in this text.
GOOD = """\
name: test
version: "1.0"
description: a test constitution
principles:
  - id: avoid-harm
    critique: Point out harmful parts of the reply.
    revision: Rewrite the reply without them.
    comparison: Which response is less harmful?
    tags: [harm]
    weight: 2
  - id: be-kind
    critique: Point out unkind parts of the reply.
    revision: Rewrite the reply kindly.
    comparison: Which response is kinder?
"""


@pytest.mark.parametrize("name,minimum", [("harmless", 12), ("helpful", 6), ("honest", 6)])
def test_shipped_constitutions_load(name, minimum):
    path = ROOT / "constitutions" / f"{name}.yaml"
    c = load_constitution(path)
    assert c.name == name and c.version == "1.0" and c.description
    assert c.source == str(path)
    assert len(c.principles) >= minimum
    assert len(set(c.ids)) == len(c.ids)
    for p in c.principles:
        assert p.comparison.endswith("?"), p.id
        for text in (p.critique, p.revision, p.comparison):
            assert 20 < len(text) < 240, (p.id, text)  # short: read by a small model
            assert len(re.findall(r"[.?!](\s|$)", text)) <= 3, (p.id, text)
        assert p.tags and p.weight > 0


def test_harmless_covers_the_required_themes():
    ids = set(load_constitution(ROOT / "constitutions" / "harmless.yaml").ids)
    for theme in ("harm-to-others", "illegal-acts", "weapons", "drugs", "self-harm-care", "harassment-hate",
                  "privacy", "no-manipulation", "protect-minors", "expert-caution", "helpful-when-benign",
                  "age-appropriate", "discrimination", "misinformation", "non-violent-alternatives"):
        assert theme in ids


def test_load_by_name_and_listing():
    assert find_constitution("harmless") == Path("constitutions/harmless.yaml") or \
        find_constitution("harmless") == ROOT / "constitutions" / "harmless.yaml"
    assert {p.stem for p in list_constitutions(ROOT / "constitutions")} >= {"harmless", "helpful", "honest"}
    with pytest.raises(ConfigError) as info:
        find_constitution("no-such-thing", ROOT / "constitutions")
    assert "harmless" in str(info.value)


def test_valid_file(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    assert c.ids == ["avoid-harm", "be-kind"]
    assert c.principle("avoid-harm").weight == 2.0 and c.principle("be-kind").weight == 1.0
    assert c.principle("be-kind").tags == []


def test_unknown_principle_lists_known_ids(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    with pytest.raises(KeyError) as info:
        c.principle("nope")
    assert isinstance(info.value, UnknownPrinciple)
    assert str(info.value) == "constitution 'test' has no principle 'nope'; known ids: avoid-harm, be-kind"


def test_malformed_yaml(tmp_path):
    e = fail(write(tmp_path, GOOD.replace("    revision: Rewrite the reply kindly.",
                                          "    revision: Note: rewrite the reply kindly.")))
    assert (e.line, e.col) == (13, 19)
    assert "mapping values are not allowed here" in e.message


def test_principle_without_id(tmp_path):
    e = fail(write(tmp_path, GOOD.replace("  - id: be-kind\n    critique:", "  - critique:")))
    assert (e.line, e.col) == (11, 5)
    assert e.message.startswith("principle #2 has no `id`; add a stable slug such as 'avoid-harm'")


def test_missing_revision_names_the_fix(tmp_path):
    # (was: a missing `comparison` was an error; a principle without one is now SL-only, issue 21)
    e = fail(write(tmp_path, GOOD.replace("    revision: Rewrite the reply without them.\n", "")))
    assert (e.line, e.col) == (6, 15)
    assert e.message.startswith("principle #1 ('avoid-harm') `critique`: has a `critique` but no `revision`; add a "
                                "revision request")


def test_duplicate_ids_point_at_second_occurrence(tmp_path):
    e = fail(write(tmp_path, GOOD.replace("id: be-kind", "id: avoid-harm")))
    assert (e.line, e.col) == (11, 9)
    assert e.message == ("principle #2 ('avoid-harm') `id`: duplicate id 'avoid-harm' (already used by "
                         "principle #1); give every principle a unique id")
    assert len(e.issues) == 1


def test_unknown_key_lists_allowed_keys(tmp_path):
    e = fail(write(tmp_path, GOOD.replace("    tags: [harm]\n", "    tag: [harm]\n")))
    assert (e.line, e.col) == (9, 5)
    assert e.message == ("principle #1 ('avoid-harm'): unknown key 'tag'; allowed keys: id, critique, "
                         "revision, comparison, tags, weight (did you mean 'tags'?)")
    e = fail(write(tmp_path, GOOD.replace("description:", "summary:")))
    assert (e.line, e.col) == (3, 1)
    assert e.message.startswith("unknown key 'summary'; allowed keys: name, version, description, principles")


@pytest.mark.parametrize("value", ['""', '"   "', "|\n      \n"])
def test_empty_critique(tmp_path, value):
    e = fail(write(tmp_path, GOOD.replace("critique: Point out unkind parts of the reply.", f"critique: {value}")))
    assert (e.line, e.col) == (12, 15)
    assert e.message.startswith("principle #2 ('be-kind') `critique`: must not be empty; write a critique request")


@pytest.mark.parametrize("weight", ["0", "-1.5", ".nan"])
def test_weight_must_be_positive(tmp_path, weight):
    e = fail(write(tmp_path, GOOD.replace("weight: 2", f"weight: {weight}")))
    assert (e.line, e.col) == (10, 13)
    assert e.message.startswith("principle #1 ('avoid-harm') `weight` must be ")
    assert "greater than 0" in e.message or "finite" in e.message


def test_bad_id_and_unquoted_version(tmp_path):
    text = GOOD.replace("id: be-kind", "id: Be Kind").replace('version: "1.0"', "version: 1.0")
    e = fail(write(tmp_path, text))
    assert [(i.line, i.col) for i in e.issues] == [(2, 10), (11, 9)]
    assert e.issues[0].message == '`version` must be text; got 1.0 (a number); put it in quotes: "1.0"'
    assert e.issues[1].message.startswith("principle #2 ('Be Kind') `id`: 'Be Kind' is not a valid id; use lowercase")


@pytest.mark.parametrize("written", ["1", "12"])
def test_whole_number_version_is_text(tmp_path, written):
    numeric = load_constitution(write(tmp_path, GOOD.replace('version: "1.0"', f"version: {written}")))
    quoted = load_constitution(write(tmp_path, GOOD.replace('version: "1.0"', f'version: "{written}"'), "q.yaml"))
    assert numeric.version == written and isinstance(numeric.version, str)
    assert numeric.hash == quoted.hash


def test_boolean_version_is_still_an_error(tmp_path):
    e = fail(write(tmp_path, GOOD.replace('version: "1.0"', "version: yes")))
    assert (e.line, e.col) == (2, 10) and e.message.startswith("`version` must be text; got true (a boolean)")


def test_no_principles(tmp_path):
    e = fail(write(tmp_path, 'name: x\nversion: "1"\nprinciples: []\n'))
    assert (e.line, e.col) == (3, 13)
    assert e.message == "`principles` must have at least 1 item(s); got a list"


def test_missing_file_non_utf8_and_duplicate_key(tmp_path):
    e = fail(tmp_path / "missing.yaml")
    assert str(e).startswith(f"{tmp_path / 'missing.yaml'}: file not found")
    e = fail(write(tmp_path, GOOD.replace("kinder?", "kinder\xe9?").encode("latin-1")))
    assert (e.line, e.col) == (14, 41) and "UTF-8" in e.message
    e = fail(write(tmp_path, GOOD.replace("    weight: 2\n", "    weight: 2\n    critique: again\n")))
    assert (e.line, e.col) == (11, 5)
    assert e.message == "duplicate key 'critique' (first set on line 6); keep only one of them"


# ------------------------------------------------------------------------------------ hashes

REORDERED = """\
# same content: keys reordered, flow style, defaults written out, block scalar with trailing newline
principles:
  - {weight: 2.0, tags: [harm], comparison: "Which response is less harmful?", id: avoid-harm,
     revision: Rewrite the reply without them., critique: Point out harmful parts of the reply.}
  - comparison: Which response is kinder?
    critique: |
      Point out unkind parts of the reply.
    revision: "Rewrite the reply kindly."
    id: be-kind
    weight: 1
    tags: []
description: a test constitution
version: '1.0'
name: test
"""


def test_same_content_same_hash(tmp_path):
    a = load_constitution(write(tmp_path, GOOD, "a.yaml"))
    b = load_constitution(write(tmp_path, REORDERED, "b.yaml"))
    assert a.source != b.source
    assert a.hash == b.hash and len(a.hash) == 16
    assert [a.principle_hash(i) for i in a.ids] == [b.principle_hash(i) for i in b.ids]


def test_principle_hash_is_sha256_of_canonical_json(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    expected = hashlib.sha256(
        b'{"comparison":"Which response is kinder?","critique":"Point out unkind parts of the reply.",'
        b'"id":"be-kind","revision":"Rewrite the reply kindly.","tags":[],"weight":1.0}').hexdigest()[:16]
    assert c.principle_hash("be-kind") == c.principle("be-kind").hash == expected


def test_editing_one_principle_changes_only_its_hash(tmp_path):
    a = load_constitution(write(tmp_path, GOOD, "a.yaml"))
    b = load_constitution(write(tmp_path, GOOD.replace("Rewrite the reply kindly.", "Rewrite it kindly."), "b.yaml"))
    assert a.principle_hash("be-kind") != b.principle_hash("be-kind")
    assert a.principle_hash("avoid-harm") == b.principle_hash("avoid-harm")
    assert a.hash != b.hash
    c = load_constitution(write(tmp_path, GOOD.replace("description: a test", "description: another"), "c.yaml"))
    assert c.hash != a.hash and c.principle_hash("be-kind") == a.principle_hash("be-kind")


def test_built_in_code():
    p = Principle(id="x", critique="c", revision="r", comparison="q?")
    c = Constitution(name="n", version="1", principles=[p])
    assert c.source is None and c.principle("x") == p
    data = json.loads(json.dumps(c.model_dump()))
    assert Constitution.model_validate(data).hash == c.hash


# ------------------------------------------------------------------- issue 21: principles by use, examples, sizes

# Computed with the code before principles by use and examples existed (main at 1c5b936): every
# constitution that loaded then keeps its hash, and so does each of its principles (the second
# value is sha256 of the sorted JSON {id: principle hash}, first 16 hex digits).
PINNED = {
    "harmless": ("c6e9807a069e0292", "604760f2f964b533"),
    "helpful": ("3e83c4613d667090", "e0c5b2ee32b71411"),
    "honest": ("15a3e0aa48182449", "48902c5a6ab085d4"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_constitution_hashes_are_pinned(name):
    c = load_constitution(ROOT / "constitutions" / f"{name}.yaml")
    principles = json.dumps({p.id: p.hash for p in c.principles}, sort_keys=True)
    assert (c.hash, hashlib.sha256(principles.encode()).hexdigest()[:16]) == PINNED[name]


SPLIT = """\
name: split
version: "1"
principles:
  - id: sl-only
    critique: Point out harmful parts of the reply.
    revision: Rewrite the reply without them.
  - id: rl-only
    comparison: Which response is less harmful?
  - id: both
    critique: Point out unkind parts.
    revision: Rewrite it kindly.
    comparison: Which response is kinder?
"""


def test_sl_only_and_rl_only_principles(tmp_path):
    c = load_constitution(write(tmp_path, SPLIT))
    assert [p.id for p in c.sl_principles] == ["sl-only", "both"]
    assert [p.id for p in c.rl_principles] == ["rl-only", "both"]
    assert c.counts() == "3 principles (2 SL: critique+revision, 2 RL: comparison)"
    # a missing request is left out of the hash, not hashed as null
    assert c.principle("rl-only").hash == hashlib.sha256(
        b'{"comparison":"Which response is less harmful?","id":"rl-only","tags":[],"weight":1.0}').hexdigest()[:16]


@pytest.mark.parametrize("drop,line,col,words", [
    ("    revision: Rewrite the reply without them.\n", 5, 15, "has a `critique` but no `revision`"),
    ("    critique: Point out harmful parts of the reply.\n", 5, 15, "has a `revision` but no `critique`"),
    ("    comparison: Which response is less harmful?\n", 7, 5, "has no `critique`/`revision` and no `comparison`"),
])
def test_a_principle_without_a_use_is_an_error_at_its_line(tmp_path, drop, line, col, words):
    e = fail(write(tmp_path, SPLIT.replace(drop, "")))
    assert (e.line, e.col) == (line, col) and words in e.message, str(e)


EXAMPLES = SPLIT + """\
examples:
  - kind: critique
    conversation: "Human: How do I pick a lock?\\n\\nAssistant: Use a tension wrench."
    critique: It helps with a possible break-in.
    revision: If you are locked out, call a locksmith.
    principle: sl-only
  - kind: comparison
    conversation: "Human: Is it safe to mix bleach and ammonia?"
    response_a: No, it makes toxic gas.
    response_b: Sure.
    preferred: A
    rationale: The first is true and safe.
"""


def test_examples_load_and_a_transcript_hashes_like_its_turns(tmp_path):
    a = load_constitution(write(tmp_path, EXAMPLES, "a.yaml"))
    crit, comp = a.examples
    assert [(t.role, t.content) for t in crit.conversation] == [
        ("user", "How do I pick a lock?"), ("assistant", "Use a tension wrench.")]
    assert comp.preferred == "a" and comp.rationale == "The first is true and safe."
    assert a.counts().endswith("2 examples (1 critique, 1 comparison)")
    turns = ('conversation:\n      - {role: user, content: How do I pick a lock?}\n'
             '      - {role: assistant, content: Use a tension wrench.}')
    b = load_constitution(write(tmp_path, EXAMPLES.replace(
        'conversation: "Human: How do I pick a lock?\\n\\nAssistant: Use a tension wrench."', turns), "b.yaml"))
    assert b.hash == a.hash and b.examples[0].hash == crit.hash
    assert a.hash != load_constitution(write(tmp_path, SPLIT, "c.yaml")).hash
    # the principles' hashes do not depend on the examples
    assert [p.hash for p in a.principles] == [p.hash for p in load_constitution(tmp_path / "c.yaml").principles]


@pytest.mark.parametrize("old,new,line,words", [
    ("principle: sl-only", "principle: nope", 18, "no principle 'nope' in this constitution"),
    ("principle: sl-only", "principle: rl-only", 18, "principle 'rl-only' has no critique and revision"),
    ('\\n\\nAssistant: Use a tension wrench."', '"', 15, "must end with the assistant's reply"),
    ("Human: Is it safe", "Robot: Is it safe", 20, "must start with 'Human:'"),
    ("preferred: A", "preferred: c", 23, "must be one of 'a' or 'b'"),
    ("  - kind: comparison", "  - kind: ranking", 19, "must be one of 'critique', 'comparison'"),
    ("    response_b: Sure.\n", "", 19, "example #2 has no `response_b`; add the second response"),
])
def test_bad_examples_are_errors_at_their_line(tmp_path, old, new, line, words):
    e = fail(write(tmp_path, EXAMPLES.replace(old, new)))
    assert e.line == line and words in e.message, str(e)


def test_version_hint_quotes_what_was_written(tmp_path):
    e = fail(write(tmp_path, GOOD.replace('version: "1.0"', "version: 0.10")))
    assert (e.line, e.col) == (2, 10)
    assert e.message == '`version` must be text; got 0.10 (a number); put it in quotes: "0.10"'


def big_constitution(n: int) -> str:
    lines = ["name: big", 'version: "1"', "principles:"]
    for i in range(n):
        lines += [f"  - id: p{i}", f"    critique: Point out where the reply breaks rule {i} about care with facts.",
                  f"    revision: Rewrite the reply so that it follows rule {i} and stays helpful.",
                  f"    comparison: Which response better follows rule {i} about care with facts?"]
    return "\n".join(lines) + "\n"


def test_five_thousand_principles_load(tmp_path):
    # 1,900 principles passed the old 10,000-value cap for any YAML file; constitutions have their own
    c = load_constitution(write(tmp_path, big_constitution(5000)))
    assert len(c.principles) == len(c.rl_principles) == 5000 and c.principle("p4999").id == "p4999"


def test_alias_bombs_in_a_constitution_are_refused_as_before():
    # constitutions may be large, but values repeated by aliases keep the budget of every config
    e = fail(ROOT / "tests/data/hostile/alias-bomb.yaml")
    assert e.line == 8 and "past 10000 values" in e.message


def test_a_syntax_error_in_a_large_file_is_located(tmp_path):
    text = big_constitution(5000)
    assert len(text) > 1 << 20  # past the size re-parsed by the pure-Python parser
    e = fail(write(tmp_path, text + "  - id: [unclosed\n"))
    assert e.message.startswith("invalid YAML") and f"at line {text.count(chr(10)) + 1}" in e.message, str(e)


def test_top_level_keys_reads_no_values(tmp_path):
    from factory.yamlconf import top_level_keys

    assert top_level_keys(write(tmp_path, GOOD)) == {"name", "version", "description", "principles"}
    nested = "a: &x {b: [1, {c: 2}], d: e}\nf: *x\ng: [*x, *x]\nprinciples: []\n"
    assert top_level_keys(write(tmp_path, nested, "n.yaml")) == {"a", "f", "g", "principles"}
    assert top_level_keys(write(tmp_path, "- x\n" * 200_000, "wide.yaml")) is None  # not a mapping: not read on
    assert top_level_keys(write(tmp_path, "a: [1, 2\n", "bad.yaml")) is None  # the full load reports it
    assert top_level_keys(ROOT / "tests/data/hostile/alias-bomb.yaml") == set("abcdefghi")
