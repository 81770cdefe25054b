"""The OpenAI family's translation without a server: reasoning fields of the dialects,
Azure's content-filter errors and deployment URLs, and transcriptions rendered from a
richer format (for usage)."""

from __future__ import annotations

import json

from multidict import CIMultiDict

from server import errors
from server.providers.azure import AzureOpenAIAdapter
from server.providers.openai import OpenAIAdapter, render_transcription, richer_transcription_format
from server.providers.transport import Transport

TRANSPORT = Transport()  # built only: nothing is sent here


def test_openrouter_reasoning_reaches_clients_as_reasoning_content() -> None:
    adapter = OpenAIAdapter(
        name="openrouter", base_url="http://x/v1", api_key=None, transport=TRANSPORT, reasoning_field="reasoning"
    )
    chunk = {"choices": [{"index": 0, "delta": {"reasoning": "hmm"}}]}
    assert adapter._rename_reasoning(chunk, "delta")["choices"][0]["delta"] == {"reasoning_content": "hmm"}


def test_azure_content_filter_refusal_names_the_categories() -> None:
    adapter = AzureOpenAIAdapter(
        name="azure", endpoint="https://r.openai.azure.com", api_key="k", transport=TRANSPORT, api_version="v"
    )
    body = {
        "error": {
            "code": "content_filter",
            "message": "filtered",
            "innererror": {"content_filter_result": {"hate": {"filtered": True, "severity": "high"}}},
        }
    }
    error = adapter._status_error(400, CIMultiDict(), json.dumps(body).encode())
    assert isinstance(error, errors.UpstreamBadRequest) and "hate: high" in error.message
    other = adapter._status_error(429, CIMultiDict({"retry-after": "2"}), b'{"error": {"message": "slow"}}')
    assert isinstance(other, errors.UpstreamRateLimited) and other.retry_after_seconds == 2.0
    assert adapter._url("/chat/completions", "my gpt") == (
        "https://r.openai.azure.com/openai/deployments/my%20gpt/chat/completions"
    )
    assert adapter._http.headers["api-key"] == "k" and adapter._params == {"api-version": "v"}


def test_srt_is_rendered_from_verbose_json_with_its_duration_as_usage() -> None:
    assert richer_transcription_format("srt", "whisper-1") == "verbose_json"
    assert richer_transcription_format("text", "gpt-4o-mini-transcribe") == "json"
    verbose = {"text": "Hello there", "duration": 1.5, "segments": [{"start": 0, "end": 1.5, "text": " Hello there"}]}
    output = render_transcription("openai", json.dumps(verbose).encode(), "srt")
    assert output.body == b"1\n00:00:00,000 --> 00:00:01,500\nHello there\n\n"
    assert output.usage == {"type": "duration", "seconds": 1.5}
