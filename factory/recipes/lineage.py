"""Lineage across steps: the ``models`` table and the chain behind a row, a run or a model.

A training step records its checkpoint in ``models`` (content fingerprint, trainer, the step's
config hash, the base model, the runs and exports it trained on). A run records what answered it
(``runs.model`` and ``runs.lineage_json.engine_model``, which carries the fingerprint), so
``factory lineage ID`` walks: constitution → runs → export → model → the runs that model answered,
and on through the base model when that one was trained too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..store import Store, StoreError, now


def record_model(db: str | Path, path: Path, *, trainer: str, kind: str, config_hash: str, base: str,
                 runs: list[str], exports: list[dict], recipe: str | None = None, step: str | None = None,
                 round: int | None = None, facts: dict | None = None) -> str:
    """Record the checkpoint in ``path`` (replacing an older record of the same fingerprint)."""
    from ..models import ModelError, fingerprint, resolve

    fp = fingerprint(path)
    try:
        base_path = resolve(base, pull=False)
    except ModelError:
        base_path = None
    with Store(db, writer_run=f"lineage-{fp}") as store:
        store.con.execute("DELETE FROM models WHERE model_id = ?", [fp])
        store.con.execute(
            """INSERT INTO models (model_id, path, fingerprint, trainer, kind, config_hash, base_model, base_path, runs_json,
               exports_json, recipe, step, round, created_at, record_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [fp, str(Path(path).resolve()), fp, trainer, kind, config_hash, base, base_path, json.dumps(runs),
             json.dumps(exports), recipe, step, round, now(), json.dumps(facts or {}, default=str)])
    return fp


def record_cli_training(kind: str, config_path: str | Path, result) -> str | None:
    """`factory train` on a ``{db, run_id}`` dataset: record the checkpoint in that db's ``models``
    (a folder or human-set dataset names no store: nothing is recorded)."""
    from ..store import content_key
    from ..train import DbData, load_config

    cfg, _ = load_config(kind, config_path)
    if not isinstance(cfg.dataset, DbData) or result.output_dir.name.startswith("member-"):
        return None
    return record_model(cfg.dataset.db, result.output_dir, trainer="trl", kind=kind,
                        config_hash=content_key("train", kind, cfg.model_dump(exclude={"output_dir"})), base=cfg.model,
                        runs=[cfg.dataset.run_id], exports=[{"path": str(Path(cfg.output_dir) / "dataset"),
                                                             "rows": result.rows, "step": None}],
                        facts={"steps": result.steps, "train_loss": result.train_loss, "config": str(config_path)})


# ------------------------------------------------------------------------------------- reading


def _dicts(store: Store, sql: str, params: list) -> list[dict]:
    cur = store.con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def find_model(store: Store, key: str) -> dict | None:
    """A trained model by fingerprint, folder, or a run's model name/identity (``name@fingerprint``)."""
    fp = key.rsplit("@", 1)[-1].removeprefix("fake:")
    try:
        resolved = str(Path(key.removeprefix("fake:")).resolve())
    except OSError:
        resolved = key
    rows = _dicts(store, "SELECT * FROM models WHERE model_id = ? OR path = ? OR path = ? ORDER BY created_at DESC LIMIT 1",
                  [fp, key.removeprefix("fake:"), resolved])
    return rows[0] if rows else None


def _run(store: Store, run_id: str) -> dict | None:
    rows = _dicts(store, """SELECT run_id, kind, status, model, constitution_name, constitution_version, constitution_hash,
                                   lineage_json FROM runs WHERE run_id = ?""", [run_id])
    return rows[0] if rows else None


def _answered_by(store: Store, model: dict) -> list[dict]:
    """Runs whose engine was this model (by folder, relative or not, or by fingerprint in the engine identity)."""
    out = []
    for r in _dicts(store, "SELECT run_id, kind, status, model, lineage_json FROM runs ORDER BY started_at", []):
        engine = _engine(r)
        name = (r["model"] or "").removeprefix("fake:")
        try:
            same = Path(name).exists() and str(Path(name).resolve()) == model["path"]
        except OSError:
            same = False
        if same or engine.endswith(f"@{model['fingerprint']}"):
            out.append(r)
    return out


