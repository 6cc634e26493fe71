"""The hostile data corpus: input files a careless or hostile user might feed a prefs run, each with the
good rows that must all be judged and the rows that must be skipped (row number → words of the reason).
Beside the hostile YAML corpus (tests/hostile_corpus.py); shared by tests/test_hostile_data.py and
bench/bench_hostile.py. Every file is generated into a folder on demand (some are large)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

MiB = 1 << 20


@dataclass
class Case:
    path: Path
    good: int  # rows that must be judged
    skips: dict[int, str] = field(default_factory=dict)  # row → words its skip reason must contain
    env: dict[str, str] = field(default_factory=dict)  # environment the run needs (e.g. a smaller line cap)
    max_model_len: int | None = None


def good(i: int) -> dict:
    return {"prompt": f"question {i}: is it safe?", "response_a": f"yes, {i} times", "response_b": f"no, because of {i}"}


def _lines(rows: list[str | bytes]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in rows)


def _with(poison: list[str | bytes], n: int = 10, at: int = 5) -> tuple[bytes, list[int]]:
    """``n`` good lines with ``poison`` inserted after the first ``at``; the poison's 1-based line numbers."""
    goods = [json.dumps(good(i)) for i in range(n)]
    rows = goods[:at] + poison + goods[at:]
    return _lines(rows), list(range(at + 1, at + 1 + len(poison)))


def lone_surrogate(d: Path) -> Case:
    data, rows = _with(['{"prompt": "x \\ud800", "response_a": "a", "response_b": "b"}',
                        '{"prompt": "y", "response_a": "\\udfff tail", "response_b": "b"}'])
    (p := d / "lone-surrogate.jsonl").write_bytes(data)
    return Case(p, 10, {r: "lone surrogate" for r in rows})


def deep_nesting(d: Path) -> Case:
    data, rows = _with(['{"prompt": ' + "[" * 10000 + "]" * 10000 + ', "response_a": "a", "response_b": "b"}',
                        '{"prompt": "x", "response_a": "a", "response_b": "b", "extra": ' + "{\"k\": " * 5000
                        + "1" + "}" * 5000 + "}"])
    (p := d / "deep-nesting.jsonl").write_bytes(data)
    return Case(p, 10, {r: "nested too deeply" for r in rows})


def nul_bytes(d: Path) -> Case:
    # a raw NUL inside a line is not JSON; an escaped one is a character like any other (a good row)
    data, rows = _with([b'{"prompt": "x\x00y", "response_a": "a", "response_b": "b"}',
                        '{"prompt": "escaped \\u0000 nul", "response_a": "a", "response_b": "b"}'])
    (p := d / "nul-bytes.jsonl").write_bytes(data)
    return Case(p, 11, {rows[0]: "invalid JSON"})


def invalid_utf8(d: Path) -> Case:
    data, rows = _with([b'{"prompt": "caf\xe9", "response_a": "a", "response_b": "b"}', b"\xff\xfe\x00garbage"])
    (p := d / "invalid-utf8.jsonl").write_bytes(data)
    return Case(p, 10, {r: "not valid UTF-8" for r in rows})


def wrong_types(d: Path) -> Case:
    data, rows = _with([json.dumps({"prompt": 42, "response_a": "a", "response_b": "b"}),
                        json.dumps({"prompt": "x", "response_a": ["a"], "response_b": "b"}),
                        json.dumps({"prompt": "x", "response_a": "a", "response_b": None}),
                        json.dumps(["not", "an", "object"]), json.dumps("a string"),
                        '{"prompt": "x", "response_a": "a", "response_b": "b", "n": ' + "9" * 5000 + "}"])
    (p := d / "wrong-types.jsonl").write_bytes(data)
    words = ["must be a non-empty string", "must be a string", "must be a string", "expected a JSON object",
             "expected a JSON object", "invalid JSON"]
    return Case(p, 10, dict(zip(rows, words, strict=True)))


def duplicates(d: Path) -> Case:
    data, rows = _with([json.dumps(good(1)), json.dumps(good(7))])
    (p := d / "duplicates.jsonl").write_bytes(data)
    return Case(p, 10, {rows[0]: "duplicate of row 2", 10: "duplicate of row 7"})  # line 7 comes before line 10


def bom(d: Path) -> Case:
    (p := d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _with([])[0])
    return Case(p, 10)


def cr_only(d: Path) -> Case:
    (p := d / "cr-only.jsonl").write_bytes(_with([])[0].replace(b"\n", b"\r"))
    return Case(p, 10)


def crlf_and_blank_lines(d: Path) -> Case:
    data = _with([""] * 3)[0].replace(b"\n", b"\r\n")
    (p := d / "crlf-blank.jsonl").write_bytes(data + b"   \r\n")
    return Case(p, 10)


def truncated_last_line(d: Path) -> Case:
    data = _with([])[0] + b'{"prompt": "cut here", "respo'
    (p := d / "truncated.jsonl").write_bytes(data)
    return Case(p, 10, {11: "invalid JSON"})


