"""Graceful shutdown: in-flight calls (streams too) finish, new calls are refused."""

from __future__ import annotations

import asyncio

import grpc

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.app import start_gateway
from server.config import Settings
from tests.conftest import gateway_config
from tests.helpers import chat_request


async def test_stop_drains_streams_in_flight_and_refuses_new_calls(fake_openai):
    gateway = await start_gateway(
        Settings(grpc_port=0, shutdown_grace_s=10, auth_required=False), gateway_config(fake_openai.base_url)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        chat = chat_grpc.ChatServiceStub(channel)
        call = chat.StreamChatCompletion(chat_request(model="openai/stream-slow", text="a b c d e"))
        first = await call.read()
        assert first.choices

        stopping = asyncio.create_task(gateway.stop())
        # Wait for the event (the gateway has stopped taking calls), not for a time.
        for _ in range(1000):
            if not gateway.serving.serving:
                break
            await asyncio.sleep(0)
        assert not gateway.serving.serving
        with_new_call_refused = False
        try:
            await chat.CreateChatCompletion(chat_request(), timeout=2)
        except grpc.aio.AioRpcError as error:
            with_new_call_refused = error.code() == grpc.StatusCode.UNAVAILABLE
        rest = []
        while (chunk := await call.read()) is not grpc.aio.EOF:
            rest.append(chunk)
        await stopping

    text = "".join(c.choices[0].delta.content for c in [first, *rest] if c.choices)
    assert "a b c d e" in text, "the stream in flight completed"
    assert rest[-1].choices[0].finish_reason == "stop"
    assert with_new_call_refused
    assert await call.code() == grpc.StatusCode.OK
