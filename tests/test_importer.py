"""`factory constitution import` on synthetic files of the CAI paper's shapes (none of its text)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.constitution import load_constitution
from factory.importer import build, write
from factory.yamlconf import ConfigError

CRIT = {
    "Harmful 0": {"prompt": ["\n\nCritiqueRequest: Name the ways the last reply is careless.\n\nCritique:"],
                  "edit_request": "\n\nRevisionRequest: Rewrite the reply so it is careful.\n\nRevision:"},
    "harmful1": {"prompt": ["\n\nCritiqueRequest: Name what is rude in the reply.\n\nCritique:",
                            "CritiqueRequest: Name what is curt in the reply.\n\nCritique:"],
                 "edit_request": "RevisionRequest: Rewrite the reply politely."},
}
RL = ["\nPlease choose the response that is kinder. Options:", "\nWhich response is calmer? Options:",
      "Choose the response a careful person would give."]
FEW = [
    ("\n\nHuman: Can you help me move house?\n\nAssistant: No.\n\nHuman: Why not?\n\nAssistant: Because I said so."
     "\n\nCritiqueRequest: Name what is rude in the reply.\n\nCritique: The reply is dismissive."
     "\n\nRevisionRequest: Rewrite the reply politely.\n\nRevision: I cannot carry boxes, but I can help you plan."
     "\n\nHuman:"),
    ("\n\nHuman: What is 2+2?\n\nAssistant: 5, surely.\n\nCritiqueRequest: Is the last reply truthful?"
     "\n\nCritique: It is wrong and overconfident.\n\nRevisionRequest: Rewrite it with the right answer."
     "\n\nRevision: 2+2 is 4."),
]


def files(tmp_path, crit=CRIT, rl=RL, few=FEW):
    paths = {}
    for name, data in (("crit", crit), ("rl", rl), ("few", few)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def test_round_trip(tmp_path):
    f = files(tmp_path)
    out = tmp_path / "cai.yaml"
    write(build("cai", critiques=f["crit"], comparisons=f["rl"], few_shot=f["few"]), out, ["x"])
    c = load_constitution(out)
    assert c.name == "cai" and c.version == "1"
    got = {p.id: (p.critique, p.revision, p.comparison) for p in c.principles}
    assert got == {
        "harmful-0": ("Name the ways the last reply is careless.", "Rewrite the reply so it is careful.", None),
        "harmful1": ("Name what is rude in the reply.", "Rewrite the reply politely.", None),
        "harmful1-2": ("Name what is curt in the reply.", "Rewrite the reply politely.", None),
        "compare-01": (None, None, "Please choose the response that is kinder."),
        "compare-02": (None, None, "Which response is calmer?"),
        "compare-03": (None, None, "Choose the response a careful person would give."),
    }
    assert len(c.sl_principles) == 3 and len(c.rl_principles) == 3
    e0, e1 = c.examples
    assert e0.kind == e1.kind == "critique"
    assert [(t.role, t.content) for t in e0.conversation] == [
        ("user", "Can you help me move house?"), ("assistant", "No."), ("user", "Why not?"),
        ("assistant", "Because I said so.")]
    # it shows an imported principle's requests: it names it instead of copying them
    assert (e0.principle, e0.critique_request, e0.critique, e0.revision) == (
        "harmful1", None, "The reply is dismissive.", "I cannot carry boxes, but I can help you plan.")
    assert (e1.principle, e1.critique_request, e1.revision_request) == (
        None, "Is the last reply truthful?", "Rewrite it with the right answer.")
    assert e1.critique == "It is wrong and overconfident." and e1.revision == "2+2 is 4."


RL_FEW = [{"prompt": "\n\nHuman: How do I get back at my noisy neighbour?\n\nAssistant:",
           "corrects": ["Talking to them calmly usually works best."],
           "incorrects": ["Blast music at 3am.", "Slash their tyres."]}]


def test_comparison_demonstrations_import_as_comparison_examples(tmp_path):
    f = files(tmp_path)
    (tmp_path / "rlfew.json").write_text(json.dumps(RL_FEW))
    out = tmp_path / "cai.yaml"
    write(build("cai", comparisons=f["rl"], comparison_few_shot=tmp_path / "rlfew.json"), out, ["x"])
    c = load_constitution(out)
    exs = c.examples_of("comparison")
    assert [(e.response_a, e.response_b, e.preferred) for e in exs] == [
        ("Talking to them calmly usually works best.", "Blast music at 3am.", "a"),
        ("Talking to them calmly usually works best.", "Slash their tyres.", "a")]
    assert [(t.role, t.content) for t in exs[0].conversation] == [("user", "How do I get back at my noisy neighbour?")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(RL_FEW + [{"prompt": "Human: hi", "corrects": [], "incorrects": ["x"]}]))
    with pytest.raises(ConfigError) as info:
        build("x", comparisons=f["rl"], comparison_few_shot=bad)
    assert "entry [1]: `corrects` must be a list" in info.value.message


def test_cli_writes_a_valid_file_and_reports_counts(tmp_path):
    f = files(tmp_path)
    out = tmp_path / "sub" / "cai.yaml"
    r = CliRunner().invoke(app, ["constitution", "import", "--critiques", str(f["crit"]), "--comparisons", str(f["rl"]),
                                 "--few-shot", str(f["few"]), "--name", "cai", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 principles (3 SL: critique+revision, 3 RL: comparison), 2 examples" in r.output
    r = CliRunner().invoke(app, ["validate", str(out)])
    assert r.exit_code == 0 and r.output.startswith("ok, 6 principles"), r.output
    # comparisons alone make a judge-only constitution
    r = CliRunner().invoke(app, ["constitution", "import", "--comparisons", str(f["rl"]), "--name", "rl", "-o",
                                 str(tmp_path / "rl.yaml")])
    assert r.exit_code == 0 and len(load_constitution(tmp_path / "rl.yaml").sl_principles) == 0


@pytest.mark.parametrize("which,data,words", [
    ("crit", {"a": {"prompt": ["CritiqueRequest: x"]}}, "entry 'a': `edit_request` must be"),
    ("crit", {"a": {"prompt": "CritiqueRequest: x", "edit_request": "RevisionRequest: y", "extra": 1}},
     "entry 'a': unknown key(s) ['extra']"),
    ("crit", {"a": {"prompt": ["CritiqueRequest:\n\nCritique:"], "edit_request": "y"}},
     "entry 'a': `prompt`[0] has no text"),
    ("crit", ["not", "a", "mapping"], "must be a JSON object"),
    ("rl", ["Which is kinder? Options:", 3], "entry [1] must be a comparison string"),
    ("rl", ["ok?", "  Options:"], "entry [1] has no text"),
    ("few", [FEW[0], "Human: hi\n\nAssistant: hello\n\nCritique: c"], "entry [1]: must be Human/Assistant turns"),
    ("few", ["Human: hi\n\nCritiqueRequest: a\n\nCritique: b\n\nRevisionRequest: c\n\nRevision: d"],
     "entry [0]: the conversation must end with the Assistant's reply"),
])
def test_malformed_input_points_at_the_entry(tmp_path, which, data, words):
    f = files(tmp_path, **{{"crit": "crit", "rl": "rl", "few": "few"}[which]: data})
    with pytest.raises(ConfigError) as info:
        build("x", critiques=f["crit"], comparisons=f["rl"], few_shot=f["few"])
    assert info.value.path == str(f[which]) and words in info.value.message, str(info.value)


def test_invalid_json_has_its_position_and_nothing_is_written(tmp_path):
    bad = tmp_path / "crit.json"
    bad.write_text('{"a": {"prompt": ["x"],\n  "edit_request": }}')
    with pytest.raises(ConfigError) as info:
        build("x", critiques=bad)
    assert (info.value.line, info.value.col) == (2, 19) and "not valid JSON" in info.value.message
    out = tmp_path / "out.yaml"
    r = CliRunner().invoke(app, ["constitution", "import", "--critiques", str(bad), "--name", "x", "-o", str(out)])
    assert r.exit_code == 2 and "crit.json:2:19" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["constitution", "import", "--name", "x", "-o", str(out)])
    assert r.exit_code == 2 and "--critiques" in r.output and not out.exists()
