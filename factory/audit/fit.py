"""``factory audit fit``: principle weights and a temperature fitted to human labels.

The features of a pair are its per-principle (for a panel: per judge × principle, named
``judge/principle``), order-averaged log-odds ``ℓ_k`` (the cells of
:mod:`factory.labels`, after the run's clamp and calibration; a principle not judged for the pair
is 0, no evidence). A logistic regression without intercept (so swapping a and b gives 1 − p: no
position prior can creep in) is fitted on a train split of the human set's pairs, its strength
chosen by cross-validation on log-loss. Its coefficients are the weights of the ``logit`` pool:
``p = σ(Σ_k w_k ℓ_k)``; ``Σ|w_k|`` is the inverse temperature and ``w_k / Σ|w_k|`` the relative
weights. The split is by a hash of each pair id (seeded), so it is disjoint and stable.

On the held-out pairs, the run's own label (the constitution's weights) and the fitted label are
audited side by side with their intervals, and the difference of agreement gets a paired bootstrap
interval: "no gain" when it includes 0. The result is stored as a named weight set that a run uses
with ``judge.weights: NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..human import human_table, set_info
from ..labels import LabelRule, cells_sql, labels_table, run_rule
from ..store import Store, StoreError, content_key, now
from .metrics import Block, compute_audit

MIN_TRAIN = 20
MAX_NAME = 100


def check_name(name: str) -> None:
    """A weight-set name is a name like a run's (letters, digits, ``_ . -``; no spaces or newlines), and short."""
    from pydantic import TypeAdapter, ValidationError

    from ..config import RunName

    try:
        TypeAdapter(RunName).validate_python(name)
    except ValidationError:
        raise StoreError(f"weight-set name {name[:40]!r}{'…' if len(name) > 40 else ''} is not a name: use letters, "
                         "digits and _ . - (starting with a letter or digit), e.g. fitted-v1") from None
    if len(name) > MAX_NAME:
        raise StoreError(f"weight-set name is {len(name)} characters long; keep it under {MAX_NAME}")


@dataclass
class FitResult:
    name: str
    weights: dict[str, float]
    temperature: float
    relative: dict[str, float]
    C: float
    n_train: int
    n_test: int
    uniform: Block
    fitted: Block
    delta: float
    delta_ci: tuple[float, float]
    verdict: str
    extra: dict[str, Any] = field(default_factory=dict)


def fit(db: str | Path, run_id: str, human_set: str, name: str, *, train_frac: float = 0.5, folds: int = 5,
        seed: int = 0, n_bootstrap: int = 1000) -> FitResult:
    from sklearn.linear_model import LogisticRegressionCV

    if not 0.1 <= train_frac <= 0.9:
        raise StoreError(f"--train-frac must be in [0.1, 0.9]; got {train_frac}")
    check_name(name)
    with Store(db, writer_run=f"fit:{name}") as store:
        set_info(store, human_set)  # a clear error for an unknown set
        rule = run_rule(store, run_id)
        base = LabelRule(rule.weights, rule.tie_eps, rule.clamp, rule.calibrate, judges=rule.judges,
                         members=rule.members) if rule.pool == "logit" else rule
        rel, params = store.run_rows("judgements", "$run"), {"run": run_id}
        # a panel's features are its (judge, principle) cells: judge × principle weights "judge/principle"
        feature = "c.judge || '/' || c.principle_id" if rule.members else "c.principle_id"
        cells = store.con.sql(f"""SELECT c.pair_id, {feature} AS principle_id, c.l, h.human_choice
                                  FROM ({cells_sql(rel, base)}) c JOIN human_labels h USING (pair_id)
                                  WHERE h.set_id = $set AND c.l IS NOT NULL AND (c.judge <> '' OR {not rule.members})""",
                              params={**params, "set": human_set}).to_arrow_table()
        if cells.num_rows == 0:
            raise StoreError(f"{db}: run '{run_id}' has no valid judgements of human set '{human_set}'; audit the set "
                             "with that judge first (`factory run pipelines/<x>-audit.yaml`)")
        pairs = sorted(set(cells.column("pair_id").to_pylist()))
        names = sorted(set(cells.column("principle_id").to_pylist()))
        index, col = {p: i for i, p in enumerate(pairs)}, {k: j for j, k in enumerate(names)}
        X = np.zeros((len(pairs), len(names)))
        y = np.zeros(len(pairs), dtype=int)
        for p, k, ell, choice in zip(*(cells.column(c).to_pylist() for c in ("pair_id", "principle_id", "l",
                                                                              "human_choice"))):
            X[index[p], col[k]] = ell
            y[index[p]] = choice == "a"
        train = np.array([int(content_key("fit-split", seed, p)[:8], 16) / 16**8 < train_frac for p in pairs])
        if train.sum() < MIN_TRAIN or (~train).sum() < MIN_TRAIN or len(set(y[train])) < 2:
            raise StoreError(f"too few pairs to fit and test weights: {int(train.sum())} train / {int((~train).sum())} "
                             f"held out (each needs ≥ {MIN_TRAIN}, with both human choices in train); "
                             "audit a larger human set")
        folds = max(2, min(folds, int(np.bincount(y[train]).min())))
        model = LogisticRegressionCV(Cs=10, cv=folds, fit_intercept=False, scoring="neg_log_loss",
                                     random_state=seed, max_iter=1000, l1_ratios=(0.0,),
                                     use_legacy_attributes=True).fit(X[train], y[train])
        w = dict(zip(names, (float(v) for v in model.coef_[0])))
        scale = sum(abs(v) for v in w.values())
        fitted_rule = LabelRule(w, rule.tie_eps, rule.clamp, rule.calibrate, pool="logit", name=name,
                                judges=rule.judges, members=rule.members)
        test_ids = pa.array([p for p, t in zip(pairs, train) if not t], pa.string())
        human = human_table(store, human_set)
        human = human.filter(pa.compute.is_in(human.column("pair_id"), test_ids))
        judg = store.con.sql(f"""SELECT pair_id, principle_id, "order", CASE WHEN status = 'ok' THEN p_a
                                 ELSE 'NaN'::DOUBLE END AS p_a FROM {rel}""", params=params).to_arrow_table()
        judg = judg.filter(pa.compute.is_in(judg.column("pair_id"), test_ids))
        uni = labels_table(store, rel, base, params)
        fit_labels = labels_table(store, rel, fitted_rule, params)
        result = compute_audit(judg, human, base.weights, tie_eps=rule.tie_eps, labels=uni,
                               variants={f"fitted weights {name}": fit_labels}, n_bootstrap=n_bootstrap, seed=seed)
        uniform, fitted = result.overall, result.variants[0]
        delta, lo, hi = _paired_gain(uni, fit_labels, human, rule.tie_eps, n_bootstrap, seed)
        verdict = ("gain: the fitted weights agree with humans more often on held-out pairs" if lo > 0 else
                   "loss: the fitted weights agree with humans less often on held-out pairs" if hi < 0 else
                   "no gain: the difference on held-out pairs is not distinguishable from 0")
        body = {"weights": w, "temperature": (1 / scale) if scale else None,
                "relative": {k: v / scale for k, v in w.items()} if scale else w, "C": float(model.C_[0]),
                "folds": folds, "train_frac": train_frac, "seed": seed, "run_id": run_id, "set_id": human_set,
                "n_train": int(train.sum()), "n_test": int((~train).sum()), "calibrate": rule.calibrate,
                "clamp": rule.clamp, "base_rule": base.name,
                "heldout": {"uniform": _brief(uniform), "fitted": _brief(fitted), "delta": delta,
                            "delta_ci": [lo, hi], "verdict": verdict}}
        store.con.execute("INSERT OR REPLACE INTO weight_sets VALUES (?, ?, ?)", [name, json.dumps(body), now()])
    return FitResult(name, w, body["temperature"] or float("inf"), body["relative"], body["C"], body["n_train"],
                     body["n_test"], uniform, fitted, delta, (lo, hi), verdict)


