"""Dataset cards checked against the run's lineage in the store; the audit gate refuses and allows
as stated; --push-to-hub goes through datasets and huggingface_hub (patched: never the real Hub)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import factory
from conftest import HH_RLHF, REPO
from factory.card import GateError

runner = CliRunner()
LIMIT = 24


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """The shipped hh-audit and hh-prefs pipelines on the fake engine (through factory.run overrides)
    into one database: the audit judges the human set, the prefs run labels the same file's pairs."""
    if not HH_RLHF.is_file():  # as the hh_rlhf fixture: fail, never skip
        pytest.fail(f"shared human labels not found at {HH_RLHF}; set FACTORY_HH_RLHF", pytrace=False)
    tmp = tmp_path_factory.mktemp("cards")
    common = {"engine": {"kind": "fake", "price": {"prompt": 0.5, "completion": 1.5}}, "db": str(tmp / "hh.duckdb"),
              "constitution": str(REPO / "constitutions/harmless.yaml"),
              "judge.template": str(REPO / "prompts/judge.j2"), "judge.per_pair": 2}
    a = factory.run(REPO / "pipelines/hh-audit.yaml", **common, **{"human.path": str(HH_RLHF), "human.limit": LIMIT,
                                                                  "audit.n_bootstrap": 50, "audit.report_dir": str(tmp)})
    p = factory.run(REPO / "pipelines/hh-prefs.yaml", **common, **{"pairs.path": str(HH_RLHF), "pairs.limit": LIMIT})
    return tmp, a, p


def test_card_fields_match_the_runs_lineage(audited):
    tmp, a, p = audited
    out = tmp / "ex"
    factory.export("prefs", p.db, p.run_id, out)
    meta = front_matter((out / "README.md").read_text())["factory"]
    manifest = json.loads((out / "export.json").read_text())
    db = factory.open(p.db)
    run = [r for r in db.runs().to_pylist() if r["run_id"] == p.run_id][0]
    j = db.judgements(p.run_id)
    jt = db.rows("judgements", run=p.run_id)
    prefs = db.rows("preferences", run=p.run_id).to_pandas()
    assert meta["run_id"] == p.run_id
    assert meta["constitution"] == {"name": run["constitution_name"], "version": run["constitution_version"],
                                    "hash": run["constitution_hash"]} == manifest["constitution"]
    assert [x["id"] for x in meta["principles"]] == sorted(set(j.principle_id))
    lineage = json.loads(db.sql("SELECT lineage_json FROM runs WHERE run_id = ?", [p.run_id]).column(0)[0].as_py())
    assert meta["engine_model"] == lineage["engine_model"] == manifest["model"]
    assert meta["template_hashes"] == sorted(set(jt.column("template_hash").to_pylist()))
    assert meta["pairs"] == len(prefs) and meta["ties"] == int(prefs.is_tie.sum())
    assert meta["rows"] == len(prefs) - int(prefs.is_tie.sum()) == manifest["rows"]
    assert meta["dropped"].get("tie", 0) == int(prefs.is_tie.sum())
    # the audit: another run with the same judge (the audit pipeline's), its stored figures
    audit = db.audits(a.run_id).to_pylist()[-1]
    assert meta["audit"]["audit_id"] == audit["audit_id"] == a.extra["audit_id"]
    assert meta["audit"]["agreement"] == pytest.approx(audit["agreement"])
    assert meta["audit"]["kappa"] == pytest.approx(audit["kappa"]) or audit["kappa"] != audit["kappa"]
    assert len(meta["audit"]["agreement_ci"]) == 2 and "p_prefers_first" in meta["audit"]["position_bias"]
    kappa, kci = meta["audit"]["kappa"], meta["audit"]["kappa_ci"]
    if kappa is not None and kappa == kappa:  # κ defined: its bootstrap interval is on the card and holds it
        assert kci[0] <= kappa <= kci[1] and kci[0] < kci[1]
        assert f"[{kci[0]:.3f}, {kci[1]:.3f}]" in (out / "README.md").read_text()
    # tokens and $ from the run's rows and its recorded price
    cost = meta["cost"]
    assert cost["prompt_tokens"] == j.prompt_tokens.sum() and cost["completion_tokens"] == j.completion_tokens.sum()
    assert cost["usd"] == pytest.approx(j.prompt_tokens.sum() * 0.5e-6 + j.completion_tokens.sum() * 1.5e-6)
    assert front_matter((out / "README.md").read_text())["license"] == "mit"  # hh-rlhf


