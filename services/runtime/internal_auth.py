"""Service-to-service authentication: a per-deployment token per calling service, checked by the callee's guard.

Without it any pod (or local process) could search, overwrite and delete every tenant's chunks at retrieval and
spend the LLM key at generation. Each caller (gateway, retrieval) presents ``authorization: Bearer <token>`` from
``RAGFLEET_INTERNAL_TOKEN_FILE`` on every call through the runtime's channels; each internal service accepts only the
callers listed in its ``RAGFLEET_INTERNAL_CALLERS_FILE`` (lines ``<caller> <sha256 hex of its token>``, ``#``
comments, several lines per caller during a rotation):

    embedding  <- gateway, retrieval        retrieval <- gateway        generation <- gateway

Both files are re-read when they change (stat checked at most once a second), so tokens rotate without a restart:
add the new digest to the callers files, then replace the token files, then drop the old digest. Health and
reflection stay open (kubelet probes, grpcurl list). ``RAGFLEET_INTERNAL_AUTH=off`` turns it all off (local runs).
The gateway's public port authenticates API keys instead (services.gateway.auth).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

import grpc

from services.runtime.config import INTERNAL_AUTH, INTERNAL_CALLERS_FILE, INTERNAL_TOKEN_FILE, Env
from services.runtime.errors import ConfigError, Unauthenticated
from services.runtime.guard import Metadata

log = logging.getLogger("ragfleet.internal_auth")

AUTH_VAR = "RAGFLEET_INTERNAL_AUTH"
TOKEN_FILE_VAR = "RAGFLEET_INTERNAL_TOKEN_FILE"
CALLERS_FILE_VAR = "RAGFLEET_INTERNAL_CALLERS_FILE"
# Who may call whom; every internal service needs a callers file, every caller a token file.
ALLOWED_CALLERS: Mapping[str, tuple[str, ...]] = {"embedding": ("gateway", "retrieval"), "retrieval": ("gateway",),
                                                  "generation": ("gateway",)}
CALLERS = ("gateway", "retrieval")
_OFF_HINT = f"or set {AUTH_VAR}=off to run without service-to-service authentication (local runs only)"
_BEARER = "bearer "
RECHECK_SECONDS = 1.0

T = TypeVar("T")


def token_digest(token: str) -> str:
    """What a callers file lists for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _parse_token(text: str, path: str) -> str:
    token = text.strip()
    if not token:
        raise ConfigError(f"{TOKEN_FILE_VAR}: {path} is empty; put this service's token in it, {_OFF_HINT}")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ConfigError(f"{TOKEN_FILE_VAR}: {path} must hold one token on one line (no spaces)")
    return token


