"""Presenting an audit: a terminal summary (rich), one self-contained HTML file, a comparison.

Every function takes an ``AuditResult`` or its ``to_dict()`` (so saved JSON can be re-rendered
and compared). The HTML file has inline CSS and inline SVG plots (matplotlib, Agg backend,
imported only here); it loads nothing from anywhere. Every model/human text, principle id and
meta value is passed through ``html.escape``; matplotlib escapes the text it writes into SVG.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from factory.audit.stats import MIN_DECIDED

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


def _decided(b: dict[str, Any]) -> str:
    lo, hi = b["decided_ci"]
    k, n = b["n_agree"], b["n_decided"]
    return f"agreement on decided pairs {k:,}/{n:,} = {k / n:.3f}, exact 95% CI [{lo:.3f}, {hi:.3f}]"


def versus_chance_cell(b: dict[str, Any]) -> str:
    """A block's call against chance for a table cell (the rule is
    :func:`factory.audit.stats.versus_chance`; this only words it)."""
    call = b.get("chance")
    if call is None or call == "no_pairs":  # no pairs, or stored before the rule existed
        return "—"
    if call == "all_ties":
        return f"no pair decided (all {b['n_pairs']:,} ties)"
    lo, hi = b["decided_ci"]
    counts = f"{b['n_agree']:,}/{b['n_decided']:,} [{lo:.3f}, {hi:.3f}]"
    words = {"too_few": "too few to say", "above": "above chance", "below": "below chance",
             "chance": "not distinguishable"}[call]
    return f"{words}: {counts}"


def verdict(result: Any) -> str:
    """One honest line: is the judge distinguishable from chance, the naive baseline, length?

    Above/below chance follows the rule of :mod:`factory.audit.stats` (decided pairs, exact
    interval, at least MIN_DECIDED of them); the comparisons with the naive baseline and the
    length heuristics use the agreement interval (ties as 0.5) and are made only beside a verdict.
    """
    d = as_dict(result)
    o = d["overall"]
    n = o["n_pairs"]
    if not n:
        return "no pair has both a human label and a valid judgement: nothing to audit"
    call = o.get("chance")
    if call is None:  # stored before the rule existed: no decided-pair counts to judge from
        return f"agreement {_agree(o['agreement'], o['agreement_ci'])} on {n} pairs (stored without a verdict)"
    if call == "all_ties":
        return (f"no pair was decided (all {n:,} are ties): the judge never departs from chance here, so there is "
                "nothing to compare with the human labels; check the tie band (judge.tie_eps) or use a stronger judge")
    if call == "too_few":
        return (f"too few pairs to say (n={o['n_decided']:,} decided; a verdict needs at least {MIN_DECIDED}): "
                f"{_decided(o)}")
    if call == "chance":
        line = f"{_decided(o)}, includes 0.5: this judge is not distinguishable from chance on these {n:,} pairs"
    elif call == "below":
        line = f"{_decided(o)}, is below 0.5: the judge disagrees with humans (check the option/order mapping)"
        if o["n_decided"] < MIN_DECIDED:  # flagged although too few pairs for any other verdict
            return (line + f"; only {o['n_decided']:,} decided pairs, but even their exact interval excludes 0.5, "
                    "so this is not a draw")
    else:
        line = f"{_decided(o)}, is above chance on {n:,} pairs"
    a, (lo, hi) = o["agreement"], o["agreement_ci"]
    naive = d["naive"]["agreement"]
    if naive is not None:
        rel = "above" if lo > naive else "below" if hi < naive else "not distinguishable from"
        line += f"; agreement {a:.3f} [{lo:.3f}, {hi:.3f}] is {rel} the naive baseline ({naive:.3f})"
    length = o["length"]
    heuristics = [x for x in (length["always_longer_agreement"], length["always_shorter_agreement"]) if x is not None]
    if heuristics and max(heuristics) >= lo:
        best = max(heuristics)
        line += f"; a length heuristic does as well ({best:.3f} on the {length['n']} pairs with a length gap)"
    return line


SUMMARY_HEADER = ["labeller", "n", "agreement [95% CI]", "κ [95% CI]", "pos. consistency", "P(first)", "ECE", "Brier",
                  "vs chance: agree/decided (exact 95% CI)"]
PRINCIPLE_HEADER = ["principle", "weight", "ties", *SUMMARY_HEADER[1:], "note"]


def _cells(b: dict[str, Any]) -> list[str]:
    """n, agreement [CI], κ, consistency, P(first), ECE, Brier, vs chance of one block, formatted."""
    pos, cal = b["position"], b["calibration"]
    return [_f(b["n_pairs"]), _agree(b["agreement"], b["agreement_ci"]), _agree(b["cohen_kappa"], b.get("kappa_ci")),
            _f(pos["consistency"]), _f(pos["p_prefers_first"]), _f(cal["ece"]), _f(cal["brier"]),
            versus_chance_cell(b)]


def summary_rows(result: Any) -> list[list[str]]:
    """Formatted rows of the headline table (:data:`SUMMARY_HEADER`): factory default, naive,
    always-longer, always-shorter (on pairs with a length gap) and chance."""
    d = as_dict(result)
    o, length = d["overall"], d["overall"]["length"]
    gap = f"|Δlen|>{d['settings']['length_gap']:g}"
    base = o["human_p_a"]
    naive = f"naive baseline (ab, {d['settings']['naive_principle']})"
    rule = d["settings"].get("label_rule") or {}
    how = [] if rule.get("name", "constitution") == "constitution" else [f"weights {rule['name']}"]
    how += ["calibrated"] if rule.get("calibrate") else []
    rows = [["factory default" + (f" ({', '.join(how)})" if how else ""), *_cells(o)]]
    rows += [[f"  same pairs, {v['name']}", *_cells(v)] for v in d.get("variants") or []]
    rows.append([naive, *_cells(d["naive"])])
    for side in ("longer", "shorter"):
        agree = _agree(length[f"always_{side}_agreement"], length[f"always_{side}_ci"])
        rows.append([f"always {side} ({gap})", _f(length["n"]), agree, "—", "—", "—", "—", "—", "—"])
    chance_ece = None if base is None else abs(base - 0.5)  # a constant 0.5 forecast: |base rate - 0.5|
    rows.append(["chance (0.5)", _f(o["n_pairs"]), "0.500", "0.000", "—", "—", _f(chance_ece),
                 _f(0.25 if o["n_pairs"] else None), "—"])
    return rows


def principle_rows(result: Any) -> list[list[str]]:
    """Formatted rows of the per-principle table (:data:`PRINCIPLE_HEADER`)."""
    return [[b["name"], _f(b["weight"], 2), _f(b["n_ties"]), *_cells(b), b["kappa_note"] or ""]
            for b in as_dict(result)["per_principle"]]


def render_terminal(result: Any, console: Console | None = None) -> None:
    """Print the headline table, the per-principle table, the counts and the verdict."""
    d = as_dict(result)
    console = console or Console()
    for title, header, rows in (("AI labels vs human labels", SUMMARY_HEADER, summary_rows(d)),
                                ("Per principle (order-averaged)", PRINCIPLE_HEADER, principle_rows(d))):
        t = Table(title=title)
        for i, col in enumerate(header):
            t.add_column(col, justify="left" if i == 0 or col == "note" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    console.print(", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in d["counts"].items()), markup=False)
    console.print(f"verdict: {verdict(d)}", markup=False)


def write_html(result: Any, path: str | Path, *, title: str, meta: dict[str, Any], sections: tuple[str, ...] = ()
               ) -> Path:
    """Write one self-contained HTML report (inline CSS and SVG; no scripts, no external assets);
    ``sections``: HTML fragments placed after the summary (a panel's judges side by side)."""
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
        *sections,
        "<h2>Plots</h2><div class='plots'>",
        *(f"<figure>{svg}<figcaption>{_e(cap)}</figcaption></figure>" for cap, svg in plots),
        "</div><h2>Per principle</h2>", _table(PRINCIPLE_HEADER, principle_rows(d)),
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
    if not ci or any(x is None or x != x for x in ci):
        return f"{a:.3f}"
    return f"{a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv_table(d: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return ", ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v)

    return _table(["key", "value"], [[k, text(v)] for k, v in d.items()]) if d else "<p>none</p>"


