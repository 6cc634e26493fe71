"""The review queue in SQL over the workspace: filters, pages, position and neighbours, progress.

Nothing here loads the queue whole: a page is ``LIMIT/OFFSET`` over one sort key, and moving to the
next or previous pair is a keyset query (the first pair whose key comes after the current one), so
it stays right while verdicts move pairs in and out of a filter ("not adjudicated yet").

Sort keys: ``items.rank`` (the AI's confidence, most confident first); with a principle filter,
``cells.prank`` (how strongly that principle pushed against the human: the principle's worst pairs
first). The principle filter keeps the pairs where that principle sided against the human
(P(the side the human did not choose) > 0.5 under that principle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .verdicts import VERDICTS
from .workspace import Workspace

CHOICES = {
    "ties": ("exclude", "include", "only"),
    "inconsistent": ("any", "yes", "no"),
    "longer": ("any", "ai", "human"),
    "state": ("all", "todo", "done"),
}
PAGE_SIZE = 50
PROMPT_CHARS = 120  # of the prompt shown in a queue row


class FilterError(ValueError):
    """A filter parameter with a value the queue does not know (the message says which values it takes)."""


@dataclass(frozen=True)
class Filters:
    principle: str | None = None  # pairs where this principle sided against the human, its worst first
    source: str | None = None  # pairs.source
    ties: str = "exclude"  # AI ties (no preference): left out, included, or only they
    inconsistent: str = "any"  # yes: some principle's two orders picked different responses
    min_gap: int = 0  # |len_a - len_b| at least this many characters
    longer: str = "any"  # ai: the AI chose the longer response; human: the human did
    state: str = "all"  # todo: no verdict yet; done: adjudicated
    verdict: str | None = None  # only pairs with this verdict

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> "Filters":
        """Filters from query parameters (empty values mean the default); unknown values are errors."""
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in params.items() if k in known and v not in ("", None)}
        for name, allowed in CHOICES.items():
            if name in kw and kw[name] not in allowed:
                raise FilterError(f"{name}={kw[name]!r}: use one of {', '.join(allowed)}")
        if "verdict" in kw and kw["verdict"] not in VERDICTS:
            raise FilterError(f"verdict={kw['verdict']!r}: use one of {', '.join(VERDICTS)}")
        if "min_gap" in kw:
            try:
                kw["min_gap"] = int(kw["min_gap"])
            except ValueError:
                raise FilterError(f"min_gap={kw['min_gap']!r}: give a whole number of characters") from None
            if kw["min_gap"] < 0:
                raise FilterError("min_gap: give a number of characters >= 0")
        return cls(**kw)

    def params(self) -> dict[str, str]:
        """The non-default filters as query parameters (for links that keep the filter)."""
        default = Filters()
        return {k: str(v) for k, v in asdict(self).items() if v != getattr(default, k)}


def _from(audit_id: str, f: Filters) -> tuple[str, list[Any], str]:
    """(FROM … WHERE … clause, its parameters, the sort key expression) of the filtered queue."""
    sql = "FROM items i " + ("JOIN cells c ON c.rank = i.rank " if f.principle else "")
    sql += "LEFT JOIN current v ON v.audit_id = i.audit_id AND v.pair_id = i.pair_id WHERE i.audit_id = ?"
    params: list[Any] = [audit_id]
    key = "i.rank"
    if f.principle:  # joined on the integer rank, the other conditions filter: the fast plan at scale
        sql += " AND c.audit_id = ? AND c.principle_id = ? AND c.toward_wrong > 0.5"
        params += [audit_id, f.principle]
        key = "c.prank"
    where = {"exclude": " AND NOT i.is_tie", "only": " AND i.is_tie"}.get(f.ties, "")
    where += {"yes": " AND i.orders_agree < 1", "no": " AND i.orders_agree = 1"}.get(f.inconsistent, "")
    longer = "CASE WHEN i.len_a > i.len_b THEN 'a' WHEN i.len_b > i.len_a THEN 'b' END"
    where += {"ai": f" AND i.ai_choice = {longer}", "human": f" AND i.human_choice = {longer}"}.get(f.longer, "")
    where += {"todo": " AND v.pair_id IS NULL", "done": " AND v.pair_id IS NOT NULL"}.get(f.state, "")
    if f.source:
        where += " AND i.source = ?"
        params.append(f.source)
    if f.min_gap:
        where += " AND abs(i.len_a - i.len_b) >= ?"
        params.append(f.min_gap)
    if f.verdict:
        where += " AND v.verdict = ?"
        params.append(f.verdict)
    return sql + where, params, key


ROW_COLUMNS = """i.pair_id, i.rank, i.p_a, i.margin, i.is_tie, i.ai_choice, i.human_choice, i.orders_agree,
                 i.n_principles, i.len_a, i.len_b, i.source, i.drivers, v.verdict, v.note, v.annotator"""


def page(ws: Workspace, audit_id: str, f: Filters, number: int = 1, size: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """Page ``number`` (from 1) of the filtered queue; ``drivers`` lists the principles that sided against
    the human, most strongly first."""
    frm, params, key = _from(audit_id, f)
    offset = (max(number, 1) - 1) * size
    rows = ws.rows(f"SELECT {ROW_COLUMNS}, {key} AS sort_key {frm} ORDER BY sort_key LIMIT ? OFFSET ?",
                   [*params, size, offset])
    prompts = dict((r["pair_id"], r["prompt"]) for r in ws.rows(  # the last user turn, shortened, per listed pair
        f"""SELECT pair_id, left(json_extract_string(conversation, '$[#-1].content'), {PROMPT_CHARS + 1}) AS prompt
            FROM texts WHERE audit_id = ? AND list_contains(?, pair_id)""", [audit_id, [r["pair_id"] for r in rows]]))
    for r in rows:
        text = " ".join((prompts.get(r["pair_id"]) or "").split())
        r["prompt"] = text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS - 1] + "…"
    return rows


def count(ws: Workspace, audit_id: str, f: Filters) -> int:
    frm, params, _ = _from(audit_id, f)
    return ws.one(f"SELECT count(*) AS n {frm}", params)["n"]


def _key_of(ws: Workspace, audit_id: str, f: Filters, pair_id: str) -> int | None:
    """The pair's sort key under ``f`` whether or not the pair passes the other filters."""
    if f.principle:
        row = ws.one("SELECT prank AS k FROM cells WHERE audit_id = ? AND pair_id = ? AND principle_id = ?",
                     [audit_id, pair_id, f.principle])
    else:
        row = ws.one("SELECT rank AS k FROM items WHERE audit_id = ? AND pair_id = ?", [audit_id, pair_id])
    return row["k"] if row else None


