"""Readable results: the labels of a run as one row per pair, its tokens and cost, numbers as people write them.

``factory labels`` and :meth:`factory.api.Database.preferences` read :func:`labels_table`;
``factory run``/``status``, the audit's report line and the dataset card read :func:`run_cost`.

Cost: an engine's ``price`` (``{prompt: $/1M tokens, completion: $/1M tokens}``, left out of the run
id) is recorded per run in ``run_prices`` when the run finishes through the API or the CLI; the
run's tokens are summed over every row it owns (:meth:`Store.run_rows`). A *label* is one labelled
pair (all its principles, both orders); $ per 1,000 labels divides the run's whole cost by its
labelled pairs, as AlpacaEval does per annotation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from .store import Store, now

# tables whose rows carry prompt_tokens/completion_tokens
TOKEN_TABLES = ("responses", "critiques", "revisions", "samples", "rationales", "judgements")


def fmt(x: Any, digits: int = 3) -> str:
    """A number as people write it: ``1,070``, ``0.513``, ``12.5``; never ``1.07e+03``; NaN → ``—``."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.{digits}g}" if abs(x) >= 1e-12 else "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{x:.{digits}f}" else f"{x:.{digits}f}"
    return str(x)


def _trunc(col: str, n: int | None) -> str:
    if n is None:
        return col
    return f"CASE WHEN length({col}) > {int(n)} THEN left({col}, {max(int(n) - 1, 1)}) || '…' ELSE {col} END"


def labels_table(store: Store, run_id: str, *, truncate: int | None = 200) -> pa.Table:
    """One row per labelled pair of ``run_id``: pair_id, source_row, prompt (the last user turn),
    response_a, response_b (each cut to ``truncate`` characters), chosen, p_a, margin, is_tie,
    orders_agree, principles_agree, n_principles, and ``p_<principle>`` per principle: that principle's
    P(a better), its two orders averaged (empty where the pair did not get that principle)."""
    from .labels import cells_sql, run_rule

    rel = store.run_rows("judgements", "$run")
    principles = [p for (p,) in store.con.execute(
        f"SELECT DISTINCT principle_id FROM {rel} ORDER BY 1", {"run": run_id}).fetchall()]
    pcols = "".join(f", max(c.p) FILTER (WHERE c.principle_id = '{p.replace(chr(39), chr(39) * 2)}') "
                    f'AS "p_{p}"' for p in principles)
    cells = cells_sql(rel, run_rule(store, run_id)) if principles else None
    per_principle = (f"(SELECT c.pair_id{pcols} FROM ({cells}) c GROUP BY c.pair_id)" if cells
                     else "(SELECT NULL::VARCHAR AS pair_id WHERE false)")
    return store.con.sql(f"""
        SELECT l.pair_id, m.source_row,
               {_trunc("json_extract_string(pr.conversation, '$[#-1].content')", truncate)} AS prompt,
               {_trunc('pr.response_a', truncate)} AS response_a, {_trunc('pr.response_b', truncate)} AS response_b,
               l.chosen, l.p_a, l.margin, l.is_tie, l.orders_agree, l.principles_agree, l.n_principles,
               pp.* EXCLUDE (pair_id)
        FROM preferences l
        LEFT JOIN run_pairs m ON m.run_id = l.run_id AND m.pair_id = l.pair_id
        LEFT JOIN pairs pr ON pr.pair_id = l.pair_id
        LEFT JOIN {per_principle} pp ON pp.pair_id = l.pair_id
        WHERE l.run_id = $run ORDER BY m.source_row NULLS LAST, l.pair_id""", params={"run": run_id}).to_arrow_table()


# ----------------------------------------------------------------------------------------- cost


def run_tokens(store: Store, run_id: str) -> dict[str, int]:
    """Prompt and completion tokens of every row the run owns (made or reused), and its labelled pairs."""
    prompt = completion = 0
    for t in TOKEN_TABLES:
        p, c = _sums(store, t, run_id)
        prompt, completion = prompt + p, completion + c
    labels = store.count("preferences", "run_id = ? AND p_a IS NOT NULL", [run_id])
    if not labels:  # a run that stores no preferences (an audit): the pairs it judged
        labels = store.one(f"SELECT count(DISTINCT pair_id) FROM {store.run_rows('judgements', '$run')} "
                           "WHERE status = 'ok'", {"run": run_id})[0]
    return {"prompt_tokens": int(prompt), "completion_tokens": int(completion), "labels": int(labels)}


def _sums(store: Store, table: str, run_id: str) -> tuple[int, int]:
    row = store.con.execute(f"SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
                            f"FROM {store.run_rows(table, '$run')}", {"run": run_id}).fetchall()
    return (row[0][0], row[0][1]) if row else (0, 0)


def _has_table(store: Store, name: str) -> bool:
    return bool(store.one("SELECT 1 FROM information_schema.tables WHERE table_name = ?", [name]))


def stored_price(store: Store, run_id: str) -> dict | None:
    if not _has_table(store, "run_prices"):
        return None
    row = store.one("SELECT prompt, completion FROM run_prices WHERE run_id = ?", [run_id])
    return {"prompt": row[0], "completion": row[1]} if row else None


def run_cost(store: Store, run_id: str, price: dict | None = None) -> dict[str, Any]:
    """Tokens, tokens per label and (with a price, given or recorded) $ and $ per 1,000 labels."""
    t = run_tokens(store, run_id)
    price = price or stored_price(store, run_id)
    labels = t["labels"]
    out: dict[str, Any] = {**t, "tokens_per_label": (t["prompt_tokens"] + t["completion_tokens"]) / labels
                           if labels else None, "price": price, "usd": None, "usd_per_1k_labels": None}
    if price:
        usd = t["prompt_tokens"] / 1e6 * price["prompt"] + t["completion_tokens"] / 1e6 * price["completion"]
        out.update(usd=usd, usd_per_1k_labels=usd / labels * 1000 if labels else None)
    return out


def cost_line(c: dict[str, Any]) -> str:
    """``12,345 prompt + 67 completion tokens, 312 tokens/label; $0.0123 ($0.128 per 1,000 labels)``."""
    text = f"{fmt(c['prompt_tokens'])} prompt + {fmt(c['completion_tokens'])} completion tokens"
    if c.get("tokens_per_label"):
        text += f", {fmt(c['tokens_per_label'], 1)} tokens/label over {fmt(c['labels'])} labels"
    if c.get("usd") is not None:
        text += f"; ${c['usd']:,.4f}"
        if c.get("usd_per_1k_labels") is not None:
            text += f" (${c['usd_per_1k_labels']:,.4f} per 1,000 labels)"
    else:
        text += "; $: set engine.price {prompt: $/1M, completion: $/1M} to see it"
    return text


def record_cost(db: str | Path, run_id: str, price: dict | None) -> dict[str, Any]:
    """Record the run's price (when given) and return its cost (:func:`run_cost`)."""
    if price:
        with Store(db, writer_run=f"price:{run_id}") as store:
            store.con.execute("DELETE FROM run_prices WHERE run_id = ?", [run_id])
            store.con.execute("INSERT INTO run_prices VALUES (?, ?, ?, ?)",
                              [run_id, float(price["prompt"]), float(price["completion"]), now()])
            return run_cost(store, run_id)
    with Store(db, read_only=True) as store:
        return run_cost(store, run_id)


def price_json(price: dict | None) -> str | None:
    return json.dumps(price) if price else None
