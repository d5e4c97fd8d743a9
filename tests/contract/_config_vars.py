"""Which environment variables the services' typed configs actually read (found by running from_env on a recorder)."""

from __future__ import annotations

import importlib
from typing import Iterator, Mapping

SERVICES = ("embedding", "retrieval", "generation", "gateway")


class RecordingEnviron(Mapping[str, str]):
    """A read-only environ that remembers every key looked up."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})
        self.seen: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        return self._values[key]

    def get(self, key: str, default: object = None):  # type: ignore[override]
        self.seen.add(key)
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.seen.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def config_class(name: str) -> type:
    module = importlib.import_module(f"services.{name}.config")
    return getattr(module, f"{name.capitalize()}Config")


def load_all(values: Mapping[str, str] | None = None) -> tuple[dict[str, object], set[str]]:
    """Build every service's config from `values`; returns the configs and every variable name consulted."""
    environ = RecordingEnviron(values)
    configs = {name: config_class(name).from_env(environ) for name in SERVICES}
    return configs, {key for key in environ.seen if key.startswith("RAGFLEET_")}
