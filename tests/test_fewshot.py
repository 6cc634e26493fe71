"""Principles by use (SL-only, RL-only) and few-shot demonstrations, on the fake engine: each stage
draws the right kind, a pipeline needing a kind its constitution lacks is an error at its line, the
demonstrations are in the messages (the judge's in both orders, in the shared prefix) and in the
keys, and editing one recomputes only the rows that showed it."""

from __future__ import annotations

import json

import pytest

from factory import pipeline, prefs
from factory.constitution import load_constitution
from factory.engines.fake import FakeEngine
from factory.fewshot import JudgeShots, SLShots
from factory.lineage import show_row
from factory.kinds import render_example
from factory.kinds import load
from factory.store import Store
from factory.yamlconf import ConfigError

from conftest import REPO

CRIT_EXAMPLES = [(f"Human: Question {i}?\n\nAssistant: Reply {i}.", f"CRIT-DEMO-{i} the reply is vague.",
                  f"REV-DEMO-{i} a clearer reply.") for i in range(4)]
CMP_EXAMPLES = [("Human: Is it safe to mix bleach and ammonia?", f"No {i}, it makes toxic gas.",
                 f"Sure {i}, it cleans better.", "a" if i % 2 == 0 else "b") for i in range(4)]


def constitution_text(*, sl: bool = True, rl: bool = True, examples: bool = True) -> str:
    lines = ["name: split", 'version: "1"', "principles:"]
    if sl:
        lines += ["  - id: sl-a", "    critique: Point out anything harmful.", "    revision: Rewrite it without harm.",
                  "  - id: sl-b", "    critique: Point out anything dishonest.", "    revision: Rewrite it honestly."]
    if rl:
        lines += ["  - id: rl-a", "    comparison: Which response is less harmful?",
                  "  - id: rl-b", "    comparison: Which response is more honest?"]
    if examples:
        lines.append("examples:")
        for conv, crit, rev in CRIT_EXAMPLES:
            lines += ["  - kind: critique", f"    conversation: {json.dumps(conv)}", f"    critique: {crit}",
                      f"    revision: {rev}"]
        for conv, a, b, pref in CMP_EXAMPLES:
            lines += ["  - kind: comparison", f"    conversation: {json.dumps(conv)}", f"    response_a: {a}",
                      f"    response_b: {b}", f"    preferred: {pref}"]
    return "\n".join(lines) + "\n"


def fake() -> FakeEngine:
    return FakeEngine(model="smollm2-135m")


def sl_pipeline(tmp, const, *, few_shot: int | None = 1, n: int = 12, extra: str = "") -> "Path":
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: what now?"}) + "\n" for i in range(n)))
    path = tmp / "sl.yaml"
    path.write_text(f"""name: s
prompts: {{path: {tmp / 'prompts.jsonl'}}}
constitution: {const}
templates: {{answer: {REPO}/prompts/answer.j2, critique: {REPO}/prompts/critique.j2, revise: {REPO}/prompts/revise.j2}}
engine: {{kind: fake}}
{'' if few_shot is None else f'few_shot: {few_shot}'}
db: {tmp / 'out.duckdb'}
{extra}""")
    return path


def prefs_pipeline(tmp, const, *, few_shot: int | None = 1, n: int = 12, judge: str = "") -> "Path":
    with open(tmp / "pairs.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Prompt {i}?", "response_a": f"Answer A{i}.", "response_b": f"Answer B{i}."}) + "\n")
    fs = "" if few_shot is None else f", few_shot: {few_shot}"
    path = tmp / "prefs.yaml"
    path.write_text(f"""kind: prefs
name: p
constitution: {const}
pairs: {{source: file, path: {tmp / 'pairs.jsonl'}}}
judge: {{template: {REPO}/prompts/judge.j2{fs}{judge}}}
engine: {{kind: fake}}
db: {tmp / 'out.duckdb'}
""")
    return path


def write_const(tmp, **kw):
    path = tmp / "split.yaml"
    path.write_text(constitution_text(**kw))
    return path


def line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ------------------------------------------------------------------------- principles by use

