"""Every RAGFLEET_* environment variable, declared once, and the typed reads built on the declarations.

A ``Var`` holds a variable's name, type, default, bounds or choices and meaning; ``declare`` registers it, so the
parsing, the start-up errors (naming the variable), the README tables (scripts/gen_config_docs.py) and the Kubernetes
ConfigMap check (tests/contract/test_config_contract.py) all come from that one line. Each service builds one frozen
dataclass at start-up (``EmbeddingConfig.from_env()``) and passes plain values down; nothing below reads the
environment.

    MAX_TEXTS = declare("RAGFLEET_EMBEDDING_MAX_TEXTS", int, 256, "most texts in one Embed request", minimum=1)
    Env().read(MAX_TEXTS)               # 256, or the set value; "0" or "x" fails start-up naming the variable
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Generic, Mapping, TypeVar

from services.runtime.errors import ConfigError
from services.runtime.limits import DEFAULT_MAX_TOKENS_LIMIT

log = logging.getLogger("ragfleet.config")

DEFAULT_PORTS = {"gateway": 50050, "embedding": 50051, "retrieval": 50052, "generation": 50053}
DEFAULT_METRICS_PORTS = {"gateway": 9450, "embedding": 9451, "retrieval": 9452, "generation": 9453}
DEFAULT_DATA_DIR = ".ragfleet"
SHARED = "shared"
SECTIONS = (SHARED, "gateway", "embedding", "retrieval", "generation")  # README table order
SERVICE = "<SERVICE>"  # placeholder in the names of per-server variables (RAGFLEET_<SERVICE>_PORT)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

T = TypeVar("T")


@dataclass(frozen=True)
class Var(Generic[T]):
    """One environment variable. ``kind`` is int, float, bool, str or tuple (a comma-separated list); a default of
    None means "unset" (the read returns None). ``aliases`` are deprecated names still read (with a warning) so a
    rename never breaks a deployment; ``shown_default`` is the README's default when the literal would mislead."""

    name: str
    kind: type
    default: T
    help: str
    section: str = SHARED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    shown_default: str | None = None

    def for_service(self, component: str, **changes: Any) -> "Var[T]":
        """The concrete variable of one server: RAGFLEET_<SERVICE>_PORT -> RAGFLEET_GATEWAY_PORT."""
        return replace(self, name=self.name.replace(SERVICE, component.upper()), **changes)

    def check(self, value: T) -> T:
        """The declared bounds and choices, or a ConfigError naming the variable."""
        if self.choices and value not in self.choices:
            # The shared switches read as a pair ("json or text"); a service's options as a list.
            allowed = (" or ".join(self.choices) if self.section == SHARED and len(self.choices) == 2
                       else "one of " + ", ".join(self.choices))
            raise ConfigError(f"{self.name}={value!r} must be {allowed}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = self.minimum, self.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                bound = f"in [{low}, {high}]" if low is not None and high is not None else (
                    f">= {low}" if low is not None else f"<= {high}")
                raise ConfigError(f"{self.name}={value} must be {bound}")
        return value


_REGISTRY: dict[str, Var[Any]] = {}


def declare(name: str, kind: type, default: T, help: str, **options: Any) -> Var[T]:
    """Declare a variable (at import time of the config module that reads it) and return it. The section (README
    table) follows from the name's service prefix unless given; a name or alias declared twice is a bug."""
    if "section" not in options:
        service = name.removeprefix("RAGFLEET_").split("_", 1)[0].lower()
        options["section"] = service if service in SECTIONS else SHARED
    var: Var[T] = Var(name, kind, default, help, **options)
    for key in (name, *var.aliases):
        other = next((v for v in _REGISTRY.values() if key in (v.name, *v.aliases)), None)
        if other is not None and other != var:
            raise ValueError(f"{key} is declared twice")
    _REGISTRY[name] = var
    return var


def declared() -> tuple[Var[Any], ...]:
    """Every variable declared so far, in declaration order (import every config module first)."""
    return tuple(_REGISTRY.values())