def _summary_html(d: dict[str, Any]) -> str:
    o = d["overall"]
    rules = [d["settings"].get(k) for k in ("ties_rule", "chance_rule", "agreement_ci_rule")]
    note = (f"<p>{_e('. '.join(r for r in rules if r))}. Factory default: {o['n_ties']} tie(s); agreement excluding ties "
            f"{_e(_f(o['agreement_excl_ties']))}; log loss {_e(_f(o['calibration']['log_loss']))}. "
            f"κ note: {_e(o['kappa_note'] or 'none')}.</p>")
    return _table(SUMMARY_HEADER, summary_rows(d)) + note


def _skips_html(skips: list[dict[str, Any]]) -> str:
    if not skips:
        return "<p>no skipped rows reported</p>"
    return _table(["reason", "count"], [[s.get("reason", "?"), s.get("count", "?")] for s in skips])


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= TEXT_LIMIT else f"{text[:TEXT_LIMIT]}… [{len(text) - TEXT_LIMIT:,} more characters]"


def _last_user(conversation: str | None, limit: int = 160) -> str:
    """The last user turn of a conversation (JSON), on one line and shortened: what the pair is about."""
    try:
        turns = json.loads(conversation) if conversation else []
        text = next((t["content"] for t in reversed(turns) if t.get("role") == "user"), "")
    except (ValueError, TypeError, AttributeError, KeyError):
        text = conversation or ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _divergence_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>no confident disagreements</p>"
    out = []
    for r in rows:
        drivers = ", ".join(f"{x['principle_id']} (p_a={x['p_a']:.3f})" for x in r["drivers"]) or "—"
        prompt = _last_user(r.get("conversation"))
        head = (f"{r['pair_id']}{f' “{prompt}”' if prompt else ''}: AI chose {r['ai_choice']} (p_a={r['p_a']:.3f}), "
                f"human chose {r['human_choice']}; driven by {drivers}")
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
            (f"Length bias on pairs with |len_a - len_b| > {d['settings']['length_gap']:g} characters",
             _length_bars(plt, d)),
            ("Position bias: P(first shown preferred) and order consistency", _position_bars(plt, d)),
        ]
        return [(cap, _svg(plt, fig)) for cap, fig in figs]


