"""Presenting an audit: a terminal summary (rich), one self-contained HTML file, a comparison.

Every function takes an ``AuditResult`` or its ``to_dict()`` (so saved JSON can be re-rendered
and compared). The HTML file has inline CSS and inline SVG plots (matplotlib, Agg backend,
imported only here); it loads nothing from anywhere. Every model/human text, principle id and
meta value is passed through ``html.escape``; matplotlib escapes the text it writes into SVG.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TEXT_LIMIT = 4000  # characters of each text shown in the HTML divergence table
COMPARED = (
    ("n_pairs", ("n_pairs",)),
    ("agreement", ("agreement",)),
    ("agreement_excl_ties", ("agreement_excl_ties",)),
    ("cohen_kappa", ("cohen_kappa",)),
    ("position consistency", ("position", "consistency")),
    ("P(first)", ("position", "p_prefers_first")),
    ("ECE", ("calibration", "ece")),
    ("Brier", ("calibration", "brier")),
    ("log loss", ("calibration", "log_loss")),
    ("P(AI prefers longer)", ("length", "ai_p_prefers_longer")),
)
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.verdict{font-size:1.1em;padding:.6em;background:#fff6d6;border-left:4px solid #e0b000}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}
.plots figure{margin:0}.plots svg{max-width:100%;height:auto}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;background:#f7f7f7;padding:.5em}
"""


def as_dict(result: Any) -> dict[str, Any]:
    """An ``AuditResult`` as its dict; a dict is returned as is."""
    return result.to_dict() if hasattr(result, "to_dict") else result


def verdict(result: Any) -> str:
    """One honest line: is the judge distinguishable from chance, the naive baseline, length?"""
    d = as_dict(result)
    o = d["overall"]
    if not o["n_pairs"]:
        return "no pair has both a human label and a valid judgement: nothing to audit"
    a, (lo, hi), n = o["agreement"], o["agreement_ci"], o["n_pairs"]
    if lo is None:
        return f"agreement {a:.3f} on {n} pairs (no bootstrap interval)"
    if lo <= 0.5 <= hi:
        line = f"agreement CI [{lo:.3f}, {hi:.3f}] includes 0.5: this judge is not distinguishable from chance on these {n} pairs"
    elif hi < 0.5:
        line = f"agreement CI [{lo:.3f}, {hi:.3f}] is below 0.5: the judge disagrees with humans (check the option/order mapping)"
    else:
        line = f"agreement {a:.3f} [{lo:.3f}, {hi:.3f}] is above chance on {n} pairs"
    naive = d["naive"]["agreement"]
    if naive is not None:
        rel = "above" if lo > naive else "below" if hi < naive else "not distinguishable from"
        line += f"; {rel} the naive baseline ({naive:.3f})"
    length = o["length"]
    best = max((x for x in (length["always_longer_agreement"], length["always_shorter_agreement"]) if x is not None), default=None)
    if best is not None and best >= lo:
        line += f"; a length heuristic does as well ({best:.3f} on the {length['n']} pairs with a length gap)"
    return line


def summary_rows(result: Any) -> list[dict[str, Any]]:
    """Rows of the headline table: factory default, naive, always-longer/shorter, chance."""
    d = as_dict(result)
    o, nv, length = d["overall"], d["naive"], d["overall"]["length"]
    base = o["human_p_a"]
    gap = f"|Δlen|>{d['settings']['length_gap']:g}, n={length['n']}"

    def row(name: str, b: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "n": b["n_pairs"], "agreement": b["agreement"], "ci": b["agreement_ci"],
                "kappa": b["cohen_kappa"], "consistency": b["position"]["consistency"],
                "p_first": b["position"]["p_prefers_first"], "ece": b["calibration"]["ece"], "brier": b["calibration"]["brier"]}

    def baseline(name: str, agreement: Any, ci: Any, n: int) -> dict[str, Any]:
        return {"name": name, "n": n, "agreement": agreement, "ci": ci, "kappa": None, "consistency": None,
                "p_first": None, "ece": None, "brier": None}

    return [
        row("factory default", o),
        row(f"naive baseline (ab, {d['settings']['naive_principle']})", nv),
        baseline(f"always longer ({gap})", length["always_longer_agreement"], length["always_longer_ci"], length["n"]),
        baseline(f"always shorter ({gap})", length["always_shorter_agreement"], length["always_shorter_ci"], length["n"]),
        {"name": "chance (0.5)", "n": o["n_pairs"], "agreement": 0.5, "ci": None, "kappa": 0.0, "consistency": None,
         "p_first": None, "ece": None if base is None else abs(base - 0.5), "brier": 0.25 if o["n_pairs"] else None},
    ]


