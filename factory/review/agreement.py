"""Agreement against the original and the adjudicated human labels, side by side.

``factory audit adjudicated AUDIT --db DB`` audits the same run's judgements against the human set
``adjudicated:<AUDIT>`` (the original labels with each adjudicated pair's verdict applied; pairs
judged to have no preference left out) through the ordinary ``factory audit --run R --human S``
path, so both audits are stored and reported alike, then prints one table: per labeller and per
principle, n and agreement [95% CI] and κ under each set of labels, and the change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ..store import StoreError
from . import maindb

SCOPES = ("overall", "naive")


def adjudicated_audit(db: str | Path, audit_id: str, *, report_dir: str | Path | None = None
                      ) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """Audit the run of ``audit_id`` against its adjudicated set. Returns (original result, adjudicated
    audit id, adjudicated result, the set's counts)."""
    from ..audit.run import audit
    from ..human import set_info

    with maindb.reading(db) as store:
        original = maindb.audit_row(store, audit_id)
        set_id = maindb.adjudicated_set(audit_id)
        if not maindb.has_set(store, set_id):
            raise StoreError(f"{db}: audit {audit_id} has no adjudicated labels yet; give verdicts with "
                             f"`factory review --db {db} --audit {audit_id}` (they are saved as human set {set_id})")
        info = set_info(store, set_id)
    naive = original.result["settings"].get("naive_principle")
    adj_id, result, _ = audit(None, db=db, run_id=original.run_id, human_set=set_id, quiet=True,
                              naive_principle=naive, report_dir=report_dir)
    return original.result, adj_id, result.to_dict(), info


def side_by_side_table(original: dict[str, Any], adjudicated: dict[str, Any], labels: tuple[str, str]) -> Table:
    t = Table(title=f"agreement with the original ({labels[0]}) and the adjudicated ({labels[1]}) human labels")
    for col in ("scope", "n (orig.)", "agreement [95% CI] (orig.)", "κ (orig.)", "n (adj.)",
                "agreement [95% CI] (adj.)", "κ (adj.)", "Δ agreement"):
        t.add_column(col, justify="left" if col == "scope" else "right")
    blocks_a = {**{s: original[s] for s in SCOPES}, **{b["name"]: b for b in original["per_principle"]}}
    blocks_b = {**{s: adjudicated[s] for s in SCOPES}, **{b["name"]: b for b in adjudicated["per_principle"]}}
    for scope in [*SCOPES, *sorted((set(blocks_a) | set(blocks_b)) - set(SCOPES))]:  # each scope once
        a, b = blocks_a.get(scope), blocks_b.get(scope)
        delta = None if not a or not b or a["agreement"] is None or b["agreement"] is None \
            else b["agreement"] - a["agreement"]
        t.add_row("factory default" if scope == "overall" else scope, *_cells(a), *_cells(b),
                  "—" if delta is None else f"{delta:+.3f}")
    return t


def _cells(b: dict[str, Any] | None) -> list[str]:
    if not b or not b["n_pairs"]:
        return ["0", "—", "—"]
    lo, hi = b["agreement_ci"]
    agree = f"{b['agreement']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
    kappa = "—" if b["cohen_kappa"] is None else f"{b['cohen_kappa']:.3f}"
    return [f"{b['n_pairs']:,}", agree, kappa]


def summary_lines(audit_id: str, adj_id: str, info: dict[str, Any]) -> list[str]:
    s = info["skips"]
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(s.get("by_verdict", {}).items())) or "none"
    lines = [f"human set {info['set_id']}: {info['n_pairs']:,} pairs, {s.get('reviewed', 0)} adjudicated "
             f"(verdicts: {verdicts}); {info['n_skipped']} left out as having no preference",
             f"original audit {audit_id}; adjudicated audit {adj_id} (`factory audit compare {audit_id} {adj_id}` "
             "for every metric)"]
    if info["n_skipped"]:
        lines.append(f"n (adj.) leaves out those {info['n_skipped']} pair(s), so the two agreements are over "
                     "different pair sets")
    return lines