def _svg(plt: Any, fig: Any) -> str:
    buf = io.StringIO()
    no_metadata = {"Date": None, "Creator": None, "Type": None, "Format": None}  # deterministic, no external URIs
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata=no_metadata)
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
        pts = [(m, o) for m, o, c in zip(cal["mean_predicted"], cal["observed"], cal["count"], strict=True) if c]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{label} (ECE {_f(cal['ece'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(a better)", ylabel="observed share human chose a")
    ax.legend(loc="upper left")
    return fig


def _agreement_bars(plt: Any, d: dict[str, Any]) -> Any:
    blocks = [("factory default", d["overall"]), ("naive", d["naive"])] + [(b["name"], b) for b in d["per_principle"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [_nan(b["agreement"]) for _, b in blocks]
    err = [[max(y - _nan(b["agreement_ci"][0]), 0) for y, (_, b) in zip(ys, blocks, strict=True)],
           [max(_nan(b["agreement_ci"][1]) - y, 0) for y, (_, b) in zip(ys, blocks, strict=True)]]
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
    bars = ((-0.2, "p_prefers_first", "P(first preferred)"), (0.2, "consistency", "order consistency"))
    values = []
    for shift, key, label in bars:
        vals = [_nan(b["position"][key]) for _, b in blocks]
        values += vals
        ax.bar([i + shift for i in x], vals, 0.4, label=label)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    if all(v == 0 or v != v for v in values):  # bars of height 0 (or none) draw nothing: say so (issue 22)
        what = "no value to plot" if all(v != v for v in values) else "every value is 0"
        ax.text(0.5, 0.6, f"{what}: no pair was judged in both orders with a valid answer" if what[0] == "n" else
                f"{what}: the first-shown option never won and no principle kept its pick across orders",
                transform=ax.transAxes, ha="center", va="center", wrap=True, fontsize=8,
                bbox={"facecolor": "#fff3cd", "edgecolor": "#c9a227"})
    ax.set_xticks(list(x), [n for n, _ in blocks], rotation=30, ha="right")
    ax.set(ylim=(0, 1))
    ax.legend()
    return fig