def render_terminal(result: Any, console: Console | None = None) -> None:
    """Print the headline table, the per-principle table, the counts and the verdict."""
    d = as_dict(result)
    console = console or Console()
    t = Table(title="AI labels vs human labels")
    for col in ("labeller", "n", "agreement [95% CI]", "κ", "pos. consistency", "P(first)", "ECE", "Brier"):
        t.add_column(col, justify="left" if col == "labeller" else "right")
    for r in summary_rows(d):
        t.add_row(r["name"], str(r["n"]), _agree(r["agreement"], r["ci"]), _f(r["kappa"]), _f(r["consistency"]),
                  _f(r["p_first"]), _f(r["ece"]), _f(r["brier"]))
    console.print(t)
    p = Table(title="Per principle (order-averaged)")
    for col in ("principle", "weight", "n", "ties", "agreement [95% CI]", "κ", "pos. consistency", "P(first)", "ECE", "Brier"):
        p.add_column(col, justify="left" if col == "principle" else "right")
    for b in d["per_principle"]:
        p.add_row(b["name"], _f(b["weight"], 2), str(b["n_pairs"]), str(b["n_ties"]), _agree(b["agreement"], b["agreement_ci"]),
                  _f(b["cohen_kappa"]), _f(b["position"]["consistency"]), _f(b["position"]["p_prefers_first"]),
                  _f(b["calibration"]["ece"]), _f(b["calibration"]["brier"]))
    console.print(p)
    console.print(", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in d["counts"].items()), markup=False)
    console.print(f"verdict: {verdict(d)}", markup=False)


def write_html(result: Any, path: str | Path, *, title: str, meta: dict[str, Any]) -> Path:
    """Write one self-contained HTML report (inline CSS and SVG; no scripts, no external assets)."""
    d = as_dict(result)
    meta = dict(meta)
    skips = meta.pop("skips", []) or []
    plots = _plots(d)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
        f"<p class='verdict'>{_e(verdict(d))}</p>",
        "<h2>Run</h2>", _kv_table(meta),
        "<h2>Summary</h2>", _summary_html(d),
        "<h2>Plots</h2><div class='plots'>",
        *(f"<figure>{svg}<figcaption>{_e(cap)}</figcaption></figure>" for cap, svg in plots),
        "</div><h2>Per principle</h2>", _principles_html(d),
        "<h2>Counts</h2>", _kv_table(d["counts"]),
        "<h2>Skipped rows</h2>", _skips_html(skips),
        f"<h2>Most confident disagreements (top {len(d['divergence'])})</h2>", _divergence_html(d["divergence"]),
        "<h2>Settings</h2>", _kv_table(d["settings"]),
        "</body></html>",
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def compare(a: Any, b: Any) -> dict[str, Any]:
    """Side by side of two audits: ``{scope: [{metric, a, b, delta}]}`` for overall, naive and each
    principle (``delta = b - a``; None where either side lacks the value)."""
    a, b = as_dict(a), as_dict(b)
    out: dict[str, Any] = {"overall": _compare_block(a["overall"], b["overall"]),
                           "naive": _compare_block(a["naive"], b["naive"]), "per_principle": {}}
    pa_ = {x["name"]: x for x in a["per_principle"]}
    pb_ = {x["name"]: x for x in b["per_principle"]}
    for name in sorted(set(pa_) | set(pb_)):
        out["per_principle"][name] = _compare_block(pa_.get(name), pb_.get(name))
    return out


def compare_table(a: Any, b: Any, labels: tuple[str, str] = ("A", "B")) -> Table:
    """:func:`compare` as a rich table (scope, metric, A, B, Δ)."""
    t = Table(title=f"audit comparison: {labels[0]} vs {labels[1]}")
    for col in ("scope", "metric", labels[0], labels[1], "Δ (B−A)"):
        t.add_column(col, justify="left" if col in ("scope", "metric") else "right")
    diff = compare(a, b)
    scopes = [("overall", diff["overall"]), ("naive", diff["naive"]), *diff["per_principle"].items()]
    for scope, rows in scopes:
        for r in rows:
            t.add_row(scope, r["metric"], _f(r["a"]), _f(r["b"]), _f(r["delta"], sign=True))
    return t


# -- helpers -----------------------------------------------------------------------------------


def _get(block: dict[str, Any] | None, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if block is None:
            return None
        block = block.get(k)
    return block


def _compare_block(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for name, keys in COMPARED:
        va, vb = _get(a, keys), _get(b, keys)
        rows.append({"metric": name, "a": va, "b": vb, "delta": None if va is None or vb is None else vb - va})
    return rows


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:+,d}" if sign else f"{x:,d}"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _agree(a: Any, ci: Any) -> str:
    if a is None or (isinstance(a, float) and a != a):
        return "—"
    return f"{a:.3f}" if not ci or ci[0] is None else f"{a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv_table(d: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return ", ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v)

    return _table(["key", "value"], [[k, text(v)] for k, v in d.items()]) if d else "<p>none</p>"


def _summary_html(d: dict[str, Any]) -> str:
    rows = [[r["name"], r["n"], _agree(r["agreement"], r["ci"]), _f(r["kappa"]), _f(r["consistency"]),
             _f(r["p_first"]), _f(r["ece"]), _f(r["brier"])] for r in summary_rows(d)]
    o = d["overall"]
    note = (f"<p>{_e(d['settings']['ties_rule'])}. Factory default: {o['n_ties']} tie(s); agreement excluding ties "
            f"{_e(_f(o['agreement_excl_ties']))}; log loss {_e(_f(o['calibration']['log_loss']))}. "
            f"κ note: {_e(o['kappa_note'] or 'none')}.</p>")
    return _table(["labeller", "n", "agreement [95% CI]", "κ", "pos. consistency", "P(first)", "ECE", "Brier"], rows) + note


def _principles_html(d: dict[str, Any]) -> str:
    rows = [[b["name"], _f(b["weight"], 2), b["n_pairs"], b["n_ties"], _agree(b["agreement"], b["agreement_ci"]),
             _f(b["cohen_kappa"]), _f(b["position"]["consistency"]), _f(b["position"]["p_prefers_first"]),
             _f(b["calibration"]["ece"]), _f(b["calibration"]["brier"]), b["kappa_note"] or ""] for b in d["per_principle"]]
    return _table(["principle", "weight", "n", "ties", "agreement [95% CI]", "κ", "pos. consistency", "P(first)",
                   "ECE", "Brier", "note"], rows)


def _skips_html(skips: list[dict[str, Any]]) -> str:
    if not skips:
        return "<p>no skipped rows reported</p>"
    return _table(["reason", "count"], [[s.get("reason", "?"), s.get("count", "?")] for s in skips])


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= TEXT_LIMIT else f"{text[:TEXT_LIMIT]}… [{len(text) - TEXT_LIMIT:,} more characters]"


def _divergence_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>no confident disagreements</p>"
    out = []
    for r in rows:
        drivers = ", ".join(f"{x['principle_id']} (p_a={x['p_a']:.3f})" for x in r["drivers"]) or "—"
        head = (f"{r['pair_id']}: AI chose {r['ai_choice']} (p_a={r['p_a']:.3f}), human chose {r['human_choice']}; "
                f"driven by {drivers}")
        texts = "".join(f"<h4>{_e(c)}</h4><div class='text'>{_e(_clip(r[c]))}</div>"
                        for c in ("conversation", "response_a", "response_b") if c in r)
        out.append(f"<details><summary>{_e(head)}</summary>{texts or '<p>no texts in the human table</p>'}</details>")
    return "\n".join(out)


def _plots(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, inline SVG) for the reliability, per-principle, length and position plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "factory-audit", "font.size": 9}
    with matplotlib.rc_context(rc):
        figs = [
            ("Reliability: observed frequency of 'human chose a' per bin of predicted p_a", _reliability(plt, d)),
            ("Agreement with humans and 95% bootstrap CI (per principle: order-averaged)", _agreement_bars(plt, d)),
            (f"Length bias on pairs with |len_a − len_b| > {d['settings']['length_gap']:g} characters", _length_bars(plt, d)),
            ("Position bias: P(first shown preferred) and order consistency", _position_bars(plt, d)),
        ]
        return [(cap, _svg(plt, fig)) for cap, fig in figs]


