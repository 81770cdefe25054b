"""Small helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from aigne.hub.v1 import chat_service_pb2 as chat_pb


def value(python: Any) -> struct_pb2.Value:
    """A google.protobuf.Value holding `python` (str, list, dict, number, None)."""
    result = struct_pb2.Value()
    json_format.ParseDict(python, result)
    return result


def chat_request(
    model: str = "openai/gpt-4o-mini", text: str = "hello", **fields: Any
) -> chat_pb.CreateChatCompletionRequest:
    request = chat_pb.CreateChatCompletionRequest(
        model=model, messages=[chat_pb.ChatMessage(role="user", content=value(text))]
    )
    for name, field_value in fields.items():
        json_format.ParseDict({name: field_value}, request)
    return request


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call's rich status."""
    for key, raw in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(raw)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {error!r}")


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    for key, raw in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(raw).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info
    return None


class _Bearer:
    """Adds `authorization: Bearer <key>` to every call, as a gRPC client would."""

    def __init__(self, secret: str) -> None:
        self._entry = ("authorization", f"Bearer {secret}")

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements only.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_key(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_key(details), request)


def bearer_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    return [_BearerUnary(secret), _BearerStream(secret)]
