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

import gzip
import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # numpy is imported by the functions that hash (config loading stays light)
    import numpy as np

WORD = re.compile(r"\w+")
MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier for polynomial (rolling) hashes
EXACT_BAND = -1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DedupSpec(Strict):
    """``dedup:`` in a pipeline: which duplicates of earlier rows of the same run to skip."""

    exact: bool = Field(True, description="skip rows whose normalised text (lower case, words only) an earlier row has")
    near: float | None = Field(None, gt=0, lt=1, description="skip near-duplicates: MinHash Jaccard threshold, e.g. 0.8")
    num_perm: int = Field(64, ge=8, le=512, description="MinHash permutations (more: a sharper threshold, slower)")
    shingle: int = Field(3, ge=1, le=10, description="words per MinHash shingle")
    on: Literal["all", "prompt"] = Field("prompt", description="prompt: the prompt/conversation (the default: a "
                                         "prompt is labelled once); all: also both responses (a pair is a duplicate "
                                         "only when its responses are too)")


class DecontamSpec(Strict):
    """``decontaminate:`` in a pipeline: held-out texts no input row may overlap."""

    against: list[str] = Field(min_length=1, description="held-out files or folders (JSONL, .gz, text), or `evals` "
                               "for data/evals/")
    ngram: int = Field(13, ge=3, le=50, description="words per n-gram (13: GPT-3, Tulu 3)")
    min_words: int = Field(8, ge=3, description="held-out texts shorter than ngram but at least this long are "
                           "matched whole; shorter ones are not checked")
    on: Literal["all", "prompt"] = Field("prompt", description="prompt: the prompt/conversation (the default, as "
                                         "Tulu 3 checks prompts); all: also both responses")


# ------------------------------------------------------------------------------------ hashing


def _word_hashes(words: list[str]) -> np.ndarray:
    """crc32 of each word (stable across processes), each distinct word hashed once."""
    import numpy as np

    table = {w: zlib.crc32(w.encode()) for w in set(words)}
    return np.fromiter(map(table.__getitem__, words), dtype=np.uint64, count=len(words))


def _grams(w: np.ndarray, unit: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial hashes of every run of ``n`` words that lies within one unit; returns (hashes, start index)."""
    import numpy as np

    m = len(w) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            acc = acc * np.uint64(MULT) + w[i:i + m] + np.uint64(1)
    ok = unit[:m] == unit[n - 1:n - 1 + m]
    return acc[ok], np.nonzero(ok)[0]


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising the false-positive and false-negative areas of the LSH S-curve
    around ``threshold`` (equal weights), as datasketch's MinHashLSH chooses them."""
    import numpy as np

    xs = np.linspace(0, 1, 201)
    best, best_err = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - xs ** r) ** b
            fp = np.trapezoid(np.where(xs < threshold, p, 0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1 - p, 0), xs)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@lru_cache(maxsize=8)
def _perms(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def minhash(shingles: np.ndarray, row_of: np.ndarray, n_rows: int, num_perm: int, batch: int = 8192) -> np.ndarray:
    """(n_rows × num_perm) MinHash signatures: for each permutation ``h·a + b`` (mod 2^64), the minimum
    over a row's shingles (``row_of`` ascending; rows without shingles keep all-max signatures)."""
    import numpy as np

    a, b = _perms(num_perm)
    sig = np.full((num_perm, n_rows), np.iinfo(np.uint64).max, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, len(shingles), batch):  # bounded temporaries (num_perm × batch), rows contiguous
            h = a[:, None] * shingles[None, s:s + batch]
            h += b[:, None]
            rows = row_of[s:s + batch]
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            ids = rows[starts]
            sig[:, ids] = np.minimum(sig[:, ids], np.minimum.reduceat(h, starts, axis=1))
    return np.ascontiguousarray(sig.T)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_rows × bands) int64 hashes of each band of ``rows`` signature values."""
    import numpy as np

    n = sig.shape[0]
    acc = np.zeros((n, bands), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            acc = acc * np.uint64(MULT) + sig[:, j:bands * rows:rows]
    return acc.view(np.int64)


# ------------------------------------------------------------------------------- held-out sets


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() if k not in ("id", "meta", "tags") for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def _files(spec: str, repo_evals: Path) -> list[Path]:
    p = repo_evals if spec == "evals" else Path(spec)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and re.search(r"\.(jsonl|json|txt)(\.gz)?$", f.name))
    if not p.exists():
        from .store import StoreError

        raise StoreError(f"decontaminate.against: {spec}: no such file or folder (relative paths start at {Path.cwd()})")
    return [p]


def read_heldout(path: Path) -> list[tuple[int, str]]:
    """Every text of a held-out file with its line number: the string values of each JSON record, or
    each line of a text file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    out: list[tuple[int, str]] = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if ".json" in path.name:
                try:
                    out += [(n, t) for t in _texts(json.loads(line))]
                except json.JSONDecodeError:
                    out.append((n, line))
            else:
                out.append((n, line))
    return out


BITS = 25  # the held-out prefilter: a bitmap of 2^25 bits (4 MiB) indexed by a hash's low bits