def _svg(plt: Any, fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Type": None, "Format": None})
    plt.close(fig)
    s = buf.getvalue()
    return s[s.index("<svg"):]


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _reliability(plt: Any, d: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for key, label in (("overall", "factory default"), ("naive", "naive baseline")):
        cal = d[key]["calibration"]
        pts = [(m, o) for m, o, c in zip(cal["mean_predicted"], cal["observed"], cal["count"]) if c]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{label} (ECE {_f(cal['ece'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(a better)", ylabel="observed share human chose a")
    ax.legend(loc="upper left")
    return fig


def _agreement_bars(plt: Any, d: dict[str, Any]) -> Any:
    blocks = [("factory default", d["overall"]), ("naive", d["naive"])] + [(b["name"], b) for b in d["per_principle"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [_nan(b["agreement"]) for _, b in blocks]
    err = [[max(y - _nan(b["agreement_ci"][0]), 0) for y, (_, b) in zip(ys, blocks)],
           [max(_nan(b["agreement_ci"][1]) - y, 0) for y, (_, b) in zip(ys, blocks)]]
    ax.bar(range(len(blocks)), ys, yerr=err, capsize=3, color=["#3b6ea8", "#999999"] + ["#7aa6d6"] * (len(blocks) - 2))
    ax.axhline(0.5, color="red", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(blocks)), [n for n, _ in blocks], rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="agreement with humans")
    ax.legend()
    return fig


def _length_bars(plt: Any, d: dict[str, Any]) -> Any:
    ln = d["overall"]["length"]
    names = ["AI (decided pairs)", "AI soft mean", "humans"]
    vals = [_nan(ln["ai_p_prefers_longer"]), _nan(ln["ai_mean_p_longer"]), _nan(ln["human_p_prefers_longer"])]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(names, vals, color=["#3b6ea8", "#7aa6d6", "#5a9e5a"])
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(ylim=(0, 1), ylabel="P(prefers the longer response)", title=f"n = {ln['n']}")
    return fig


def _position_bars(plt: Any, d: dict[str, Any]) -> Any:
    blocks = [("all", d["overall"])] + [(b["name"], b) for b in d["per_principle"]]
    x = range(len(blocks))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [_nan(b["position"]["p_prefers_first"]) for _, b in blocks], 0.4, label="P(first preferred)")
    ax.bar([i + 0.2 for i in x], [_nan(b["position"]["consistency"]) for _, b in blocks], 0.4, label="order consistency")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(list(x), [n for n, _ in blocks], rotation=30, ha="right")
    ax.set(ylim=(0, 1))
    ax.legend()
    return fig
