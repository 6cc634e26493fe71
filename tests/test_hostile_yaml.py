"""Hostile config files: every one is a located error (exit 2, ``file:line:col: what to fix``, no
traceback) from the real command, in a child process that cannot take the machine down with it
(1 GiB address space, a hang guard). The corpus is tests/data/hostile/; the large files are
generated here rather than committed (tests/hostile_corpus.py)."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from factory.yamlconf import MAX_BYTES, MAX_DEPTH, MAX_VALUES, ConfigError, load_yaml_data, parse_yaml
from hostile_corpus import CORPUS, EXPECTED, FIXES, GENERATED, generate

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 1 << 30  # a bomb that got through would hit this, not the machine
HANG_GUARD_S = 120  # generous: a correct refusal takes well under a second


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def factory(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000", "NO_COLOR": "1"}  # no wrapping of the message
    return subprocess.run([sys.executable, "-m", "factory.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, preexec_fn=_limit_memory, timeout=HANG_GUARD_S)


def check_refused(done: subprocess.CompletedProcess, path: Path, line: int, words: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}: {out[-2000:]}"
    assert "Traceback" not in out, out[-2000:]
    m = re.search(rf"^error: {re.escape(str(path))}:(\d+):(\d+): (.*)$", done.stderr, re.M)
    assert m, done.stderr
    assert int(m[1]) == line, done.stderr
    assert words in m[3], done.stderr
    assert any(fix in m[3] for fix in FIXES), f"no hint of what to fix: {m[3]}"


# Every file through `factory validate`, and two of them through the other commands that read a
# YAML config (pipelines, training configs).
OTHER_COMMANDS = [("run",), ("render",), ("train", "sft")]
OTHER_FILES = ("alias-bomb.yaml", "python-tag.yaml")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[tuple, tuple[subprocess.CompletedProcess, Path, int, str]]:
    """Each case's child process, run a few at a time (each is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("hostile")
    cases = {("validate", n): (CORPUS / n, *EXPECTED[n]) for n in EXPECTED}
    cases |= {("validate", n): generate(n, tmp) for n in GENERATED}
    cases |= {(*c, n): (CORPUS / n, *EXPECTED[n]) for c in OTHER_COMMANDS for n in OTHER_FILES}
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = {case: pool.submit(factory, *case[:-1], str(spec[0])) for case, spec in cases.items()}
        return {case: (future.result(), *cases[case]) for case, future in done.items()}


def test_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED) + sorted(GENERATED))
def test_validate_refuses_hostile_file(refusals, name):
    check_refused(*refusals["validate", name])


@pytest.mark.parametrize("command", OTHER_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("name", OTHER_FILES)
def test_pipelines_and_training_configs_share_the_bounded_loader(refusals, command, name):
    """The same refusal from every command that reads a YAML config."""
    check_refused(*refusals[(*command, name)])


# --------------------------------------------------- in-process: what stays allowed, and the limits

def test_merge_idiom_still_works():
    text = """\
defaults: &defaults {max_tokens: 64, temperature: 0.7}
answer: {<<: *defaults, max_tokens: 128}
critique:
  <<: *defaults
"""
    data, marks = parse_yaml(text, "s.yaml")
    assert data["answer"] == {"max_tokens": 128, "temperature": 0.7}
    assert data["critique"] == {"max_tokens": 64, "temperature": 0.7}
    assert marks.find(("answer", "max_tokens")) == (2, 37)


def test_value_budget_counts_alias_expansions_exactly():
    # the root mapping, 2 keys, the list and its n items: n + 4 values; each alias repeats n + 1
    def doc(n: int, aliases: int) -> str:
        items = ", ".join(["x"] * n)
        return f"a: &a [{items}]\nb: [" + ", ".join(["*a"] * aliases) + "]\n"

    n = 999
    room = MAX_VALUES - (n + 4) - 1  # the list under b is one more value
    fits = room // (n + 1)
    data, _ = parse_yaml(doc(n, fits), "ok.yaml")
    assert len(data["b"]) == fits and data["b"][0] is data["a"]  # shared, not copied
    with pytest.raises(ConfigError) as info:
        parse_yaml(doc(n, fits + 1), "bomb.yaml")
    e = info.value
    alias_col = len("b: [") + 1 + fits * len("*a, ")
    assert (e.line, e.col) == (2, alias_col)
    assert e.message.startswith(f"the alias *a repeats {n + 1} values and takes this file past {MAX_VALUES} values")


def test_depth_limit_is_exact_and_counts_aliases():
    ok = "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)  # the values 1..MAX_DEPTH levels deep
    assert parse_yaml(f"{ok}\n", "ok.yaml")[0] is not None
    with pytest.raises(ConfigError) as info:
        parse_yaml("[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH + "\n", "deep.yaml")
    assert (info.value.line, info.value.col) == (1, MAX_DEPTH + 1)  # the scalar at level MAX_DEPTH + 1
    # aliases of aliases: a_i's list (on line i + 1) is i + 2 levels tall, so the alias *a_{i-1} inside
    # it reaches 2 + (i + 1) levels under the root mapping: past MAX_DEPTH first at i = MAX_DEPTH - 2
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, MAX_DEPTH))
    with pytest.raises(ConfigError) as info:
        parse_yaml(chain, "chain.yaml")
    assert info.value.line == MAX_DEPTH - 1
    assert info.value.message.startswith(f"the alias *a{MAX_DEPTH - 3} nests")


def test_size_cap_reads_at_most_the_limit(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_yaml_data("/dev/zero")  # endless; a NUL-free endless file would be refused the same way
    assert "larger than" in info.value.message
    at_limit = tmp_path / "at-limit.yaml"
    at_limit.write_text("x: " + "a" * (MAX_BYTES - 4) + "\n")
    assert at_limit.stat().st_size == MAX_BYTES
    assert len(load_yaml_data(at_limit)[0]["x"]) == MAX_BYTES - 4
