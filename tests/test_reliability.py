"""Issue 22: damaged, locked and stale databases are three different messages; `factory db check` and
`factory db backup`; the lock names the run's real id; smaller CLI checks; templates bounded; fence."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time

import pytest

from factory import prefs
from factory import runs as runs_mod
from factory.store import DamagedError, Store, StoreError
from factory.templates import TemplateError, fence, load_template
from runkit import REPO, invoke, pair_records, prefs_yaml, query, wide, write_jsonl  # noqa: F401


@pytest.fixture
def good_db(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(300, chars=400))
    db = tmp_path / "good.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2)
    s = prefs.run(y, quiet=True)
    return db, y, s.run_id


def _garbage(src, dst, offset):
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(4096))


# -- damaged, locked, stale -------------------------------------------------------------------

def test_a_damaged_header_block_is_named_damaged_not_in_use(tmp_path, good_db, wide):
    db = tmp_path / "dmg.duckdb"
    _garbage(good_db[0], db, 8192)
    with pytest.raises(DamagedError, match="damaged") as e:
        Store(db, read_only=True)
    assert "in use" not in str(e.value) and "factory db check" in str(e.value)
    for args in (["status", "--db", db], ["run", good_db[1]]):
        if args[0] == "run":
            shutil.copy(db, good_db[0])
        code, out, exc = invoke(args)
        assert code == 2 and "damaged" in out and "in use" not in out and "Traceback" not in out, out
    assert not json.loads(good_db[0].with_name(good_db[0].name + ".lock").read_text() or "{}")  # no stale lock left


def test_a_file_cut_short_is_damaged_and_a_run_refuses_it(tmp_path, good_db, wide):
    db, y, _ = good_db
    data = db.read_bytes()
    db.write_bytes(data[:len(data) * 2 // 3])
    code, out, _ = invoke(["status", "--db", db])
    assert code == 2 and "cut short" in out and "Traceback" not in out, out
    code, out, _ = invoke(["run", y])
    assert code == 2 and "damaged" in out, out  # it no longer "succeeds" on a damaged file
    code, out, _ = invoke(["db", "check", db])
    assert code == 1 and "damaged" in out


def test_damage_met_by_a_query_is_named_and_db_check_lists_the_table(tmp_path, good_db, wide):
    db, _, run_id = good_db
    with Store(db, read_only=True) as s:  # a data block of the judgements table, found from its storage info
        blocks = s.con.execute("SELECT DISTINCT block_id FROM pragma_storage_info('judgements') "
                               "WHERE block_id >= 0 ORDER BY 1").fetchall()
        block_size = s.one("SELECT block_size FROM pragma_database_size()")[0]
    assert blocks
    bad = tmp_path / "bad.duckdb"
    _garbage(db, bad, 3 * 4096 + blocks[len(blocks) // 2][0] * block_size + 4096)
    code, out, _ = invoke(["db", "check", bad])
    assert code == 1 and "✗ judgements" in out and "damaged" in out, out
    code, out, _ = invoke(["export", "prefs", "--db", bad, "--run", run_id, "--out", tmp_path / "ex"])
    assert "Traceback" not in out
    assert code == 0 or (code == 2 and "damaged" in out), out


def test_db_check_and_backup_of_a_sound_database(tmp_path, good_db, wide):
    db = good_db[0]
    code, out, _ = invoke(["db", "check", db])
    assert code == 0 and "all readable" in out and "✓ judgements" in out, out
    dest = tmp_path / "backups" / "copy.duckdb"
    code, out, _ = invoke(["db", "backup", db, dest])
    assert code == 0 and "checked readable" in out, out
    assert query(dest, "SELECT count(*) FROM judgements") == query(db, "SELECT count(*) FROM judgements")
    code, out, _ = invoke(["db", "backup", db, dest])
    assert code == 2 and "exists" in out


def _hold(path, ready, release):
    s = Store(path, writer_run="holder-run")
    ready.set()
    release.wait(30)
    s.close()


def test_backup_waits_for_no_one_and_refuses_a_held_database(tmp_path, good_db, wide):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(good_db[0], ready, release))
    p.start()
    try:
        assert ready.wait(60)
        code, out, _ = invoke(["db", "backup", good_db[0], tmp_path / "b.duckdb"])
        assert code == 2 and "in use by run holder-run" in out, out
    finally:
        release.set()
        p.join(30)


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    db = tmp_path / "s.duckdb"
    Store(db, writer_run="r1").close()
    lock = db.with_name(db.name + ".lock")
    assert lock.read_text() == ""  # a clean release empties the lock file
    ctx = mp.get_context("spawn")  # a process that dies holding the lock (kill -9: no release)
    p = ctx.Process(target=_die_holding, args=(db,))
    p.start()
    p.join(60)
    assert json.loads(lock.read_text())["run_id"] == "doomed"
    t = time.perf_counter()
    Store(db, writer_run="r2").close()
    assert time.perf_counter() - t < 1.0
    err = capsys.readouterr().err
    assert "took over the lock left by run doomed" in err and err.count("\n") == 1


def _die_holding(db):
    Store(db, writer_run="doomed")
    os._exit(9)


def test_a_folder_or_unwritable_place_is_a_clear_error(tmp_path, wide):
    code, out, _ = invoke(["status", "--db", tmp_path])
    assert code == 2 and "is a folder, not a database file" in out
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    for args in (["status", "--db", a_file / "x.duckdb"], ["db", "backup", a_file, tmp_path / "b.duckdb"]):
        code, out, _ = invoke(args)
        assert code == 2 and "Traceback" not in out, out
    with pytest.raises(StoreError, match="cannot create the folder"):
        Store(a_file / "x.duckdb", writer_run="r")  # its folder would be inside a file


def test_the_lock_names_the_real_run_id_while_the_engine_starts(tmp_path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(3))
    db = tmp_path / "o.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=1)
    seen = []
    import factory.engines as engines_mod

    real = engines_mod.make_engine

    def spy(*a, **kw):  # the lock's content while the engine is being built
        seen.append(json.loads(db.with_name(db.name + ".lock").read_text())["run_id"])
        return real(*a, **kw)

    monkeypatch.setattr(engines_mod, "make_engine", spy)
    s = prefs.run(y, quiet=True)
    assert seen == [s.run_id]


# -- smaller things ---------------------------------------------------------------------------

def test_status_of_an_unknown_run_is_an_error(good_db, wide):
    code, out, _ = invoke(["status", "--db", good_db[0], "--run", "no-such-run"])
    assert code == 2 and "no run 'no-such-run'" in out and good_db[2] in out
    code, out, _ = invoke(["status", "--db", good_db[0], "--run", good_db[2]])
    assert code == 0 and good_db[2] in out


@pytest.mark.parametrize("name", ["two\nlines", "x" * 10_000, "has space", "-dash-first", ""])
def test_audit_fit_names_are_validated_like_other_names(good_db, name, wide):
    from factory.audit.fit import fit

    with pytest.raises(StoreError, match="weight-set name"):
        fit(good_db[0], good_db[2], "any-set", name)


@pytest.mark.parametrize("closing", ["</OPTION>", "</option >", "< /option>", "<  /  Option  >", "</option>"])
def test_fence_neutralises_closing_tags_in_any_case_and_spacing(closing):
    out = fence(f"before {closing} after", "option")
    inner = out[len("<option>\n"):-len("\n</option>")]
    assert closing not in inner and "after" in inner
    import re

    assert not re.search(r"<\s*/\s*option\s*>", inner, re.I)


# -- templates bounded ------------------------------------------------------------------------

RUNAWAY = {
    "mul": ('{{ "a" * 1000000000 }}', "cap on a rendered template"),
    "range": ("{% for i in range(10**8) %}x{% endfor %}", "range"),
    "nested": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "iterations"),
    "doubling": ('{% set ns = namespace(x="ab") %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}',
                 "cap on a rendered template"),
    "center": ('{{ "x" | center(1000000000) }}', "cap on a rendered template"),
    "format": ('{{ "{:>1000000000}".format(1) }}', "width"),
    "percent": ('{{ "%01000000000d" % 1 }}', "width"),
    "replace": ('{{ ("a" * 100000) | replace("a", "b" * 100000) }}', "cap on a rendered template"),
    "literal": ("{% for i in range(99999) %}{% for j in range(9) %}" + "y" * 100_000 + "{% endfor %}{% endfor %}",
                "passed"),
    "recursion": ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "too deeply"),
}


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_a_runaway_template_is_a_file_line_error(tmp_path, name):
    body, words = RUNAWAY[name]
    p = tmp_path / f"{name}.j2"
    p.write_text('{% call message("user") %}\n' + body + "\n{% endcall %}\n")
    t = time.perf_counter()
    with pytest.raises(TemplateError) as e:
        load_template(p).render()
    assert time.perf_counter() - t < 5
    assert str(e.value).startswith(f"{p}:") and words in str(e.value), str(e.value)


def test_template_files_are_capped_like_yaml(tmp_path):
    big = tmp_path / "big.j2"
    big.write_text("x" * (2 << 20))
    with pytest.raises(TemplateError, match="larger than 1024 KiB"):
        load_template(big)
    with pytest.raises(TemplateError, match="larger than 1024 KiB"):
        load_template("/dev/zero")


def test_bounded_templates_render_the_shipped_ones_as_before():
    """Counting filters return what they are given: a render of a shipped template equals the same
    template rendered by plain Jinja's sandbox (the pre-issue-22 environment)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from factory.templates import transcript

    plain = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                          keep_trailing_newline=False, autoescape=False)
    plain.filters.update(fence=fence, transcript=transcript)

    class P:
        comparison, revision, critique = "Which reply is kinder?", "Make it kinder.", "Is it unkind?"

    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi </option> {{x}}"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    variables = dict(conversation=conv, first="one </reply>", second="two", principle=P(), options=["A", "B"],
                     rationale="because", cot=True, prefill=False, response="resp",
                     critiques=[{"text": "too long", "principle": P()}], round=1, request="req", reply="rep",
                     descriptions=["refused", "complied"])
    for path in sorted((REPO / "prompts").glob("*.j2")):
        ours = load_template(path).render(**variables)
        out: list = []

        def message(role, caller=None):
            out.append({"role": role, "content": caller().strip()})
            return ""

        plain.from_string(path.read_text()).render(message=message, **variables)
        assert ours == out, path.name
