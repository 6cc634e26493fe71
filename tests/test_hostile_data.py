"""The hostile data corpus (tests/hostile_data.py): every file's good rows are judged, every bad row is a
skip with its row number and reason, and nothing fails the run (issue 22). Memory and time per file are
measured in bench/bench_hostile.py."""

from __future__ import annotations

import io
import random

import pytest

from factory import prefs
from factory.readers import _Long, _split_nl, bounded_lines, line_ends
from hostile_data import CASES, pipeline, small
from runkit import REPO, query


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_skips_its_bad_rows_and_judges_every_good_one(tmp_path, monkeypatch, name):
    case = small(name, tmp_path)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    db = tmp_path / "out.duckdb"
    s = prefs.run(pipeline(case, tmp_path, db, REPO), quiet=True)
    assert s.status == "done", s.error
    assert query(db, "SELECT count(*) FROM run_pairs")[0][0] == case.good
    assert query(db, "SELECT count(*) FROM preferences")[0][0] == case.good  # every good row judged
    skips = dict(query(db, 'SELECT "row", reason FROM skips WHERE stage = \'pairs\''))
    assert sorted(skips) == sorted(case.skips), skips
    for row, words in case.skips.items():
        assert words in skips[row] and (f"line {row}" in skips[row] or f"row {row}" in skips[row]), skips[row]
    stored = query(db, "SELECT max(length(response_a) + length(response_b) + length(conversation)) FROM pairs")[0][0]
    assert stored < 10_000  # nothing over-long reached the database


def test_a_rerun_of_a_poisoned_file_resumes_and_adds_nothing(tmp_path):
    case = small("mixed", tmp_path)
    db = tmp_path / "out.duckdb"
    y = pipeline(case, tmp_path, db, REPO)
    prefs.run(y, quiet=True)
    s = prefs.run(y, quiet=True)
    assert s.status == "done" and s.written == 0
    assert query(db, "SELECT count(*) FROM preferences")[0][0] == case.good


def _reference(data: bytes, cap: int, ends: str):
    parts = data.splitlines(True) if ends == "cr" else _split_nl(data)
    return [p if len(p) <= cap else ("long", len(p)) for p in parts]


def test_bounded_lines_match_splitting_the_whole_input_at_any_block_size():
    rng = random.Random(7)
    for _ in range(3000):
        data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 60)))
        cap, block, ends = rng.randint(1, 8), rng.randint(1, 7), rng.choice(["cr", "nl"])
        got = [("long", int(x)) if isinstance(x, _Long) else x for x in bounded_lines(io.BytesIO(data), cap, block, ends)]
        assert got == _reference(data, cap, ends), (data, cap, block, ends)


def test_an_over_long_line_is_counted_not_held():
    class Stream:  # 64 MiB of one line, then a short one: only ever read in blocks
        def __init__(self):
            self.left, self.tail, self.largest = 64 << 20, b"\nshort\n", 0

        def read(self, n):
            if self.left:
                k = min(n, self.left)
                self.left -= k
                self.largest = max(self.largest, k)
                return b"x" * k
            out, self.tail = self.tail, b""
            return out

    s = Stream()
    got = list(bounded_lines(s, cap=1 << 20, block=1 << 16))
    assert [int(x) if isinstance(x, _Long) else x for x in got] == [(64 << 20) + 1, b"short\n"]
    assert isinstance(got[0], _Long) and s.largest <= 1 << 16


def test_line_ends_follow_the_first_line():
    assert line_ends(b'{"a": 1}\r{"b": 2}\r') == "cr"
    assert line_ends(b'{"a": 1}\r\n{"b": "x\ry"}\r\n') == "nl"
    assert line_ends(b'{"a": 1}\n\r') == "nl"
    assert line_ends(b"no line end at all") == "nl"
