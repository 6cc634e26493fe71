"""Preference labelling on the real vLLM CPU engine (shares the session engine)."""

import json
import math

import pytest

from factory import prefs

from factory.store import Store

from conftest import REPO

pytestmark = pytest.mark.engine


def write(tmp, n_prompts=4, per_pair=2):
    (tmp / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is a good way to spend a free afternoon number {i}?"}) + "\n" for i in range(n_prompts)))
    path = tmp / "prefs.yaml"
    path.write_text(f"""kind: prefs
name: e
constitution: {REPO / 'constitutions/harmless.yaml'}
pairs: {{source: sample, prompts: {{path: {tmp / 'prompts.jsonl'}}}, n: 2, sampling: {{max_tokens: 24, temperature: 1.0}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: {per_pair}}}
answer_template: {REPO}/prompts/answer.j2
db: {tmp / 'out.duckdb'}
chunk_rows: 4
""")
    return path


def test_small_preference_run_on_real_engine(engine, tmp_path):
    s = prefs.run(write(tmp_path), engine=engine, quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute('SELECT pair_id, principle_id, "order", logprob_first, logprob_second, p_first, p_a, '
                              "status FROM judgements").fetchall()
        ok_pairs = st.count("pairs", "status = 'ok'")
        assert len(rows) == ok_pairs * 2 * 2 and ok_pairs >= 3
        orders = {}
        for pair, prin, order, lf, ls, pf, p_a, status in rows:
            assert status == "ok" and lf <= 0 and ls <= 0
            assert 0 <= pf <= 1 and pf == pytest.approx(math.exp(lf) / (math.exp(lf) + math.exp(ls)), abs=1e-9)
            assert p_a == pytest.approx(pf if order == "ab" else 1 - pf)
            orders.setdefault((pair, prin), set()).add(order)
        assert all(o == {"ab", "ba"} for o in orders.values())  # both orders stored for every judgement
        assert st.count("preferences") == ok_pairs
        assert st.one("SELECT min(p_a) >= 0 AND max(p_a) <= 1 FROM preferences")[0]
    assert s.labels["pairs labelled"] == ok_pairs


class Interrupt:
    """Wraps the real engine: counts the scoring (judgement) requests it receives and raises
    KeyboardInterrupt (Ctrl-C) after ``after`` judgement completions."""

    def __init__(self, engine, after):
        self.e, self.after = engine, after
        self.model, self.seed, self.max_model_len = engine.model, engine.seed, engine.max_model_len
        self.capabilities = engine.capabilities
        self.judgements_sent = 0

    def token_ids(self, text):
        return self.e.token_ids(text)

    def close(self):
        pass

    def generate(self, requests):
        scoring = set()

        def counted():
            for r in requests:
                if r is not None and r.options:
                    scoring.add(r.key)
                    self.judgements_sent += 1
                yield r

        done = 0
        for c in self.e.generate(counted()):
            if c.key in scoring:
                if self.after is not None and done == self.after:
                    raise KeyboardInterrupt
                done += 1
            yield c


def test_interrupted_preference_run_resumes(engine, tmp_path):
    path = write(tmp_path, n_prompts=5, per_pair=3)
    with pytest.raises(KeyboardInterrupt):
        prefs.run(path, engine=Interrupt(engine, after=6), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        before = dict(st.con.execute("SELECT id, p_a FROM judgements").fetchall())
    assert len(before) >= 6  # every judgement that completed before the interrupt was written
    again = Interrupt(engine, after=None)
    prefs.run(path, engine=again, quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        after = dict(st.con.execute("SELECT id, p_a FROM judgements").fetchall())
        total = st.count("pairs", "status = 'ok'") * 3 * 2
        assert st.one("SELECT count(*), count(DISTINCT id) FROM judgements") == (total, total)
    assert again.judgements_sent == total - len(before)  # only the missing judgements were asked
    assert all(after[k] == v for k, v in before.items())


def test_vote_mode_on_the_real_engine(engine, tmp_path):
    """Sampled verdicts after the answer prefix, parsed strictly; every text stored, none guessed."""
    from factory.judges import parse_verdict

    path = write(tmp_path, n_prompts=2, per_pair=1)
    path.write_text(path.read_text().replace("per_pair: 1}", "per_pair: 1, mode: vote, votes: 4, vote_temperature: 1.0}"))
    s = prefs.run(path, engine=engine, quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute('SELECT "order", verdicts, p_first, p_a, status, error FROM judgements').fetchall()
    assert rows and s.labels.get("pairs labelled", 0) >= 1
    for order, verdicts, p_first, p_a_, status, error in rows:
        texts = json.loads(verdicts)
        picks = [parse_verdict(t, ["A", "B"]) for t in texts]
        valid = [x for x in picks if x is not None]
        assert len(texts) == 4
        if valid:
            assert status == "ok" and p_first == pytest.approx(sum(x == 0 for x in valid) / len(valid))
            assert p_a_ == pytest.approx(p_first if order == "ab" else 1 - p_first)
        else:
            assert status == "failed" and "no parseable verdict" in error
