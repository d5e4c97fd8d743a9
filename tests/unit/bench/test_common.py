"""bench/_common.py's Redis clean-up, and that the benchmarks which use it take it from bench, not from tests."""

from __future__ import annotations

import ast
import sys
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # bench/ is scripts, not an installed package

from bench._common import delete_keys  # noqa: E402
from tests.conftest import REDIS_URL  # noqa: E402


def test_delete_keys_deletes_every_key_under_the_patterns_and_nothing_else() -> None:
    prefix = f"ragfleet-test:{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.mset({prefix + "a:1": 1, prefix + "a:2": 2, prefix + "b:1": 3, prefix + "keep": 4})
        assert delete_keys(prefix + "a:*", prefix + "b:*", url=REDIS_URL) == 3
        assert sorted(client.scan_iter(match=prefix + "*")) == [(prefix + "keep").encode()]
        assert delete_keys(prefix + "nothing:*", url=REDIS_URL) == 0
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


@pytest.mark.parametrize("name", ["workers", "soak", "gateway_bench"])
def test_benchmarks_take_the_redis_clean_up_from_bench_not_tests(name: str) -> None:
    tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m == "tests" or m.startswith("tests.")}, imported
