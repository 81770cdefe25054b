"""Bedrock's error bodies and event-stream exceptions without a server (the Converse
translation itself: tests/test_bedrock_converse.py)."""

from __future__ import annotations

import httpx
import pytest

from server import errors
from server.providers.bedrock import BedrockAdapter
from server.providers.transport import Transport

ADAPTER = BedrockAdapter(
    name="bedrock", endpoint="https://bedrock.invalid", region="us-east-1", transport=Transport(), api_key="k"
)


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (
            429,
            {"x-amzn-errortype": "ThrottlingException:http://internal"},
            b'{"message": "slow down"}',
            errors.UpstreamRateLimited,
        ),
        (
            403,
            {},
            b'{"__type": "com.amazon#UnrecognizedClientException", "Message": "bad token"}',
            errors.UpstreamCredentialRejected,
        ),
        (403, {"x-amzn-errortype": "AccessDeniedException"}, b'{"message": "not enabled"}', errors.UpstreamAuthFailed),
        (400, {"x-amzn-errortype": "ValidationException"}, b'{"message": "bad"}', errors.UpstreamBadRequest),
        (503, {}, b"<html>unknown</html>", errors.UpstreamUnavailable),  # no type: by status
    ],
)
def test_error_types_decide_the_class(
    status: int, headers: dict[str, str], body: bytes, expected: type[errors.UpstreamError]
) -> None:
    error = ADAPTER._status_error(status, httpx.Headers({**headers, "retry-after": "2"}), body)
    assert type(error) is expected and error.retry_after_seconds == 2.0


def test_a_stream_exception_frame_is_mapped_like_its_http_error() -> None:
    error = ADAPTER._stream_exception(
        {":message-type": "exception", ":exception-type": "modelStreamErrorException"}, b'{"message": "broke"}'
    )
    assert isinstance(error, errors.UpstreamUnavailable) and "broke" in error.message
    assert ADAPTER._http.headers["authorization"] == "Bearer k"
