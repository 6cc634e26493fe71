"""Which content keys the store may hold, in fixed memory (the batcher's probe filter)."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np


class KeyFilter:
    """A blocked Bloom filter over content keys (hex sha256 prefixes, uniformly distributed: their own
    digits are the hash functions): a key's three bits lie in one 512-bit block (one cache line), so
    a look-up or an insert touches one line of the table instead of three (the table is larger than
    the CPU's caches: each line touched is a miss). ``bits`` = 2^26 (8 MiB): false positives, which
    cost only a probe, stay near 1e-4 at a million keys and ~5% at ten million."""

    BLOCK = 512  # bits: one 64-byte cache line

    def __init__(self, bits: int = 1 << 26):
        self.blocks = max(1, bits // self.BLOCK) - 1  # a mask: bits is a power of two
        self.bits = bytearray(max(bits, self.BLOCK) >> 3)
        self.n = 0

    def _slots(self, key: str) -> tuple[int, int, int]:
        """The key's three bit positions, all in its block."""
        try:  # one parse of the 24 hex digits (96 bits), or of what there is of them
            x = int(key[:24], 16) if len(key) >= 24 else int(key, 16)
        except ValueError:  # not a hex content key (an id a pairs file gave): hash it first
            x = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=12).digest(), "little")
        base = ((x >> 64) & self.blocks) << 9
        return base | ((x >> 32) & 511), base | ((x >> 41) & 511), base | (x & 511)

    def _slots_many(self, keys: Sequence[str]) -> np.ndarray | None:
        """The three bit positions of each key, as an (n, 3) array (:meth:`_slots`, vectorized: one
        hex parse for the whole batch); None when a key is not 24+ hex digits (the caller goes key by key)."""
        try:
            raw = bytes.fromhex("".join([k[:24] for k in keys]))
        except ValueError:
            return None
        if len(raw) != 12 * len(keys):
            return None
        w = np.frombuffer(raw, dtype=">u4").reshape(-1, 3).astype(np.int64)  # bits 95-64, 63-32, 31-0 of the key
        base = (w[:, 0] & self.blocks) << 9
        return np.stack([base | (w[:, 1] & 511), base | ((w[:, 1] >> 9) & 511), base | (w[:, 2] & 511)], axis=1)

    def add_many(self, keys: Sequence[str]) -> None:
        """:meth:`add` for a batch of keys (a transaction's, a load's): one numpy pass instead of a Python
        loop (the judge service adds every key it commits)."""
        slots = self._slots_many(keys) if len(keys) >= 8 else None  # a few keys: the loop is cheaper
        if slots is None:
            for k in keys:
                self.add(k)
            return
        i = slots.ravel()
        np.bitwise_or.at(np.frombuffer(self.bits, dtype=np.uint8), i >> 3, (1 << (i & 7)).astype(np.uint8))
        self.n += len(keys)

    def maybe_many(self, keys: Sequence[str]) -> list[bool]:
        """:meth:`maybe` for a batch of keys."""
        slots = self._slots_many(keys) if len(keys) >= 8 else None
        if slots is None:
            return [self.maybe(k) for k in keys]
        bits = np.frombuffer(self.bits, dtype=np.uint8)
        hit = np.ones(len(keys), dtype=bool)
        for c in range(3):
            i = slots[:, c]
            hit &= ((bits[i >> 3] >> (i & 7)) & 1).astype(bool)
        return hit.tolist()

    def add(self, key: str) -> None:
        bits = self.bits
        for i in self._slots(key):
            bits[i >> 3] |= 1 << (i & 7)
        self.n += 1

    def maybe(self, key: str) -> bool:
        bits = self.bits
        i, j, k = self._slots(key)
        return bool(bits[i >> 3] & (1 << (i & 7)) and bits[j >> 3] & (1 << (j & 7)) and bits[k >> 3] & (1 << (k & 7)))

    def load(self, store: Any, model: str, sampling_hash: str) -> None:
        """Every stored judgement key of this judge (other runs' and earlier lives of the service)."""
        self.load_sql(store, "SELECT id FROM judgements WHERE model IS NOT DISTINCT FROM ? AND sampling_hash IS "
                      "NOT DISTINCT FROM ?", [model, sampling_hash])

    def load_sql(self, store: Any, sql: str, params: list) -> None:
        """Every key the query's one column gives."""
        cur = store.con.execute(sql, params)
        while batch := cur.fetchmany(65536):
            self.add_many([key for (key,) in batch])