def _parse_callers(text: str, path: str) -> tuple[tuple[bytes, str], ...]:
    entries: list[tuple[bytes, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64:
            raise ConfigError(f"{CALLERS_FILE_VAR}: {path} line {number}: expected '<caller> <sha256 hex of its "
                              f"token>'")
        try:
            entries.append((bytes.fromhex(parts[1]), parts[0]))
        except ValueError:
            raise ConfigError(f"{CALLERS_FILE_VAR}: {path} line {number}: the digest is not hex") from None
    if not entries:
        raise ConfigError(f"{CALLERS_FILE_VAR}: {path} lists no callers; add '<caller> <sha256 hex>' lines, "
                          f"{_OFF_HINT}")
    return tuple(entries)


class WatchedFile(Generic[T]):
    """A small secret file, parsed once and again whenever it changes (checked at most every RECHECK_SECONDS: one
    clock read per call on the hot path). A change that does not parse keeps the previous value and logs why."""

    def __init__(self, path: str, var: str, parse: Callable[[str, str], T],
                 recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.path, self._var, self._parse, self._recheck = path, var, parse, recheck_seconds
        self._signature = self._stat()
        if self._signature is None:
            raise ConfigError(f"{var}={path}: cannot read the file; mount it, {_OFF_HINT}")
        self.value: T = self._read()
        self._next_check = time.monotonic() + recheck_seconds

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> T:
        try:
            text = Path(self.path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self._var}={self.path}: cannot read the file ({exc.__class__.__name__}); "
                              f"{_OFF_HINT}") from None
        return self._parse(text, self.path)

    def get(self) -> T:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._recheck
            signature = self._stat()
            if signature is not None and signature != self._signature:
                self._signature = signature
                try:
                    self.value = self._read()
                    log.info("reloaded %s", self._var, extra={"fields": {"path": self.path}})
                except ConfigError as exc:
                    log.warning("kept the previous %s: %s", self._var, exc)
        return self.value


class CallerToken:
    """The token this service presents on its internal calls, as ready-made metadata."""

    def __init__(self, path: str) -> None:
        self._file = WatchedFile(path, TOKEN_FILE_VAR, _parse_token)
        self._token = ""
        self._metadata: tuple[tuple[str, str], ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._file.get()
        if token is not self._token:
            self._token, self._metadata = token, (("authorization", f"Bearer {token}"),)
        return self._metadata


class CallersAuthenticator:
    """Accepts calls whose bearer token hashes to a digest in the callers file; the caller's name is the result.
    Digests are compared in constant time against every entry (no early exit)."""

    span_attribute = "ragfleet.caller"
    mesh_callers = True

    def __init__(self, path: str) -> None:
        self._file = WatchedFile(path, CALLERS_FILE_VAR, _parse_callers)

    @property
    def callers(self) -> list[str]:
        return sorted({name for _, name in self._file.get()})

    def authenticate(self, metadata: Metadata) -> str:
        header = None
        for name, value in metadata or ():
            if name == "authorization":
                header = value.decode(errors="replace") if isinstance(value, bytes) else value
                break
        if header is None:
            raise Unauthenticated("internal call without a service token: send 'authorization: Bearer <token>' "
                                  f"(the calling service reads it from {TOKEN_FILE_VAR})")
        if header[: len(_BEARER)].lower() != _BEARER or not header[len(_BEARER):].strip():
            raise Unauthenticated("internal call with a malformed authorization header: expected 'Bearer <token>'")
        digest = hashlib.sha256(header[len(_BEARER):].strip().encode()).digest()
        found: str | None = None
        for expected, caller in self._file.get():
            if hmac.compare_digest(digest, expected):
                found = caller
        if found is None:
            raise Unauthenticated(f"unknown service token: this service accepts calls from "
                                  f"{', '.join(self.callers)} only ({CALLERS_FILE_VAR})")
        return found


@dataclass(frozen=True)
class InternalAuthConfig:
    """RAGFLEET_INTERNAL_AUTH (token|off), RAGFLEET_INTERNAL_TOKEN_FILE, RAGFLEET_INTERNAL_CALLERS_FILE; which files
    a service needs follows from its role (ALLOWED_CALLERS, CALLERS)."""

    component: str
    enabled: bool = True
    token_file: str | None = None
    callers_file: str | None = None

    @classmethod
    def from_env(cls, component: str, environ: Mapping[str, str] | None = None) -> "InternalAuthConfig":
        env = Env(environ=environ)
        if env.read(INTERNAL_AUTH) == "off":
            return cls(component, enabled=False)
        token_file = env.read(INTERNAL_TOKEN_FILE) if component in CALLERS else None
        callers_file = env.read(INTERNAL_CALLERS_FILE) if component in ALLOWED_CALLERS else None
        if component in CALLERS and token_file is None:
            raise ConfigError(f"{TOKEN_FILE_VAR} is not set: {component} needs the token it presents to the "
                              f"internal services; {_OFF_HINT}")
        if component in ALLOWED_CALLERS and callers_file is None:
            raise ConfigError(f"{CALLERS_FILE_VAR} is not set: {component} needs the list of services allowed to "
                              f"call it ({', '.join(ALLOWED_CALLERS[component])}); {_OFF_HINT}")
        return cls(component, True, token_file, callers_file)


@dataclass(frozen=True)
class InternalAuth:
    """What a service process runs with: the authenticator of its internal port, the token it presents."""

    authenticator: CallersAuthenticator | None
    token: CallerToken | None

    @classmethod
    def load(cls, config: InternalAuthConfig) -> "InternalAuth":
        """Reads the files now: unreadable or empty ones fail start-up (ConfigError)."""
        if not config.enabled:
            return cls(None, None)
        return cls(CallersAuthenticator(config.callers_file) if config.callers_file else None,
                   CallerToken(config.token_file) if config.token_file else None)


_process_token: CallerToken | None = None


def install(token: CallerToken | None) -> None:
    """Make `token` the one every ChannelPool of this process presents (called once by services.runtime.serve)."""
    global _process_token
    _process_token = token


def process_token() -> CallerToken | None:
    return _process_token


class _WithToken:
    def __init__(self, token: CallerToken) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self._token.metadata():
            metadata.add(key, value)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


class _UnaryToken(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamToken(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(details), request)


def token_interceptors(token: CallerToken) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the caller's service token to every unary and server-streaming call of a channel (one
    per kind: grpc.aio files an interceptor under its first matching kind only)."""
    return [_UnaryToken(token), _StreamToken(token)]


def write_local_credentials(directory: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Fresh random tokens for the callers and the callers file of each internal service, under `directory`
    (created 0700; files 0600). Returns each service's RAGFLEET_INTERNAL_* variables (LocalMesh, `ragfleet up`)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)

    def write(name: str, text: str) -> str:
        path = root / name
        tmp = root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)  # atomic: a service re-reading it never sees half a file
        return str(path)

    env: dict[str, dict[str, str]] = {name: {} for name in ("gateway", *ALLOWED_CALLERS)}
    digests: dict[str, str] = {}
    for caller in CALLERS:
        token = secrets.token_urlsafe(32)
        digests[caller] = token_digest(token)
        env[caller][TOKEN_FILE_VAR] = write(f"{caller}.token", token + "\n")
    for service, callers in ALLOWED_CALLERS.items():
        lines = "".join(f"{caller} {digests[caller]}\n" for caller in callers)
        env[service][CALLERS_FILE_VAR] = write(f"{service}.callers", f"# who may call {service}\n{lines}")
    return env
