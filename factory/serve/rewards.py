"""Group rewards from pairwise preferences.

A group is one prompt's completions c_1 … c_k. Completion i's reward is its mean win probability
against its opponents: ``r_i = mean_{j in O_i} P(c_i beats c_j)``, with P read from the label of
the pair (c_i, c_j) (``p_a`` when c_i is shown as a, ``1 − p_a`` otherwise).

- Every other completion is an opponent by default: k(k−1)/2 unordered pairs, each judged in both
  orders for every principle the judge asks: **k(k−1) × principles judge calls per group** (k = 8
  and 4 principles: 224 calls). A judgement already stored costs nothing.
- ``opponents: m`` samples m opponents per completion (seeded by the request's ``seed`` and its
  content, so the same request asks the same pairs): at most k·m unordered pairs, k·m·2 calls per
  principle; the pairs two completions share are judged once.
- With a ``reference``, the only opponent is the reference: k pairs, 2k calls per principle.

Pairs the judge is not asked about: identical texts are a tie (0.5 each); an empty completion
loses to a non-empty one (0 vs 1). A group of one without a reference has no opponent: reward 0.5.
"""

from __future__ import annotations

import random
from typing import Callable

from ..store import content_key

REF = -1  # the reference's index


def opponents(k: int, *, m: int | None = None, reference: bool = False, seed: int = 0,
              salt: str | Callable[[], str] = "") -> list[list[int]]:
    """Per completion, the indexes it is compared with (``REF`` for the reference). ``salt``: the
    request's content (or a function making it: only sampled opponents read it)."""
    if reference:
        return [[REF] for _ in range(k)]
    if m is None or m >= k - 1:
        return [[j for j in range(k) if j != i] for i in range(k)]
    rng = random.Random(content_key("opponents", seed, salt() if callable(salt) else salt, k, m))
    return [rng.sample([j for j in range(k) if j != i], m) for i in range(k)]


def pairs_of(opps: list[list[int]]) -> list[tuple[int, int]]:
    """The unordered pairs to judge, each once, as (i, j) with i shown as response a: i < j, or (i, REF)."""
    seen: dict[tuple[int, int], None] = {}
    for i, row in enumerate(opps):
        for j in row:
            seen[(i, j) if j == REF or i < j else (j, i)] = None
    return list(seen)


def fixed_preference(a: str, b: str) -> float | None:
    """P(a beats b) for the pairs the judge is not asked about (module docstring), else None."""
    if a.strip() == b.strip():
        return 0.5
    if not a.strip():
        return 0.0
    if not b.strip():
        return 1.0
    return None


def group_rewards(opps: list[list[int]], p: dict[tuple[int, int], float]) -> list[float]:
    """``r_i`` = mean over i's opponents of P(i beats j), from ``p[(a, b)]`` = P(a beats b) per judged pair."""
    out = []
    for i, row in enumerate(opps):
        wins = [p[(i, j)] if (i, j) in p else 1.0 - p[(j, i)] for j in row]
        out.append(sum(wins) / len(wins) if wins else 0.5)
    return out
