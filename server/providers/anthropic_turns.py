"""Anthropic's thinking blocks of a tool-calling turn, kept for the conversation's next turn.

Anthropic wants a tool-calling turn's thinking blocks (`thinking` with its signature,
`redacted_thinking` with its data) back, unmodified, with the tool results; an OpenAI
client echoes only the turn's text and tool calls. So the turn's blocks are stored
(see `server.providers.conversation_state` for where and why) under a key derived
from its tool_use ids, which Anthropic issues, unguessable, once per call: the next
request that echoes the same tool calls gets the stored blocks in their place. A stored
turn is used only if the echoed text and calls are unchanged (an edited turn is sent as
edited, without thinking, which Anthropic then judges).

`ThinkingTurns.recall_for(request)` reads, in one round trip, every stored turn the
request's assistant messages may echo, and returns a `Recall` that the (synchronous)
request translation asks per assistant message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from server.providers.base import JSON
from server.providers.conversation_state import DEFAULT_TTL_S, ConversationStore, StateKeeper, state_key

log = logging.getLogger(__name__)
THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_KIND = "anthropic-thinking"


class Recall:
    """The stored turns a request may echo, by their key."""

    def __init__(self, turns: dict[str, list[JSON]] | None = None) -> None:
        self._turns = turns or {}

    def recall(self, blocks: list[JSON]) -> list[JSON]:
        """The stored turn that `blocks` (rebuilt from OpenAI's message) echoes, or `blocks`."""
        ids = tool_use_ids(blocks)
        turn = self._turns.get(state_key(_KIND, *ids)) if ids else None
        if turn is None or _visible(turn) != _visible(blocks):
            return blocks
        return turn


class ThinkingTurns:
    """Stores and finds thinking turns through an adapter's `StateKeeper`."""

    def __init__(self, store: ConversationStore | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.keeper = StateKeeper(store, ttl_s)

    async def remember(self, blocks: list[JSON]) -> None:
        """Keeps a turn that thought before calling tools (others need nothing kept)."""
        ids = tool_use_ids(blocks)
        if not ids or not any(block.get("type") in THINKING_BLOCKS for block in blocks):
            return
        await self.keeper.put({state_key(_KIND, *ids): json.dumps(blocks, ensure_ascii=False)})

    async def recall_for(self, request: JSON) -> Recall:
        """The stored turns of the request's assistant messages that called tools."""
        keys = {state_key(_KIND, *ids): ids for ids in _echoed_call_ids(request.get("messages") or [])}
        found = await self.keeper.get(keys)
        turns: dict[str, list[JSON]] = {}
        for key, text in found.items():
            blocks = _blocks(text)
            if blocks is not None and tool_use_ids(blocks) == keys[key]:
                turns[key] = blocks
        return Recall(turns)


def tool_use_ids(blocks: list[JSON]) -> tuple[str, ...]:
    return tuple(str(block.get("id")) for block in blocks if block.get("type") == "tool_use")


def _echoed_call_ids(messages: Iterable[Any]) -> list[tuple[str, ...]]:
    """The tool call ids of each assistant message that has some, as the request
    translation will turn them into tool_use blocks."""
    found = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        calls = [call for call in message.get("tool_calls") or [] if isinstance(call, dict)]
        if calls:
            found.append(tuple(str(call.get("id")) for call in calls))
    return found


def _blocks(text: str) -> list[JSON] | None:
    try:
        blocks = json.loads(text)
    except ValueError:
        return None
    if not isinstance(blocks, list) or not all(isinstance(block, dict) for block in blocks):
        return None
    return blocks


def _visible(blocks: list[JSON]) -> tuple[str, list[tuple[Any, ...]]]:
    """What an OpenAI client sees of a turn: its text and its tool calls."""
    text = "".join(str(block.get("text") or "") for block in blocks if block.get("type") == "text")
    calls = [(b.get("id"), b.get("name"), b.get("input")) for b in blocks if b.get("type") == "tool_use"]
    return text, calls
