"""Dataset cards for exports, the audit gate, and pushing an export to the Hugging Face Hub.

Every export folder gets a ``README.md`` in the Hub's dataset-card format: a YAML block (metadata
a program can read: ``factory:`` holds the lineage) then prose for a person. What it states comes
from the run's lineage in the store, never from the command line: the constitution (name,
version, hash) and the principles judged, the judge model(s) with their fingerprints and the
engine, template hashes, run ids, the filters and what each dropped, ties, input rows skipped
(bad rows, duplicates, contamination), the latest audit of the judge (agreement and κ with their
interval, position and length bias), tokens and $ and the licence of the inputs where known.

The gate (``export prefs --require-audit "kappa>=0.2"``) reads the same latest audit.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .results import fmt, run_cost
from .store import Store, StoreError

# licences of inputs the factory knows by their path (anything else: "unknown", say where to look)
KNOWN_LICENCES = {"hh-rlhf": "mit", "demo_prompts": "apache-2.0", "data/evals": "apache-2.0",
                  "smollm2": "apache-2.0"}


class GateError(StoreError):
    """The audit gate refused an export (the message gives the figures and how to override)."""


# ------------------------------------------------------------------------------------- audits


def latest_audit(store: Store, run_id: str) -> dict[str, Any] | None:
    """The newest audit of ``run_id``'s labels: an audit of the run itself, else the newest audit of a run
    with the same judge (same answering model, constitution hash and judge template). ``None`` if none."""
    if not store.one("SELECT 1 FROM information_schema.tables WHERE table_name = 'audits'"):
        return None
    row = store.one("SELECT audit_id, run_id, set_id, created_at, result_json FROM audits WHERE run_id = ? "
                    "ORDER BY created_at DESC LIMIT 1", [run_id])
    how = "an audit of this run"
    if row is None:
        row = store.one("""
            WITH me AS (SELECT constitution_hash, json_extract_string(lineage_json, '$.engine_model') AS m,
                               json_extract_string(config_json, '$.judge.template') AS tpl FROM runs WHERE run_id = ?)
            SELECT a.audit_id, a.run_id, a.set_id, a.created_at, a.result_json
            FROM audits a JOIN runs r ON r.run_id = a.run_id, me
            WHERE r.constitution_hash = me.constitution_hash
              AND json_extract_string(r.lineage_json, '$.engine_model') = me.m
              AND coalesce(json_extract_string(r.config_json, '$.judge.template'), '') = coalesce(me.tpl, '')
            ORDER BY a.created_at DESC LIMIT 1""", [run_id])
        how = "an audit of another run with the same judge (model, constitution, judge template)"
    if row is None:
        return None
    audit_id, arun, set_id, created, result = row
    res = json.loads(result)
    o = res.get("overall", {})
    return {"audit_id": audit_id, "run_id": arun, "human_set": set_id, "created_at": str(created), "scope": how,
            "n_pairs": o.get("n_pairs"), "n_ties": o.get("n_ties"), "agreement": o.get("agreement"),
            "agreement_ci": o.get("agreement_ci"), "kappa": o.get("cohen_kappa"), "kappa_note": o.get("kappa_note"),
            "kappa_ci": o.get("kappa_ci"), "versus_chance": o.get("chance"),
            "position_bias": {k: o.get("position", {}).get(k) for k in ("p_prefers_first", "consistency")},
            "length_bias": {k: o.get("length", {}).get(k) for k in ("ai_p_prefers_longer", "human_p_prefers_longer")}}


_BAR = re.compile(r"^\s*(kappa|κ|agreement)\s*(>=|>)\s*(-?[0-9]*\.?[0-9]+)\s*$")


def parse_bar(bar: str) -> tuple[str, str, float]:
    m = _BAR.match(bar)
    if not m:
        raise GateError(f"--require-audit {bar!r}: write METRIC>=VALUE with METRIC kappa or agreement, "
                        "e.g. \"kappa>=0.2\" or \"agreement>=0.6\"")
    metric = "kappa" if m.group(1) in ("kappa", "κ") else "agreement"
    return metric, m.group(2), float(m.group(3))


def _audit_line(a: dict[str, Any]) -> str:
    ci = a.get("agreement_ci") or [math.nan, math.nan]
    return (f"audit {a['audit_id']} ({a['created_at'][:16]}, {a['scope']}; run {a['run_id']} vs human set "
            f"{a['human_set']}, {fmt(a['n_pairs'])} pairs): agreement {fmt(a['agreement'])} "
            f"[{fmt(ci[0])}, {fmt(ci[1])}], κ {fmt(a['kappa'])}, versus chance: {a['versus_chance']}")


def check_gate(db: str | Path, run_id: str, bar: str) -> dict[str, Any]:
    """Refuse (:class:`GateError`) unless the latest audit of ``run_id``'s labels meets ``bar``; return it."""
    metric, op, value = parse_bar(bar)
    with Store(db, read_only=True) as store:
        a = latest_audit(store, run_id)
    override = "to export anyway, leave out --require-audit (the card still states the audit, or that there is none)"
    if a is None:
        raise GateError(f"refused: run '{run_id}' has no audit, so --require-audit {bar!r} cannot be met. Audit its "
                        f"judge first (`factory audit pipelines/hh-audit.yaml` with the same model and constitution, "
                        f"or `factory audit --db {db} --run {run_id} --human SET`); {override}")
    got = a[metric]
    ok = got is not None and not math.isnan(got) and (got >= value if op == ">=" else got > value)
    if not ok:
        raise GateError(f"refused: {metric} {fmt(got)} does not meet --require-audit {bar!r}. {_audit_line(a)}. "
                        f"{override}")
    return a


