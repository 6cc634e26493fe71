"""Word n-grams and MinHash, vectorised with numpy: the hashing under :mod:`factory.dedup` and
:mod:`factory.decontam`.

Words are runs of ``\\w`` characters of the lower-cased text, each hashed with crc32 (stable across
processes: the hashes of a run's rows are stored and compared after a restart); an n-gram's hash is a
polynomial over its words' hashes (mod 2^64), computed for every position at once.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported by the functions that hash (config loading stays light)
    import numpy as np

WORD = re.compile(r"\w+")
MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier for polynomial (rolling) hashes


def word_hashes(words: list[str], cache: dict[str, int] | None = None) -> np.ndarray:
    """crc32 of each word (stable across processes), each distinct word hashed once (once per ``cache``
    when one is passed: a chunk hashed text by text)."""
    import numpy as np

    table = {} if cache is None else cache
    for w in set(words).difference(table):
        table[w] = zlib.crc32(w.encode())
    return np.fromiter(map(table.__getitem__, words), dtype=np.uint64, count=len(words))


def grams(w: np.ndarray, unit: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
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


def h64(text: str) -> int:
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