def _brief(b: Block) -> dict[str, Any]:
    return {"n": b.n_pairs, "agreement": b.agreement, "ci": list(b.agreement_ci), "kappa": b.cohen_kappa,
            "n_decided": b.n_decided, "chance": b.chance}


def _paired_gain(a: pa.Table, b: pa.Table, human: pa.Table, tie_eps: float, n_bootstrap: int, seed: int
                 ) -> tuple[float, float, float]:
    """Mean per-pair score difference (fitted − uniform; tie = 0.5) and its paired bootstrap 95% interval."""
    from ..prefmath import decide

    ids = human.column("pair_id").to_pylist()
    y = np.array([c == "a" for c in human.column("human_choice").to_pylist()])

    def scores(t: pa.Table) -> np.ndarray:
        got = dict(zip(t.column("pair_id").to_pylist(), t.column("p_a").to_pylist()))
        p = np.array([np.nan if got.get(k) is None else got[k] for k in ids], dtype=np.float64)
        chose_a, tie, _ = decide(np.nan_to_num(p, nan=0.5), tie_eps)
        return np.where(tie, 0.5, (chose_a == y).astype(float))

    d = scores(b) - scores(a)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(max(n_bootstrap, 1), len(d)))].mean(axis=1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def show(r: FitResult) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"weight set {r.name}: logistic regression on {r.n_train} train pairs (C={r.C:.3g}, "
                    f"temperature {r.temperature:.3g})")
    for col in ("principle", "weight", "relative"):
        t.add_column(col, justify="left" if col == "principle" else "right")
    for k, v in sorted(r.weights.items(), key=lambda kv: -abs(kv[1])):
        t.add_row(k, f"{v:+.3f}", f"{r.relative[k]:+.3f}")
    c.print(t)
    h = Table(title=f"held-out pairs (n={r.n_test})")
    for col in ("label", "agreement [95% CI]", "κ", "decided", "vs chance"):
        h.add_column(col)
    for label, b in (("constitution weights", r.uniform), (f"fitted ({r.name})", r.fitted)):
        h.add_row(label, f"{b.agreement:.3f} [{b.agreement_ci[0]:.3f}, {b.agreement_ci[1]:.3f}]",
                  "—" if b.cohen_kappa != b.cohen_kappa else f"{b.cohen_kappa:.3f}", str(b.n_decided), b.chance)
    c.print(h)
    c.print(f"fitted − constitution: {r.delta:+.3f} [{r.delta_ci[0]:+.3f}, {r.delta_ci[1]:+.3f}] → {r.verdict}",
            markup=False)
    c.print(f"use it: judge: {{weights: {r.name}}} in a prefs or audit pipeline", markup=False)
