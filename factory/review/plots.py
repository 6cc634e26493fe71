"""SVG plots for the review app, drawn by matplotlib from the same data as the audit report.

The principle view reuses the report's own agreement and position plots on the stored audit
result; the pair view draws each principle's P(a better) in both orders. Served as separate
``image/svg+xml`` responses (loaded by ``<img>``, which never runs scripts).
"""

from __future__ import annotations

import math
from typing import Any

_RC = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "factory-review", "font.size": 9}


def _draw(make: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..audit.report import _svg

    with matplotlib.rc_context(_RC):
        return _svg(plt, make(plt))


def principles_svg(result: dict[str, Any]) -> str:
    """The report's agreement-per-principle plot (bootstrap 95% intervals, chance line)."""
    from ..audit.report import _agreement_bars

    return _draw(lambda plt: _agreement_bars(plt, result))


def position_svg(result: dict[str, Any]) -> str:
    """The report's position-bias plot: P(first shown preferred) and order consistency per principle."""
    from ..audit.report import _position_bars

    return _draw(lambda plt: _position_bars(plt, result))


def pair_svg(cells: list[dict[str, Any]], human_choice: str, p_a: float) -> str:
    """Per principle, P(a better) when a was shown first (ab), second (ba), and their mean; the pair's
    weighted label and the human's side."""

    def make(plt: Any) -> Any:
        names = [c["principle_id"] for c in cells]
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.4))
        y = range(len(names))
        for shift, key, label, mark in ((-0.2, "p_ab", "order ab (a first)", "o"), (0.2, "p_ba", "order ba (b first)", "s"),
                                        (0.0, "p", "mean of both orders", "D")):
            xs = [_nan(c[key]) for c in cells]
            ax.scatter(xs, [i + shift for i in y], marker=mark, label=label, zorder=3)
        for i, c in enumerate(cells):
            ax.plot([_nan(c["p_ab"]), _nan(c["p_ba"])], [i - 0.2, i + 0.2], color="#bbbbbb", lw=1, zorder=2)
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.axvline(p_a, color="#d62728", lw=1.5, label=f"pair label P(a better) = {p_a:.3f}")
        ax.axvspan(0.5, 1.0, color="#5a9e5a" if human_choice == "a" else "#dddddd", alpha=0.12, lw=0)
        ax.axvspan(0.0, 0.5, color="#5a9e5a" if human_choice == "b" else "#dddddd", alpha=0.12, lw=0)
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel=f"P(a better)   (green side: the human chose {human_choice})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8)
        return fig

    return _draw(make)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)
