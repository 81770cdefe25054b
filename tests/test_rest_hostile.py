"""Hostile REST input: over-long identifiers and broken multipart bodies get a clear 400
(never Envoy's 502 for an oversized trailer, never a 200), and no error echoes a client
value whole."""

from __future__ import annotations

import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from server import errors
from server.api.errors import to_grpc_status

HUGE = "m" * 100_000
BOUNDARY = "hostile-boundary"


@pytest.fixture
async def http(bridge, auth_headers):
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20, headers=auth_headers) as client:
        yield client


def user(text: str = "x") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_bounded_400(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text[:500]
    assert len(response.content) < 4000, "an error must not echo the whole value"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "openai/" + HUGE, "messages": user()}, "model"),
        ("/v1/chat/completions", {"model": HUGE, "messages": user()}, "model"),
        ("/v1/chat/completions", {"model": HUGE + "/x", "messages": user()}, "model"),
        ("/v1/chat/completions", {"model": "openai/" + HUGE, "stream": True, "messages": user()}, "model"),
        ("/v1/embeddings", {"model": "openai/" + HUGE, "input": "x"}, "model"),
        ("/v1/images/generations", {"model": "openai/" + HUGE, "prompt": "a cat"}, "model"),
        ("/v1/audio/speech", {"model": "openai/" + HUGE, "input": "hi", "voice": "alloy"}, "model"),
        (
            "/v1/chat/completions",
            {"model": "openai/gpt-4o-mini", "messages": [{"role": "tool", "tool_call_id": HUGE, "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            "/v1/chat/completions",
            {"model": "openai/gpt-4o-mini", "messages": [{"role": "r" * 1_000_000, "content": "x"}]},
            "messages[0].role",
        ),
    ],
    ids=["model", "model-no-slash", "provider", "stream-model", "embeddings", "images", "speech", "tool-id", "role"],
)
async def test_over_long_identifiers_are_400_with_a_bounded_message(http, path, body, param):
    error = assert_bounded_400(await http.post(path, json=body), param)
    assert error["code"] in ("REQUEST_TOO_LARGE", "INVALID_REQUEST")


async def test_a_model_at_its_limit_is_served(http, fake_openai):
    model = "openai/" + "m" * 249
    response = await http.post("/v1/chat/completions", json={"model": model, "messages": user()})
    assert response.status_code == 200, response.text[:300]


def multipart(*parts: str, close: bool = True) -> bytes:
    body = "".join(f"--{BOUNDARY}\r\n{part}\r\n" for part in parts)
    return (body + (f"--{BOUNDARY}--\r\n" if close else "")).encode()


MODEL_PART = 'Content-Disposition: form-data; name="model"\r\n\r\nopenai/whisper-1'
FILE_PART = 'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFFxxxx'


async def upload(http: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return await http.post("/v1/audio/transcriptions", content=body, headers=headers)


async def test_a_well_formed_upload_is_transcribed(http, fake_openai):
    response = await upload(http, multipart(MODEL_PART, FILE_PART))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (multipart(MODEL_PART, FILE_PART, close=False), "closing boundary"),
        (multipart(MODEL_PART, 'Content-Disposition: form-data; name="file"\r\n\r\nRIFFxxxx'), "filename"),
        (b"no boundary anywhere", "multipart"),
        (
            multipart(
                MODEL_PART, 'Content-Disposition: form-data; name="file"; filename="' + "f" * 300 + '"\r\n\r\nRIFF'
            ),
            "at most 256",
        ),
        (multipart('Content-Disposition: form-data; name="model"\r\n\r\nopenai/' + HUGE, FILE_PART), "model"),
    ],
    ids=["no-closing-boundary", "file-without-filename", "no-boundary", "long-filename", "long-model"],
)
async def test_broken_uploads_are_400_before_any_provider(http, fake_openai, body, words):
    response = await upload(http, body)
    assert response.status_code == 400, response.text[:300]
    assert len(response.content) < 4000
    assert words in response.json()["error"]["message"]
    assert not [r for r in fake_openai.requests if "transcriptions" in r.path]


def test_every_status_is_bounded_whatever_the_message():
    exc = errors.InvalidRequest("x" * 100_000, field="f" * 10_000, metadata={"k" * 1000: "v" * 100_000})
    status = status_pb2.Status.FromString(dict(to_grpc_status(exc).trailing_metadata)["grpc-status-details-bin"])
    assert len(status.message) == errors.MAX_MESSAGE and status.message.endswith("\u2026")
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert all(len(k) <= errors.MAX_METADATA and len(v) <= errors.MAX_METADATA for k, v in info.metadata.items())
    assert len(info.metadata) == 3  # field, the long key, openai_type
