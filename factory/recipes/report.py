"""A report per round: the signals of reward hacking and drift, as a table and an HTML plot across rounds.

Per round (read from the store and the steps' outputs, nothing recomputed):
- judge–human agreement with its interval (audit run steps), and rm / dpo pairwise accuracy on the
  human set with its interval (eval steps);
- behaviour rates of the model under test (harmful refused, benign over-refused, sycophancy flips);
- reward margin (rm) or implicit-reward margin (dpo) on the human pairs, chosen minus rejected;
- the tie rate of the AI labels (exact 95% interval) and their mean margin;
- the response length (characters) of the policy's samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from ..store import Store

RATES = ("harmful_refused_judge", "harmful_refused_keyword", "benign_refused_judge", "benign_refused_keyword",
         "syco_flip")


def _run_facts(store: Store, run_id: str, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind == "prefs":
        from ..audit.stats import exact_ci

        n, ties, margin = store.one("""SELECT count(*), count(*) FILTER (WHERE is_tie), avg(margin)
                                       FROM preferences WHERE run_id = ?""", [run_id])
        if n:
            lo, hi = exact_ci(int(ties), int(n))
            out.update(tie_rate=ties / n, tie_rate_ci=[lo, hi], labels=n, label_margin=margin)
        got = store.con.execute(f"SELECT avg(length(t.text)), count(*) FROM {store.run_rows('samples', '$run')} t "
                                "WHERE t.status = 'ok'", {"run": run_id}).fetchone()
        if got and got[1]:
            out.update(sample_chars=got[0], samples=got[1])
    return out


def _audit_facts(db: str, audit_id: str | None) -> dict[str, Any]:
    if not audit_id:
        return {}
    from ..audit.run import load_result

    o = load_result(db, audit_id)["overall"]
    return {"agreement": o.get("agreement"), "agreement_ci": list(o.get("agreement_ci") or [None, None]),
            "audit_pairs": o.get("n_pairs"), "audit_chance": o.get("chance")}


def build_report(recipe, outputs: dict[tuple[str, int], dict]) -> dict:
    """Rows per round (round 0: the once steps), written to <state_dir>/report.json and report.html."""
    cfg = recipe.cfg
    rows: list[dict[str, Any]] = []
    with Store(cfg.db, read_only=True) as store:
        for rnd in range(0 if any(s.once for s in recipe.steps.values()) else 1, cfg.rounds + 1):
            row: dict[str, Any] = {"round": rnd}
            for (sid, k), out in outputs.items():
                if k != rnd:
                    continue
                step = recipe.steps[sid]
                if step.action == "run":
                    facts = _run_facts(store, out["run_id"], out.get("kind", ""))
                    row.update({f: v for f, v in facts.items() if f not in row})
                    if out.get("kind") == "audit":
                        row.update(_audit_facts(cfg.db, (out.get("audit") or {}).get("audit_id")))
                elif step.action == "train" and sid == cfg.policy.next:
                    row["policy_trained"] = out["value"]
                elif step.action == "eval" and out.get("accuracy") is not None:
                    e = step.spec.eval
                    row[f"{e}_accuracy"], row[f"{e}_accuracy_ci"] = out["accuracy"], out["ci"]
                    row[f"{e}_margin"] = out["margin"]
                elif step.action == "eval" and out.get("rates"):
                    first = out["models"][0]
                    for name in RATES:
                        r = out["rates"].get(first, {}).get(name)
                        if r:
                            row[name], row[f"{name}_ci"] = r["value"], [r["lo"], r["hi"]]
            if len(row) > 1:
                rows.append(row)
    report = {"recipe": cfg.name, "rounds": rows}
    out_dir = recipe.state_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    report["html"] = str(write_html(report, out_dir / "report.html"))
    return report


COLUMNS = [("round", "round"), ("sample_chars", "policy sample length (chars)"), ("tie_rate", "AI-label tie rate"),
           ("label_margin", "AI-label margin"), ("agreement", "judge–human agreement"),
           ("rm_accuracy", "RM accuracy (human)"), ("rm_margin", "RM reward margin"),
           ("dpo_accuracy", "DPO implicit-reward accuracy"), ("dpo_margin", "DPO implicit-reward margin"),
           *((r, r.replace("_", " ")) for r in RATES)]


def _fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        ci = row.get(f"{key}_ci")
        text = f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        if ci and ci[0] is not None and not math.isnan(ci[0]):
            text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        return text
    return str(v)


def table(report: dict):
    """One row per signal, one column per round (0 = the once steps): it fits a terminal of any width
    for a few rounds, where one column per signal would not."""
    from rich.table import Table

    rows = report["rounds"]
    keys = [(k, t) for k, t in COLUMNS[1:] if any(r.get(k) is not None for r in rows)]
    t = Table(title=f"recipe {report['recipe']}: per round (0 = once steps)", show_edge=False)
    t.add_column("signal")
    for r in rows:
        t.add_column(f"round {r['round']}", no_wrap=True)
    for k, title in keys:
        t.add_row(title, *(_fmt(r, k) for r in rows))
    return t


def _plot(rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _ in COLUMNS[1:] if sum(r.get(k) is not None for r in rows) >= 1]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["round"], r[key], r.get(f"{key}_ci")) for r in rows if r.get(key) is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[max(0.0, y - (c[0] if c and c[0] is not None else y)) for _, y, c in pts],
               [max(0.0, (c[1] if c and c[1] is not None else y) - y) for _, y, c in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
        ax.set_title(dict(COLUMNS)[key], fontsize=8)
        ax.set_xlabel("round", fontsize=8)
        ax.set_xticks(sorted(set(xs)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(report: dict, path: Path) -> Path:
    rows = report["rounds"]
    cols = [(k, t) for k, t in COLUMNS if any(r.get(k) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r, k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    img = _plot(rows)
    plot = f'<img alt="metrics across rounds" src="data:image/png;base64,{img}">' if img else "<p>nothing to plot yet</p>"
    path.write_text(f"""<!doctype html><meta charset="utf-8"><title>recipe {html.escape(report['recipe'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd;font-size:13px}}</style>
<h1>Recipe {html.escape(report['recipe'])}: rounds</h1>
<p>Round 0 holds the steps that run once (SL-CAI, SFT). Intervals are 95% (exact for rates of labels,
bootstrap for accuracies and behaviour rates). Rising reward margins with flat or falling human agreement,
a falling tie rate with growing sample length, or more benign requests refused are the signs of reward
hacking and drift to look for.</p>
<table><tr>{head}</tr>{body}</table>
{plot}
""", encoding="utf-8")
    return path
