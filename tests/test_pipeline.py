"""Pipeline logic on the deterministic fake engine: keys, resume, lineage, bad input."""

import json

import pytest

from factory import pipeline
from factory.config import load_pipeline
from factory.constitution import load_constitution
from factory.engines.fake import FakeEngine
from factory.stages.sl import choose_principles
from factory.store import Store
from factory.yamlconf import ConfigError

from conftest import REPO, write_pipeline

PROMPTS = [{"prompt": f"Question number {i}: how do I do thing {i}?"} for i in range(6)]


def fake(**kw):
    return FakeEngine(model="smollm2-135m", **kw)


def test_end_to_end_tables_join_with_lineage(tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, rounds=2, engine="fake")
    s = pipeline.run(path, engine=fake(), quiet=True)
    assert s.prompts == 6 and s.written == 6 * 5  # answer + 2 × (critique + revision)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute("""
            SELECT p.prompt_id, r.id, c1.principle_ids, v2.round, cfg.body, t.kind, k.kind
            FROM prompts p
            JOIN responses r ON r.prompt_id = p.prompt_id
            JOIN critiques c1 ON c1.parent_id = r.id AND c1.round = 1
            JOIN revisions v1 ON v1.parent_id = r.id AND v1.round = 1
            JOIN critiques c2 ON c2.parent_id = v1.id AND c2.round = 2
            JOIN revisions v2 ON v2.parent_id = v1.id AND v2.round = 2
            JOIN configs cfg ON cfg.config_hash = v2.sampling_hash
            JOIN configs t ON t.config_hash = v2.template_hash
            JOIN configs k ON k.config_hash = v2.constitution_hash
        """).fetchall()
        assert len(rows) == 6
        ids = load_constitution(REPO / "constitutions/harmless.yaml").ids
        for _, _, pids, rnd, body, tkind, ckind in rows:
            assert json.loads(pids)[0] in ids and rnd == 2
            assert json.loads(body)["engine_seed"] == 0 and tkind == "template" and ckind == "constitution"
        run = st.one("SELECT constitution_name, constitution_version, model, status FROM runs")
        assert run == ("harmless", "1.0", "smollm2-135m", "done")


def test_rerun_recomputes_nothing(tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake")
    pipeline.run(path, engine=fake(), quiet=True)
    eng = fake()
    s = pipeline.run(path, engine=eng, quiet=True)
    assert eng.calls == [] and s.written == 0 and s.reused == 6 * 3


class Dies(FakeEngine):
    """Raises KeyboardInterrupt after ``after`` completions, like Ctrl-C mid-run."""

    def __init__(self, after, **kw):
        super().__init__(model="smollm2-135m", **kw)
        self.after = after

    def generate(self, requests):
        for i, c in enumerate(super().generate(requests)):
            if i == self.after:
                raise KeyboardInterrupt
            yield c


def test_interrupted_run_resumes_without_losses_or_duplicates(tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(path, engine=Dies(after=5), quiet=True)  # the 6th completion never arrives
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        before = dict(st.con.execute("SELECT id, created_at FROM responses").fetchall())
        assert st.one("SELECT status FROM runs")[0] == "stopped"
    assert len(before) == 5  # every completion that arrived was written, though chunk_rows (4) was not reached
    eng = fake()
    pipeline.run(path, engine=eng, quiet=True)
    assert eng.calls == [1 + 6 + 6]  # only the missing answer, then every critique and revision
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        after = dict(st.con.execute("SELECT id, created_at FROM responses").fetchall())
        assert st.one("SELECT count(*), count(DISTINCT id) FROM revisions") == (6, 6)
    assert len(after) == 6 and all(after[k] == v for k, v in before.items())  # stored rows untouched


def test_editing_one_principle_recomputes_only_its_rows(tmp_path, copy_constitution):
    const = copy_constitution()
    extra = "principles: {strategy: all, only: [weapons, privacy]}"
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake", constitution=str(const), extra=extra)
    pipeline.run(path, engine=fake(), quiet=True)
    c = load_constitution(const)
    old = c.principle("privacy").critique
    const.write_text(const.read_text().replace(old, old + " Be specific."))
    eng = fake()
    s = pipeline.run(path, engine=eng, quiet=True)
    # responses reused; 6 privacy critiques recomputed, weapons ones reused; all revisions redone
    assert eng.calls == [6 + 6]
    by_table = {w.table: (w.written, w.reused) for w in s.stages}
    assert by_table["responses"] == (0, 6) and by_table["critiques"] == (6, 6) and by_table["revisions"] == (6, 0)


def test_bad_rows_are_recorded_not_dropped(tmp_path):
    prompts = PROMPTS[:3] + [{"prompt": "   "}, {"text": "no field"}, {"prompt": "word " * 3000}]
    path = write_pipeline(tmp_path, prompts=prompts, engine="fake")
    with open(tmp_path / "prompts.jsonl", "ab") as f:
        f.write(b'{"prompt": "caf\xe9"}\n')
    s = pipeline.run(path, engine=fake(empty_every=2), quiet=True)
    assert sum(s.input_skips.values()) == 3
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        reasons = [r[0] for r in st.con.execute("SELECT reason FROM skips ORDER BY row").fetchall()]
        assert any("empty prompt" in r for r in reasons) and any("UTF-8" in r for r in reasons)
        status = dict(st.con.execute("SELECT status, count(*) FROM responses GROUP BY 1").fetchall())
        assert status == {"ok": 2, "failed": 1, "skipped": 1}
        long = st.one("SELECT error FROM responses WHERE status = 'skipped'")[0]
        assert "prompt too long" in long and "max_model_len" in long
        # a failed answer is not critiqued; the failure stays visible with its reason
        assert st.count("critiques") == 2
    assert any("empty model output" in k for k in s.failures)


def test_choose_principles_strategies():
    c = load_constitution(REPO / "constitutions/harmless.yaml")
    ids = [f"p{i}" for i in range(5)]
    rr1 = choose_principles(c, "round_robin", 1, 0, ids, 1)
    rr2 = choose_principles(c, "round_robin", 1, 0, ids, 2)
    n = len(c.principles)
    assert [rr1[p][0].id for p in ids] == [c.principles[i % n].id for i in range(5)]
    assert [rr2[p][0].id for p in ids] == [c.principles[(i + 1) % n].id for i in range(5)]
    r_a = choose_principles(c, "random", 2, 0, ids, 1)
    assert r_a == choose_principles(c, "random", 2, 0, list(reversed(ids)), 1)  # not order dependent
    assert all(len(v) == 2 and v[0].id != v[1].id for v in r_a.values())
    seeds = {tuple(p.id for p in choose_principles(c, "random", 1, s, ids, 1)["p0"]) for s in range(20)}
    assert len(seeds) > 3  # the seed matters
    assert all(len(v) == n for v in choose_principles(c, "all", 1, 0, ids, 1).values())


def test_unknown_pipeline_key_points_at_line(tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake", extra="temperature: 0.3")
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    last = len(path.read_text().splitlines())
    assert f"pipeline.yaml:{last}:1" in str(e.value) and "unknown key 'temperature'" in str(e.value)


def test_rounds_out_of_range_and_missing_prompts_file(tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake", rounds=5)
    with pytest.raises(ConfigError, match="rounds"):
        load_pipeline(path)
    path = write_pipeline(tmp_path, prompts=PROMPTS, engine="fake")
    (tmp_path / "prompts.jsonl").unlink()
    engine = fake()
    with pytest.raises(ConfigError, match="prompts file not found: .*prompts.jsonl") as info:
        pipeline.run(path, engine=engine, quiet=True)  # refused while loading: before any engine is used
    assert str(info.value).startswith(f"{path}:")  # at the line of `prompts.path`
    assert engine.calls == []