def test_gate_refuses_and_allows(audited):
    tmp, a, p = audited
    audit = factory.open(p.db).audits(a.run_id).to_pylist()[-1]
    agreement = audit["agreement"]
    with pytest.raises(GateError, match="does not meet") as e:
        factory.export("prefs", p.db, p.run_id, tmp / "no", require_audit=f"agreement>={agreement + 0.01:.4f}")
    assert audit["audit_id"] in str(e.value) and "leave out --require-audit" in str(e.value)
    assert not (tmp / "no").exists()
    r = factory.export("prefs", p.db, p.run_id, tmp / "yes", require_audit=f"agreement>={agreement - 0.01:.4f}")
    assert (r.out / "README.md").exists()
    kappa = audit["kappa"]
    if kappa == kappa:  # κ defined: the same both ways
        with pytest.raises(GateError):
            factory.export("prefs", p.db, p.run_id, tmp / "no", require_audit=f"kappa>{kappa + 0.01:.4f}")
        factory.export("prefs", p.db, p.run_id, tmp / "yes", require_audit=f"kappa>={kappa - 0.01:.4f}")
    with pytest.raises(GateError, match="METRIC>=VALUE"):
        factory.export("prefs", p.db, p.run_id, tmp / "no", require_audit="precision>=0.2")


def test_gate_refuses_labels_without_an_audit_from_the_cli(tmp_path):
    from factory.cli import app
    from runkit import pair_records, prefs_yaml, write_jsonl

    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(6))
    s = factory.run(prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "p.duckdb", per_pair=1))
    r = runner.invoke(app, ["export", "prefs", "--db", s.db, "--run", s.run_id, "--out", str(tmp_path / "x"),
                            "--require-audit", "kappa>=0.2"])
    assert r.exit_code == 2 and "has no audit" in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(app, ["export", "prefs", "--db", s.db, "--run", s.run_id, "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "x" / "README.md").read_text()
    assert front_matter(card)["factory"]["audit"] is None and "No audit" in card


def test_push_to_hub_goes_through_datasets(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from factory.cli import app
    from runkit import pair_records, prefs_yaml, write_jsonl

    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: calls.append(("rows", repo, self.num_rows, kw)))
    monkeypatch.setattr(huggingface_hub.DatasetCard, "push_to_hub", lambda self, repo, **kw: calls.append(("card", repo, self.content, kw)))
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(6))
    s = factory.run(prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "p.duckdb", per_pair=1))
    args = ["export", "prefs", "--db", s.db, "--run", s.run_id, "--out", str(tmp_path / "x"), "--push-to-hub", "me/prefs"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "HF_TOKEN" in r.output and not calls
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = [c for c in calls if c[0] == "rows"]
    cards = [c for c in calls if c[0] == "card"]
    n = datasets.load_from_disk(str(tmp_path / "x")).num_rows
    assert rows == [("rows", "me/prefs", n, {"token": "hf_test"})]
    assert cards[0][1] == "me/prefs" and cards[0][2].startswith("---") and s.run_id in cards[0][2]


def test_sft_card_states_the_constitution_and_principles_of_the_revisions(tmp_path):
    from conftest import write_pipeline

    prompts = [{"prompt": f"Question number {i}: how do I fix a bike tyre?"} for i in range(4)]
    s = factory.run(write_pipeline(tmp_path, prompts=prompts, engine="fake"))
    r = factory.export("sft", s.db, s.run_id, tmp_path / "sft")
    meta = front_matter((r.out / "README.md").read_text())
    db = factory.open(s.db)
    run = [x for x in db.runs().to_pylist() if x["run_id"] == s.run_id][0]
    revs = db.revisions(s.run_id)
    assert meta["factory"]["constitution"]["hash"] == run["constitution_hash"]
    used = sorted({p for ids in revs.principle_ids for p in json.loads(ids)})
    assert [p["id"] for p in meta["factory"]["principles"]] == used
    assert meta["factory"]["rows"] == r.rows and meta["task_categories"] == ["text-generation"]
