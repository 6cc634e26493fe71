"""Reward-model ensembles: read one, normalise and aggregate member rewards, measure on human pairs.

An ensemble is a folder written by ``factory train rm`` with ``ensemble: k``: ``ensemble.json``
and ``member-0 … member-(k-1)``. Aggregation (one place, :data:`AGGREGATES`):

1. each member's rewards are z-scored over the rewards it gave on the evaluation set at hand
   (every response scored in this call: both sides of every human pair, or every best-of-n
   sample): ``z = (r − mean) / std`` (population std; a member whose rewards are all equal gets
   z = 0). Members trained with different seeds live on different scales, and only then are their
   rewards comparable;
2. ``mean``: the members' mean z; ``min``: the worst case over members; ``uwo``
   (uncertainty-weighted): ``mean − λ·std`` across members, which penalises responses the members
   disagree about.

Accuracy on held-out human pairs (tie = wrong) is reported for every member and every aggregate,
each with a seeded 95% bootstrap interval over pairs, and each aggregate's paired difference from
member 0 (the single reward model the best-of-n check compares against).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..models import ModelError
from .stats import Rate, difference, rate

AGGREGATES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "mean": lambda z, lam: z.mean(axis=0),
    "min": lambda z, lam: z.min(axis=0),
    "uwo": lambda z, lam: z.mean(axis=0) - lam * z.std(axis=0),
}
LABELS = {"mean": "mean", "min": "worst case (min)", "uwo": "mean − λ·std"}


class EnsembleError(ModelError):
    """A folder that is not a usable reward-model ensemble (or an unknown aggregate)."""


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / "ensemble.json").is_file()


def member_dirs(path: str | Path) -> list[Path]:
    """The members' folders, in manifest order (each must hold a trained model)."""
    root = Path(path)
    try:
        manifest = json.loads((root / "ensemble.json").read_text())
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{root}/ensemble.json: cannot read it ({e}); train the ensemble with "
                            "`factory train rm CONFIG` and `ensemble: k` in the config") from None
    dirs = [root / m["path"] for m in manifest.get("members", [])]
    missing = [str(d) for d in dirs if not (d / "config.json").exists()]
    if not dirs or missing:
        raise EnsembleError(f"{root}: ensemble members missing ({', '.join(missing) or 'none listed'}); "
                            "rerun `factory train rm` with the same config to finish training them")
    return dirs


def normalise(scores: np.ndarray) -> np.ndarray:
    """Per member (row), z-scores over the evaluation set's rewards (columns)."""
    s = np.asarray(scores, dtype=np.float64)
    mu, sd = s.mean(axis=1, keepdims=True), s.std(axis=1, keepdims=True)
    return np.divide(s - mu, sd, out=np.zeros_like(s), where=sd > 0)


def aggregate(z: np.ndarray, how: str, lam: float = 1.0) -> np.ndarray:
    if how not in AGGREGATES:
        raise EnsembleError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    return AGGREGATES[how](np.asarray(z, dtype=np.float64), lam)


def member_rewards(dirs: list[Path], conversations: list[list[dict]], *, batch_size: int = 8,
                   max_length: int = 512) -> tuple[np.ndarray, int]:
    """``(k × N raw rewards, sequences cut)``: each member loaded in turn and released after scoring."""
    from ..evaluate import load_model, rm_scores

    rows, cut = [], 0
    for d in dirs:
        model, tok = load_model(d, "rm")
        r, cut = rm_scores(model, tok, conversations, batch_size=batch_size, max_length=max_length)
        rows.append(r)
        del model
    return np.vstack(rows), cut


@dataclass
class EnsembleEval:
    model: str
    set_id: str
    n: int
    lam: float
    members: list[tuple[str, Rate, int]]  # (member folder, accuracy, ties)
    aggregates: list[tuple[str, Rate, int, Rate]]  # (aggregate, accuracy, ties, difference from member 0)
    seconds: float
    details: dict = field(default_factory=dict)

    def table(self):
        from rich.table import Table

        t = Table(title=f"reward-model ensemble {self.model} on {self.n} human pairs ({self.set_id}); "
                        "accuracy [95% bootstrap CI], tie = wrong", show_edge=False)
        for col in ("scorer", "accuracy", "ties", "Δ vs member 0"):
            t.add_column(col, justify="left" if col == "scorer" else "right")
        for name, r, ties in self.members:
            t.add_row(name, r.fmt(), str(ties), "")
        for name, r, ties, d in self.aggregates:
            label = LABELS[name].replace("λ", f"{self.lam:g}")
            t.add_row(f"ensemble: {label}", r.fmt(), str(ties), d.fmt(sign=True))
        return t


def eval_rm_ensemble(model_dir: str | Path, human_spec: str | Path, *, limit: int | None = 50, offset: int = 0,
                     db: str | Path | None = None, lam: float = 1.0, batch_size: int = 8, max_length: int = 512,
                     n_bootstrap: int = 1000, seed: int = 0) -> EnsembleEval:
    """Every member's and every aggregate's pairwise accuracy on human pairs ``[offset, offset+limit)``;
    with ``db``, one ``evals`` row each (kind ``rm`` per member, ``rm-ensemble:<aggregate>``)."""
    from ..evaluate import finish, human, pairwise_accuracy

    start = time.perf_counter()
    dirs = member_dirs(model_dir)
    table, convs, dropped = human(human_spec, limit, offset)
    n = table.num_rows
    reply = lambda col: [{"role": "assistant", "content": t} for t in table.column(col).to_pylist()]  # noqa: E731
    conversations = [c + [r] for c, r in zip(convs + convs, reply("response_a") + reply("response_b"))]
    raw, cut = member_rewards(dirs, conversations, batch_size=batch_size, max_length=max_length)
    z = normalise(raw)
    params = {"limit": limit, "offset": offset, "max_length": max_length}
    choice = table.column("human_choice").to_pylist()
    members, correct0 = [], None
    for d, r in zip(dirs, raw):
        res = finish("rm", str(d), human_spec, table, r[:n], r[n:], params, {"truncated": cut, "dropped": dropped},
                     0.0, db, n_bootstrap=n_bootstrap, seed=seed)
        c = np.asarray(res.details["correct"], dtype=float)
        correct0 = c if correct0 is None else correct0
        members.append((d.name, rate(c, n_bootstrap, seed), res.ties))
    aggregates = []
    for how in AGGREGATES:
        s = aggregate(z, how, lam)
        res = finish(f"rm-ensemble:{how}", str(model_dir), human_spec, table, s[:n], s[n:],
                     {**params, "lam": lam, "normalise": "z-score per member over the evaluation set"},
                     {"truncated": cut, "dropped": dropped, "members": [str(d) for d in dirs]}, 0.0, db,
                     n_bootstrap=n_bootstrap, seed=seed)
        _, _, c = pairwise_accuracy(s[:n], s[n:], choice)
        c = c.astype(float)
        d = difference(dict(enumerate(correct0)), dict(enumerate(c)), paired=True, n_bootstrap=n_bootstrap, seed=seed)
        aggregates.append((how, rate(c, n_bootstrap, seed), res.ties, d))
    return EnsembleEval(str(model_dir), str(human_spec), n, lam, members, aggregates, time.perf_counter() - start,
                        {"truncated": cut, "dropped": dropped})


__all__ = ["AGGREGATES", "EnsembleError", "EnsembleEval", "aggregate", "eval_rm_ensemble", "is_ensemble",
           "member_dirs", "member_rewards", "normalise"]
