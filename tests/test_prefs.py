"""Preference pipeline on the fake engine: pairs, both orders, maths consistency, resume, edits."""

import json
import math

import pytest

from factory import prefs
from factory.constitution import load_constitution
from factory.engines.fake import FakeEngine
from factory.stages.judge import OptionError, truncate
from factory.lineage import show_row
from factory.store import Store
from factory.yamlconf import ConfigError

from conftest import REPO

PROMPTS = [{"prompt": f"How should I handle situation {i}?"} for i in range(5)]


def write(tmp, *, pairs: str, judge: str = "per_pair: 2", constitution=None):
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    path = tmp / "prefs.yaml"
    path.write_text(f"""kind: prefs
name: p
constitution: {constitution or REPO / 'constitutions/harmless.yaml'}
pairs: {pairs}
judge: {{template: {REPO}/prompts/judge.j2, {judge}}}
answer_template: {REPO}/prompts/answer.j2
engine: {{kind: fake}}
db: {tmp / 'out.duckdb'}
chunk_rows: 8
""")
    return path


SAMPLE = "{source: sample, prompts: {path: PROMPTS}, n: 2, sampling: {max_tokens: 16}}"


def sample(tmp):
    return SAMPLE.replace("PROMPTS", str(tmp / "prompts.jsonl"))


def fake(**kw):
    return FakeEngine(model="smollm2-135m", **kw)


def test_sampled_pairs_judged_in_both_orders_with_consistent_probabilities(tmp_path):
    s = prefs.run(write(tmp_path, pairs=sample(tmp_path)), engine=fake(), quiet=True)
    assert s.pairs == 5 and s.labels["pairs labelled"] == 5
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute('SELECT pair_id, principle_id, "order", logprob_first, logprob_second, p_first, p_a '
                              "FROM judgements").fetchall()
        assert len(rows) == 5 * 2 * 2
        for pair, prin, order, lf, ls, pf, pa_ in rows:
            assert pf == pytest.approx(math.exp(lf) / (math.exp(lf) + math.exp(ls)))
            assert pa_ == pytest.approx(pf if order == "ab" else 1 - pf)
        per = {}
        for pair, prin, order, *_, pa_ in rows:
            per.setdefault(pair, {}).setdefault(prin, []).append(pa_)
        w = {p.id: p.weight for p in load_constitution(REPO / "constitutions/harmless.yaml").principles}
        for pair, p_a, chosen, is_tie, n in st.con.execute(
                "SELECT pair_id, p_a, chosen, is_tie, n_principles FROM preferences").fetchall():
            # orders averaged per principle, then the constitution's weights across principles
            expected = sum(w[k] * sum(v) / 2 for k, v in per[pair].items()) / sum(w[k] for k in per[pair])
            assert n == 2 and p_a == pytest.approx(expected)
            assert chosen == (None if abs(p_a - 0.5) < 0.05 else ("a" if p_a > 0.5 else "b"))
            assert is_tie == (abs(p_a - 0.5) < 0.05)
        # lineage: samples → pairs → judgements
        n = st.one("""SELECT count(*) FROM judgements j JOIN pairs p USING (pair_id)
                      JOIN samples sa ON sa.id = p.response_a_id JOIN samples sb ON sb.id = p.response_b_id""")[0]
        assert n == 20


def test_rerun_recomputes_nothing_and_edit_recomputes_only_that_principle(tmp_path, copy_constitution):
    const = copy_constitution()
    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 17", constitution=const)
    prefs.run(path, engine=fake(), quiet=True)
    eng = fake()
    prefs.run(path, engine=eng, quiet=True)
    assert eng.calls == []
    text = const.read_text()
    q = load_constitution(const).principle("privacy").comparison
    const.write_text(text.replace(q, q.replace("?", " in any way?")))
    eng = fake()
    s = prefs.run(path, engine=eng, quiet=True)
    assert eng.calls == [5 * 2]  # 5 pairs × the edited principle × 2 orders; samples reused
    assert {w.table: w.written for w in s.stages} == {"samples": 0, "judgements": 10}