@dataclass
class Place:
    position: int | None  # 1-based position of the pair in the filtered queue (None: not in it)
    total: int
    prev: str | None
    next: str | None


def place(ws: Workspace, audit_id: str, f: Filters, pair_id: str) -> Place:
    """Where a pair stands in the filtered queue and its neighbours (keyset: right even when the pair
    itself has just left the filter). One scan of the filtered queue."""
    frm, params, key = _from(audit_id, f)
    k = _key_of(ws, audit_id, f, pair_id)
    row = ws.one(f"""WITH q AS MATERIALIZED (SELECT i.pair_id, {key} AS k {frm})
                     SELECT (SELECT count(*) FROM q) AS total,
                            (SELECT count(*) FROM q WHERE k <= ?) AS pos,
                            (SELECT count(*) FROM q WHERE pair_id = ?) AS inside,
                            (SELECT pair_id FROM q WHERE k > ? ORDER BY k LIMIT 1) AS next,
                            (SELECT pair_id FROM q WHERE k < ? ORDER BY k DESC LIMIT 1) AS prev""",
                 [*params, -1 if k is None else k, pair_id, -1 if k is None else k, -1 if k is None else k])
    if k is None:  # not a key under this sort at all: start from the first pair
        return Place(None, row["total"], None, row["next"])
    return Place(row["pos"] if row["inside"] else None, row["total"], row["prev"], row["next"])