# --------------------------------------------------------------------------------------- cards


def _licence(*sources: str | None) -> str:
    found = {lic for s in sources if s for key, lic in KNOWN_LICENCES.items() if key in str(s)}
    return found.pop() if len(found) == 1 else ("other" if found else "unknown")


def lineage(store: Store, run_id: str, kind: str) -> dict[str, Any]:
    """What made the run's rows: constitution, principles, judge, models, templates, counts, cost, audit."""
    run = store.one("""SELECT name, kind, constitution_name, constitution_version, constitution_hash, model,
                              engine_json, lineage_json, config_json, pipeline_path FROM runs WHERE run_id = ?""", [run_id])
    if run is None:
        return {}
    name, rkind, cname, cver, chash, model, engine_json, lineage_json, config_json, ppath = run
    config = json.loads(config_json or "{}")
    lin = json.loads(lineage_json or "{}")
    table = "judgements" if kind == "prefs" else "revisions"
    rel = store.run_rows(table, "$run")
    models = [m for (m,) in store.con.execute(f"SELECT DISTINCT model FROM {rel} ORDER BY 1", {"run": run_id}).fetchall()]
    templates = [t for (t,) in store.con.execute(f"SELECT DISTINCT template_hash FROM {rel} WHERE template_hash IS NOT NULL "
                                                 "ORDER BY 1", {"run": run_id}).fetchall()]
    if kind == "prefs":
        principles = [p for (p,) in store.con.execute(f"SELECT DISTINCT principle_id FROM {rel} ORDER BY 1",
                                                      {"run": run_id}).fetchall()]
    else:
        principles = sorted({p for (j,) in store.con.execute(f"SELECT DISTINCT principle_ids FROM {rel}",
                                                               {"run": run_id}).fetchall() for p in json.loads(j or "[]")})
    weights = {}
    body = store.one("SELECT body FROM configs WHERE config_hash = ?", [chash])
    if body:
        weights = {p["id"]: p.get("weight", 1.0) for p in json.loads(body[0]).get("principles", [])}
    skips = {r: n for r, n in store.con.execute(
        "SELECT regexp_replace(reason, '^row [0-9]+: ', ''), count(*) FROM skips WHERE run_id = ? GROUP BY 1 ORDER BY 2 DESC",
        [run_id]).fetchall()}
    skip_kinds = {"duplicate": 0, "near-duplicate": 0, "contaminated": 0, "other": 0}
    for r, n in skips.items():
        k = ("near-duplicate" if r.startswith("near-duplicate") else "duplicate" if r.startswith("duplicate")
             else "contaminated" if r.startswith("contaminated") else "other")
        skip_kinds[k] += n
    out: dict[str, Any] = {
        "run_id": run_id, "run_kind": rkind, "pipeline": ppath,
        "constitution": {"name": cname, "version": cver, "hash": chash},
        "principles": [{"id": p, "weight": weights.get(p)} for p in principles],
        "model": model, "engine_model": lin.get("engine_model"), "engine": json.loads(engine_json or "{}").get("kind"),
        "models_in_rows": models, "template_hashes": templates,
        "judge": config.get("judge"), "dedup": config.get("dedup"), "decontaminate": config.get("decontaminate"),
        "input_skips": skips, "input_skips_by_kind": skip_kinds, "cost": run_cost(store, run_id),
    }
    if kind == "prefs":
        n, ties, nolabel = store.one("""SELECT count(*), count(*) FILTER (WHERE is_tie), count(*) FILTER (WHERE p_a IS NULL)
                                        FROM preferences WHERE run_id = ?""", [run_id])
        out.update(pairs=n, ties=ties, unlabelled=nolabel, audit=latest_audit(store, run_id))
    src = (config.get("pairs") or {}).get("path") or ((config.get("pairs") or {}).get("prompts") or {}).get("path") \
        or (config.get("prompts") or {}).get("path")
    out["input"] = src
    out["licence"] = _licence(src)
    return out


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "1M<n<10M"


