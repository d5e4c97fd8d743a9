"""The in-process LRU every cache uses as its L1: bounded by entries and by bytes, each entry expiring on its own.

Event-loop only (no locking). Expired entries count as absent and are dropped when next touched or evicted.

    l1 = LruCache[bytes](max_entries=2048, ttl=600)                          # entries bound
    l1 = LruCache[Vector](max_bytes=64 << 20, ttl=3600, size_of=nbytes)      # bytes bound
    l1.put(key, value)
    l1.put(key, value, ttl=remaining)                                        # expire with a copy's source
    l1.get(key)                                                              # None if absent or expired
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    def __init__(self, *, ttl: float, max_entries: int | None = None, max_bytes: int | None = None,
                 size_of: Callable[[V], int] | None = None) -> None:
        """``max_entries`` / ``max_bytes``: None means unbounded on that axis, 0 keeps nothing. ``size_of`` gives an
        entry's bytes (required with ``max_bytes``)."""
        if max_bytes is not None and size_of is None:
            raise ValueError("max_bytes needs size_of")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size_of = size_of or (lambda _: 0)
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()  # key -> (monotonic expiry, value)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        """The value if present and unexpired, which also makes it the most recently used."""
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if expires <= time.monotonic():
            self.pop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V, *, ttl: float | None = None) -> None:
        """Store (or replace) the value for ``ttl`` seconds (default: the cache's), evicting the least recently used
        entries past either bound. A value that could never fit is not stored."""
        size = self._size_of(value)
        if self.max_entries == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        self.pop(key)
        self._entries[key] = (time.monotonic() + (self.ttl if ttl is None else ttl), value)
        self.bytes += size
        while (self.max_entries is not None and len(self._entries) > self.max_entries) or \
                (self.max_bytes is not None and self.bytes > self.max_bytes):
            self.pop(next(iter(self._entries)))

    def pop(self, key: str) -> V | None:
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self.bytes -= self._size_of(found[1])
        return found[1]

    def values(self) -> list[V]:
        """The unexpired values, least recently used first (a snapshot; their recency is left as it was)."""
        now = time.monotonic()
        return [value for expires, value in self._entries.values() if expires > now]

    def drop_where(self, predicate: Callable[[str, V], bool]) -> int:
        """Remove every entry whose (key, value) matches; returns how many."""
        doomed = [key for key, (_, value) in self._entries.items() if predicate(key, value)]
        for key in doomed:
            self.pop(key)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
