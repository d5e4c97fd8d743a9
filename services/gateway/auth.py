"""API-key authentication: `authorization: Bearer <key>` metadata -> tenant.

Keys are compared in constant time against EVERY configured key (no early exit), so response time does not reveal
how much of a guessed key was right. With no keys configured, auth is off and every caller is tenant "default"
(the local `ragfleet up` mesh and the demo run that way; a warning is logged at start-up). That happens only when
neither RAGFLEET_GATEWAY_API_KEYS nor RAGFLEET_GATEWAY_API_KEYS_FILE is set: a keys file that holds no keys fails
start-up instead (GatewayConfig.from_env), so an empty mounted secret never turns authentication off.

The gateway's server runs this as its guard's authenticator (services.runtime.guard): the key is checked from the
invocation metadata before the request body is sized or parsed, and the tenant reaches the servicer through
``authenticated_by``. An anonymous caller cannot make the gateway parse anything.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Iterable, Mapping

from services.runtime.errors import Unauthenticated

log = logging.getLogger("ragfleet.gateway.auth")

DEFAULT_TENANT = "default"
_BEARER = "bearer "


class ApiKeyAuth:
    span_attribute = "ragfleet.tenant"
    mesh_callers = False

    def __init__(self, keys: Mapping[str, str]) -> None:
        # Compare fixed-length digests so differing key lengths do not leak through timing either.
        self._entries = [(hashlib.sha256(key.encode()).digest(), tenant) for key, tenant in keys.items()]
        self.enabled = bool(self._entries)
        if not self.enabled:
            log.warning("no API keys configured (RAGFLEET_GATEWAY_API_KEYS / _API_KEYS_FILE): authentication is "
                        "DISABLED and every caller is tenant %r", DEFAULT_TENANT)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant, or Unauthenticated; the guard's entry point (services.runtime.guard.Authenticator).
        Must not log the key."""
        if not self.enabled:
            return DEFAULT_TENANT
        header = None
        for name, value in metadata or ():
            if name.lower() == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        if header is None:
            raise Unauthenticated("authorization: missing; send metadata 'authorization: Bearer <api key>'")
        if not header[: len(_BEARER)].lower() == _BEARER or not header[len(_BEARER):].strip():
            raise Unauthenticated("authorization: expected 'Bearer <api key>'")
        digest = hashlib.sha256(header[len(_BEARER):].strip().encode()).digest()
        found: str | None = None
        for key_digest, tenant in self._entries:
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        if found is None:
            raise Unauthenticated("authorization: unknown API key")
        return found