def test_file_pairs_identical_and_empty_are_recorded(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q1", "response_a": "yes", "response_b": "no", "choice": "a"},
            {"prompt": "q2", "response_a": "same", "response_b": "same"},
            {"prompt": "q3", "response_a": "", "response_b": "x"},
            {"prompt": "q4", "response_b": "x"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = prefs.run(write(tmp_path, pairs=f"{{source: file, path: {f}}}"), engine=fake(), quiet=True)
    assert s.pairs == 1 and sum(s.input_skips.values()) == 3
    reasons = " | ".join(s.input_skips)
    assert "identical" in reasons and "empty" in reasons and "response_a" in reasons
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        assert st.count("skips") == 3 and st.count("judgements") == 4


def test_multi_token_options_fail_clearly(tmp_path):
    path = write(tmp_path, pairs=sample(tmp_path), judge="options: [first, second]")
    with pytest.raises(OptionError, match="single tokens"):
        prefs.run(path, engine=fake(), quiet=True)


def test_cot_judge_stores_rationale_and_clamps(tmp_path):
    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 1, mode: cot, clamp: [0.2, 0.8], cot_max_tokens: 16")
    prefs.run(path, engine=fake(), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        assert st.count("rationales") == 10 and st.count("judgements", "rationale IS NOT NULL") == 10
        for (jid,) in st.con.execute("SELECT id FROM judgements").fetchall():  # re-rendered from stored inputs
            lin = show_row(st, jid)
            assert lin.ok and set(lin.checks) == {"principle", "template", "messages_hash", "key"}
            m = lin.messages
            assert m[-1]["role"] == "assistant" and "better option is (" in m[-1]["content"]
            assert lin.row["rationale"] in m[-1]["content"]
        lo, hi = st.one("SELECT min(p_a), max(p_a) FROM preferences")
        assert 0.2 <= lo and hi <= 0.8


def test_sample_source_requires_prompts(tmp_path):
    with pytest.raises(ConfigError, match="needs `prompts"):
        prefs.load(write(tmp_path, pairs="{source: sample}"))


def test_truncate_keeps_last_turns():
    conv = [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b" * 50},
            {"role": "user", "content": "c" * 30}]
    assert truncate(conv, 85) == conv[1:]
    assert truncate(conv, 10) == [{"role": "user", "content": "…" + "c" * 10}]


def test_sl_pairs_initial_answer_vs_final_revision(tmp_path):
    from factory import pipeline

    from conftest import write_pipeline

    sl_dir = tmp_path / "sl"
    sl_dir.mkdir()
    sl_path = write_pipeline(sl_dir, prompts=PROMPTS, rounds=2, engine="fake")
    pipeline.run(sl_path, engine=fake(), quiet=True)
    path = write(tmp_path, pairs="{source: sl}")
    path.write_text(path.read_text().replace(f"db: {tmp_path / 'out.duckdb'}", f"db: {sl_dir / 'out.duckdb'}"))
    s = prefs.run(path, engine=fake(), quiet=True)
    assert s.pairs == 5
    with Store(sl_dir / "out.duckdb", read_only=True) as st:
        rows = st.con.execute("""SELECT r.round, v.round FROM pairs p JOIN responses r ON r.id = p.response_a_id
                                 JOIN revisions v ON v.id = p.response_b_id WHERE p.source = 'sl'""").fetchall()
        assert rows == [(0, 2)] * 5  # initial answer (a) vs the final round-2 revision (b)
        assert st.count("judgements") == 5 * 2 * 2


def test_vote_mode_stores_every_verdict_and_never_guesses(tmp_path):
    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 2, mode: vote, votes: 6")
    eng = fake(scoring="none")  # an endpoint with no log-probs at all
    s = prefs.run(path, engine=eng, quiet=True)
    assert s.labels["pairs labelled"] == 5 and s.labels["generated tokens/label"] > 0
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute('SELECT "order", verdicts, p_first, p_a, status, error, logprob_first FROM judgements').fetchall()
        prefs_rows = st.con.execute("SELECT p_a, p_a_raw, p_a_cal FROM preferences").fetchall()
    assert len(rows) == 5 * 2 * 2
    unparseable = 0
    for order, verdicts, p_first, p_a_, status, error, lp in rows:
        texts = json.loads(verdicts)
        assert len(texts) == 6 and lp is None  # every sampled verdict is kept, as text
        first = sum(t.strip("() ") == "A" for t in texts)
        valid = sum(t.strip("() ") in ("A", "B") for t in texts)
        unparseable += 6 - valid
        if valid:
            assert status == "ok" and p_first == pytest.approx(first / valid)
            assert p_a_ == pytest.approx(p_first if order == "ab" else 1 - p_first)
        else:
            assert status == "failed" and "no parseable verdict" in error
    assert unparseable > 0  # "not sure" answers were stored, not counted for either option
    assert all(p == pytest.approx(raw) and cal is not None for p, raw, cal in prefs_rows)  # calibrate off: label = raw


def test_logprob_mode_on_an_endpoint_without_logprobs_says_use_vote(tmp_path):
    from factory.engines.base import EngineError

    with pytest.raises(EngineError, match="judge.mode: vote"):
        prefs.run(write(tmp_path, pairs=sample(tmp_path)), engine=fake(scoring="none"), quiet=True)


def test_no_prefill_endpoint_gets_the_single_letter_variant(tmp_path):
    s = prefs.run(write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 1"), engine=fake(prefill=False), quiet=True)
    assert s.labels["pairs labelled"] == 5
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        jid = st.one("SELECT id FROM judgements LIMIT 1")[0]
        lin = show_row(st, jid)
        settings = json.loads(st.one("SELECT body FROM configs WHERE config_hash = ?", [lin.row["sampling_hash"]])[0])
    assert lin.ok and lin.messages[-1]["role"] == "user" and "single letter" in lin.messages[-1]["content"]
    assert settings["prefill"] is False


def test_calibration_is_stored_beside_the_raw_label(tmp_path):
    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 3, calibrate: true")
    prefs.run(path, engine=fake(), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute("SELECT p_a, p_a_raw, p_a_cal FROM preferences").fetchall()
        priors = st.con.execute('SELECT principle_id, "order", prior, n FROM calibration').fetchall()
        # the priors are the mean P(first) of each (principle, order) of the run's judgements
        ref = dict(((p, o), (m, n)) for p, o, m, n in st.con.execute(
            'SELECT principle_id, "order", avg(p_first), count(*) FROM judgements WHERE status = \'ok\' GROUP BY 1, 2'
        ).fetchall())
    assert rows and all(p == pytest.approx(cal) for p, _, cal in rows)  # calibrate on: the label is the calibrated one
    assert any(abs(raw - cal) > 1e-6 for _, raw, cal in rows)
    assert {(p, o): (pytest.approx(m), n) for p, o, m, n in priors} == ref


def test_export_over_every_principle_gives_the_run_labels(tmp_path):
    """One label rule: re-made by export (weights, tie band, clamp, calibration) = the run's preferences."""
    import datasets

    from factory.export import export_prefs

    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 3, calibrate: true, clamp: [0.1, 0.9], tie_eps: 0.02")
    s = prefs.run(path, engine=fake(), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        judged = [p for (p,) in st.con.execute("SELECT DISTINCT principle_id FROM judgements").fetchall()]
        stored = dict(st.con.execute("SELECT pair_id, CASE WHEN chosen = 'a' THEN p_a ELSE 1 - p_a END "
                                     "FROM preferences WHERE NOT is_tie").fetchall())
    export_prefs(tmp_path / "out.duckdb", s.run_id, tmp_path / "all", principles=judged)
    export_prefs(tmp_path / "out.duckdb", s.run_id, tmp_path / "plain")
    for folder in ("all", "plain"):
        got = {r["pair_id"]: r["p_chosen"] for r in datasets.load_from_disk(str(tmp_path / folder))}
        assert got.keys() == stored.keys() and all(got[k] == pytest.approx(v) for k, v in stored.items())


def test_judge_key_is_the_factory_content_key():
    """The judge builds its keys' canonical JSON from a cached prefix: the same bytes as content_key."""
    from factory.constitution import load_constitution
    from factory.stages import judge as J
    from factory.store import content_key
    from factory.templates import load_template

    c = load_constitution(REPO / "constitutions/harmless.yaml")
    ctx = J.JudgeCtx(run_id="r", model='m@ü"x\\', seed=3, constitution=c, template=load_template(REPO / "prompts/judge.j2"),
                     options=["A", "B"], option_ids=None, sampling_hash="s", max_chars=3000)
    pair = J.Pair("p1", [], "a", "b")
    for table, rationale in (("judgements", None), ("judgements", "r1"), ("rationales", None)):
        for p in c.principles[:3]:
            for order in J.ORDERS:
                assert ctx.key(table, pair, p, order, rationale) == content_key(
                    table, ctx.model, 3, "s", ctx.template.hash, J.RENDER_VERSION, "p1", p.hash, order, ["A", "B"], rationale)


def test_labelling_in_parts_gives_the_labels_of_the_whole_run(tmp_path, monkeypatch):
    """A large run is labelled in parts (by a hash of the pair id) so its memory does not grow with
    the run; calibration priors still come from the whole run, so the labels equal those made over
    every judgement at once (labels_table over the run's rows, as export and audit make them)."""
    from factory import labelrun, labels

    path = write(tmp_path, pairs=sample(tmp_path), judge="per_pair: 3, calibrate: true, clamp: [0.1, 0.9], tie_eps: 0.02")
    monkeypatch.setattr(labelrun, "PART_JUDGEMENTS", 7)  # 30 judgements: 5 parts
    s = prefs.run(path, engine=fake(), quiet=True)
    cols = "pair_id, p_a, chosen, margin, is_tie, orders_agree, principles_agree, n_principles, orders_complete"
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        parts = st.con.execute(f"SELECT {cols}, p_a_raw, p_a_cal FROM preferences ORDER BY pair_id").fetchall()
        rule = labels.run_rule(st, s.run_id)
        rel = st.run_rows("judgements", "$run")
        whole = labels.labels_table(st, rel, rule, {"run": s.run_id}).sort_by("pair_id")
        raw = labels.labels_table(st, rel, rule.with_(calibrate=False), {"run": s.run_id}).sort_by("pair_id")
    assert len(parts) == whole.num_rows == 5
    assert len({p[1] for p in parts}) > 1  # not one value everywhere, so the comparison can fail
    exact = ("pair_id", "chosen", "is_tie", "principles_agree", "n_principles", "orders_complete")
    for got, want, r in zip(parts, whole.select(cols.split(", ")).to_pylist(), raw.column("p_a").to_pylist()):
        got = dict(zip([*cols.split(", "), "p_a_raw", "p_a_cal"], got))
        assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
        assert [got[k] for k in ("p_a", "margin", "orders_agree")] == \
            pytest.approx([want[k] for k in ("p_a", "margin", "orders_agree")])
        assert got["p_a_cal"] == pytest.approx(want["p_a"]) and got["p_a_raw"] == pytest.approx(r)
