"""Fast unit tests of the API layer's pure parts: validation, conversion, metering and
the error mapping. No server, no Envoy: each runs in microseconds, so a failure here
points at one function rather than at a whole stack."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import json_format

from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from server import errors
from server.accounts import errors as accounts_errors
from server.api.audio import parse_transcription_upload
from server.api.convert import from_json, to_json
from server.api.errors import GRPC_CODES, OPENAI_TYPE_KEY, grpc_code, to_grpc_status
from server.api.metering import chat_prompt_tokens, streamed_text_chars, usage_from_openai
from server.api.validation import check_chat_request, check_model_name, check_request
from tests.helpers import chat_request, value


def refusal(call, *args) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as caught:
        call(*args)
    return caught.value


# ---------------------------------------------------------------- validation


def test_a_valid_chat_request_passes():
    request = chat_request(temperature=1.5, tools=[{"type": "function", "function": {"name": "f"}}])
    check_request(request)
    check_chat_request(request)


@pytest.mark.parametrize(
    ("fields", "field", "error"),
    [
        ({"temperature": 2.5}, "temperature", errors.InvalidRequest),
        ({"model": "openai/" + "m" * 250}, "model", errors.RequestTooLarge),
        ({"messages": []}, "messages", errors.InvalidRequest),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", errors.RequestTooLarge),
    ],
)
def test_documented_bounds_are_refused_naming_the_field(fields, field, error):
    request = chat_request()
    for name, item in fields.items():
        request.ClearField(name)
        json_format.ParseDict({name: item}, request)
    caught = refusal(check_request, request)
    assert type(caught) is error and caught.field == field


def test_a_tool_call_id_is_bounded_inside_a_message():
    request = chat_request()
    request.messages.append(chat_pb.ChatMessage(role="tool", tool_call_id="c" * 257, content=value("x")))
    assert refusal(check_request, request).field == "messages[1].tool_call_id"


def test_a_refused_value_is_quoted_short():
    request = chat_request()
    request.messages[0].role = "r" * 100_000
    caught = refusal(check_chat_request, request)
    assert len(caught.message) < 200 and caught.field == "messages[0].role"


@pytest.mark.parametrize("model", ["gemini/../files", "gemini/./x", "openai/a\nb", "openai/\x00", "../x"])
def test_model_names_that_could_walk_an_upstream_url_are_refused(model):
    assert refusal(check_model_name, model).field == "model"


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "ollama/llama3.1:8b", "hf/meta-llama/Llama-3-8B", "x..y/z"])
def test_real_model_names_pass(model):
    check_model_name(model)


def test_an_embedding_model_is_checked_by_the_contract_walk():
    request = embedding_pb.CreateEmbeddingRequest(model="openai/../v1/files", input=value("x"))
    assert refusal(check_request, request).field == "model"


# ---------------------------------------------------------------- multipart


BOUNDARY = "b0"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: str, close: bool = True) -> bytes:
    body = "".join(f"--{BOUNDARY}\r\n{part}\r\n" for part in parts)
    return (body + (f"--{BOUNDARY}--\r\n" if close else "")).encode()


MODEL = 'Content-Disposition: form-data; name="model"\r\n\r\nopenai/whisper-1'
FILE = 'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF'


def test_a_complete_upload_parses():
    model, audio = parse_transcription_upload(
        CONTENT_TYPE, form(MODEL, FILE, 'Content-Disposition: form-data; name="language"\r\n\r\nen')
    )
    assert model == "openai/whisper-1"
    assert (audio.file, audio.filename, audio.file_content_type) == (b"RIFF", "a.wav", "audio/wav")
    assert audio.fields == [("language", "en")]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (form(MODEL, FILE, close=False), "closing boundary"),
        (form(MODEL, 'Content-Disposition: form-data; name="file"\r\n\r\nRIFF'), "filename"),
        (form(MODEL), "file is required"),
        (form('Content-Disposition: form-data; name="model"\r\n\r\nopenai/../x', FILE), "path segments"),
    ],
)
def test_broken_uploads_are_refused(body, words):
    assert words in refusal(parse_transcription_upload, CONTENT_TYPE, body).message


def test_an_upload_needs_a_multipart_content_type():
    assert refusal(parse_transcription_upload, "application/json", b"{}").field == "file"


# ---------------------------------------------------------------- convert


def test_to_json_keeps_whole_numbers_whole_and_drops_unset_fields():
    request = chat_request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"minItems": 1}}}])
    body = to_json(request)
    assert body["tools"][0]["function"]["parameters"] == {"minItems": 1}
    assert "temperature" not in body and "n" not in body


def test_to_json_refuses_nan_naming_where():
    request = chat_request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"x": 1}}}])
    request.tools[0].function.parameters["x"] = math.nan
    assert refusal(to_json, request).field == "tools[0].function.parameters.x"


def test_from_json_ignores_extra_fields_and_blames_the_provider_for_wrong_types():
    answer = from_json({"text": "hi", "brand_new_field": 1}, audio_pb.CreateTranscriptionResponse(), provider="p")
    assert answer.text == "hi"
    with pytest.raises(errors.UpstreamMalformedResponse) as caught:
        from_json({"text": {"not": "text"}}, audio_pb.CreateTranscriptionResponse(), provider="p")
    assert caught.value.metadata["provider"] == "p"


# ---------------------------------------------------------------- metering


def test_usage_from_openai_counts_cached_tokens_and_ignores_junk():
    usage = usage_from_openai(
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
    )
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (10, 5, 4)
    junk = usage_from_openai({"prompt_tokens": -3, "completion_tokens": "5"})
    assert (junk.input_tokens, junk.output_tokens) == (0, 0)
    assert usage_from_openai(None).input_tokens == 0


def test_prompt_tokens_grow_with_the_prompt():
    short, long = chat_request(text="x" * 10), chat_request(text="x" * 10_000)
    assert 0 < chat_prompt_tokens(short) < chat_prompt_tokens(long)


def test_streamed_text_counts_content_and_tool_arguments():
    chunk = {"choices": [{"delta": {"content": "abc", "tool_calls": [{"function": {"arguments": "{}"}}]}}]}
    assert streamed_text_chars(chunk) == 5
    assert streamed_text_chars({"choices": [None, {"delta": "junk"}]}) == 0


# ---------------------------------------------------------------- error mapping


def every_error_class() -> list[type[errors.GatewayError]]:
    found, pending = [], [errors.GatewayError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
def test_every_class_maps_to_a_code_and_carries_its_openai_type(cls):
    if issubclass(cls, errors.UpstreamError):
        exc = cls("m", provider="p")
    elif issubclass(cls, accounts_errors.QuotaExceeded):
        exc = cls("m", available_micros=0, needed_micros=1)
    elif issubclass(cls, errors.RateLimited):
        exc = cls("m", retry_after_seconds=1.0)
    else:
        exc = cls("m")
    code = grpc_code(exc)
    assert code != grpc.StatusCode.INTERNAL or cls in (errors.GatewayError, errors.InternalError)
    status = to_grpc_status(exc)
    assert status.code == code
    assert exc.openai_type.encode() in dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert OPENAI_TYPE_KEY == "openai_type"


def test_the_code_table_names_only_classes_of_the_tree():
    assert set(GRPC_CODES) <= set(every_error_class())
