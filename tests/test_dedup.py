"""Deduplication and decontamination as run options (factory.dedup), on the fake engine: planted
overlaps with data/evals/ and with a human set are skipped, paraphrases with whitespace and case
changes are caught by near-dedup, across input chunks (the index lives in DuckDB), counted, resumable,
and a pipeline without the sections keeps its run id."""

from __future__ import annotations

import gzip
import json
import re

import pytest

import factory
from conftest import REPO, write_pipeline
from runkit import prefs_yaml, write_jsonl

CLEAN = [
    "How do I bake bread at home with a simple recipe that works every time for beginners",
    "What is a good way to learn to play the piano as an adult with a busy schedule",
    "Can you explain how vaccines train the immune system in words a child would understand",
]


def eval_prompt(suite: str, lo: int, hi: int) -> tuple[str, int]:
    for n, line in enumerate((REPO / "data/evals" / f"{suite}.jsonl").read_text().splitlines(), 1):
        rec = json.loads(line)
        if "prompt" in rec and lo <= len(re.findall(r"\w+", rec["prompt"])) <= hi:
            return rec["prompt"], n
    raise AssertionError(f"no {suite} prompt of {lo}-{hi} words")


def pair(prompt: str, i: int) -> dict:
    return {"prompt": prompt, "response_a": f"First answer number {i} to this.", "response_b": f"Another reply {i}."}


def skips(db, run_id) -> dict[int, str]:
    t = factory.open(db).rows("skips", run=run_id)
    return dict(zip(t.column("row").to_pylist(), t.column("reason").to_pylist()))


def test_decontamination_catches_a_planted_overlap_with_the_eval_suites(tmp_path):
    long, long_line = eval_prompt("harmful", 16, 40)
    words = re.findall(r"\w+", long)
    short, short_line = eval_prompt("benign", 8, 12)  # shorter than 13 words: matched whole
    rows = [pair(CLEAN[0], 0),
            pair(f"My friend asked me: {long.lower()} What should I tell them?", 1),  # the eval prompt inside
            pair(f"Someone wrote: {short} Is that fine?", 2),
            pair(" ".join(words[:12]) + " and then something else entirely", 3),  # 12 words: no 13-gram
            pair(CLEAN[1], 4)]
    path = prefs_yaml(tmp_path / "p.yaml", pairs=write_jsonl(tmp_path / "p.jsonl", rows), db=tmp_path / "p.duckdb",
                      per_pair=1, extra="decontaminate: {against: [evals]}\n")
    s = factory.run(path)
    got = skips(s.db, s.run_id)
    assert set(got) == {2, 3}, got  # JSONL rows are 1-based line numbers
    assert got[2].endswith(f"contaminated: 13-gram overlap with held-out harmful.jsonl line {long_line}")
    assert re.search(rf"contaminated: \d+-gram overlap with held-out benign.jsonl line {short_line}$", got[3])
    assert s.pairs == 3 and sum(s.input_skips.values()) == 2
    card_meta = factory.export("prefs", s.db, s.run_id, tmp_path / "ex")
    card = (card_meta.out / "README.md").read_text()
    assert "2 contaminated" in card


def test_decontamination_against_a_human_set_on_prompts(tmp_path, hh_rlhf):
    with gzip.open(hh_rlhf, "rt") as f:
        rec = json.loads(f.readline())
    turn = max(re.split(r"\n\n(?:Human|Assistant): ", rec["chosen"]), key=lambda t: len(t.split()))
    span = " ".join(turn.split()[:15])
    assert len(re.findall(r"\w+", span)) >= 13
    prompts = [{"prompt": CLEAN[0]}, {"prompt": f"Please continue this: {span}"}, {"prompt": CLEAN[2]}]
    path = write_pipeline(tmp_path, prompts=prompts, engine="fake",
                          extra=f"decontaminate: {{against: [{hh_rlhf}], ngram: 13}}\n")
    s = factory.run(path)
    got = skips(s.db, s.run_id)
    assert list(got) == [2] and f"held-out {hh_rlhf.name}" in got[2]
    assert s.prompts == 2


def test_near_dedup_catches_paraphrases_across_chunks_and_resumes(tmp_path):
    base = ("Write a short story about a lighthouse keeper who finds a message in a bottle that was sent by "
            "his grandmother many years ago and decides to sail to the island it describes")
    rows = [pair(base, 0),
            pair(CLEAN[0], 1),
            pair("  WRITE a short story about a Lighthouse keeper, who finds a message\tin a bottle that was sent by "
                 "his GRANDMOTHER many years ago - and decides to sail to the island it describes!  ", 0),
            pair(CLEAN[1], 2),
            pair(base.replace("short story", "short tale"), 0),  # one word changed
            pair(CLEAN[2], 3)]
    rows = [{**r, "response_a": "same first answer", "response_b": "same second answer"} for r in rows]
    extra = "dedup: {exact: false, near: 0.7, num_perm: 128}\n"
    path = prefs_yaml(tmp_path / "p.yaml", pairs=write_jsonl(tmp_path / "p.jsonl", rows), db=tmp_path / "p.duckdb",
                      per_pair=1, chunk_inputs=2, extra=extra)  # chunks of 2: the matches cross chunks
    s = factory.run(path)
    got = skips(s.db, s.run_id)
    assert set(got) == {3, 5}, got
    assert all("near-duplicate of row 1 (MinHash" in got[r] for r in (3, 5))
    assert s.pairs == 4
    again = factory.run(path)  # a rerun finds the same skips and labels nothing new
    assert skips(again.db, again.run_id) == got and again.written == 0 and again.pairs == 4
    # exact (normalised) dedup alone catches the whitespace/case/punctuation variant, not the changed word
    path2 = prefs_yaml(tmp_path / "q.yaml", pairs=tmp_path / "p.jsonl", db=tmp_path / "q.duckdb", per_pair=1,
                       chunk_inputs=2, extra="dedup: {exact: true}\n")
    s2 = factory.run(path2)
    got2 = skips(s2.db, s2.run_id)
    assert set(got2) == {3} and "duplicate of row 1 (normalised text)" in got2[3]