def long_line(d: Path, line_mib: int = 24) -> Case:
    """One valid JSON line of ``line_mib`` MiB between good rows: past the 8 MiB default cap."""
    with open(p := d / "long-line.jsonl", "wb") as f:
        head, rows = _with(["LONG"])
        before, after = head.split(b"LONG\n")
        f.write(before)
        f.write(b'{"prompt": "')
        for _ in range(line_mib):
            f.write(b"a" * MiB)
        f.write(b'", "response_a": "a", "response_b": "b"}\n')
        f.write(after)
    return Case(p, 10, {rows[0]: "longer than the 8.0 MiB line cap"})


def gzip_bomb(d: Path, line_mib: int = 1536) -> Case:
    """A few KB of .jsonl.gz whose last line expands to ``line_mib`` MiB with no newline (the contract's bomb)."""
    with gzip.open(p := d / "bomb.jsonl.gz", "wb", compresslevel=9) as f:
        f.write(_with([])[0])
        chunk = b"a" * MiB
        for _ in range(line_mib):
            f.write(chunk)
    return Case(p, 10, {11: "longer than the 8.0 MiB line cap"})


def huge_field(d: Path) -> Case:
    """A valid 6 MiB field under the line cap: it could never fit a 2,048-token context, so it is skipped
    before it is stored (the run's DuckDB never holds it)."""
    data, rows = _with([json.dumps({"prompt": "p", "response_a": "x" * (6 * MiB), "response_b": "b"})])
    (p := d / "huge-field.jsonl").write_bytes(data)
    return Case(p, 10, {rows[0]: "could never fit the engine's context"})


def wrong_parquet_schema(d: Path) -> Case:
    """A folder of two parquet files: one as expected, one whose response_b column holds integers."""
    folder = d / "parquet-mixed"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist([good(i) for i in range(10)]), folder / "a-good.parquet")
    bad = pa.table({"prompt": ["x", "y"], "response_a": ["a", "a"], "response_b": pa.array([1, 2], pa.int64())})
    pq.write_table(bad, folder / "b-bad.parquet")
    return Case(folder, 10, {10: "`response_b` must be a string", 11: "`response_b` must be a string"})


def mixed(d: Path) -> Case:
    """Every row problem in one file, 20 good rows between them."""
    poison = ['{"prompt": "x \\ud800", "response_a": "a", "response_b": "b"}',
              '{"prompt": ' + "[" * 3000 + "]" * 3000 + ', "response_a": "a", "response_b": "b"}',
              b'{"prompt": "caf\xe9", "response_a": "a", "response_b": "b"}',
              json.dumps({"prompt": 1, "response_a": "a", "response_b": "b"}), json.dumps(good(3))]
    data, rows = _with(poison, n=20, at=10)
    (p := d / "mixed.jsonl").write_bytes(data)
    words = ["lone surrogate", "nested too deeply", "not valid UTF-8", "must be a non-empty string", "duplicate of row 4"]
    return Case(p, 20, dict(zip(rows, words, strict=True)))


# name → (writer, "small" writer for tests: same shape, less data)
CASES: dict[str, Callable[[Path], Case]] = {
    "lone-surrogate": lone_surrogate, "deep-nesting": deep_nesting, "nul-bytes": nul_bytes,
    "invalid-utf8": invalid_utf8, "wrong-types": wrong_types, "duplicates": duplicates, "bom": bom,
    "cr-only": cr_only, "crlf-blank": crlf_and_blank_lines, "truncated": truncated_last_line,
    "long-line": long_line, "gzip-bomb": gzip_bomb, "huge-field": huge_field,
    "wrong-parquet-schema": wrong_parquet_schema, "mixed": mixed,
}


def small(name: str, d: Path) -> Case:
    """The case as the tests use it: the large ones with a 1 MiB line cap and a few MiB of data."""
    if name == "long-line":
        c = long_line(d, line_mib=3)
    elif name == "gzip-bomb":
        c = gzip_bomb(d, line_mib=40)
    else:
        return CASES[name](d)
    c.env = {"FACTORY_MAX_LINE_BYTES": "1MiB"}
    c.skips = {r: "longer than the 1.0 MiB line cap" for r in c.skips}
    return c


def pipeline(case: Case, d: Path, db: Path, repo: Path) -> Path:
    """A prefs pipeline over the case's file on the fake engine."""
    y = d / f"{case.path.name}.yaml"
    fmt = "" if case.path.suffix == ".parquet" or case.path.is_dir() else ", format: jsonl"
    y.write_text(f"kind: prefs\nname: hostile\nconstitution: {repo}/constitutions/harmless.yaml\n"
                 f"pairs: {{source: file, path: '{case.path}'{fmt}}}\njudge: {{per_pair: 1, seed: 0}}\n"
                 f"engine: {{kind: fake, seed: 0}}\ndb: {db}\n")
    return y
