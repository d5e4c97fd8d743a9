"""The shared in-process LRU: entry and byte bounds, recency, per-entry TTL, and dropping by predicate."""

from __future__ import annotations

import time

import pytest

from services.runtime.lru import LruCache


def test_entry_bound_evicts_the_least_recently_used():
    lru = LruCache[str](max_entries=2, ttl=60)
    lru.put("a", "1")
    lru.put("b", "2")
    assert lru.get("a") == "1"  # a is now the most recently used
    lru.put("c", "3")
    assert lru.get("b") is None and lru.get("a") == "1" and lru.get("c") == "3" and len(lru) == 2


def test_byte_bound_counts_sizes_and_refuses_what_could_never_fit():
    lru = LruCache[bytes](max_bytes=10, ttl=60, size_of=len)
    lru.put("a", b"12345")
    lru.put("b", b"12345")
    assert lru.bytes == 10
    lru.put("a", b"123")  # a replacement is counted once
    assert lru.bytes == 8 and len(lru) == 2
    lru.put("c", b"1234")  # evicts b, the least recently used
    assert lru.get("b") is None and lru.bytes == 7
    lru.put("huge", b"x" * 11)
    assert lru.get("huge") is None and lru.get("a") == b"123", "an oversized value evicts nothing"


def test_both_bounds_at_once():
    lru = LruCache[bytes](max_entries=3, max_bytes=100, ttl=60, size_of=len)
    for key in "abcd":
        lru.put(key, b"x")
    assert len(lru) == 3 and lru.get("a") is None
    lru.put("big", b"x" * 99)
    assert len(lru) == 2 and lru.bytes == 100, "evicted down to the byte bound, not further"


def test_zero_entries_keeps_nothing():
    lru = LruCache[str](max_entries=0, ttl=60)
    lru.put("a", "1")
    assert lru.get("a") is None and len(lru) == 0


def test_entries_expire_with_the_cache_ttl_or_their_own(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    lru = LruCache[bytes](max_bytes=100, ttl=10, size_of=len)
    lru.put("default", b"abc")
    lru.put("short", b"de", ttl=1)
    now[0] += 1
    assert lru.get("short") is None and lru.get("default") == b"abc"
    assert [v for v in lru.values()] == [b"abc"]
    now[0] += 9
    assert lru.values() == [] and lru.get("default") is None and lru.bytes == 0


def test_drop_where_and_clear():
    lru = LruCache[int](max_entries=10, ttl=60)
    for i in range(6):
        lru.put(f"t{i % 2}:{i}", i)
    assert lru.drop_where(lambda key, _: key.startswith("t0:")) == 3
    assert sorted(lru.values()) == [1, 3, 5]
    assert lru.pop("t1:1") == 1 and lru.pop("t1:1") is None
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0


def test_a_byte_bound_needs_a_size():
    with pytest.raises(ValueError):
        LruCache[bytes](max_bytes=10, ttl=1)
