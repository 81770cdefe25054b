"""One source for how errors look: every class of the error tree, raised in a gRPC
servicer and carried through the real Envoy bridge and Lua filter, reads the same in a
unary REST answer, a REST stream's error event and a gRPC status, and has the HTTP
status the tree's docstring states.

The servicer here is a stand-in whose methods only raise the class a request names;
everything that shapes the error is the project's own: `unary` and `abort_for`
(server.api.calls), `to_grpc_status` (server.api.errors), the stream's error event
(server.api.chat._error_chunk) as ChatServicer prints it for BridgeService, the transcoder and
openai_bridge.lua.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from aigne.hub.v1 import bridge_service_pb2_grpc as bridge_grpc
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server import errors
from server.accounts import errors as accounts_errors
from server.api.bridge import BridgeServicer
from server.api.calls import abort_for, from_bridge, unary
from server.api.chat import _error_chunk, sse_event
from server.api.errors import OPENAI_TYPE_KEY, grpc_code
from tests.conftest import Bridge, start_bridge
from tests.helpers import chat_request, error_info

MESSAGE = "the error under test"


def all_classes() -> list[type[errors.GatewayError]]:
    found: list[type[errors.GatewayError]] = []
    pending: list[type[errors.GatewayError]] = [errors.GatewayError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted((cls for cls in found if cls.__module__ in ("server.errors", "server.accounts.errors")), key=str)


CLASSES = {cls.__name__: cls for cls in all_classes()}


def build(cls: type[errors.GatewayError]) -> errors.GatewayError:
    """An instance of `cls`, with `field` where its constructor takes one."""
    if issubclass(cls, errors.UpstreamError):
        return cls(MESSAGE, provider="openai", field="model")
    if issubclass(cls, accounts_errors.QuotaExceeded):
        return cls(MESSAGE, available_micros=1, needed_micros=2)
    if issubclass(cls, errors.StorageUnavailable | errors.RateLimitsUnavailable):
        return cls(MESSAGE)
    if issubclass(cls, errors.RateLimited):
        return cls(MESSAGE, retry_after_seconds=1.0)
    return cls(MESSAGE, field="model")


class RaisingChat(chat_grpc.ChatServiceServicer):
    """Raises the error class named by the request's model (`error/<ClassName>`)."""

    @unary
    async def CreateChatCompletion(self, request, context):  # type: ignore[override]
        raise build(CLASSES[request.model.removeprefix("error/")])

    @unary
    async def create_printed(self, request, context):  # type: ignore[no-untyped-def]
        """What BridgeService answers with: ChatServicer's CreateChatCompletion, printed."""
        raise build(CLASSES[request.model.removeprefix("error/")])

    async def StreamChatCompletion(self, request, context) -> AsyncIterator[chat_pb.StreamChatCompletionResponse]:  # type: ignore[override]
        exc = build(CLASSES[request.model.removeprefix("error/")])
        yield chat_pb.StreamChatCompletionResponse(id="chatcmpl-1", object="chat.completion.chunk")
        if not from_bridge(context):
            await abort_for(context, exc)
        yield _error_chunk(exc)

    async def stream_events(self, request, context) -> AsyncIterator[bytes]:  # type: ignore[no-untyped-def]
        """What BridgeService relays: the same stream, as ChatServicer prints its events."""
        exc = build(CLASSES[request.model.removeprefix("error/")])
        yield sse_event(chat_pb.StreamChatCompletionResponse(id="chatcmpl-1", object="chat.completion.chunk"))
        yield sse_event(_error_chunk(exc))


class Available(status_grpc.StatusServiceServicer):
    """What the bridge's readiness check calls."""

    async def GetStatus(self, request, context):  # type: ignore[override]
        return status_pb.GetStatusResponse(available=True)


@pytest_asyncio.fixture(scope="module")
async def raising(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[int, Bridge]]:
    server = grpc.aio.server()
    chat = RaisingChat()
    chat_grpc.add_ChatServiceServicer_to_server(chat, server)
    # OpenAI's REST chat paths reach the chat servicer through BridgeService.
    bridge_grpc.add_BridgeServiceServicer_to_server(BridgeServicer(chat), server)  # type: ignore[arg-type]
    status_grpc.add_StatusServiceServicer_to_server(Available(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = await start_bridge(port, tmp_path_factory.mktemp("envoy-errors"))
    yield port, bridge
    await bridge.envoy.stop()
    await server.stop(None)


def documented_http_statuses() -> dict[str, int]:
    """Each class's HTTP status as the docstring trees of the error modules state it."""
    text = (errors.__doc__ or "") + (accounts_errors.__doc__ or "")
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = re.search(r"[─└├]\s*(\w+)\s.*\((\d{3})", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def test_the_docstrings_state_a_status_for_every_class():
    assert set(documented_http_statuses()) >= set(CLASSES) - {"GatewayError", "UpstreamError"}


@pytest.mark.parametrize("name", sorted(CLASSES))
async def test_an_error_looks_the_same_on_every_transport(raising, name):
    port, bridge = raising
    exc = build(CLASSES[name])
    body = {"model": f"error/{name}", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20) as http:
        unary_answer = await http.post("/v1/chat/completions", json=body)
        stream_answer = await http.post("/v1/chat/completions", json=body | {"stream": True})
    unary_error = unary_answer.json()["error"]
    events = [json.loads(line[6:]) for line in stream_answer.text.splitlines() if line.startswith("data: {")]
    stream_error = events[-1]["error"]

    expected = {"message": MESSAGE, "type": exc.openai_type, "code": exc.reason, "param": exc.field}
    assert {key: unary_error[key] for key in expected} == expected
    assert {key: stream_error[key] for key in expected} == expected
    documented = documented_http_statuses().get(name)
    if documented is not None:
        assert unary_answer.status_code == documented, f"{name}: HTTP {unary_answer.status_code}"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary_failure:
            await stub.CreateChatCompletion(chat_request(f"error/{name}"))
        with pytest.raises(grpc.aio.AioRpcError) as stream_failure:
            async for _ in stub.StreamChatCompletion(chat_request(f"error/{name}")):
                pass
    for failure in (unary_failure.value, stream_failure.value):
        assert failure.code() == grpc_code(exc)
        info = error_info(failure)
        assert (info.reason, info.metadata[OPENAI_TYPE_KEY]) == (exc.reason, exc.openai_type)
        assert info.metadata.get("field") == exc.field


def test_the_bridge_keeps_no_table_of_error_types():
    lua = (Path(__file__).parents[1] / "envoy" / "openai_bridge.lua").read_text()
    assert "rate_limit_error" not in lua and "invalid_request_error" not in lua
