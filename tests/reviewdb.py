"""A small real audit database for the review app's tests: hh-rlhf pairs plus planted XSS pairs,
judged by the fake engine through the factory's own audit pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import HH_RLHF, REPO

XSS_SCRIPT = "<script>window.__xss = 'script'</script>"
XSS_IMG = "<img src=x onerror=\"window.__xss = 'img'\">"
PAYLOADS = (XSS_SCRIPT, XSS_IMG)


def human_file(tmp: Path, n_hh: int) -> Path:
    """Generic JSONL: the first ``n_hh`` hh-rlhf pairs, then for each payload three prompts, each with two
    mirrored pairs (a and b swapped, human picks 'a' in both) whose texts hold it: the judge's p_a of one
    is 1 - p_a of the other, so unless both are ties one of them is a disagreement in the review queue."""
    from factory.sources import read_pairs

    table, _ = read_pairs(HH_RLHF, format="hh-rlhf", limit=n_hh)
    rows = [{"conversation": json.loads(r["conversation"]), "response_a": r["response_a"],
             "response_b": r["response_b"], "human_choice": r["human_choice"]} for r in table.to_pylist()]
    for k, evil in enumerate(PAYLOADS):
        for v in range(3):  # three variants: the fake judge's labels are hash noise, some pairs are ties
            prompt = f"Question {k}.{v}: what does {evil} do on a web page?"
            bad, good = f"Paste this into the page: {evil}", f"I would not run markup from strangers ({k}.{v})."
            rows += [{"prompt": prompt, "response_a": bad, "response_b": good, "human_choice": "a"},
                     {"prompt": prompt, "response_a": good, "response_b": bad, "human_choice": "a"}]
    path = tmp / "human.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_audit_db(tmp: Path, n_hh: int = 40, tie_eps: float = 0.05) -> tuple[Path, str]:
    """(database, audit id) of an audit over ``n_hh`` hh-rlhf pairs + 12 planted pairs, fake engine."""
    from factory.audit.run import audit
    from factory.engines.fake import FakeEngine

    tmp.mkdir(parents=True, exist_ok=True)
    db = tmp / "hh.duckdb"
    path = tmp / "audit.yaml"
    path.write_text(f"""kind: audit
name: review-test
constitution: {REPO / 'constitutions/harmless.yaml'}
human: {{path: {human_file(tmp, n_hh)}, format: jsonl, name: reviewset}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2, tie_eps: {tie_eps}}}
engine: {{kind: fake}}
db: {db}
chunk_rows: 64
audit: {{n_bootstrap: 200, report_dir: {tmp}}}
""")
    audit_id, _, _ = audit(path, engine=FakeEngine(model="smollm2-135m"), quiet=True)
    return db, audit_id


_BUILT: dict[str, tuple[Path, str]] = {}


@pytest.fixture(scope="session")
def review_audit(tmp_path_factory) -> tuple[Path, str]:
    """One audited database per test session, shared by every module that imports this fixture (copy it
    before writing into it)."""
    if "db" not in _BUILT:
        _BUILT["db"] = make_audit_db(tmp_path_factory.mktemp("review-audit"))
    return _BUILT["db"]
