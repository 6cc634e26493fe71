"""Deduplication and decontamination of a run's input rows, as they are admitted (run options).

A pipeline may say::

    dedup: {exact: true, near: 0.8}                     # normalised-text and MinHash near-duplicates
    decontaminate: {against: [evals, ../shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz], ngram: 13}

Each admitted chunk of prompts or pairs goes through a :class:`Screen` (:func:`screen_for`) before it is stored
(:func:`factory.inputs.chunked` calls it once per chunk); a row it rejects becomes a skip with its
reason, counted in the summary, ``factory status`` and the dataset card, like any bad row:

- **exact**: the row's text, lower-cased, with punctuation and runs of whitespace removed (its
  words joined by one space), hashed: ``duplicate of row N (normalised text)``. (Byte-identical rows
  are already skipped by admission itself.)
- **near**: MinHash over word 3-gram shingles (``num_perm`` permutations) and locality-sensitive
  hashing in bands (``b`` bands of ``r`` values, chosen for the threshold the way datasketch's
  ``MinHashLSH`` does): two rows whose estimated Jaccard similarity is around ``near`` or more
  share a band: ``near-duplicate of row N (MinHash ≈ J ≥ near)``. LSH finds candidates with the
  S-shaped probability ``1 − (1 − J^r)^b``; the band hashes are not verified against a full
  signature (that would have to be stored per row).
- **decontaminate**: word n-grams (``ngram`` = 13 by default, as in the GPT-3 and Tulu 3 reports) of
  the row against every n-gram of the held-out texts; any shared n-gram:
  ``contaminated: 13-gram overlap with held-out <file> line N`` (the held-out text's line). Held-out texts shorter than
  ``ngram`` words but at least ``min_words`` long are matched whole (an eval prompt of 10 words is
  contamination when a training row contains all 10 in order); shorter ones are not checked and
  counted. ``against`` names files (JSONL, JSONL.gz, text: every string value of a record is a
  text), folders of them, or ``evals`` for ``data/evals/``.

State: the held-out n-grams are a sorted array held for the run (its size depends on the held-out
sets, not on the run). The exact and band hashes of the rows kept so far live in DuckDB
(``dedup_index``: one row per kept input row and band), so nothing in Python memory grows with the
run; each chunk probes it with one join. What the row's text is: ``on: prompt`` (default) is the
prompt, or a pair's conversation (a prompt is labelled once); ``on: all`` adds both responses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import Field

from .decontam import DecontamSpec, Heldout, Strict, give_back
from .ngrams import WORD, band_hashes, grams, h64, lsh_params, minhash, word_hashes

if TYPE_CHECKING:
    import numpy as np

EXACT_BAND = -1
# What a screen holds outside DuckDB beyond a plain run, in MB: the held-out index (~10 MB resident
# after its build) and each chunk's word, shingle and MinHash arrays. Measured (RSS and DuckDB's own
# count sampled every 2 s): a 500k-pair run's RSS less DuckDB's count was 10–15 MB above the plain
# run's and, at 1M pairs, grew by ~20 MB more over the run; every peak came when DuckDB sat at its
# cap. The screen's share comes out of the run's DuckDB cap (Store.hold_outside) instead of on top of
# it: the dedup index's scans fill DuckDB's cache to whatever the cap allows. (With 16 MB, a 1M-pair
# run still peaked at 402 MB.)
SCREEN_MB = 24


class DedupSpec(Strict):
    """``dedup:`` in a pipeline: which duplicates of earlier rows of the same run to skip."""

    exact: bool = Field(True, description="skip rows whose normalised text (lower case, words only) an earlier row has")
    near: float | None = Field(None, gt=0, lt=1, description="skip near-duplicates: MinHash Jaccard threshold, e.g. 0.8")
    num_perm: int = Field(64, ge=8, le=512, description="MinHash permutations (more: a sharper threshold, slower)")
    shingle: int = Field(3, ge=1, le=10, description="words per MinHash shingle")
    on: Literal["all", "prompt"] = Field("prompt", description="prompt: the prompt/conversation (the default: a "
                                         "prompt is labelled once); all: also both responses (a pair is a duplicate "
                                         "only when its responses are too)")


def _units(entity: str, row: dict, on: str) -> list[str]:
    """The texts of an admitted row: its prompt/conversation turns and, for pairs with ``on: all``, responses."""
    if entity == "prompts":
        return [m.get("content") or "" for m in json.loads(row["messages"])]
    conv = json.loads(row["conversation"]) if row.get("conversation") else []
    units = [m.get("content") or "" for m in conv]
    return units + ([row.get("response_a") or "", row.get("response_b") or ""] if on == "all" else [])


_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})


def normalised(units: list[str]) -> str:
    """The text exact dedup compares: lower case, ASCII punctuation removed, whitespace collapsed (C-level
    string operations only: no per-word Python)."""
    return "\x1e".join(" ".join(u.lower().translate(_PUNCT).split()) for u in units)


@dataclass
class Screen:
    """Screens one run's admitted rows (see the module docstring): ``screen(store, entity, rows, skips,
    source)`` returns the rows kept and appends a skip per row rejected."""

    run_id: str
    dedup: DedupSpec | None
    decon: DecontamSpec | None
    heldout: Heldout | None
    bands: tuple[int, int] | None

    def __call__(self, store, entity: str, rows: list[dict], skips: list, source: str) -> list[dict]:
        from .sources import Skip

        if not rows:
            return rows
        units: dict[str, list[list[str]]] = {}  # on -> per row, its texts
        words: dict[str, tuple] = {}  # on -> (words, row of each word, unit of each word, word hashes)

        def texts(on: str) -> list[list[str]]:
            if on not in units:
                units[on] = [_units(entity, r, on) for r in rows]
            return units[on]

        def tokens(on: str) -> tuple:
            if on not in words:
                words[on] = self._words(texts(on))
            return words[on]

        bad: dict[int, str] = {}  # index in rows -> reason
        if self.heldout is not None:
            bad.update(self._contaminated(tokens(self.decon.on)))
        if self.dedup is not None:
            for i, reason in self._duplicates(store, rows, bad, texts, tokens).items():
                bad.setdefault(i, reason)
        for i, reason in sorted(bad.items()):
            skips.append(Skip(rows[i]["source_row"], f"row {rows[i]['source_row']}: {reason}", source))
        units.clear()
        words.clear()
        give_back(collect=False)  # the chunk's arrays, freed, would otherwise stay in the heap (< 1 ms)
        return [r for i, r in enumerate(rows) if i not in bad]

    @staticmethod
    def _words(texts: list[list[str]]) -> tuple:
        """The rows' words as hashes: (word count, row of each word, unit (one text of a row) of each
        word, word hashes). Hashed text by text (each distinct word once per chunk), so the chunk's
        words never exist as one list of strings."""
        import numpy as np

        cache: dict[str, int] = {}
        parts: list[np.ndarray] = []
        counts: list[int] = []
        for row in texts:
            for text in row:
                ws = WORD.findall(text.lower())
                parts.append(word_hashes(ws, cache))
                counts.append(len(ws))
        w = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        unit_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        unit_row = np.repeat(np.arange(len(texts), dtype=np.int64), [len(row) for row in texts])
        row_of = unit_row[unit_of] if len(unit_of) else np.empty(0, np.int64)
        return len(w), row_of, unit_of, w

    def _contaminated(self, tok: tuple) -> dict[int, str]:
        n_words, row_of, unit_of, w = tok
        if not n_words:
            return {}
        out: dict[int, str] = {}
        for start, k, s, line in sorted(self.heldout.find(w, unit_of)):
            i = int(row_of[start])
            if i not in out:  # where to look, not the words (reasons are grouped with their numbers as N)
                out[i] = f"contaminated: {k}-gram overlap with held-out {Path(self.heldout.names[s]).name} line {line}"
        return out

    def _duplicates(self, store, rows: list[dict], bad: dict[int, str], texts, tokens) -> dict[int, str]:
        import numpy as np
        import pyarrow as pa

        spec, n = self.dedup, len(rows)
        idx: list[np.ndarray] = []
        band: list[np.ndarray] = []
        hashes: list[np.ndarray] = []
        if spec.exact:
            idx.append(np.arange(n, dtype=np.int64))
            band.append(np.full(n, EXACT_BAND, np.int16))
            hashes.append(np.array([h64(normalised(t)) for t in texts(spec.on)], np.int64))
        if self.bands is not None:
            n_words, row_of, _, w = tokens(spec.on)
            if n_words:
                b, r = self.bands
                sh, start = grams(w, row_of, spec.shingle)  # shingles within a row (across its texts)
                bh = band_hashes(minhash(sh, row_of[start], n, spec.num_perm), b, r)
                ok = np.nonzero(np.bincount(row_of[start], minlength=n) > 0)[0]  # rows with a shingle
                idx.append(np.repeat(ok, b))
                band.append(np.tile(np.arange(b, dtype=np.int16), len(ok)))
                hashes.append(bh[ok].reshape(-1))
        if not idx:
            return {}
        src = np.array([r["source_row"] for r in rows], np.int64)
        i_all, band_all, h_all = np.concatenate(idx), np.concatenate(band), np.concatenate(hashes)
        probe = pa.table({"i": i_all, "band": band_all, "h": h_all, "source_row": src[i_all]})
        store.con.register("_dedup_probe", probe)
        try:
            seen = store.con.execute("""SELECT p.i, p.band, min(d.source_row) FROM _dedup_probe p JOIN dedup_index d
                                        ON d.run_id = ? AND d.band = p.band AND d.h = p.h GROUP BY 1, 2""",
                                     [self.run_id]).fetchall()
        finally:
            store.con.unregister("_dedup_probe")
        earlier: dict[tuple[int, int], int] = {(i, b): s for i, b, s in seen}
        by_row: dict[int, list[tuple[int, int]]] = {}
        for i, b, h in zip(i_all.tolist(), band_all.tolist(), h_all.tolist()):
            by_row.setdefault(i, []).append((b, h))
        out: dict[int, str] = {}
        first: dict[tuple[int, int], int] = {}  # (band, hash) -> first source_row kept in this chunk
        for i in sorted(by_row):  # in input order: a row is compared with the earlier rows and those kept before it
            me = rows[i]["source_row"]
            for b, h in by_row[i]:
                prev = earlier.get((i, b))
                if prev == me:  # this very row, indexed by an earlier try of this chunk (a restart)
                    prev = None
                if prev is None:
                    prev = first.get((b, h))
                if prev is not None and prev != me:
                    out[i] = (f"duplicate of row {prev} (normalised text)" if b == EXACT_BAND else
                              f"near-duplicate of row {prev} (MinHash, Jaccard ≳ {fmt_t(spec.near)})")
                    break
            if i not in out and i not in bad:
                for b, h in by_row[i]:
                    first.setdefault((b, h), me)
        keep = [(b, h, rows[i]["source_row"]) for i in sorted(by_row) if i not in out and i not in bad
                for b, h in by_row[i] if (i, b) not in earlier]
        if keep:  # index the rows kept (once: a restarted chunk's rows are found as themselves)
            store.insert("dedup_index", pa.table({
                "run_id": [self.run_id] * len(keep), "band": pa.array([k[0] for k in keep], pa.int16()),
                "h": pa.array([k[1] for k in keep], pa.int64()), "source_row": pa.array([k[2] for k in keep], pa.int64())}))
        return out


def fmt_t(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def screen_for(store, run_id: str) -> Callable | None:
    """The run's screen (from the ``dedup``/``decontaminate`` sections of its recorded config), or None."""
    row = store.one("SELECT config_json FROM runs WHERE run_id = ?", [run_id])
    config = json.loads(row[0]) if row and row[0] else {}
    d, c = config.get("dedup"), config.get("decontaminate")
    if not d and not c:
        return None
    dedup = DedupSpec.model_validate(d) if d else None
    decon = DecontamSpec.model_validate(c) if c else None
    heldout = Heldout.build(decon, Path(__file__).resolve().parents[1] / "data" / "evals") if decon else None
    bands = lsh_params(dedup.near, dedup.num_perm) if dedup and dedup.near else None
    store.hold_outside("screen", SCREEN_MB)
    return Screen(run_id, dedup, decon, heldout, bands)


__all__ = ["DecontamSpec", "DedupSpec", "Heldout", "Screen", "lsh_params", "minhash", "screen_for"]
