"""Deduplication and decontamination of a run's input rows, as they are admitted (run options).

A pipeline may say::

    dedup: {exact: true, near: 0.8}                     # normalised-text and MinHash near-duplicates
    decontaminate: {against: [evals, ../shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz], ngram: 13}

Each admitted chunk of prompts or pairs goes through :func:`screen` before it is stored
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
run; each chunk probes it with one join. What the row's text is: ``on: all`` (default) is the
prompt or conversation plus, for pairs, both responses; ``on: prompt`` is the prompt/conversation only
(so two pairs of different responses to one prompt are duplicates).
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
    on: Literal["all", "prompt"] = Field("all", description="all: prompt and responses; prompt: the prompt only")


class DecontamSpec(Strict):
    """``decontaminate:`` in a pipeline: held-out texts no input row may overlap."""

    against: list[str] = Field(min_length=1, description="held-out files or folders (JSONL, .gz, text), or `evals` "
                               "for data/evals/")
    ngram: int = Field(13, ge=3, le=50, description="words per n-gram (13: GPT-3, Tulu 3)")
    min_words: int = Field(8, ge=3, description="held-out texts shorter than ngram but at least this long are "
                           "matched whole; shorter ones are not checked")
    on: Literal["all", "prompt"] = Field("all", description="all: prompt and responses; prompt: the prompt only")


# ------------------------------------------------------------------------------------ hashing


def _word_hashes(words: list[str]) -> np.ndarray:
    import numpy as np

    return np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))


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


def minhash(shingles: np.ndarray, row_of: np.ndarray, n_rows: int, num_perm: int, batch: int = 4096) -> np.ndarray:
    """(n_rows × num_perm) MinHash signatures: for each permutation ``h·a + b`` (mod 2^64), the minimum
    over a row's shingles (``row_of`` ascending; rows without shingles keep all-max signatures)."""
    import numpy as np

    a, b = _perms(num_perm)
    sig = np.full((n_rows, num_perm), np.iinfo(np.uint64).max, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, len(shingles), batch):  # bounded temporaries (batch × num_perm)
            h = shingles[s:s + batch, None] * a + b
            rows = row_of[s:s + batch]
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            ids = rows[starts]
            sig[ids] = np.minimum(sig[ids], np.minimum.reduceat(h, starts, axis=0))
    return sig


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


