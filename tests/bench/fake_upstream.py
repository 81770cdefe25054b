"""A fake OpenAI upstream that costs almost no CPU: an Envoy serving fixed bodies with
`direct_response`. The Python fake in tests/fakes would be the bottleneck under load.

Routes (by prefix, so that two gateway providers can point at two behaviours):
  /json/v1/chat/completions  a fixed chat.completion JSON object
  /sse/v1/chat/completions   a fixed stream of chat.completion.chunk events + [DONE]
  /v1/chat/completions       the same JSON, for calling the fake the way an SDK would
  /stream/v1/chat/completions  the same stream, where the side-by-side kit's LiteLLM asks
"""

from __future__ import annotations

import json
from string import Template
from typing import Any

CREATED = 1_700_000_000
MODEL = "gpt-4o-mini"
# Words of the streamed answer: one content event each, plus role, finish and usage
# events: 21 events in all, then [DONE].
STREAM_WORDS = [
    "Hello",
    "there!",
    "This",
    "is",
    "a",
    "streamed",
    "answer",
    "from",
    "the",
    "fake",
    "upstream,",
    "one",
    "word",
    "per",
    "event,",
    "twenty",
]

_TEMPLATE = Template(
    """\
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $admin_port}}
static_resources:
  listeners:
  - name: fake_openai
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: fake_openai
          route_config:
            # The SSE body is larger than the 4 KiB default limit of direct responses.
            max_direct_response_body_size_bytes: 65536
            virtual_hosts:
            - name: fake
              domains: ["*"]
              routes:
              - match: {prefix: /sse/v1/chat/completions}
                direct_response: {status: 200, body: {inline_string: $sse_body}}
                response_headers_to_add: &sse
                - header: {key: content-type, value: text/event-stream}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
              # The path the side-by-side kit (../shared/bench) gives LiteLLM for streams.
              - match: {prefix: /stream/v1/chat/completions}
                direct_response: {status: 200, body: {inline_string: $sse_body}}
                response_headers_to_add: *sse
              - match: {prefix: /json/v1/chat/completions}
                direct_response: {status: 200, body: {inline_string: $json_body}}
                response_headers_to_add: &json
                - header: {key: content-type, value: application/json}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
              - match: {prefix: /v1/chat/completions}
                direct_response: {status: 200, body: {inline_string: $json_body}}
                response_headers_to_add: *json
          http_filters:
          # Without it Envoy answers before reading a POST's body and then closes the
          # connection (`connection: close`), so every call would pay a new TCP
          # connection, which a real upstream's keep-alive does not cost.
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 1048576
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
)


def completion_body() -> str:
    """A chat.completion as OpenAI sends it today, nulls included (the gateway must
    parse those too, so they belong in the measured path)."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
            "system_fingerprint": "fp_bench",
        },
        separators=(",", ":"),
    )


def _chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: dict[str, int] | None = None) -> str:
    choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": choices,
    }
    if usage:
        chunk["usage"] = usage
    return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"


def stream_body() -> str:
    """The SSE stream of one streamed completion, usage chunk and [DONE] included
    (the adapter always asks upstream for usage)."""
    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": word + " "}) for word in STREAM_WORDS]
    events.append(_chunk({}, finish_reason="stop"))
    usage = {"prompt_tokens": 9, "completion_tokens": len(STREAM_WORDS), "total_tokens": 9 + len(STREAM_WORDS)}
    events.append(_chunk({}, usage=usage))
    return "".join(events) + "data: [DONE]\n\n"


def render_fake_config(*, port: int, admin_port: int) -> str:
    # JSON strings are valid YAML double-quoted scalars: no escaping of our own.
    return _TEMPLATE.substitute(
        port=port,
        admin_port=admin_port,
        json_body=json.dumps(completion_body()),
        sse_body=json.dumps(stream_body()),
    )
