"""Decontamination: the held-out texts (human sets, eval suites, any file) as n-gram hashes that an
input row may not share (see :mod:`factory.dedup` for how a run uses them)."""

from __future__ import annotations

import functools

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .ngrams import WORD, grams, word_hashes

if TYPE_CHECKING:
    import numpy as np


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")



class DecontamSpec(Strict):
    """``decontaminate:`` in a pipeline: held-out texts no input row may overlap."""

    against: list[str] = Field(min_length=1, description="held-out files or folders (JSONL, .gz, text), or `evals` "
                               "for data/evals/")
    ngram: int = Field(13, ge=3, le=50, description="words per n-gram (13: GPT-3, Tulu 3)")
    min_words: int = Field(8, ge=3, description="held-out texts shorter than ngram but at least this long are "
                           "matched whole; shorter ones are not checked")
    on: Literal["all", "prompt"] = Field("prompt", description="prompt: the prompt/conversation (the default, as "
                                         "Tulu 3 checks prompts); all: also both responses")


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


def read_heldout(path: Path) -> Iterator[tuple[int, str]]:
    """Every text of a held-out file with its line number, one at a time: the string values of each
    JSON record, or each line of a text file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if ".json" in path.name:
                try:
                    texts = _texts(json.loads(line))
                except json.JSONDecodeError:
                    texts = [line]
                yield from ((n, t) for t in texts)
            else:
                yield n, line


BITS = 23  # the held-out prefilter: a bitmap of 2^23 bits (1 MiB) indexed by a hash's low bits (a few % false
# positives for a million distinct n-grams, each then ruled out by the sorted array)


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
                    w = word_hashes(words)
                    zero = np.zeros(len(w), np.int64)
                    if len(words) >= spec.ngram:
                        g, _ = grams(w, zero, spec.ngram)
                        longs.append((g, idx, line))
                    else:
                        prefix, _ = grams(w[:h.min_words], zero[:h.min_words], h.min_words)
                        whole, _ = grams(w, zero, len(w))
                        shorts.append((int(prefix[0]), idx, line, len(w), int(whole[0])))
        if longs:
            hashes = np.concatenate([g for g, _, _ in longs])
            sets = np.concatenate([np.full(len(g), i, np.int32) for g, i, _ in longs])
            lines = np.concatenate([np.full(len(g), n, np.int32) for g, _, n in longs])
            del longs
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]
            # one entry per distinct n-gram (a held-out set repeats them: hh-rlhf's chosen and rejected share
            # the conversation), the first text that has it (the stable sort keeps file/line order)
            first = np.ones(len(hashes), bool)
            first[1:] = hashes[1:] != hashes[:-1]
            keep = order[first]
            h.long = (hashes[first], sets[keep], lines[keep])
            del hashes, sets, lines, order, first, keep
        if shorts:
            shorts.sort()
            cols = list(zip(*shorts))
            h.short = (np.array(cols[0], np.uint64), np.array(cols[1], np.int64), np.array(cols[2], np.int64),
                       np.array(cols[3], np.int64), np.array(cols[4], np.uint64))
        h.bitmap = np.zeros(1 << (BITS - 3), np.uint8)
        for arr in (h.long[:1] + h.short[:1]):
            low = (arr & np.uint64((1 << BITS) - 1)).astype(np.int64)
            np.bitwise_or.at(h.bitmap, low >> 3, (1 << (low & 7)).astype(np.uint8))
        give_back()
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
            g, start = grams(w, unit, self.ngram)
            cand = self._maybe(g)
            pos = np.searchsorted(hashes, g[cand]).clip(0, len(hashes) - 1)
            for c, p in zip(cand[hashes[pos] == g[cand]], pos[hashes[pos] == g[cand]]):
                hits.append((int(start[c]), self.ngram, int(sets[p]), int(lines[p])))
        if self.short:
            prefixes, sets, lines, lengths, wholes = self.short
            g, start = grams(w, unit, self.min_words)
            cand = self._maybe(g)
            for c in cand:
                lo = np.searchsorted(prefixes, g[c])
                while lo < len(prefixes) and prefixes[lo] == g[c]:  # verify the whole short text
                    s0, n = int(start[c]), int(lengths[lo])
                    if s0 + n <= len(w) and unit[s0] == unit[s0 + n - 1]:
                        whole, _ = grams(w[s0:s0 + n], unit[s0:s0 + n], n)
                        if len(whole) and int(whole[0]) == int(wholes[lo]):
                            hits.append((s0, n, int(sets[lo]), int(lines[lo])))
                    lo += 1
        return hits


def give_back(collect: bool = True) -> None:
    """Hand freed memory back to the OS (glibc keeps freed blocks in its heap otherwise, and they would
    add to the run's peak for its whole length); a no-op where there is no glibc. ``collect``: run
    Python's garbage collector first (after a build; not per chunk)."""
    import gc

    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (it is called per screened chunk), or None without glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
