"""The four verdicts an adjudicator gives a disagreement, and the label each one stands for.

One rule, written once: ``label(verdict, human_choice, ai_choice)`` is the preference the
adjudicated human set holds for the pair ('a' / 'b'), or None when the verdict says there is no
preference to learn from (the pair is then left out of the set and counted with its reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Verdict:
    code: str
    key: str  # keyboard shortcut
    title: str
    excluded: str  # why a pair with this verdict has no label (when it has none)


VERDICTS: dict[str, Verdict] = {v.code: v for v in (
    Verdict("human", "1", "human right", "human right, but the human label is missing"),
    Verdict("ai", "2", "AI right", "AI right, but the AI label was a tie (no preference)"),
    Verdict("both", "3", "both acceptable", "both responses acceptable (no preference)"),
    Verdict("neither", "4", "neither acceptable", "neither response acceptable (no preference)"),
)}

# one row per event: 'set' gives a pair a verdict; 'undo' puts back what a 'set' event replaced
EVENT_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("audit_id", pa.string()),
    ("pair_id", pa.string()),
    ("seq", pa.int64()),  # order within one workspace
    ("action", pa.string()),  # set | undo
    ("verdict", pa.string()),  # the pair's verdict after this event (NULL: none)
    ("label", pa.string()),  # the adjudicated label after this event: a | b | NULL
    ("note", pa.string()),
    ("annotator", pa.string()),
    ("given_at", pa.timestamp("us", tz="UTC")),
    ("undoes", pa.string()),  # undo: the event_id it reverts
    ("session", pa.string()),  # the browser session that gave it (a hash of its cookie): sessions told apart
    ("base", pa.string()),  # the pair's latest event when the verdict was made ('' none): its version
])


def label(verdict: str | None, human_choice: str | None, ai_choice: str | None) -> str | None:
    """The adjudicated preference: the human's choice, the AI's choice (None for an AI tie), or None."""
    if verdict not in VERDICTS and verdict is not None:
        raise ValueError(f"unknown verdict {verdict!r}; use one of {list(VERDICTS)}")
    if verdict == "human":
        return human_choice
    if verdict == "ai":
        return ai_choice
    return None