def _engine(run: dict) -> str:
    try:
        return json.loads(run.get("lineage_json") or "{}").get("engine_model") or run["model"]
    except ValueError:
        return run["model"]


def run_chain(store: Store, run_id: str, depth: int = 0, seen: set | None = None) -> dict[str, Any]:
    run = _run(store, run_id)
    if run is None:
        raise StoreError(f"{store.path}: no run '{run_id}'")
    node: dict[str, Any] = {"what": "run", "id": run_id, "kind": run["kind"], "status": run["status"],
                            "constitution": f"{run['constitution_name']} v{run['constitution_version']} "
                                            f"({run['constitution_hash'][:10]})", "answered_by": _engine(run)}
    model = find_model(store, run["model"]) or find_model(store, _engine(run))
    if model is not None and depth < 8:
        node["model"] = model_chain(store, model, depth + 1, answered=False, seen=seen)
    return node


def model_chain(store: Store, model: dict, depth: int = 0, answered: bool = True,
                seen: set | None = None) -> dict[str, Any]:
    seen = set() if seen is None else seen
    if model["model_id"] in seen:  # shown once, in full, above
        return {"what": "seen", "id": model["model_id"], "path": model["path"]}
    seen.add(model["model_id"])
    node: dict[str, Any] = {"what": "model", "id": model["model_id"], "path": model["path"], "kind": model["kind"],
                            "trainer": model["trainer"], "config_hash": model["config_hash"][:12],
                            "recipe_step": f"{model['recipe']}/{model['step']} round {model['round']}",
                            "exports": json.loads(model["exports_json"] or "[]")}
    base = find_model(store, model["base_path"] or model["base_model"]) if depth < 8 else None
    node["base"] = model_chain(store, base, depth + 1, answered=False, seen=seen) if base else model["base_model"]
    node["trained_on"] = [run_chain(store, r, depth + 1, seen) for r in json.loads(model["runs_json"] or "[]")]
    if answered:
        node["answered"] = _answered_by(store, model)
    return node


def lineage(db: str | Path, key: str) -> dict[str, Any]:
    """The chain for ``key``: a model (fingerprint or folder), a run id, or a stored row id."""
    from ..lineage import find_row

    with Store(db, read_only=True) as store:
        model = find_model(store, key)
        if model is not None:
            return model_chain(store, model)
        if _run(store, key) is not None:
            return run_chain(store, key)
        table, row = find_row(store, key)
        node = run_chain(store, row["run_id"])
        return {"what": "row", "id": key, "table": table, "run": node}


def render(node: dict[str, Any], tree=None):
    """A rich Tree of a chain."""
    from rich.tree import Tree

    if node["what"] == "row":
        t = Tree(f"[bold]row[/bold] {node['id']} ({node['table']})")
        render(node["run"], t)
        return t
    if node["what"] == "seen":
        label = f"model {node['id']} (its lineage is shown above)"
        return tree.add(label) if tree is not None else Tree(label)
    if node["what"] == "run":
        label = (f"[bold]run[/bold] {node['id']} ({node['kind']}, {node['status']}) · constitution "
                 f"{node['constitution']} · answered by {node['answered_by']}")
        t = tree.add(label) if tree is not None else Tree(label)
        if "model" in node:
            render(node["model"], t)
        return t
    label = (f"[bold]model[/bold] {node['id']} ({node['kind']} by {node['trainer']}, {node['recipe_step']}) "
             f"→ {node['path']}")
    t = tree.add(label) if tree is not None else Tree(label)
    base = node["base"]
    if isinstance(base, dict):
        render(base, t.add("base model"))
    else:
        t.add(f"base model {base}")
    for e in node["exports"]:
        t.add(f"export {e['path']} ({e['rows']} rows, step {e.get('step')})")
    if node["trained_on"]:
        runs = t.add("trained on")
        for r in node["trained_on"]:
            render(r, runs)
    if "answered" in node:
        a = t.add(f"runs this model answered ({len(node['answered'])})")
        for r in node["answered"]:
            a.add(f"{r['run_id']} ({r['kind']}, {r['status']})")
    return t
