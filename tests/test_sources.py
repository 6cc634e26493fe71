"""Tests for factory.sources: prompt and pair readers, skips, and the real hh-rlhf sample."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory import sources
from factory.sources import (PAIR_SCHEMA, PROMPT_SCHEMA, SourceError, content_hash, parse_transcript,
                             read_pairs, read_prompts)

from conftest import HH_RLHF as HH  # the shared human labels (one place: tests/conftest.py)


def write_lines(path: Path, lines: list) -> Path:
    """Write one line per item: bytes as-is, str as-is, anything else as JSON."""
    with open(path, "wb") as fh:
        for item in lines:
            if isinstance(item, bytes):
                fh.write(item)
            else:
                fh.write((item if isinstance(item, str) else json.dumps(item)).encode())
            fh.write(b"\n")
    return path


def reasons(skips) -> dict[int, str]:
    return {s.row: s.reason for s in skips}


def user(text):
    return {"role": "user", "content": text}


def test_content_hash_is_sha256_of_canonical_json():
    expected = hashlib.sha256('[{"a":1,"b":"é"},"x"]'.encode()).hexdigest()[:24]
    assert content_hash({"b": "é", "a": 1}, "x") == expected
    assert content_hash({"a": 1, "b": "é"}, "x") == expected
    assert len(expected) == 24


# ---------------------------------------------------------------- prompts

PROMPT_LINES = [
    {"prompt": "Hello"},                                                                  # 1 ok
    "   ",                                                                                # 2 blank
    {"messages": [{"role": "system", "content": "Be nice"}, user("Hi"), ]},             # 3 ok
    {"prompt": "   "},                                                                    # 4
    {"text": "x"},                                                                        # 5
    {"prompt": 5},                                                                        # 6
    {"messages": [{"role": "bot", "content": "x"}]},                                      # 7
    {"messages": [user("x"), {"role": "assistant", "content": "y"}]},                     # 8
    {"prompt": "Hello"},                                                                  # 9
    {"messages": [user("Hello")]},                                                        # 10
    '{"prompt": "unterminated',                                                           # 11
    [1, 2],                                                                               # 12
    b'{"prompt": "caf\xe9"}',                                                             # 13
    {"messages": "hi"},                                                                   # 14
    {"messages": [{"role": "user", "content": 3}]},                                       # 15
    {"prompt": "Hello", "messages": [user("Hello")]},                                     # 16
    {"messages": []},                                                                     # 17
    {"messages": [{"role": "system", "content": " "}, user("Go")]},                       # 18
    {"prompt": "Dernière question ?"},                                                    # 19 ok
]


def test_read_prompts_accepts_and_skips_with_reasons(tmp_path):
    table, skips = read_prompts(write_lines(tmp_path / "p.jsonl", PROMPT_LINES))
    assert table.schema == PROMPT_SCHEMA
    assert table["source_row"].to_pylist() == [1, 3, 19]
    msgs = [json.loads(m) for m in table["messages"].to_pylist()]
    assert msgs == [[user("Hello")], [{"role": "system", "content": "Be nice"}, user("Hi")],
                    [user("Dernière question ?")]]
    assert table["n_chars"].to_pylist() == [5, 9, 19]
    assert table["prompt_id"].to_pylist()[0] == content_hash([user("Hello")])
    r = reasons(skips)
    assert r == {
        4: "row 4: empty prompt",
        5: "row 5: no `prompt` or `messages` field; add one",
        6: "row 6: `prompt` must be a string, got int",
        7: "row 7: messages[0] has role 'bot'; use system, user or assistant",
        8: "row 8: `messages` must end with a user turn (the last is assistant)",
        9: "row 9: duplicate of row 1",
        10: "row 10: duplicate of row 1",
        11: r[11], 12: "line 12: expected a JSON object, got list",
        13: "line 13: not valid UTF-8 (byte offset 15 in the line); re-encode the file as UTF-8",
        14: "row 14: `messages` must be a list of {role, content} objects, got str",
        15: "row 15: messages[0].content must be a string, got int",
        16: "row 16: has both `prompt` and `messages`; keep one",
        17: "row 17: empty `messages` list",
        18: "row 18: messages[0] has empty content",
    }
    assert r[11].startswith("line 11: invalid JSON: Unterminated string")
    assert all("1-based line" in s.source and "p.jsonl" in s.source for s in skips)
    non_blank = sum(1 for x in PROMPT_LINES if x != "   ")
    assert table.num_rows + len(skips) == non_blank


def test_read_prompts_gz_limit_and_field(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(5):
            fh.write(json.dumps({"question": f"q{i}"}) + "\n")
        fh.write(json.dumps({"prompt": "no question"}) + "\n")
    table, skips = read_prompts(path, field="question", limit=3)
    assert table["source_row"].to_pylist() == [1, 2, 3] and skips == []
    table, skips = read_prompts(path, field="question")
    assert table.num_rows == 5
    assert reasons(skips) == {6: "row 6: no `question` field; add one or pass a different field"}


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(sources.SourceNotFoundError, match="nope.jsonl") as info:
        read_prompts(missing)
    assert isinstance(info.value, FileNotFoundError) and "Hugging Face dataset name" in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_pairs(str(missing))


def test_parquet_file_uses_zero_based_rows(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "", "c"]}), tmp_path / "p.parquet")
    table, skips = read_prompts(tmp_path / "p.parquet")
    assert table["source_row"].to_pylist() == [0, 2]
    assert [(s.row, s.reason) for s in skips] == [(1, "row 1: empty prompt")]
    assert "0-based" in skips[0].source


def test_hf_name_goes_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, data_dir=None, split=None, streaming=False):
        calls.append((name, data_dir, split, streaming))
        if name == "broken/x":
            raise ConnectionError("no network")
        return [{"prompt": "first"}, {"prompt": ""}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    table, skips = read_prompts("org/prompts", data_dir="sub", split="validation")
    assert calls == [("org/prompts", "sub", "validation", True)]  # Hub datasets stream
    assert table["source_row"].to_pylist() == [0]
    assert skips[0].row == 1 and skips[0].source.startswith("hf:org/prompts[validation]")
    with pytest.raises(SourceError, match="broken/x.*no network"):
        read_pairs("broken/x")


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "one"}, {"prompt": "two"}])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    table, _ = read_prompts(tmp_path / "dd")
    assert [json.loads(m)[0]["content"] for m in table["messages"].to_pylist()] == ["one", "two"]
    with pytest.raises(SourceError, match="no split 'test'.*'train'"):
        read_prompts(tmp_path / "dd", split="test")


# ---------------------------------------------------------------- hh-rlhf pairs


def test_parse_transcript_keeps_newlines_inside_turns():
    text = "\n\nHuman: Hi\nthere\n\nAssistant: Hello\n\nfriend, Human: ok?\n\nHuman: bye \n\nAssistant: ok\n"
    assert parse_transcript(text) == [
        user("Hi\nthere"), {"role": "assistant", "content": "Hello\n\nfriend, Human: ok?"},
        user("bye"), {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="before the first"):
        parse_transcript("preamble\n\nHuman: x")


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


HH_LINES = [
    {"chosen": hh("How do I\nbake?", "Which cake?", "Sponge", "Use eggs.\nThen flour."),
     "rejected": hh("How do I\nbake?", "Which cake?", "Sponge", "No idea.")},             # 1 ok
    {"chosen": hh("Hi", "Hello", "Bye", "Bye!"), "rejected": hh("Hi", "Yo", "Bye", "Ciao")},  # 2 differ at turn 2
    {"chosen": hh("Hi", "Same"), "rejected": hh("Hi", "Same")},                             # 3 identical
    {"chosen": hh("Hi", "Fine"), "rejected": hh("Hi", "  ")},                               # 4 empty
    {"chosen": hh("How do I\nbake?", "Which cake?", "Sponge", "Use eggs.\nThen flour."),
     "rejected": hh("How do I\nbake?", "Which cake?", "Sponge", "No idea.")},             # 5 duplicate
    {"chosen": hh("Hi", "Hello", "More?"), "rejected": hh("Hi", "Hello", "More?")},         # 6 ends with Human
    {"chosen": hh("Q", "A1"), "rejected": hh("Q", "X", "Q2", "A2")},                        # 7 lengths differ
]


def test_hh_rlhf_pairs(tmp_path):
    table, skips = read_pairs(write_lines(tmp_path / "hh.jsonl", HH_LINES))
    assert table.schema == PAIR_SCHEMA
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert json.loads(row["conversation"]) == [
        user("How do I\nbake?"), {"role": "assistant", "content": "Which cake?"}, user("Sponge")]
    chosen, rejected = "Use eggs.\nThen flour.", "No idea."
    assert row["response_" + row["human_choice"]] == chosen
    assert {row["response_a"], row["response_b"]} == {chosen, rejected}
    assert row["swapped"] == (row["human_choice"] == "b")
    assert row["annotator"] is None and row["confidence"] is None
    assert row["pair_id"] == content_hash(json.loads(row["conversation"]), row["response_a"], row["response_b"])
    assert reasons(skips) == {
        2: "row 2: chosen and rejected transcripts do not share a conversation prefix (they differ at turn 2)",
        3: "row 3: identical responses",
        4: "row 4: empty final response in rejected",
        5: "row 5: duplicate of row 1",
        6: "row 6: chosen transcript does not end with an Assistant turn after a Human turn",
        7: "row 7: chosen and rejected transcripts do not share a conversation prefix (they differ at turn 2)",
    }


def test_hh_swap_is_balanced(tmp_path):
    lines = [{"chosen": hh(f"q{i}", f"good {i}"), "rejected": hh(f"q{i}", f"bad {i}")} for i in range(400)]
    table, skips = read_pairs(write_lines(tmp_path / "hh.jsonl", lines), format="hh-rlhf")
    assert skips == [] and table.num_rows == 400
    frac = sum(table["swapped"].to_pylist()) / 400
    assert 0.4 < frac < 0.6
    for r in table.to_pylist():  # the chosen ("good") reply sits where human_choice points
        assert r["response_" + r["human_choice"]].startswith("good")


@pytest.mark.usefixtures("hh_rlhf")
def test_real_hh_rlhf_sample():
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    assert len(raw) == 1800
    table, skips = read_pairs(HH)
    assert table.num_rows + len(skips) == 1800
    assert all(s.row is not None and s.reason.startswith(f"row {s.row}: ") for s in skips)
    prefix = [s for s in skips if "conversation prefix" in s.reason]
    assert 1 <= len(prefix) <= 20 and len(skips) <= 30
    assert 0.4 <= sum(table["swapped"].to_pylist()) / table.num_rows <= 0.6
    for r in table.to_pylist():  # independent of the parser: the raw chosen text ends with the chosen reply
        rec = raw[r["source_row"] - 1]
        assert r["human_choice"] == ("b" if r["swapped"] else "a")
        assert rec["chosen"].rstrip().endswith(r["response_" + r["human_choice"]])
        assert rec["rejected"].rstrip().endswith(r["response_" + "ab"[r["human_choice"] == "a"]])
        assert json.loads(r["conversation"])[-1]["role"] == "user"
    limited, _ = read_pairs(HH, limit=10)
    assert limited.num_rows == 10


# ---------------------------------------------------------------- generic JSONL pairs


@pytest.mark.parametrize("value,expected", [("a", "a"), ("b", "b"), ("A", "a"), ("B", "b"),
                                            ("response_a", "a"), ("response_b", "b"), (0, "a"), (1, "b")])
def test_generic_choice_mapping(tmp_path, value, expected):
    rec = {"prompt": "p", "response_a": "x", "response_b": "y", "choice": value}
    table, skips = read_pairs(write_lines(tmp_path / "g.jsonl", [rec]))
    assert skips == [] and table["human_choice"].to_pylist() == [expected]


@pytest.mark.parametrize("value,shown", [("c", "'c'"), (2, "2"), (True, "True"), ("1", "'1'")])
def test_generic_bad_choice(tmp_path, value, shown):
    rec = {"prompt": "p", "response_a": "x", "response_b": "y", "human_choice": value}
    table, skips = read_pairs(write_lines(tmp_path / "g.jsonl", [rec]))
    assert table.num_rows == 0
    assert reasons(skips) == {1: f"row 1: unknown choice value {shown}; use a or b"}


def test_generic_pairs(tmp_path):
    conv = [{"role": "system", "content": "s"}, user("u")]
    lines = [
        {"conversation": conv, "response_a": "x", "response_b": "y", "annotator_id": 17, "confidence": 0.7},  # 1
        {"prompt": "p", "response_a": "x"},                                                  # 2
        {"prompt": "p", "response_a": "", "response_b": "y"},                                # 3
        {"prompt": "p", "response_a": "x", "response_b": "y", "confidence": 1.5},            # 4
        {"messages": conv, "response_a": "x", "response_b": "y"},                            # 5 dup of 1
        {"messages": [user("u"), {"role": "assistant", "content": "a"}], "response_a": "x", "response_b": "y"},  # 6
        {"response_a": "x", "response_b": "y"},                                              # 7
        {"prompt": "p", "response_a": "same", "response_b": "same"},                         # 8
        {"prompt": "p", "response_a": "x", "response_b": "y", "annotator": "ann-1", "choice": "B"},  # 9 ok
        {"prompt": "p", "response_a": "x", "response_b": 3},                                 # 10
    ]
    table, skips = read_pairs(write_lines(tmp_path / "g.jsonl", lines))
    rows = table.to_pylist()
    assert [r["source_row"] for r in rows] == [1, 9]
    assert rows[0]["annotator"] == "17" and rows[0]["confidence"] == 0.7 and rows[0]["human_choice"] is None
    assert json.loads(rows[0]["conversation"]) == conv and rows[0]["swapped"] is False
    assert rows[1]["annotator"] == "ann-1" and rows[1]["human_choice"] == "b" and rows[1]["confidence"] is None
    assert reasons(skips) == {
        2: "row 2: missing `response_b` field",
        3: "row 3: empty response_a",
        4: "row 4: confidence must be a number between 0 and 1, got 1.5",
        5: "row 5: duplicate of row 1",
        6: "row 6: `messages` must end with a user turn (the last is assistant)",
        7: "row 7: no `prompt`, `conversation` or `messages` field; add one",
        8: "row 8: identical responses",
        10: "row 10: `response_b` must be a string, got int",
    }


def test_format_detection_and_forcing(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", ["not json", {"prompt": "p", "response_a": "x", "response_b": "y"}])
    table, skips = read_pairs(path)  # auto looks at the first record that parsed
    assert table.num_rows == 1 and skips[0].row == 1
    table, skips = read_pairs(path, format="hh-rlhf")
    assert table.num_rows == 0
    assert reasons(skips)[2] == "row 2: `chosen` must be a transcript string, got NoneType"
    with pytest.raises(SourceError, match="unknown pairs format"):
        read_pairs(path, format="csv")  # type: ignore[arg-type]


def test_parquet_folder_ignores_other_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["b"]}), tmp_path / "d" / "sub" / "1.parquet")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "d" / "0.parquet")
    (tmp_path / "d" / "README.md").write_text("not parquet")
    table, skips = read_prompts(tmp_path / "d")
    assert [json.loads(m)[0]["content"] for m in table["messages"].to_pylist()] == ["a", "b"] and skips == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="neither parquet files nor a save_to_disk"):
        read_prompts(tmp_path / "empty")
