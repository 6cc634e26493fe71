"""The CLI end to end on the fake engine: exit codes and messages a user sees."""


from typer.testing import CliRunner

from factory.cli import app

from conftest import REPO, write_pipeline

runner = CliRunner()


def test_validate_ok_and_error_with_location(tmp_path):
    r = runner.invoke(app, ["validate", str(REPO / "constitutions/harmless.yaml")])
    assert r.exit_code == 0 and r.output.startswith("ok, 17 principles")
    bad = tmp_path / "c.yaml"
    # (issue 21: critique+revision without a comparison is a valid SL-only principle; no use at all is not)
    bad.write_text("name: x\nversion: '1'\nprinciples:\n  - id: a\n    tags: [t]\n")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "c.yaml:4:" in r.output and "comparison" in r.output and "Traceback" not in r.output


def test_run_status_render_on_fake_engine(tmp_path):
    prompts = [{"prompt": f"q {i}"} for i in range(3)] + [{"prompt": ""}]
    path = write_pipeline(tmp_path, prompts=prompts, engine="fake")
    r = runner.invoke(app, ["run", str(path), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "rows written: 9" in r.output and "input rows skipped: 1" in r.output and "out.duckdb" in r.output
    r = runner.invoke(app, ["run", str(path), "--quiet"])
    assert "rows written: 0, reused: 9" in r.output
    r = runner.invoke(app, ["status", "--db", str(tmp_path / "out.duckdb")])
    assert r.exit_code == 0 and "3/3" in r.output and "(sl, done)" in r.output and "empty prompt" in r.output
    r = runner.invoke(app, ["render", str(path), "--stage", "critique", "--example", "1"])
    assert r.exit_code == 0 and "q 1" in r.output and "<reply>" in r.output
    r = runner.invoke(app, ["render", str(path), "--stage", "answer", "--example", "7"])
    assert r.exit_code == 2 and "out of range" in r.output


def test_missing_prompts_file_is_one_line_error(tmp_path):
    path = write_pipeline(tmp_path, prompts=[{"prompt": "x"}], engine="fake")
    (tmp_path / "prompts.jsonl").unlink()
    r = runner.invoke(app, ["run", str(path)])
    assert r.exit_code == 2 and "prompts.jsonl" in r.output and "Traceback" not in r.output


def test_every_pipeline_kind_validates_and_renders(tmp_path, hh_rlhf):
    """The run-kind registry serves validate and render for SL, prefs and audit pipelines alike."""
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Is tea good?", "response_a": "Yes.", "response_b": "No."}\n')
    prefs = tmp_path / "prefs.yaml"
    prefs.write_text(f"""kind: prefs
name: p
constitution: {REPO}/constitutions/harmless.yaml
pairs: {{source: file, path: {tmp_path}/pairs.jsonl}}
judge: {{template: {REPO}/prompts/judge.j2}}
engine: {{kind: fake}}
db: {tmp_path}/p.duckdb
""")
    audit = tmp_path / "audit.yaml"
    audit.write_text(f"""kind: audit
name: a
constitution: {REPO}/constitutions/harmless.yaml
human: {{path: {hh_rlhf}, format: hh-rlhf, limit: 3}}
judge: {{template: {REPO}/prompts/judge.j2}}
engine: {{kind: fake}}
db: {tmp_path}/a.duckdb
""")
    for path, kind, text in ((prefs, "prefs", "Is tea good?"), (audit, "audit", "Conversation:")):
        r = runner.invoke(app, ["validate", str(path)])
        assert r.exit_code == 0 and f"ok, {kind} pipeline" in r.output and "run id" in r.output, r.output
        r = runner.invoke(app, ["render", str(path)])
        assert r.exit_code == 0 and text in r.output and "The better option is (" in r.output, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(prefs.read_text().replace("kind: prefs", "kind: labels"))
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "unknown pipeline kind 'labels'" in r.output
