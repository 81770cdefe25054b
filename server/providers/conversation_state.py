"""State a conversation needs on its next turn, kept where every replica finds it.

Some providers hand out state that must come back, unmodified, on the conversation's
next request, and that an OpenAI client does not echo: Anthropic's thinking blocks of
a tool-calling turn (with their signatures; `server.providers.anthropic_turns`) and
Gemini's thought signatures of function calls (`server.providers.gemini_state`).

Choice: a shared store, not the client's echo. The only thing every OpenAI client is
sure to send back unchanged is a tool call's id, and it is short: the gateway accepts
256 characters, OpenAI 64 (a conversation may be replayed to an OpenAI fallback),
while a thinking block is the whole reasoning text (kilobytes) and a real Gemini
signature runs to hundreds or thousands of characters. Fields such as
`reasoning_content` are not round-tripped by the REST bridge, and many clients rebuild
messages without them. So the state is stored under a key derived from what the client
does echo (the tool call ids, unguessable and issued once), with an expiry
(`AIGNE_HUB_CONVERSATION_STATE_TTL_S`, default a day), in the gateway's database
(`server.storage.conversation`): the one store every replica already shares
(PostgreSQL for several replicas) and that outlives a restart. A replica, another
deployment of the same provider kind, or a restarted gateway serves the next turn the
same way.

Adapters see only `ConversationStore`; without one (unit tests, tools) they keep the
state in a bounded `MemoryConversationStore`. A failing store never fails a call: the
turn is then sent without the state (and the provider says what it misses).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 86_400.0
_FAILURE_LOG_INTERVAL_S = 60.0


class ConversationStore(Protocol):
    """Opaque values under keys, each kept for `ttl_s` seconds."""

    async def put_many(self, values: Mapping[str, str], ttl_s: float) -> None: ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The values still kept of `keys` (missing and expired keys are left out)."""
        ...


@runtime_checkable
class KeepsConversationState(Protocol):
    """An adapter whose conversations carry state to their next turn."""

    def keep_state_in(self, store: ConversationStore, ttl_s: float) -> None: ...


def state_key(kind: str, *parts: str) -> str:
    """The store's key for `parts` (e.g. tool call ids): a digest, so neither the
    ids nor their number show in the store and every key has the same size."""
    digest = hashlib.sha256(kind.encode())
    for part in parts:
        digest.update(b"\x00" + part.encode())
    return f"{kind}:{digest.hexdigest()[:48]}"


class MemoryConversationStore:
    """This process's memory only, bounded: the fallback when no shared store is given."""

    def __init__(self, capacity: int = 1000) -> None:
        self._capacity = capacity
        self._values: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def put_many(self, values: Mapping[str, str], ttl_s: float) -> None:
        expires = time.monotonic() + ttl_s
        for key, value in values.items():
            self._values[key] = (expires, value)
            self._values.move_to_end(key)
        while len(self._values) > self._capacity:
            self._values.popitem(last=False)

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        now = time.monotonic()
        found = {}
        for key in keys:
            kept = self._values.get(key)
            if kept is not None and kept[0] > now:
                found[key] = kept[1]
        return found


class StateKeeper:
    """An adapter's handle on its store: put and get that log a failure instead of
    failing the call (at most one warning a minute)."""

    def __init__(self, store: ConversationStore | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store: ConversationStore = store if store is not None else MemoryConversationStore()
        self.ttl_s = ttl_s
        self._logged_at = float("-inf")

    async def put(self, values: Mapping[str, str]) -> None:
        if not values:
            return
        try:
            await self.store.put_many(values, self.ttl_s)
        except Exception as exc:  # noqa: BLE001 - the answer is still good; the next turn may miss it
            self._warn("could not keep conversation state for the next turn", exc)

    async def get(self, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        try:
            return await self.store.get_many(wanted)
        except Exception as exc:  # noqa: BLE001 - sent without the state, the provider says what is missing
            self._warn("could not read conversation state; the turn is sent without it", exc)
            return {}

    def _warn(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _FAILURE_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning("%s: %s", what, type(exc).__name__)
