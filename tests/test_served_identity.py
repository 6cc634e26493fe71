"""A served model's identity (issue 22): rows judged through an OpenAI-compatible server are keyed by the
served folder's weights fingerprint, so a checkpoint retrained into the same folder and served again
reuses nothing; ``engine.model_id`` names the identity when the server cannot (tests/fakeserver.py)."""

from __future__ import annotations

from pathlib import Path

from factory import prefs
from fakeserver import FakeServer
from runkit import pair_records, prefs_yaml, query, write_jsonl


def checkpoint(folder, weights: bytes):
    """A model folder as training writes it: the embedded model's tokenizer and config, and ``weights``."""
    import shutil

    from factory import models

    src = models.resolve("smollm2-135m", pull=False)
    folder.mkdir(exist_ok=True)
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "config")):
            shutil.copy(f, folder / f.name)
    (folder / "model.safetensors").write_bytes(weights)


def test_a_checkpoint_retrained_into_the_same_folder_and_served_again_reuses_nothing(tmp_path):
    folder = tmp_path / "ckpt"
    checkpoint(folder, b"weights of round 1")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(4))
    db = tmp_path / "out.duckdb"
    with FakeServer(models=(str(folder),)) as server:
        y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=1,
                       engine=f"{{kind: openai, base_url: '{server.url}'}}", extra=f"model: '{folder}'")
        first = prefs.run(y, quiet=True)
        n1 = len(server.bodies)
        models = {m for (m,) in query(db, "SELECT DISTINCT model FROM judgements")}
        assert len(models) == 1 and models.pop().startswith(f"{folder}@") and first.written == 8
        again = prefs.run(y, quiet=True)  # same weights: everything is reused
        probes = len(server.bodies) - n1  # what an engine start asks (capability detection), nothing judged
        assert again.written == 0 and again.run_id == first.run_id
        checkpoint(folder, b"weights of round 2, retrained in place")  # same folder, same served id
        n2 = len(server.bodies)
        third = prefs.run(y, quiet=True)
        assert len(server.bodies) - n2 == probes + 8  # every judgement asked again
    assert third.reused == 0 and third.written == 8 and third.run_id != first.run_id
    rows = query(db, "SELECT model, count(*) FROM judgements GROUP BY 1 ORDER BY 1")
    assert len(rows) == 2 and all(n == 8 for _, n in rows) and all(m.startswith(f"{folder}@") for m, _ in rows)


def test_engine_model_id_names_what_a_server_cannot(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(3))
    db = tmp_path / "out.duckdb"
    with FakeServer(models=("hosted-model",)) as server:
        for model_id, expect_new in (("hosted-model@2026-12-01", 6), ("hosted-model@2026-12-01", 0),
                                     ("hosted-model@2027-01-15", 6)):
            y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=1, extra="model: hosted-model",
                           engine=f"{{kind: openai, base_url: '{server.url}', model_id: '{model_id}'}}")
            s = prefs.run(y, quiet=True)
            assert s.written == expect_new, (model_id, s.written)
    assert dict(query(db, "SELECT model, count(*) FROM judgements GROUP BY 1")) == {
        "hosted-model@2026-12-01": 6, "hosted-model@2027-01-15": 6}


def test_model_id_is_not_in_the_snapshot_of_pipelines_without_it(tmp_path):
    """A new key must not change the run id of a file that does not use it: only the engine identity
    (which model_id sets) reaches the run id."""
    from factory.kinds import load

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(1))
    snaps = []
    for extra in ("", ", model_id: x@1"):
        y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "o.duckdb",
                       engine=f"{{kind: openai, base_url: 'http://127.0.0.1:9/v1'{extra}}}")
        _, lp = load(y)
        snaps.append(lp.cfg.snapshot())
    assert "model_id" not in snaps[0]["engine"] and snaps[0] == snaps[1]
