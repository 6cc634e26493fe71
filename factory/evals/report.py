"""Presenting a behavioural eval: one terminal table (rich) and one self-contained HTML report.

The HTML reuses the audit report's page style and its inline-SVG embedding of matplotlib figures
(``factory.audit.report``), so it loads nothing from anywhere; every model text is escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import Rate
from .summary import FAILURES, METRICS, BehaviourResult

TEXT_LIMIT = 1500


def _cell(r: Rate | None, sign: bool = False) -> str:
    return "—" if r is None else r.fmt(sign)


def header(result: BehaviourResult) -> list[str]:
    head = result.models[0].name if result.models else ""
    return (["metric", *(m.name for m in result.models)]
            + [f"Δ {head} − {m.name}" for m in result.models[1:]])


def rows(result: BehaviourResult) -> list[list[str]]:
    """One row per metric: each model's rate [95% CI] n=…, then the first model minus each other."""
    diffs = {(c["metric"], c["against"]): c["diff"] for c in result.comparisons}
    out = []
    for m in METRICS:
        cells = [_cell(ms.rates.get(m.key)) for ms in result.models]
        cells += [_cell(diffs.get((m.key, o.name)), sign=True) for o in result.models[1:]]
        out.append([m.short, *cells])
    return out


def render_terminal(result: BehaviourResult, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="behaviour: rate [95% bootstrap CI] n=items", show_edge=False)
    for i, col in enumerate(header(result)):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows(result):
        t.add_row(*r)
    console.print(t)
    for ms in result.models:
        if ms.counts:
            console.print(f"{ms.name} ({ms.identity}): " + ", ".join(f"{k} {v}" for k, v in ms.counts.items()),
                          markup=False, highlight=False)
    for c in result.comparisons:
        console.print(f"verdict: {c['verdict']}", markup=False, highlight=False)
    for n in result.notes + result.warnings:
        console.print(f"note: {n}", markup=False, highlight=False)
    s = result.settings
    console.print(f"judge: {s.get('judge_identity')} (refusal rubric, both orders); {result.seconds:.1f} s; "
                  f"database: {s.get('db')}", markup=False, highlight=False)


# -- HTML ---------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    from ..audit.report import _e

    return _e(x)


def _html_table(head: list[str], body: list[list[Any]]) -> str:
    h = "".join(f"<th>{_esc(x)}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{h}</tr>{b}</table>"


def _clip(text: Any) -> str:
    t = "" if text is None else str(text)
    return t if len(t) <= TEXT_LIMIT else f"{t[:TEXT_LIMIT]}… [{len(t) - TEXT_LIMIT:,} more characters]"


def _examples_html(result: BehaviourResult) -> str:
    out = []
    for kind, title in FAILURES.items():
        out.append(f"<h3>{_esc(title)}</h3>")
        for ms in result.models:
            ex = ms.examples.get(kind, [])
            out.append(f"<h4>{_esc(ms.name)}: {len(ex)} shown</h4>")
            if not ex:
                out.append("<p>none</p>")
            for e in ex:
                meta = ", ".join(f"{k}: {v}" for k, v in e.items() if k not in ("request", "reply", "question", "first",
                                                                                  "after push-back"))
                texts = "".join(f"<h5>{_esc(k)}</h5><div class='text'>{_esc(_clip(e[k]))}</div>"
                                for k in ("request", "question", "reply", "first", "after push-back") if k in e)
                out.append(f"<details><summary>{_esc(meta)}</summary>{texts}</details>")
    return "\n".join(out)


def _plots(result: BehaviourResult) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..audit.report import _svg

    rc = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "factory-behaviour", "font.size": 9}
    with matplotlib.rc_context(rc):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        k = len(result.models)
        width = 0.8 / max(k, 1)
        ys = np.arange(len(METRICS))
        for j, ms in enumerate(result.models):
            vals = [ms.rates[m.key].value for m in METRICS]
            v = np.array([np.nan if x is None else x for x in vals])
            lo = np.array([np.nan if ms.rates[m.key].lo is None else ms.rates[m.key].lo for m in METRICS])
            hi = np.array([np.nan if ms.rates[m.key].hi is None else ms.rates[m.key].hi for m in METRICS])
            err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
            ax.barh(ys + (j - (k - 1) / 2) * width, np.nan_to_num(v), width, xerr=err, capsize=2, label=ms.name)
        ax.set_yticks(ys, [m.short for m in METRICS])
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="rate (95% bootstrap CI)")
        ax.legend(loc="lower right")
        fig2, axes = plt.subplots(1, max(k, 1), figsize=(4 * max(k, 1), 3.2), squeeze=False)
        bins = np.linspace(0, 1, 21)
        for ax2, ms in zip(axes[0], result.models):
            for suite, color in (("harmful", "#c0392b"), ("benign", "#2e86c1")):
                ax2.hist(ms.judge_p.get(suite, []), bins=bins, alpha=0.6, color=color, label=f"{suite} requests")
            ax2.set(title=ms.name, xlabel="judge P(refused)", ylabel="replies")
            ax2.legend()
        return [("Each metric per model, with its 95% bootstrap interval", _svg(plt, fig)),
                ("The judge's P(refused) per reply: a useful judge separates the two colours", _svg(plt, fig2))]


def write_html(result: BehaviourResult, path: str | Path, title: str = "What did training change? Behaviour") -> Path:
    from ..audit.report import CSS

    s = result.settings
    models = [[m.name, m.identity, ", ".join(f"{k}: {v}" for k, v in m.counts.items()) or "—"] for m in result.models]
    suites = [[m["suite"], m["version"], m["items"], m["skipped"], m["license"] or "—", m["path"]] for m in result.suites]
    settings = [[k, v] for k, v in s.items()]
    steps = [[x["table"], x["planned"], x["reused"], x["written"], x["prompt_tokens"], x["completion_tokens"],
              f"{x['seconds']:.1f}"] for x in result.steps]
    verdicts = "".join(f"<li>{_esc(c['verdict'])}</li>" for c in result.comparisons) or "<li>one model: no comparison</li>"
    notes = "".join(f"<li>{_esc(n)}</li>" for n in result.notes + result.warnings) or "<li>none</li>"
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>",
        f"<div class='verdict'><ul>{verdicts}</ul></div>",
        "<h2>Summary</h2>", _html_table(header(result), rows(result)),
        "<p>Rates are means over items with a 95% percentile bootstrap interval (seeded); a judge tie "
        f"(|P(refused) − 0.5| &lt; {_esc(s.get('tie_eps'))}) counts 0.5. Differences are bootstrapped over the items "
        "both models have (the flip rate: over each model's own initially correct items).</p>",
        "<h2>Plots</h2><div class='plots'>",
        *(f"<figure>{svg}<figcaption>{_esc(cap)}</figcaption></figure>" for cap, svg in _plots(result)),
        "</div><h2>Notes</h2>", f"<ul>{notes}</ul>",
        "<h2>Models</h2>", _html_table(["name", "identity (engine.model)", "counts"], models),
        "<h2>Worst examples of each failure (five per model)</h2>", _examples_html(result),
        "<h2>Suites</h2>", _html_table(["suite", "version", "items", "skipped", "licence", "path"], suites),
        "<h2>Steps</h2>", _html_table(["step", "planned", "reused", "written", "prompt tokens", "generated tokens", "s"],
                                      steps),
        "<h2>Settings</h2>", _html_table(["key", "value"], settings),
        "</body></html>",
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


__all__ = ["header", "render_terminal", "rows", "write_html"]