def test_sections_are_identity_only_when_present(tmp_path):
    from factory.kinds import load

    rows = [pair(t, i) for i, t in enumerate(CLEAN)]
    pairs = write_jsonl(tmp_path / "p.jsonl", rows)
    plain = load(prefs_yaml(tmp_path / "a.yaml", pairs=pairs, db=tmp_path / "a.duckdb"))[1]
    dedup = load(prefs_yaml(tmp_path / "b.yaml", pairs=pairs, db=tmp_path / "a.duckdb", extra="dedup: {near: 0.8}\n"))[1]
    assert "dedup" not in plain.cfg.snapshot() and "decontaminate" not in plain.cfg.snapshot()
    assert dedup.cfg.snapshot()["dedup"]["near"] == 0.8
    assert plain.config_hash != dedup.config_hash


def test_lsh_parameters_follow_the_threshold():
    from factory.dedup import lsh_params

    for t in (0.5, 0.7, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
        assert abs((1 / b) ** (1 / r) - t) < 0.12  # the S-curve's midpoint sits near the threshold
    assert lsh_params(0.9, 128)[1] > lsh_params(0.5, 128)[1]


def test_unknown_heldout_path_is_a_clear_error(tmp_path):
    path = prefs_yaml(tmp_path / "p.yaml", pairs=write_jsonl(tmp_path / "p.jsonl", [pair(CLEAN[0], 0)]),
                      db=tmp_path / "p.duckdb", extra="decontaminate: {against: [nope.jsonl]}\n")
    with pytest.raises(Exception, match="nope.jsonl: no such file"):
        factory.run(path)


def test_heldout_keeps_each_ngram_once_with_the_first_text_that_has_it(tmp_path):
    """hh-rlhf's chosen and rejected texts share their conversation: the held-out index keeps one entry
    per distinct n-gram (a third of the hh test set's), and a match names the first line holding it."""
    import numpy as np

    from factory.decontam import DecontamSpec, Heldout
    from factory.ngrams import WORD, word_hashes

    shared = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps({"text": "unrelated words only here " * 4}) + "\n"
                 + json.dumps({"chosen": shared + " and then", "rejected": shared + " but never"}) + "\n"
                 + json.dumps({"text": "prefix words " + shared}) + "\n")
    h = Heldout.build(DecontamSpec(against=[str(f)]), REPO / "data" / "evals")
    hashes = h.long[0]
    assert len(hashes) == len(np.unique(hashes)) and np.all(hashes[1:] > hashes[:-1])
    words = WORD.findall(("a row that quotes " + shared).lower())
    hits = h.find(word_hashes(words), np.zeros(len(words), np.int64))
    assert hits and {line for *_, line in hits} == {2}  # line 3 repeats it; line 2 had it first


def test_a_screen_takes_its_memory_out_of_the_runs_duckdb_cap(tmp_path):
    """The screen's arrays live outside DuckDB, so a screened run's DuckDB cap is lowered by the
    screen's share (factory.dedup.SCREEN_MB): the run's whole footprint keeps the plain run's budget.
    The lowered cap survives the reopen a long run does, and a second screen does not lower it twice."""
    from factory.dedup import SCREEN_MB, screen_for
    from factory.store import RUN_MEMORY_LIMIT, Store, _megabytes

    rows = [pair(c, i) for i, c in enumerate(CLEAN)]

    def cap(store) -> float:  # DuckDB reports its setting in binary units ("106.8 MiB")
        value = store.one("SELECT current_setting('memory_limit')")[0]
        return _megabytes(value.replace(" ", ""))

    for name, extra, lowered in (("plain", "", False), ("screened", "dedup: {exact: true}\n", True)):
        path = prefs_yaml(tmp_path / f"{name}.yaml", pairs=write_jsonl(tmp_path / f"{name}.jsonl", rows),
                          db=tmp_path / f"{name}.duckdb", per_pair=1, extra=extra)
        s = factory.run(path)
        store = Store(s.db, writer_run="test", run_memory=True)
        try:
            before = cap(store)
            assert abs(before - _megabytes(RUN_MEMORY_LIMIT)) < 1
            screen = screen_for(store, s.run_id)
            assert (screen is not None) == lowered
            want = before - SCREEN_MB if lowered else before
            assert abs(cap(store) - want) < 1, (name, cap(store), want)
            if lowered:
                screen_for(store, s.run_id)  # a second input of the same run
                assert abs(cap(store) - want) < 1
            assert store.reopen() and abs(cap(store) - want) < 1
        finally:
            store.close()
