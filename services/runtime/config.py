"""Typed configuration read once from RAGFLEET_* environment variables.

Each service builds one frozen dataclass at start-up (``EmbeddingConfig.from_env()``) and passes plain values down;
nothing below the server reads the environment. A bad value fails start-up with a message naming the variable.

    env = Env("RAGFLEET_EMBEDDING_")
    env.int("PORT", 50051)        # reads RAGFLEET_EMBEDDING_PORT
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from services.runtime.errors import ConfigError

DEFAULT_PORTS = {"gateway": 50050, "embedding": 50051, "retrieval": 50052, "generation": 50053}
DEFAULT_METRICS_PORTS = {"gateway": 9450, "embedding": 9451, "retrieval": 9452, "generation": 9453}
DEFAULT_DATA_DIR = ".ragfleet"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Env:
    """Reads prefixed environment variables with types and clear errors."""

    def __init__(self, prefix: str, environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self._environ = os.environ if environ is None else environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(self.prefix + name)
        return None if value is None else value.strip()

    def str(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None or raw == "" else raw

    def optional_str(self, name: str) -> str | None:
        raw = self._raw(name)
        return raw or None

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{self.prefix}{name}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.prefix}{name}={value} must be >= {minimum}")
        return value

    def float(self, name: str, default: float, *, minimum: float | None = None) -> float:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{self.prefix}{name}={raw!r} is not a number") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.prefix}{name}={value} must be >= {minimum}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{self.prefix}{name}={raw!r} is not a boolean (use true/false)")

    def list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return default
        return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC server needs. Env: RAGFLEET_<SERVICE>_HOST, _PORT, _METRICS_PORT, _GRACE_SECONDS,
    _DRAIN_NOTICE_SECONDS, _MAX_CONNECTION_AGE_SECONDS, _MAX_CONNECTION_AGE_GRACE_SECONDS, _KEEPALIVE_SECONDS, _MAX_MESSAGE_MB;
    RAGFLEET_LOG_LEVEL, RAGFLEET_LOG_FORMAT (json|text) and RAGFLEET_EVENT_LOOP (uvloop|asyncio) are shared by all
    services."""

    component: str
    host: str = "0.0.0.0"
    port: int = 0
    metrics_port: int = 0  # 0 disables the Prometheus endpoint
    grace_seconds: float = 10.0
    drain_notice_seconds: float = 5.0
    max_connection_age_seconds: float = 300.0
    max_connection_age_grace_seconds: float = 30.0
    keepalive_seconds: float = 30.0
    max_message_mb: int = 64
    log_level: str = "INFO"
    log_format: str = "json"
    event_loop: str = "uvloop"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, component: str, environ: Mapping[str, str] | None = None) -> "ServerConfig":
        env = Env(f"RAGFLEET_{component.upper()}_", environ)
        shared = Env("RAGFLEET_", environ)
        log_format = shared.str("LOG_FORMAT", "json")
        if log_format not in ("json", "text"):
            raise ConfigError(f"RAGFLEET_LOG_FORMAT={log_format!r} must be json or text")
        event_loop = shared.str("EVENT_LOOP", "uvloop")
        if event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"RAGFLEET_EVENT_LOOP={event_loop!r} must be uvloop or asyncio")
        return cls(
            component=component,
            host=env.str("HOST", "0.0.0.0"),
            port=env.int("PORT", DEFAULT_PORTS.get(component, 0), minimum=0),
            metrics_port=env.int("METRICS_PORT", DEFAULT_METRICS_PORTS.get(component, 0), minimum=0),
            grace_seconds=env.float("GRACE_SECONDS", 10.0, minimum=0),
            drain_notice_seconds=env.float("DRAIN_NOTICE_SECONDS", 5.0, minimum=0),
            max_connection_age_seconds=env.float("MAX_CONNECTION_AGE_SECONDS", 300.0, minimum=1),
            max_connection_age_grace_seconds=env.float("MAX_CONNECTION_AGE_GRACE_SECONDS", 30.0, minimum=0),
            keepalive_seconds=env.float("KEEPALIVE_SECONDS", 30.0, minimum=1),
            max_message_mb=env.int("MAX_MESSAGE_MB", 64, minimum=1),
            log_level=shared.str("LOG_LEVEL", "INFO").upper(),
            log_format=log_format,
            event_loop=event_loop,
        )


def redis_url(environ: Mapping[str, str] | None = None) -> str | None:
    """RAGFLEET_REDIS_URL, shared by every service that caches; unset or empty means no Redis (L1 only)."""
    return Env("RAGFLEET_", environ).optional_str("REDIS_URL")


def data_dir(environ: Mapping[str, str] | None = None) -> str:
    """RAGFLEET_DATA_DIR: where embedded engines keep their files."""
    return Env("RAGFLEET_", environ).str("DATA_DIR", DEFAULT_DATA_DIR)