def lookup(name: str) -> Var[Any] | None:
    """The declaration of a concrete variable name (per-server names resolved), or None; aliases do not count."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for var in _REGISTRY.values():
        for component in DEFAULT_PORTS:
            if SERVICE in var.name and var.name.replace(SERVICE, component.upper()) == name:
                return var.for_service(component)
    return None


class Env:
    """Reads declared variables with types and clear errors: ``Env(environ=...).read(VAR)``. The name-based methods
    (``Env(prefix).int("N", 1)``) are the parsers underneath."""

    def __init__(self, prefix: str = "", environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self._environ = os.environ if environ is None else environ

    def read(self, var: Var[T]) -> T:
        name = self.prefix + var.name
        raw = self._raw(var.name)
        for alias in var.aliases:
            if raw is None and (raw := self._raw(alias)) is not None:
                log.warning("%s is deprecated: set %s instead", alias, var.name)
                name = self.prefix + alias
        if var.kind is tuple:
            value: Any = var.default if raw is None else _split(raw)
        elif var.kind is bool:
            value = var.default if raw is None else self._bool(name, raw)
        elif raw is None or raw == "":
            return var.default
        elif var.kind is int:
            value = self._number(name, raw, int, "an integer")
        elif var.kind is float:
            value = self._number(name, raw, float, "a number")
        else:
            value = raw.lower() if var.choices else raw
        return replace(var, name=name).check(value)

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
        return self.read(Var(name, int, default, "", minimum=minimum))

    def float(self, name: str, default: float, *, minimum: float | None = None) -> float:
        return self.read(Var(name, float, default, "", minimum=minimum))

    def bool(self, name: str, default: bool) -> bool:
        return self.read(Var(name, bool, default, ""))

    def list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        return self.read(Var(name, tuple, default, ""))

    @staticmethod
    def _number(name: str, raw: str, kind: type, what: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not {what}") from None

    @staticmethod
    def _bool(name: str, raw: str) -> bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# Per-server variables (RAGFLEET_<SERVICE>_*), then those every service shares.
HOST = declare(f"RAGFLEET_{SERVICE}_HOST", str, "0.0.0.0",
               "bind address; SERVICE is GATEWAY, EMBEDDING, RETRIEVAL or GENERATION",
               shown_default="0.0.0.0 (`ragfleet up`: 127.0.0.1)")
PORT = declare(f"RAGFLEET_{SERVICE}_PORT", int, 0, "gRPC port", minimum=0,
               shown_default=", ".join(f"{name} {port}" for name, port in DEFAULT_PORTS.items()))
METRICS_PORT = declare(f"RAGFLEET_{SERVICE}_METRICS_PORT", int, 0, "Prometheus `/metrics` port; 0 disables it",
                       minimum=0, shown_default=", ".join(map(str, DEFAULT_METRICS_PORTS.values())))
GRACE_SECONDS = declare(f"RAGFLEET_{SERVICE}_GRACE_SECONDS", float, 10.0,
                        "drain time for in-flight calls and streams after SIGTERM", minimum=0)
DRAIN_NOTICE_SECONDS = declare(
    f"RAGFLEET_{SERVICE}_DRAIN_NOTICE_SECONDS", float, 5.0,
    "first part of the drain, at most this long and ending early once no call is in flight: NOT_SERVING while still "
    "answering, so health watchers and readiness probes move traffic away; then GOAWAY (no new calls) while "
    "in-flight ones finish", minimum=0)
MAX_CONNECTION_AGE_SECONDS = declare(f"RAGFLEET_{SERVICE}_MAX_CONNECTION_AGE_SECONDS", float, 300.0,
                                     "connections are recycled after this, so clients re-resolve DNS", minimum=1)
MAX_CONNECTION_AGE_GRACE_SECONDS = declare(f"RAGFLEET_{SERVICE}_MAX_CONNECTION_AGE_GRACE_SECONDS", float, 30.0,
                                           "time calls on a recycled connection get to finish", minimum=0)
KEEPALIVE_SECONDS = declare(f"RAGFLEET_{SERVICE}_KEEPALIVE_SECONDS", float, 30.0, "HTTP/2 keepalive ping interval",
                            minimum=1)
MAX_MESSAGE_MB = declare(f"RAGFLEET_{SERVICE}_MAX_MESSAGE_MB", int, 64,
                         "largest gRPC message this server sends or receives (the services' client channels to their "
                         "upstreams keep 64 MB)", minimum=1)
LOG_LEVEL = declare("RAGFLEET_LOG_LEVEL", str, "INFO", "log level of every service")
LOG_FORMAT = declare("RAGFLEET_LOG_FORMAT", str, "json",
                     "`json` (one object per line, with trace and span ids) or `text`", choices=("json", "text"))
DIE_WITH_PARENT = declare("RAGFLEET_DIE_WITH_PARENT", int, None,
                          "set by whatever starts a service (`ragfleet up`, LocalMesh, a worker supervisor), not by "
                          "hand: its pid; the service asks Linux for SIGTERM when that process dies", minimum=1)
EVENT_LOOP = declare("RAGFLEET_EVENT_LOOP", str, "uvloop",
                     "`uvloop` or `asyncio`: the services' event loop (uvloop: ~17 % less CPU per RPC)",
                     choices=("uvloop", "asyncio"))
DATA_DIR = declare("RAGFLEET_DATA_DIR", str, DEFAULT_DATA_DIR,
                   "where embedded engines keep their files (retrieval: `<dir>/retrieval`)")
REDIS_URL = declare("RAGFLEET_REDIS_URL", str, None,
                    "Redis shared by all services and replicas; unset = in-process caches and conversations only")
INTERNAL_AUTH = declare(
    "RAGFLEET_INTERNAL_AUTH", str, "token",
    "`token`: embedding, retrieval and generation accept only calls carrying a listed caller's service token (see "
    "Security); `off`: no service-to-service authentication (local runs only)", choices=("token", "off"))
INTERNAL_TOKEN_FILE = declare(
    "RAGFLEET_INTERNAL_TOKEN_FILE", str, None,
    "gateway and retrieval: file holding the token this service presents on its internal calls; required with "
    "`token`; re-read when it changes", shown_default="(none; `ragfleet up` writes one)")
INTERNAL_CALLERS_FILE = declare(
    "RAGFLEET_INTERNAL_CALLERS_FILE", str, None,
    "embedding, retrieval, generation: who may call this service, lines `<caller> <sha256 hex of its token>` (`#` "
    "comments; several per caller while rotating); required with `token`; re-read when it changes",
    shown_default="(none; `ragfleet up` writes one)")
LLM_BASE_URL = declare("RAGFLEET_LLM_BASE_URL", str, None,
                       "OpenAI-compatible endpoint (`.../v1`); unset = the offline extractive answerer")
LLM_MODEL = declare("RAGFLEET_LLM_MODEL", str, "gpt-4o-mini", "chat model when a request names none")
LLM_API_KEY = declare("RAGFLEET_LLM_API_KEY", str, "unused", "bearer key for the LLM")
CLI_GATEWAY_ADDRESS = declare("RAGFLEET_GATEWAY_ADDRESS", str, "127.0.0.1:50050",
                              "gateway used by `ragfleet ask` / `ragfleet ingest` (or `--gateway`)", section=SHARED)
CLI_API_KEY = declare("RAGFLEET_API_KEY", str, None,
                      "API key sent by `ragfleet ask` / `ragfleet ingest` (or `--api-key`)")
# Read by the OpenTelemetry SDK and services/runtime/telemetry.py; declared here so the README lists them.
OTEL_ENDPOINT = declare("OTEL_EXPORTER_OTLP_ENDPOINT", str, None,
                        "export spans over OTLP/gRPC there (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` wins); unset = no "
                        "export")
OTEL_TRACES_ENDPOINT = declare("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", str, None,
                               "the traces endpoint, over `OTEL_EXPORTER_OTLP_ENDPOINT`")
OTEL_INSECURE = declare("OTEL_EXPORTER_OTLP_INSECURE", bool, False,
                        "plaintext to an `https`-less endpoint (implied by an `http://` endpoint)")
TRACE_CLIENT_SPANS = declare("RAGFLEET_TRACE_CLIENT_SPANS", bool, False,
                             "also record a CLIENT span for every call between the services and for generation's "
                             "call to the LLM (`chat <model>`); off, each hop's "
                             "SERVER span hangs straight under its caller's span (still one trace per Ask) and "
                             "the gateway's `ragfleet.stage.*_ms` time the hops from its side: in the mesh a span "
                             "costs ~0.1-0.15 ms of CPU to record and export (bench/tracing_cost.py)")
OTEL_BSP_SCHEDULE_DELAY = declare("OTEL_BSP_SCHEDULE_DELAY", int, 5000,
                                  "ms between span exports (the SDK's batch span processor; each export is one "
                                  "gRPC call, so shorter costs more CPU)")
OTEL_SERVICE_NAME = declare("OTEL_SERVICE_NAME", str, None, "service name on the spans",
                            shown_default="ragfleet-<service>")
OTEL_TRACES_SAMPLER = declare(
    "OTEL_TRACES_SAMPLER", str, "parentbased_always_on",
    "the OpenTelemetry SDK's sampler, honoured as-is: `parentbased_traceidratio` with `OTEL_TRACES_SAMPLER_ARG=0.1` "
    "on the gateway keeps one Ask in ten, and the other services follow the gateway's decision. Unset and without "
    "an OTLP endpoint, a trace that starts in the process is not sampled (ids still made and propagated, no span "
    "recorded: nothing could export it)",
    shown_default="parentbased_always_on (no OTLP endpoint: parentbased_always_off)")
OTEL_TRACES_SAMPLER_ARG = declare("OTEL_TRACES_SAMPLER_ARG", str, None, "the sampler's argument (a ratio for "
                                  "`traceidratio` samplers)")
# Generation enforces it; the gateway reads it too, so both refuse the same requests before any work.
MAX_TOKENS_LIMIT = declare("RAGFLEET_GENERATION_MAX_TOKENS_LIMIT", int, DEFAULT_MAX_TOKENS_LIMIT,
                           "largest max_tokens a request may ask for (the gateway refuses more before its first "
                           "event)", minimum=1)
# Several processes on one port (services/runtime/workers.py), for the services with no per-process state that
# matters. Default 1, so nothing changes unasked: each worker has its own in-process caches, and on a machine the
# other services share (`ragfleet up`) extra workers compete for the same cores; Kubernetes sets it per Deployment.
_WORKERS_HELP = ("worker processes sharing the gRPC port (SO_REUSEPORT; one `/metrics` for all), or `auto`: the CPUs "
                 "this process may use (affinity, capped by a cgroup quota). Each worker has its own in-process "
                 "caches and {limit}")
GATEWAY_WORKERS = declare("RAGFLEET_GATEWAY_WORKERS", str, "1", _WORKERS_HELP.format(
    limit="RAGFLEET_GATEWAY_MAX_IN_FLIGHT; more than 1 needs RAGFLEET_REDIS_URL (the workers share conversations, "
          "the corpus version and cached answers through it)"))
GENERATION_WORKERS = declare("RAGFLEET_GENERATION_WORKERS", str, "1", _WORKERS_HELP.format(
    limit="admits its own RAGFLEET_GENERATION_MAX_CONCURRENT streams"))
WORKERS = {"gateway": GATEWAY_WORKERS, "generation": GENERATION_WORKERS}


def _workers(env: Env, var: Var[str]) -> int:
    raw = env.read(var)
    if raw.lower() == "auto":
        from services.runtime.workers import available_cpus  # it imports this module

        return available_cpus()
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{var.name}={raw!r} must be a whole number >= 1 or auto")
    return int(raw)


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC server needs: the RAGFLEET_<SERVICE>_* variables above plus the shared log and loop ones."""

    component: str
    host: str = HOST.default
    port: int = 0
    metrics_port: int = 0  # 0 disables the Prometheus endpoint
    grace_seconds: float = GRACE_SECONDS.default
    drain_notice_seconds: float = DRAIN_NOTICE_SECONDS.default
    max_connection_age_seconds: float = MAX_CONNECTION_AGE_SECONDS.default
    max_connection_age_grace_seconds: float = MAX_CONNECTION_AGE_GRACE_SECONDS.default
    keepalive_seconds: float = KEEPALIVE_SECONDS.default
    max_message_mb: int = MAX_MESSAGE_MB.default
    log_level: str = LOG_LEVEL.default
    log_format: str = LOG_FORMAT.default
    event_loop: str = EVENT_LOOP.default
    workers: int = 1  # > 1: serve.main supervises that many worker processes
    trace_client_spans: bool = TRACE_CLIENT_SPANS.default

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, component: str, environ: Mapping[str, str] | None = None) -> "ServerConfig":
        env = Env(environ=environ)

        def own(var: Var[T], **changes: Any) -> T:
            return env.read(var.for_service(component, **changes))

        return cls(
            component=component,
            host=own(HOST),
            port=own(PORT, default=DEFAULT_PORTS.get(component, 0)),
            metrics_port=own(METRICS_PORT, default=DEFAULT_METRICS_PORTS.get(component, 0)),
            grace_seconds=own(GRACE_SECONDS),
            drain_notice_seconds=own(DRAIN_NOTICE_SECONDS),
            max_connection_age_seconds=own(MAX_CONNECTION_AGE_SECONDS),
            max_connection_age_grace_seconds=own(MAX_CONNECTION_AGE_GRACE_SECONDS),
            keepalive_seconds=own(KEEPALIVE_SECONDS),
            max_message_mb=own(MAX_MESSAGE_MB),
            log_level=env.read(LOG_LEVEL).upper(),
            log_format=env.read(LOG_FORMAT),
            event_loop=env.read(EVENT_LOOP),
            workers=_workers(env, WORKERS[component]) if component in WORKERS else 1,
            trace_client_spans=env.read(TRACE_CLIENT_SPANS),
        )


def redis_url(environ: Mapping[str, str] | None = None) -> str | None:
    """RAGFLEET_REDIS_URL, shared by every service that caches; unset or empty means no Redis (L1 only)."""
    return Env(environ=environ).read(REDIS_URL)


def data_dir(environ: Mapping[str, str] | None = None) -> str:
    """RAGFLEET_DATA_DIR: where embedded engines keep their files."""
    return Env(environ=environ).read(DATA_DIR)
