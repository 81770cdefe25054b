"""What each kind of call is expected to cost at worst (for credit reservations) and
what it consumed (from the provider's OpenAI-shaped usage), for `Accounts.meter`."""

from __future__ import annotations

from typing import Any

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.accounts.credits import Usage
from server.providers.base import JSON

# When a chat request sets no output limit, reserve for this many output tokens.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
# A token is at least ~2 bytes of JSON in practice; overestimating input is safe for a
# reservation (the settlement charges what the provider reports).
BYTES_PER_TOKEN_FLOOR = 2


def chat_worst_case(request: chat_pb.CreateChatCompletionRequest) -> Usage:
    output = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS
    choices = request.n if request.HasField("n") else 1
    return Usage(input_tokens=request.ByteSize() // BYTES_PER_TOKEN_FLOOR + 1, output_tokens=output * choices)


def input_worst_case(size_bytes: int) -> Usage:
    return Usage(input_tokens=size_bytes // BYTES_PER_TOKEN_FLOOR + 1)


def usage_from_openai(usage: Any) -> Usage:
    """OpenAI's `usage` object as the ledger's Usage (missing parts count 0)."""
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(cached),
    )


def streamed_text_chars(chunk: JSON) -> int:
    """Characters of generated text in a chunk, to estimate an abandoned stream's use."""
    total = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for field in ("content", "reasoning_content", "refusal"):
            value = delta.get(field)
            if isinstance(value, str):
                total += len(value)
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                total += len(function["arguments"])
    return total


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0