@dataclass
class Heldout:
    """The n-grams of the held-out sets: per length k (``ngram``, or shorter whole texts), a sorted hash
    array and the set each hash came from; plus how many texts were too short to check."""

    ngram: int
    grams: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # k -> (sorted hashes, set, line)
    names: list[str] = field(default_factory=list)
    too_short: int = 0
    texts: int = 0

    @classmethod
    def build(cls, spec: DecontamSpec, repo_evals: Path) -> "Heldout":
        import numpy as np

        h = cls(spec.ngram)
        per_k: dict[int, list[tuple[np.ndarray, int, int]]] = {}
        for name in spec.against:
            for path in _files(name, repo_evals):
                h.names.append(str(path))
                idx = len(h.names) - 1
                for line, text in read_heldout(path):
                    words = WORD.findall(text.lower())
                    h.texts += 1
                    if len(words) < spec.min_words:
                        h.too_short += 1
                        continue
                    k = min(len(words), spec.ngram)
                    w = _word_hashes(words)
                    g, _ = _grams(w, np.zeros(len(w), np.int64), k)
                    per_k.setdefault(k, []).append((g, idx, line))
        for k, parts in per_k.items():
            hashes = np.concatenate([g for g, _, _ in parts])
            sets = np.concatenate([np.full(len(g), i, np.int32) for g, i, _ in parts])
            lines = np.concatenate([np.full(len(g), n, np.int32) for g, _, n in parts])
            order = np.argsort(hashes, kind="stable")
            h.grams[k] = (hashes[order], sets[order], lines[order])
        return h

    def find(self, w: np.ndarray, unit: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(word start, length k, set index, line) of held-out n-grams found in the words ``w``."""
        import numpy as np

        hits = []
        for k, (hashes, sets, lines) in self.grams.items():
            g, start = _grams(w, unit, k)
            if not len(g):
                continue
            pos = np.searchsorted(hashes, g)
            pos[pos >= len(hashes)] = 0
            found = hashes[pos] == g
            hits += [(int(start[i]), k, int(sets[pos[i]]), int(lines[pos[i]])) for i in np.nonzero(found)[0]]
        return hits


# ------------------------------------------------------------------------------------ screening


def _units(entity: str, row: dict, on: str) -> list[str]:
    """The texts of an admitted row: its prompt/conversation turns and, for pairs with ``on: all``, responses."""
    if entity == "prompts":
        return [m.get("content") or "" for m in json.loads(row["messages"])]
    conv = json.loads(row["conversation"]) if row.get("conversation") else []
    units = [m.get("content") or "" for m in conv]
    return units + ([row.get("response_a") or "", row.get("response_b") or ""] if on == "all" else [])


@dataclass
class Screen:
    """Screens one run's admitted rows (see the module docstring). Call with (entity, rows, skips, source)."""

    run_id: str
    dedup: DedupSpec | None
    decon: DecontamSpec | None
    heldout: Heldout | None
    bands: tuple[int, int] | None

    def __call__(self, store, entity: str, rows: list[dict], skips: list, source: str) -> list[dict]:
        from .sources import Skip

        if not rows:
            return rows
        bad: dict[int, str] = {}  # index in rows -> reason
        if self.heldout is not None:
            for i, reason in self._contaminated(entity, rows).items():
                bad[i] = reason
        if self.dedup is not None:
            for i, reason in self._duplicates(store, entity, rows, bad).items():
                bad.setdefault(i, reason)
        for i, reason in sorted(bad.items()):
            skips.append(Skip(rows[i]["source_row"], f"row {rows[i]['source_row']}: {reason}", source))
        return [r for i, r in enumerate(rows) if i not in bad]

    def _words(self, entity: str, rows: list[dict], on: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All words of the rows' texts, and per word its row and its unit (a text of a row)."""
        import numpy as np

        words: list[str] = []
        row_of: list[int] = []
        unit_of: list[int] = []
        u = 0
        for i, r in enumerate(rows):
            for text in _units(entity, r, on):
                ws = WORD.findall(text.lower())
                words += ws
                row_of += [i] * len(ws)
                unit_of += [u] * len(ws)
                u += 1
        return words, np.asarray(row_of, np.int64), np.asarray(unit_of, np.int64)

    def _contaminated(self, entity: str, rows: list[dict]) -> dict[int, str]:
        words, row_of, unit_of = self._words(entity, rows, self.decon.on)
        if not words:
            return {}
        out: dict[int, str] = {}
        for start, k, s, line in sorted(self.heldout.find(_word_hashes(words), unit_of)):
            i = int(row_of[start])
            if i not in out:  # where to look, not the words (reasons are grouped with their numbers as N)
                out[i] = f"contaminated: {k}-gram overlap with held-out {Path(self.heldout.names[s]).name} line {line}"
        return out

    def _duplicates(self, store, entity: str, rows: list[dict], bad: dict[int, str]) -> dict[int, str]:
        import numpy as np
        import pyarrow as pa

        spec = self.dedup
        words, row_of, unit_of = self._words(entity, rows, spec.on)
        n = len(rows)
        keys: list[tuple[int, int, int]] = []  # (row index, band, hash)
        if spec.exact:
            per_row: list[list[str]] = [[] for _ in range(n)]
            for w, r in zip(words, row_of.tolist()):
                per_row[r].append(w)
            keys += [(i, EXACT_BAND, _h64(" ".join(ws))) for i, ws in enumerate(per_row)]
        if self.bands is not None and words:
            b, r = self.bands
            w = _word_hashes(words)
            k = spec.shingle
            sh, start = _grams(w, row_of, k)  # shingles within a row (across its texts)
            sig = minhash(sh, row_of[start], n, spec.num_perm)
            short = np.bincount(row_of, minlength=n) < k  # rows too short for one shingle: exact covers them
            bh = band_hashes(sig, b, r)
            keys += [(i, j, int(bh[i, j])) for i in range(n) if not short[i] for j in range(b)]
        if not keys:
            return {}
        src = [rows[i]["source_row"] for i, _, _ in keys]
        probe = pa.table({"i": [i for i, _, _ in keys], "band": pa.array([b for _, b, _ in keys], pa.int16()),
                          "h": pa.array([h for _, _, h in keys], pa.int64()), "source_row": src})
        store.con.register("_dedup_probe", probe)
        try:
            seen = store.con.execute("""SELECT p.i, p.band, min(d.source_row) FROM _dedup_probe p JOIN dedup_index d
                                        ON d.run_id = ? AND d.band = p.band AND d.h = p.h GROUP BY 1, 2""",
                                     [self.run_id]).fetchall()
        finally:
            store.con.unregister("_dedup_probe")
        earlier: dict[tuple[int, int], int] = {(i, b): s for i, b, s in seen}
        out: dict[int, str] = {}
        first: dict[tuple[int, int], int] = {}  # (band, hash) -> first source_row kept in this chunk
        by_row: dict[int, list[tuple[int, int]]] = {}
        for i, band, h in keys:
            by_row.setdefault(i, []).append((band, h))
        for i in sorted(by_row):  # in input order: a row is compared with the earlier rows and those kept before it
            me = rows[i]["source_row"]
            for band, h in by_row[i]:
                prev = earlier.get((i, band))
                if prev == me:  # this very row, indexed by an earlier try of this chunk (a restart)
                    prev = None
                if prev is None:
                    prev = first.get((band, h))
                if prev is not None and prev != me:
                    out[i] = (f"duplicate of row {prev} (normalised text)" if band == EXACT_BAND else
                              f"near-duplicate of row {prev} (MinHash, Jaccard ≳ {fmt_t(spec.near)})")
                    break
            if i not in out and i not in bad:
                for band, h in by_row[i]:
                    first.setdefault((band, h), me)
        keep = [(band, h, rows[i]["source_row"]) for i, band, h in keys
                if i not in out and i not in bad and (i, band) not in earlier]
        if keep:
            store.insert("dedup_index", pa.table({
                "run_id": [self.run_id] * len(keep), "band": pa.array([k[0] for k in keep], pa.int16()),
                "h": pa.array([k[1] for k in keep], pa.int64()), "source_row": [k[2] for k in keep]}))
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
