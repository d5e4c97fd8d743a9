"""Conversation memory: conversation id -> its turns, stored per tenant with a TTL.

Redis when configured (a list per conversation, trimmed to the last ``max_turns`` and expiring ``ttl_seconds`` after
the last turn, so every replica sees the same history); an in-process LRU otherwise. Keys include the tenant, so a
conversation id guessed from another tenant reads nothing: ``<prefix>conv:<tenant>:<sha256(conversation id)>``. The
id's fixed-length digest ends every key, so no (tenant, id) pair can spell another pair's key, even when either
contains ":" (tenant "acme" + id "eu:1" is not tenant "acme:eu" + id "1").
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from services.gateway.config import ConversationConfig
from services.runtime.lru import LruCache
from services.runtime.pb.ragfleet.v1 import common_pb2

log = logging.getLogger("ragfleet.gateway.conversations")

_MAX_LOCAL_CONVERSATIONS = 10_000


class ConversationStore:
    def __init__(self, config: ConversationConfig, redis: Any | None, *, prefix: str) -> None:
        self.config = config
        self._redis = redis
        self._prefix = prefix
        # Without Redis: the runtime's LRU, each conversation expiring ttl_seconds after its last turn.
        self._local = LruCache[list[tuple[int, str]]](max_entries=_MAX_LOCAL_CONVERSATIONS,
                                                    ttl=config.ttl_seconds)
        # Whole user/assistant pairs only, so history never starts with an orphaned answer.
        self._keep = max(2, config.max_turns - config.max_turns % 2)

    def key(self, tenant: str, conversation_id: str) -> str:
        """The conversation's Redis (or local) key; unambiguous for any tenant and id (see the module doc)."""
        digest = hashlib.sha256(conversation_id.encode()).hexdigest()
        return f"{self._prefix}conv:{tenant}:{digest}"

    async def history(self, tenant: str, conversation_id: str) -> list[common_pb2.ChatTurn]:
        """Earlier turns, oldest first; empty for an unknown or expired conversation."""
        key = self.key(tenant, conversation_id)
        if self._redis is not None:
            raw = await self._redis.lrange(key, 0, -1)
            turns = [tuple(json.loads(item)) for item in raw]
        else:
            turns = self._local.get(key) or []
        return [common_pb2.ChatTurn(role=role, content=content) for role, content in turns]

    async def append(self, tenant: str, conversation_id: str, question: str, answer: str) -> None:
        """Store one user/assistant pair and push the expiry out."""
        key = self.key(tenant, conversation_id)
        pair = [(common_pb2.ROLE_USER, question), (common_pb2.ROLE_ASSISTANT, answer)]
        if self._redis is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *(json.dumps(turn) for turn in pair))
                pipe.ltrim(key, -self._keep, -1)
                pipe.expire(key, self.config.ttl_seconds)
                await pipe.execute()
            return
        self._local.put(key, ((self._local.get(key) or []) + pair)[-self._keep:])