def render_card(manifest: dict[str, Any]) -> str:
    """The dataset card (README.md) of an export from its manifest (export.json, lineage included)."""
    kind, n, lin = manifest["kind"], manifest.get("rows", 0), manifest.get("lineage") or {}
    src = manifest.get("source", {})
    meta: dict[str, Any] = {
        "license": lin.get("licence") or _licence(src.get("human")),
        "task_categories": ["text-generation"] if kind == "sft" else ["text-classification"],
        "tags": ["constitutional-ai", "rlaif", "cai-factory", "preference" if kind != "sft" else "sft"],
        "size_categories": [_size_category(n)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data.parquet"}]}],
        "factory": {"kind": kind, "rows": n, "run_id": src.get("run_id"), "filters": {
            k: v for k, v in src.items() if k not in ("db", "run_id")}, "dropped": manifest.get("dropped", {}),
            **{k: lin.get(k) for k in ("constitution", "principles", "engine_model", "models_in_rows", "template_hashes",
                                       "pairs", "ties", "input_skips_by_kind", "audit", "cost") if k in lin}},
    }
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100) + "---\n"
    lines = [f"# {kind} data from run `{src.get('run_id') or src.get('human')}`", ""]
    if kind == "human":
        lines += [f"Human-labelled pairs from `{src.get('human')}` in the preference format (chosen = the human's "
                  f"choice): {fmt(n)} rows.", ""]
    else:
        c = lin.get("constitution", {})
        lines += [f"Made by cai-factory from constitution **{c.get('name')} v{c.get('version')}** "
                  f"(hash `{c.get('hash')}`), answered by `{lin.get('engine_model')}` ({lin.get('engine')} engine).", ""]
        lines += ["## Principles", "", "| principle | weight |", "|---|---|",
                  *[f"| {p['id']} | {fmt(p['weight'])} |" for p in lin.get("principles", [])], ""]
        lines += ["## Lineage", "", f"- run: `{src.get('run_id')}` (pipeline `{lin.get('pipeline')}`)",
                  f"- models in the rows: {', '.join(f'`{m}`' for m in lin.get('models_in_rows', []))}",
                  f"- template hashes: {', '.join(f'`{t}`' for t in lin.get('template_hashes', []))}",
                  f"- judge settings: `{json.dumps(lin.get('judge'))}`" if lin.get("judge") else "- judge: n/a",
                  f"- input: `{lin.get('input')}` (licence: {lin.get('licence')})", ""]
    lines += ["## Rows and filters", "", f"- rows exported: {fmt(n)}"]
    if "pairs" in lin:
        lines.append(f"- pairs labelled in the run: {fmt(lin['pairs'])}, ties {fmt(lin['ties'])}, "
                     f"no valid judgement {fmt(lin['unlabelled'])}")
    for r, k in sorted((manifest.get("dropped") or {}).items(), key=lambda x: -x[1]):
        lines.append(f"- left out: {fmt(k)}× {r}")
    filt = {k: v for k, v in src.items() if k not in ("db", "run_id") and v not in (None, False, [], 0, 0.0, "none")}
    lines.append(f"- filters: `{json.dumps(filt)}`" if filt else "- filters: none")
    sk = lin.get("input_skips_by_kind") or {}
    if sk:
        lines.append(f"- input rows skipped: {fmt(sk.get('duplicate', 0))} duplicates, {fmt(sk.get('near-duplicate', 0))} "
                     f"near-duplicates, {fmt(sk.get('contaminated', 0))} contaminated (held-out overlap), "
                     f"{fmt(sk.get('other', 0))} other")
    if lin.get("dedup") or lin.get("decontaminate"):
        lines.append(f"- deduplication: `{json.dumps(lin.get('dedup'))}`; decontamination: "
                     f"`{json.dumps(lin.get('decontaminate'))}`")
    lines.append("")
    if kind == "prefs":
        a = lin.get("audit")
        lines += ["## Audit against human labels", ""]
        if a:
            pb, lb = a.get("position_bias") or {}, a.get("length_bias") or {}
            kci = a.get("kappa_ci")
            lines += [f"Latest {a['scope']}: audit `{a['audit_id']}` of run `{a['run_id']}` against human set "
                      f"`{a['human_set']}` ({a['created_at'][:16]}).", "",
                      f"- pairs: {fmt(a['n_pairs'])} ({fmt(a['n_ties'])} ties)",
                      f"- agreement: {fmt(a['agreement'])}, 95% interval [{fmt((a.get('agreement_ci') or [None])[0])}, "
                      f"{fmt((a.get('agreement_ci') or [None, None])[1])}]; versus chance: {a['versus_chance']}",
                      f"- Cohen's κ: {fmt(a['kappa'])}" + (f", 95% interval [{fmt(kci[0])}, {fmt(kci[1])}]" if kci
                                                             else " (no interval stored by this audit)")
                      + (f" ({a['kappa_note']})" if a.get("kappa_note") else ""),
                      f"- position bias: P(prefers the first shown) {fmt(pb.get('p_prefers_first'))}, orders agree "
                      f"{fmt(pb.get('consistency'))}",
                      f"- length bias: AI prefers the longer response {fmt(lb.get('ai_p_prefers_longer'))}, humans "
                      f"{fmt(lb.get('human_p_prefers_longer'))}", ""]
        else:
            lines += ["**No audit**: these labels were never compared with human labels. Treat them as unverified "
                      "(`factory audit` measures agreement and κ against a held-out human set).", ""]
    cost = lin.get("cost")
    if cost:
        from .results import cost_line

        lines += ["## Cost", "", cost_line(cost), ""]
    lines += ["## Files", "", "`data.parquet` (the rows), the `datasets` `save_to_disk` files, `export.json` (the "
              "manifest this card was made from). Load with `datasets.load_from_disk(folder)`.", ""]
    return head + "\n".join(lines)


def push(folder: str | Path, repo: str, *, token: str | None = None) -> str:
    """Push an export folder (rows and card) to the Hub dataset repo ``repo`` through ``datasets``."""
    token = token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise StoreError(f"--push-to-hub {repo}: no Hugging Face token; set HF_TOKEN (a write token) and rerun")
    import datasets
    from huggingface_hub import DatasetCard

    folder = Path(folder)
    datasets.load_from_disk(str(folder)).push_to_hub(repo, token=token)
    DatasetCard((folder / "README.md").read_text()).push_to_hub(repo, token=token)
    return f"https://huggingface.co/datasets/{repo}"