@dataclass
class Heldout:
    """The held-out sets as sorted hash arrays: every ``ngram``-word n-gram of the long texts, and the
    first ``min_words`` words of the shorter texts (with the whole text's length and hash, checked on
    a match); a bitmap over both lets a row's n-grams be tested with one lookup each."""

    ngram: int
    min_words: int
    long: tuple = ()  # (sorted hashes, set index, line)
    short: tuple = ()  # (sorted prefix hashes, set index, line, length, whole-text hash)
    names: list[str] = field(default_factory=list)
    too_short: int = 0
    texts: int = 0
    bitmap: Any = None

    @classmethod
    def build(cls, spec: DecontamSpec, repo_evals: Path) -> "Heldout":
        import numpy as np

        h = cls(spec.ngram, min(spec.min_words, spec.ngram))
        longs: list[tuple] = []
        shorts: list[tuple] = []
        for name in spec.against:
            for path in _files(name, repo_evals):
                h.names.append(str(path))
                idx = len(h.names) - 1
                for line, text in read_heldout(path):
                    words = WORD.findall(text.lower())
                    h.texts += 1
                    if len(words) < h.min_words:
                        h.too_short += 1
                        continue
                    w = _word_hashes(words)
                    zero = np.zeros(len(w), np.int64)
                    if len(words) >= spec.ngram:
                        g, _ = _grams(w, zero, spec.ngram)
                        longs.append((g, idx, line))
                    else:
                        prefix, _ = _grams(w[:h.min_words], zero[:h.min_words], h.min_words)
                        whole, _ = _grams(w, zero, len(w))
                        shorts.append((int(prefix[0]), idx, line, len(w), int(whole[0])))
        if longs:
            hashes = np.concatenate([g for g, _, _ in longs])
            order = np.argsort(hashes, kind="stable")
            h.long = (hashes[order], np.concatenate([np.full(len(g), i, np.int32) for g, i, _ in longs])[order],
                      np.concatenate([np.full(len(g), n, np.int32) for g, _, n in longs])[order])
        if shorts:
            shorts.sort()
            cols = list(zip(*shorts))
            h.short = (np.array(cols[0], np.uint64), np.array(cols[1], np.int64), np.array(cols[2], np.int64),
                       np.array(cols[3], np.int64), np.array(cols[4], np.uint64))
        h.bitmap = np.zeros(1 << (BITS - 3), np.uint8)
        for arr in (h.long[:1] + h.short[:1]):
            low = (arr & np.uint64((1 << BITS) - 1)).astype(np.int64)
            np.bitwise_or.at(h.bitmap, low >> 3, (1 << (low & 7)).astype(np.uint8))
        return h

    def _maybe(self, g: np.ndarray) -> np.ndarray:
        import numpy as np

        low = (g & np.uint64((1 << BITS) - 1)).astype(np.int64)
        return np.nonzero(self.bitmap[low >> 3] & (1 << (low & 7)).astype(np.uint8))[0]

    def find(self, w: np.ndarray, unit: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(word start, length, set index, line) of held-out texts found in the words ``w`` (``unit``: the
        text each word belongs to; a match never spans two texts)."""
        import numpy as np

        hits = []
        if self.long:
            hashes, sets, lines = self.long
            g, start = _grams(w, unit, self.ngram)
            cand = self._maybe(g)
            pos = np.searchsorted(hashes, g[cand]).clip(0, len(hashes) - 1)
            for c, p in zip(cand[hashes[pos] == g[cand]], pos[hashes[pos] == g[cand]]):
                hits.append((int(start[c]), self.ngram, int(sets[p]), int(lines[p])))
        if self.short:
            prefixes, sets, lines, lengths, wholes = self.short
            g, start = _grams(w, unit, self.min_words)
            cand = self._maybe(g)
            for c in cand:
                lo = np.searchsorted(prefixes, g[c])
                while lo < len(prefixes) and prefixes[lo] == g[c]:  # verify the whole short text
                    s0, n = int(start[c]), int(lengths[lo])
                    if s0 + n <= len(w) and unit[s0] == unit[s0 + n - 1]:
                        whole, _ = _grams(w[s0:s0 + n], unit[s0:s0 + n], n)
                        if len(whole) and int(whole[0]) == int(wholes[lo]):
                            hits.append((s0, n, int(sets[lo]), int(lines[lo])))
                    lo += 1
        return hits


# ------------------------------------------------------------------------------------ screening


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
        return [r for i, r in enumerate(rows) if i not in bad]

    @staticmethod
    def _words(texts: list[list[str]]) -> tuple:
        """All words of the rows' texts; per word its row and its unit (one text of a row); word hashes."""
        import numpy as np

        words: list[str] = []
        counts: list[int] = []
        for row in texts:
            for text in row:
                ws = WORD.findall(text.lower())
                words += ws
                counts.append(len(ws))
        unit_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        unit_row = np.repeat(np.arange(len(texts), dtype=np.int64), [len(row) for row in texts])
        row_of = unit_row[unit_of] if len(unit_of) else np.empty(0, np.int64)
        return words, row_of, unit_of, _word_hashes(words)

    def _contaminated(self, tok: tuple) -> dict[int, str]:
        words, row_of, unit_of, w = tok
        if not words:
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
            hashes.append(np.array([_h64(normalised(t)) for t in texts(spec.on)], np.int64))
        if self.bands is not None:
            words, row_of, _, w = tokens(spec.on)
            if words:
                b, r = self.bands
                sh, start = _grams(w, row_of, spec.shingle)  # shingles within a row (across its texts)
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
    return Screen(run_id, dedup, decon, heldout, bands)


__all__ = ["DecontamSpec", "DedupSpec", "Heldout", "Screen", "lsh_params", "minhash", "screen_for"]
