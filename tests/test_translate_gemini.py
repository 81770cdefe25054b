"""Gemini's translator without a server: OpenAI request -> GenerateContentRequest,
GenerateContentResponse (whole and streamed, as Google sends them) -> OpenAI, and
Google's error objects (RetryInfo, the bad-key 400) -> errors."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict

from server import errors
from server.providers.gemini import (
    StreamTranslator,
    completion_from_response,
    generate_content_request,
    google_error,
    read_call_id,
)

USAGE = {"promptTokenCount": 8, "candidatesTokenCount": 4, "totalTokenCount": 14, "thoughtsTokenCount": 2}


def _candidate(parts: list[dict[str, object]], finish: str | None = None) -> dict[str, object]:
    candidate: dict[str, object] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def test_request_roles_tools_and_generation_config() -> None:
    request = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "stop": ["END"],
    }
    body = generate_content_request(request, "gemini-2.5-flash", "gemini")
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Weather?"}]}]
    assert body["tools"][0]["functionDeclarations"][0]["name"] == "weather"
    assert body["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"
    config = body["generationConfig"]
    assert config["maxOutputTokens"] == 50 and config["temperature"] == 0.2 and config["stopSequences"] == ["END"]


def test_logit_bias_is_refused() -> None:
    with pytest.raises(errors.UnsupportedFeature, match="logit_bias"):
        generate_content_request({"messages": [], "logit_bias": {"1": 1}}, "m", "gemini")


def test_answer_with_a_function_call_mints_an_id_carrying_its_signature() -> None:
    answer = {
        "candidates": [
            _candidate(
                [
                    {"text": "thinking...", "thought": True},
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                ],
                "STOP",
            )
        ],
        "usageMetadata": USAGE,
        "modelVersion": "gemini-2.5-flash",
        "responseId": "r1",
    }
    completion = completion_from_response(answer, "gemini-2.5-flash", 1, "gemini")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"  # STOP with calls
    call = choice["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert read_call_id(call["id"]).signature == "c2ln"
    assert completion["usage"]["prompt_tokens"] == 8


def test_stream_events_become_chunks_then_usage() -> None:
    translator = StreamTranslator("gemini-2.5-flash", 1)
    events = [
        {"candidates": [_candidate([{"text": "Hel"}])], "usageMetadata": USAGE, "responseId": "r2"},
        {"candidates": [_candidate([{"text": "lo"}], "MAX_TOKENS")], "usageMetadata": USAGE, "responseId": "r2"},
    ]
    chunks = [chunk for event in events for chunk in translator.chunks(event)]
    assert translator.finished
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["Hel", "lo"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = translator.usage_chunk()
    assert usage is not None and usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_a_blocked_prompt_is_a_content_filter_refusal() -> None:
    answer = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": USAGE}
    completion = completion_from_response(answer, "gemini-2.5-flash", 1, "gemini")
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["refusal"]


def _error_body(code: int, status: str, details: list[dict[str, object]]) -> bytes:
    return json.dumps({"error": {"code": code, "message": "why", "status": status, "details": details}}).encode()


def test_retry_info_is_the_retry_hint() -> None:
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    error = google_error("gemini", 429, CIMultiDict(), _error_body(429, "RESOURCE_EXHAUSTED", [retry]))
    assert isinstance(error, errors.UpstreamRateLimited) and error.retry_after_seconds == 7.0
    assert "RESOURCE_EXHAUSTED: why" in error.message


def test_a_bad_key_400_is_a_rejected_credential() -> None:
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    error = google_error("gemini", 400, CIMultiDict(), _error_body(400, "INVALID_ARGUMENT", [info]))
    assert isinstance(error, errors.UpstreamCredentialRejected)


def test_a_body_that_is_not_google_s_is_read_by_status() -> None:
    error = google_error("gemini", 503, CIMultiDict(), b"<html>down</html>")
    assert isinstance(error, errors.UpstreamUnavailable) and "down" in error.message
