"""Human label import: the shared hh-rlhf file, idempotence, pair ids shared with the judge, bad rows."""

from __future__ import annotations

import gzip
import json

import pytest

from factory import prefs
from factory.engines.fake import FakeEngine
from factory.human import import_human, list_sets, skip_counts, skip_reason
from factory.sources import SourceError
from factory.store import Store, StoreError, content_key

from conftest import HH_RLHF, REPO

needs_hh = pytest.mark.usefixtures("hh_rlhf")  # fails, never skips, when the shared file is missing


def counts(db, set_id):
    with Store(db, read_only=True) as st:
        return {t: st.count(t) for t in ("pairs", "human_labels", "human_sets", "skips")}, st.one(
            "SELECT n_pairs, n_skipped, skips_json FROM human_sets WHERE set_id = ?", [set_id])


def raw_lines(n):
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


@needs_hh
def test_shared_file_import_counts_labels_and_idempotence(tmp_path):
    db = tmp_path / "h.duckdb"
    set_id, n, skips = import_human(db, HH_RLHF, format="hh-rlhf", limit=100)
    last_row = max(s.row for s in skips) if skips else 0
    with Store(db, read_only=True) as st:
        last_row = max(last_row, st.one("SELECT max(source_row) FROM human_labels")[0])
        rows = st.con.execute("""SELECT h.source_row, h.human_choice, h.swapped, p.pair_id, p.conversation,
                                        p.response_a, p.response_b, p.source, p.status
                                 FROM human_labels h JOIN pairs p USING (pair_id) ORDER BY 1""").fetchall()
    # every line read up to the 100th usable pair is either imported or a recorded skip
    assert n == 100 and n + len(skips) == last_row
    assert [s.row for s in skips] == [87] and "empty final response" in skips[0].reason
    assert len(rows) == 100
    raw = raw_lines(last_row)
    for line, choice, swapped, pid, conv, a, b, source, status in rows:
        # the response at the human's position is the last Assistant turn of `chosen` in the file
        chosen = raw[line - 1]["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
        rejected = raw[line - 1]["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert (a, b) == ((rejected, chosen) if swapped else (chosen, rejected))
        assert choice == ("b" if swapped else "a")
        assert source == f"human:{set_id}" and status == "ok"
        assert pid == content_key(json.loads(conv), a, b)  # the judge's pair key
    assert 25 < sum(r[1] == "a" for r in rows) < 75  # the hash bit puts the human's pick on both sides

    before, meta = counts(db, set_id)
    assert meta[:2] == (100, 1)
    assert json.loads(meta[2])["by_reason"] == [{"reason": "empty final response in chosen", "count": 1, "rows": [87]}]
    again = import_human(db, HH_RLHF, format="hh-rlhf", limit=100)
    assert again[:2] == (set_id, 100)
    assert counts(db, set_id) == (before, meta)
    assert list_sets(db).column("set_id").to_pylist() == [set_id]
    other, n_other, _ = import_human(db, HH_RLHF, format="hh-rlhf", limit=10)  # a different set
    assert other != set_id and n_other == 10
    with pytest.raises(StoreError, match="already holds different pairs"):
        import_human(db, HH_RLHF, format="hh-rlhf", limit=20, name=set_id)


@needs_hh
def test_pair_ids_are_the_ones_the_judge_uses(tmp_path):
    db = tmp_path / "h.duckdb"
    set_id, n, _ = import_human(db, HH_RLHF, format="hh-rlhf", limit=10)
    path = tmp_path / "p.yaml"
    path.write_text(f"""kind: prefs
name: p
constitution: {REPO / 'constitutions/harmless.yaml'}
pairs: {{source: file, path: {HH_RLHF}, format: hh-rlhf, limit: 10}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 1}}
engine: {{kind: fake}}
db: {db}
""")
    prefs.run(path, engine=FakeEngine(model="smollm2-135m"), quiet=True)
    with Store(db, read_only=True) as st:
        judged = {r[0] for r in st.con.execute("SELECT DISTINCT pair_id FROM judgements").fetchall()}
        human = {r[0] for r in st.con.execute("SELECT pair_id FROM human_labels WHERE set_id = ?", [set_id]).fetchall()}
        assert st.count("pairs") == 10  # the prefs run found the imported pairs by content, no new rows
    assert n == 10 and judged == human


def write_lines(path, lines):
    with open(path, "wb") as fh:
        for x in lines:
            fh.write(x if isinstance(x, bytes) else json.dumps(x).encode())
            fh.write(b"\n")
    return path


def test_bad_generic_rows_become_counted_skips(tmp_path):
    good = {"prompt": "How do I bake bread?", "response_a": "Knead, rise, bake.", "response_b": "No.",
            "human_choice": "a"}
    lines = [
        good,                                                                          # 1 ok
        {"prompt": "Hi", "response_a": "Hello!"},                                      # 2 no response_b
        {**good, "response_b": "Buy it.", "human_choice": "c"},                        # 3 unknown choice
        b'{"prompt": "caf\xe9", "response_a": "x", "response_b": "y", "choice": "a"}',  # 4 latin-1 byte
        good,                                                                          # 5 duplicate of 1
        {"prompt": "Hi", "response_a": "Hello!", "response_b": "Go away."},            # 6 no choice
        {"prompt": "Hi", "response_a": "Same ", "response_b": "Same", "choice": "b"},  # 7 same after strip
        {"conversation": [{"role": "user", "content": "Hi"}], "response_a": "Hey", "response_b": "Yo",
         "human_choice": "B", "annotator": 7, "confidence": 0.8},                      # 8 ok
    ]
    db = tmp_path / "h.duckdb"
    set_id, n, skips = import_human(db, write_lines(tmp_path / "bad.jsonl", lines), format="jsonl", name="bad")
    assert set_id == "bad" and n == 2
    got = {s.row: skip_reason(s.reason) for s in skips}
    assert set(got) == {2, 3, 4, 5, 6, 7}
    assert "missing `response_b`" in got[2]
    assert "unknown choice value 'c'" in got[3]
    assert "not valid UTF-8" in got[4]
    assert got[5] == "duplicate of row N"
    assert "no human choice" in got[6]
    assert "identical responses" in got[7]
    with Store(db, read_only=True) as st:
        assert st.con.execute("SELECT human_choice, annotator, confidence FROM human_labels ORDER BY source_row"
                              ).fetchall() == [("a", None, None), ("b", "7", 0.8)]
        n_pairs, n_skipped, skips_json = st.one("SELECT n_pairs, n_skipped, skips_json FROM human_sets")
        assert (n_pairs, n_skipped) == (2, 6)
        assert sum(g["count"] for g in json.loads(skips_json)["by_reason"]) == 6
        assert st.count("skips", "run_id = ?", ["human:bad"]) == 6  # every row also in the skips table


def test_prefix_mismatch_is_a_skip_and_skip_counts_group_reasons(tmp_path):
    def tr(*turns):
        return "".join(f"\n\n{who}: {text}" for who, text in turns)

    ok = {"chosen": tr(("Human", "Hi"), ("Assistant", "Hello")), "rejected": tr(("Human", "Hi"), ("Assistant", "Go"))}
    bad = {"chosen": tr(("Human", "A"), ("Assistant", "x"), ("Human", "B"), ("Assistant", "y")),
           "rejected": tr(("Human", "A"), ("Assistant", "DIFFERENT"), ("Human", "B"), ("Assistant", "z"))}
    with pytest.raises(SourceError, match=r"no usable human-labelled pairs \(1 rows skipped: 1× chosen and rejected"):
        import_human(tmp_path / "h.duckdb", write_lines(tmp_path / "only_bad.jsonl", [bad]), format="hh-rlhf")
    path = write_lines(tmp_path / "hh.jsonl", [ok, bad, bad, ok])
    set_id, n, skips = import_human(tmp_path / "h.duckdb", path, format="hh-rlhf")
    assert n == 1
    grouped = {g["reason"]: (g["count"], g["rows"]) for g in skip_counts(skips)}
    assert grouped == {
        "chosen and rejected transcripts do not share a conversation prefix (they differ at turn N)": (2, [2, 3]),
        "duplicate of row N": (1, [4]),
    }