def first(ws: Workspace, audit_id: str, f: Filters) -> str | None:
    frm, params, key = _from(audit_id, f)
    row = ws.one(f"SELECT i.pair_id {frm} ORDER BY {key} LIMIT 1", params)
    return row["pair_id"] if row else None


def progress(ws: Workspace, audit_id: str, f: Filters) -> dict[str, int]:
    """Counts for the progress line: the whole queue (disagreements, ties, adjudicated) and this filter."""
    totals = ws.one("""SELECT count(*) FILTER (WHERE NOT i.is_tie) AS disagreements,
                              count(*) FILTER (WHERE i.is_tie) AS ties,
                              count(v.pair_id) FILTER (WHERE NOT i.is_tie) AS done_disagreements,
                              count(v.pair_id) AS done
                       FROM items i LEFT JOIN current v ON v.audit_id = i.audit_id AND v.pair_id = i.pair_id
                       WHERE i.audit_id = ?""", [audit_id])
    frm, params, _ = _from(audit_id, f)
    here = ws.one(f"SELECT count(*) AS n, count(v.pair_id) AS done {frm}", params)
    return {**totals, "filtered": here["n"], "filtered_done": here["done"]}


def sources(ws: Workspace, audit_id: str) -> list[str]:
    return [r["source"] for r in ws.rows("SELECT DISTINCT source FROM items WHERE audit_id = ? ORDER BY 1", [audit_id])]


def principle_stats(ws: Workspace, audit_id: str) -> dict[str, dict[str, int]]:
    """Per principle: queued pairs it was judged on, pairs where it sided against the human, and the
    verdicts given on those."""
    rows = ws.rows("""SELECT c.principle_id, count(*) AS judged, count(*) FILTER (WHERE c.toward_wrong > 0.5) AS against,
                             count(v.verdict) FILTER (WHERE c.toward_wrong > 0.5) AS adjudicated,
                             count(*) FILTER (WHERE c.toward_wrong > 0.5 AND v.verdict = 'human') AS human,
                             count(*) FILTER (WHERE c.toward_wrong > 0.5 AND v.verdict = 'ai') AS ai,
                             count(*) FILTER (WHERE c.toward_wrong > 0.5 AND v.verdict = 'both') AS both,
                             count(*) FILTER (WHERE c.toward_wrong > 0.5 AND v.verdict = 'neither') AS neither
                      FROM cells c LEFT JOIN current v ON v.audit_id = c.audit_id AND v.pair_id = c.pair_id
                      WHERE c.audit_id = ? GROUP BY 1""", [audit_id])
    return {r.pop("principle_id"): r for r in rows}


def pair_detail(ws: Workspace, audit_id: str, pair_id: str) -> dict[str, Any] | None:
    """One queued pair with its texts, current verdict, per-principle cells (most against the human first),
    judgements and verdict history; None when the pair is not in the audit's queue."""
    item = ws.one("""SELECT i.*, t.conversation, t.response_a, t.response_b, v.verdict, v.note, v.annotator,
                            v.given_at, v.session AS verdict_session
                     FROM items i JOIN texts t ON t.audit_id = i.audit_id AND t.pair_id = i.pair_id
                     LEFT JOIN current v ON v.audit_id = i.audit_id AND v.pair_id = i.pair_id
                     WHERE i.audit_id = ? AND i.pair_id = ?""", [audit_id, pair_id])
    if item is None:
        return None
    args = [audit_id, pair_id]
    item["cells"] = ws.rows("""SELECT principle_id, p_ab, p_ba, p, toward_wrong FROM cells WHERE audit_id = ?
                               AND pair_id = ? ORDER BY toward_wrong DESC, principle_id""", args)
    item["judgements"] = ws.rows("""SELECT id, principle_id, "order", p_first, p_a, status, error, model FROM judgements
                                    WHERE audit_id = ? AND pair_id = ? ORDER BY principle_id, "order" """, args)
    item["history"] = ws.rows("""SELECT event_id, action, verdict, label, note, annotator, session, given_at, synced_at
                                 FROM events WHERE audit_id = ? AND pair_id = ? ORDER BY given_at, seq""", args)
    item["version"] = item["history"][-1]["event_id"] if item["history"] else ""  # what a verdict is made against
    return item
