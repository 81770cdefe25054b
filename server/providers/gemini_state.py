"""Gemini's thought signatures, kept for the conversation's next turn.

The translation (`server.providers.gemini`) mints each tool call's id carrying Gemini's
call id and thought signature (`mint_call_id`), so the next request can be rebuilt
from the ids alone. A real signature is hundreds to thousands of characters, though:
such an id is longer than the gateway accepts back (256 characters) and than OpenAI
accepts (64, for a conversation replayed to an OpenAI model). So an id longer than
`MAX_ID_CHARS` reaches the client shortened to its random head (`call_<16 hex>`), and
the full id is kept in the conversation store under the short one (see
`server.providers.conversation_state` for where and why); the next request's short ids
are put back to full ones before translation. Ids that fit are left as they are
(nothing stored), and full ids from before this change still work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from server.providers.base import JSON
from server.providers.conversation_state import DEFAULT_TTL_S, ConversationStore, StateKeeper, state_key

# OpenAI's limit on a tool call id: the ids clients see stay valid for every provider.
MAX_ID_CHARS = 64
SHORT_ID_CHARS = len("call_") + 16
_KIND = "gemini-call"


class SignatureKeeper:
    """Shortens long tool call ids on the way out and restores them on the way in."""

    def __init__(self, store: ConversationStore | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.keeper = StateKeeper(store, ttl_s)

    async def shorten_completion(self, completion: JSON) -> JSON:
        """The completion with its long tool call ids shortened (and kept)."""
        calls = [
            call
            for choice in completion.get("choices") or []
            for call in (choice.get("message") or {}).get("tool_calls") or []
        ]
        await self._shorten(calls)
        return completion

    async def shorten_chunk(self, chunk: JSON) -> JSON:
        """The chunk with its long tool call ids shortened (and kept) before any client sees them."""
        calls = [
            call
            for choice in chunk.get("choices") or []
            for call in (choice.get("delta") or {}).get("tool_calls") or []
        ]
        await self._shorten(calls)
        return chunk

    async def restore(self, request: JSON) -> JSON:
        """The request with the short ids this gateway handed out put back to full ones."""
        messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
        short = [i for i in _ids_in(messages) if len(i) == SHORT_ID_CHARS]
        keys = {state_key(_KIND, i): i for i in short}
        found = await self.keeper.get(keys)
        full = {keys[key]: value for key, value in found.items() if value.startswith(keys[key])}
        if not full:
            return request
        return {
            **request,
            "messages": [_with_full_ids(m, full) if isinstance(m, dict) else m for m in request["messages"]],
        }

    async def _shorten(self, calls: list[Any]) -> None:
        kept: dict[str, str] = {}
        for call in calls:
            call_id = call.get("id") if isinstance(call, dict) else None
            if isinstance(call_id, str) and len(call_id) > MAX_ID_CHARS:
                short = call_id[:SHORT_ID_CHARS]
                kept[state_key(_KIND, short)] = call_id
                call["id"] = short
        await self.keeper.put(kept)


def _ids_in(messages: Iterable[JSON]) -> list[str]:
    ids = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                ids.append(call["id"])
        if isinstance(message.get("tool_call_id"), str):
            ids.append(message["tool_call_id"])
    return ids


def _with_full_ids(message: JSON, full: dict[str, str]) -> JSON:
    changed = dict(message)
    if isinstance(message.get("tool_calls"), list):
        changed["tool_calls"] = [
            {**call, "id": full.get(str(call.get("id")), call.get("id"))} if isinstance(call, dict) else call
            for call in message["tool_calls"]
        ]
    if message.get("tool_call_id") in full:
        changed["tool_call_id"] = full[message["tool_call_id"]]
    return changed