def test_sl_run_critiques_only_with_sl_principles(tmp_path):
    const = write_const(tmp_path)
    s = pipeline.run(sl_pipeline(tmp_path, const, few_shot=None, extra="principles: {strategy: all}"),
                     engine=fake(), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        used = {p for (ids,) in st.con.execute("SELECT principle_ids FROM critiques").fetchall() for p in json.loads(ids)}
    assert used == {"sl-a", "sl-b"} and s.written == 12 * (1 + 2 + 1)


def test_judge_uses_only_rl_principles(tmp_path):
    const = write_const(tmp_path)
    pipeline_path = prefs_pipeline(tmp_path, const, few_shot=None)
    prefs.run(pipeline_path, engine=fake(), quiet=True)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        used = {p for (p,) in st.con.execute("SELECT DISTINCT principle_id FROM judgements").fetchall()}
        n = st.one("SELECT count(*) FROM judgements")[0]
    assert used == {"rl-a", "rl-b"} and n == 12 * 2 * 2


def test_sl_pipeline_over_comparison_only_constitution_is_an_error_at_its_line(tmp_path):
    const = write_const(tmp_path, sl=False, examples=False)
    path = sl_pipeline(tmp_path, const, few_shot=None)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == line_of(path, "constitution:")
    assert "no principle with a critique and a revision" in info.value.message


def test_judge_over_critique_only_constitution_is_an_error_at_its_line(tmp_path):
    const = write_const(tmp_path, rl=False, examples=False)
    path = prefs_pipeline(tmp_path, const, few_shot=None)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == line_of(path, "constitution:")
    assert "no principle with a `comparison` question" in info.value.message


def test_sl_only_lists_an_rl_principle_and_too_many_shots_are_errors(tmp_path):
    const = write_const(tmp_path)
    path = sl_pipeline(tmp_path, const, few_shot=None, extra="principles: {only: [sl-a, rl-b]}")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == line_of(path, "only:") and "'rl-b'" in info.value.message
    path = sl_pipeline(tmp_path, const, few_shot=5)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == line_of(path, "few_shot:") and "which has 4" in info.value.message


# ------------------------------------------------------------------------------ demonstrations

def test_sl_demonstrations_are_earlier_turns_of_critique_and_revision(tmp_path):
    const = write_const(tmp_path)
    path = sl_pipeline(tmp_path, const, few_shot=2)
    c = load_constitution(const)
    for stage, answer in (("critique", "CRIT-DEMO"), ("revise", "REV-DEMO")):
        m = render_example(path, stage, 0)
        assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert m[2]["content"].startswith(answer) and m[4]["content"].startswith(answer)
        assert "Question 0: what now?" in m[-1]["content"]  # the real request comes last
    # the messages sent are the ones rendered, and the chosen examples are the seeded choice
    pipeline.run(path, engine=fake(), quiet=True)
    shots = SLShots(c, 2, 0, {})
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rows = st.con.execute("SELECT prompt_id, messages FROM critiques").fetchall()
    assert len(rows) == 12
    for pid, messages in rows:
        shown = [t["content"] for t in json.loads(messages) if t["role"] == "assistant"]
        assert shown == [ex.critique for ex in shots.chosen(pid, 1)]


def test_judge_demonstrations_in_both_orders_in_the_shared_prefix(tmp_path):
    const = write_const(tmp_path)
    path = prefs_pipeline(tmp_path, const, few_shot=2)
    kind, lp = load(path)
    from factory.stages import judge as J

    ctx = J.JudgeCtx(run_id="", model="", seed=None, constitution=lp.constitution, template=lp.templates["judge"],
                     options=["A", "B"], option_ids=[], sampling_hash="", max_chars=3000,
                     shots=JudgeShots(lp.constitution, 2, 0))
    pair = J.Pair("pair-1", [{"role": "user", "content": "Prompt?"}], "Answer A.", "Answer B.")
    chosen = ctx.shots.chosen(pair.pair_id)
    assert len(chosen) == 2
    renders = {(p.id, o): ctx.render(pair, p, o) for p in lp.constitution.rl_principles for o in J.ORDERS}
    m = renders["rl-a", "ab"]
    demos = m[1:1 + 8]  # 2 examples × 2 orders × (user, assistant)
    assert m[0]["role"] == "system" and [d["role"] for d in demos] == ["user", "assistant"] * 4
    for j, i in enumerate(chosen):
        ex = lp.constitution.examples_of("comparison")[i]
        ab_user, ab_answer, ba_user, ba_answer = demos[4 * j:4 * j + 4]
        assert ab_user["content"].index(ex.response_a) < ab_user["content"].index(ex.response_b)
        assert ba_user["content"].index(ex.response_b) < ba_user["content"].index(ex.response_a)
        best_first = "(A)" if ex.preferred == "a" else "(B)"
        best_second = "(B)" if ex.preferred == "a" else "(A)"
        assert ab_answer["content"].endswith(best_first) and ba_answer["content"].endswith(best_second)
    # the demonstrations come before the conversation and are the same for every principle and order
    assert "Prompt?" in m[9]["content"] and all("Prompt?" not in d["content"] for d in demos)
    assert all(r[:9] == m[:9] for r in renders.values())
    # the skeleton path gives the same messages as a full render
    assert ctx.messages(pair, lp.constitution.principle("rl-b"), "ba") == renders["rl-b", "ba"]


def test_render_shows_judge_demonstrations(tmp_path):
    const = write_const(tmp_path)
    m = render_example(prefs_pipeline(tmp_path, const, few_shot=1), "answer", 0)
    assert sum("bleach" in x["content"] for x in m) == 2  # one example, both orders


def test_few_shot_zero_keeps_run_ids_and_keys(tmp_path):
    const = write_const(tmp_path)
    ids = {fs: load(sl_pipeline(tmp_path, const, few_shot=fs))[1].run_id for fs in (None, 0, 1)}
    assert ids[None] == ids[0] != ids[1]
    ids = {fs: load(prefs_pipeline(tmp_path, const, few_shot=fs))[1].run_id for fs in (None, 0, 1)}
    assert ids[None] == ids[0] != ids[1]
    # with few_shot 0, a judgement's key is the one it had before demonstrations existed
    prefs.run(prefs_pipeline(tmp_path, const, few_shot=0), engine=fake(), quiet=True)
    eng = fake()
    s = prefs.run(prefs_pipeline(tmp_path, const, few_shot=None), engine=eng, quiet=True)
    assert eng.calls == [] and s.written == 0


def _edit_example(path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def test_editing_a_judge_demonstration_recomputes_only_the_pairs_that_showed_it(tmp_path):
    const = write_const(tmp_path)
    path = prefs_pipeline(tmp_path, const, few_shot=1, n=16)
    s1 = prefs.run(path, engine=fake(), quiet=True)
    assert {w.table: w.written for w in s1.stages}["judgements"] == 16 * 2 * 2
    c = load_constitution(const)
    shots = JudgeShots(c, 1, 0)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        pairs = [p for (p,) in st.con.execute("SELECT pair_id FROM run_pairs").fetchall()]
    users = sum(1 for p in pairs if 1 in shots.chosen(p))
    assert 0 < users < 16  # a test that can tell "only those" from "all" or "none"
    _edit_example(const, "No 1, it makes toxic gas.", "No 1, it makes a toxic gas.")
    eng = fake()
    s2 = prefs.run(path, engine=eng, quiet=True)
    by_table = {w.table: (w.written, w.reused) for w in s2.stages}
    assert by_table["judgements"][0] == users * 2 * 2  # 2 principles × 2 orders per pair that showed it
    assert by_table["judgements"][1] == (16 - users) * 2 * 2
    # the few-shot judgements' messages re-render exactly (factory show)
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        rid = st.one("SELECT id FROM judgements ORDER BY created_at DESC LIMIT 1")[0]
        lin = show_row(st, rid)
    assert lin.ok, lin.checks
    assert sum("bleach" in m["content"] for m in lin.messages) == 2


def test_editing_a_critique_demonstration_recomputes_only_the_prompts_that_showed_it(tmp_path):
    const = write_const(tmp_path)
    path = sl_pipeline(tmp_path, const, few_shot=1, n=16)
    pipeline.run(path, engine=fake(), quiet=True)
    shots = SLShots(load_constitution(const), 1, 0, {})
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        pids = [p for (p,) in st.con.execute("SELECT prompt_id FROM run_prompts").fetchall()]
    users = sum(1 for p in pids if shots.chosen(p, 1)[0].critique.startswith("CRIT-DEMO-2"))
    assert 0 < users < 16
    _edit_example(const, "REV-DEMO-2 a clearer reply.", "REV-DEMO-2 a much clearer reply.")
    s = pipeline.run(path, engine=fake(), quiet=True)
    # a critique request shows the demonstration's critique only: the edited revision changes revisions only
    assert {w.table: w.written for w in s.stages} == {"responses": 0, "critiques": 0, "revisions": users}
    _edit_example(const, "CRIT-DEMO-2 the reply is vague.", "CRIT-DEMO-2 the reply is too vague.")
    s = pipeline.run(path, engine=fake(), quiet=True)
    assert {w.table: w.written for w in s.stages} == {"responses": 0, "critiques": users, "revisions": users}
    assert sum(w.reused for w in s.stages) == 16 + 2 * (16 - users)


def test_audit_naive_principle_must_have_a_comparison(tmp_path):
    const = write_const(tmp_path)
    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"prompt": "Hi?", "response_a": "Hello.", "response_b": "Go away.", "choice": "a"}) + "\n")
    path = tmp_path / "audit.yaml"
    path.write_text(f"""kind: audit
name: a
constitution: {const}
human: {{path: {human}}}
judge: {{template: {REPO}/prompts/judge.j2}}
engine: {{kind: fake}}
db: {tmp_path / 'out.duckdb'}
audit: {{naive_principle: sl-a}}
""")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == line_of(path, "audit: {naive_principle") and "'sl-a' has no `comparison`" in info.value.message
    path.write_text(path.read_text().replace("naive_principle: sl-a", "naive_principle: rl-b"))
    assert load(path)[1].cfg.audit.naive_principle == "rl-b"
