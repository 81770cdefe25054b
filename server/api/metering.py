"""What each kind of call is expected to cost at worst (for credit reservations) and
what it consumed (from the provider's OpenAI-shaped usage), for `Accounts.meter`.

`chat_prompt_tokens` estimates a chat prompt's input tokens for calls cut before the
provider reported usage: the characters of the messages' text (string contents, text
parts, names, tool call arguments, tool definitions) at 4 characters per token, the
meter's rule for streamed output too. Images and audio parts are not counted: their
token cost is the provider's own and the estimate stays a lower bound.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.accounts.credits import Usage
from server.accounts.service import CHARS_PER_TOKEN
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


def chat_prompt_tokens(request: chat_pb.CreateChatCompletionRequest) -> int:
    """About how many input tokens the prompt is (see the module docstring)."""
    chars = 0
    for message in request.messages:
        chars += len(message.role) + len(message.name) + _text_chars(message.content)
        for call in message.tool_calls:
            chars += len(call.function.name) + len(call.function.arguments)
    for tool in request.tools:
        chars += len(tool.function.name) + len(tool.function.description) + tool.function.parameters.ByteSize()
    return -(-chars // CHARS_PER_TOKEN)


def _text_chars(content: struct_pb2.Value) -> int:
    """Characters of text in a message content: a string, or a list of parts."""
    kind = content.WhichOneof("kind")
    if kind == "string_value":
        return len(content.string_value)
    if kind != "list_value":
        return 0
    total = 0
    for part in content.list_value.values:
        if part.WhichOneof("kind") == "struct_value":
            text = part.struct_value.fields.get("text")
            if text is not None and text.WhichOneof("kind") == "string_value":
                total += len(text.string_value)
    return total


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
