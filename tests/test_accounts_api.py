"""Keys, allow-lists, the usage ledger and credits, through the real server and the
REST bridge (the accounts library itself is tested in tests/test_storage_*.py)."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import openai
import pytest
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.accounts.credits import Rate, Usage, credits_to_micros
from server.accounts.owners import ensure_owner
from server.api.auth import CURRENT_KEY
from server.api.chat import ChatServicer
from server.app import start_gateway
from server.config import Settings
from server.routing.router import Router
from tests.conftest import gateway_config
from tests.helpers import bearer_interceptors, chat_request, error_info

HELLO = [{"role": "user", "content": "hello"}]


async def new_key(gateway, owner="user:tester", **options):
    kind, _, name = owner.partition(":")
    record = await ensure_owner(gateway.accounts.db, kind, name)
    return await gateway.accounts.keys.create_key(record.id, "test key", **options)


def sdk(bridge, secret):
    return openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0)


async def test_missing_and_wrong_keys_are_401_with_the_reason(bridge, anonymous_channel):
    async with httpx.AsyncClient(base_url=bridge.rest_url) as client:
        missing = await client.post("/v1/chat/completions", json={"model": "openai/gpt-4o", "messages": HELLO})
        malformed = await client.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-4o", "messages": HELLO},
            headers={"authorization": "Bearer nope"},
        )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "UNAUTHENTICATED"
    assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "KEY_INVALID"
    with pytest.raises(openai.AuthenticationError) as caught:
        await sdk(bridge, "ahk_abcdefgh_" + "x" * 43).chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    assert caught.value.code == "KEY_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await chat_grpc.ChatServiceStub(anonymous_channel).CreateChatCompletion(chat_request())
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_anonymous_status_need_no_key(bridge, anonymous_channel):
    health = await health_pb2_grpc.HealthStub(anonymous_channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    status = await status_grpc.StatusServiceStub(anonymous_channel).GetStatus(status_pb.GetStatusRequest())
    assert status.available
    async with httpx.AsyncClient(base_url=bridge.rest_url) as client:
        assert (await client.get("/status")).json()["available"] is True
        models = await client.get("/v1/models")
    assert models.status_code == 401, "the catalog is for key holders"


async def test_revoked_key_stops_working(gateway, bridge):
    record, secret = await new_key(gateway)
    client = sdk(bridge, secret)
    await client.chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    await gateway.accounts.keys.revoke_key(record.id)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    assert caught.value.code == "KEY_REVOKED"


async def test_expired_key_is_refused(gateway, bridge):
    _, secret = await new_key(gateway, expires_at=datetime.now(UTC) + timedelta(milliseconds=300))
    await asyncio.sleep(0.4)
    with pytest.raises(openai.AuthenticationError) as caught:
        await sdk(bridge, secret).chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    assert caught.value.code == "KEY_EXPIRED"


async def test_allow_list_is_enforced_after_alias_resolution(gateway, bridge, fake_openai):
    _, secret = await new_key(gateway, allowed_models=["openai/gpt-4o-mini*"])
    client = sdk(bridge, secret)
    allowed = await client.chat.completions.create(model="fast", messages=HELLO)  # alias of openai/gpt-4o-mini
    assert allowed.choices[0].message.content
    fake_openai.reset()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    assert caught.value.code == "MODEL_NOT_ALLOWED"
    assert not fake_openai.requests


async def test_every_call_leaves_one_record(gateway, bridge):
    record, secret = await new_key(gateway, owner="project:ledger")
    client = sdk(bridge, secret)
    completion = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    stream = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, stream=True)
    async for _ in stream:
        pass
    await client.embeddings.create(model="openai/text-embedding-3-small", input=["a b", "c"])
    await client.images.generate(model="openai/dall-e-2", prompt="x", n=2)
    await client.audio.speech.create(model="openai/tts-1", voice="alloy", input="twelve chars")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="openai/error-429", messages=HELLO)

    records = await gateway.accounts.ledger.records(key_id=record.id)
    by_operation = {}
    for usage in records:
        by_operation.setdefault(usage.operation, []).append(usage)
    assert sorted(by_operation) == ["chat", "chat_stream", "embedding", "image", "speech"]
    failed, chat = sorted(by_operation["chat"], key=lambda u: u.outcome)  # "error" < "ok"
    assert chat.outcome == "ok" and failed.outcome == "error" and failed.error_reason == "UPSTREAM_RATE_LIMITED"
    assert chat.input_tokens == completion.usage.prompt_tokens
    assert chat.output_tokens == completion.usage.completion_tokens
    assert chat.owner_id == "project:ledger" and chat.model == "openai/gpt-4o-mini"
    assert by_operation["chat_stream"][0].output_tokens > 0, "streams are billed from the usage the adapter asks for"
    assert by_operation["chat_stream"][0].ttft_ms is not None
    assert by_operation["image"][0].image_count == 2
    assert by_operation["speech"][0].characters == len("twelve chars")
    assert len({u.request_id for u in records}) == len(records) == 6

    totals = await gateway.accounts.ledger.totals("key", key_id=record.id)
    assert totals[0].calls == 6 and totals[0].errors == 1
    assert totals[0].input_tokens == sum(u.input_tokens for u in records)


async def test_a_stream_closed_while_it_waits_at_a_yield_is_recorded_as_cancelled(gateway):
    # A consumer that goes away while the stream waits at a `yield` (its last message
    # being sent) closes it: GeneratorExit there, not CancelledError. It was recorded
    # as an error with reason GeneratorExit; it is the client leaving.
    record, _ = await new_key(gateway)
    request_id = f"closed-at-yield-{record.id}"

    async def stream():
        meter = gateway.accounts.meter(
            record, "openai", "gpt-4o-mini", "chat_stream", Usage(), prompt_tokens=5, request_id=request_id
        )
        async with meter:
            meter.add_streamed_chars(40)
            yield "first"
            yield "second"

    chunks = stream()
    assert await anext(chunks) == "first"
    await chunks.aclose()
    stored = await gateway.accounts.ledger.get(request_id)
    assert stored is not None
    assert (stored.outcome, stored.error_reason) == ("cancelled", "CancelledError")
    assert (stored.input_tokens, stored.output_tokens) == (5, 10)


class _GoneCallContext:
    """grpc.aio's servicer context of a call whose client has left, as grpc-core's state
    can be before grpc cancels the handler's task: sending the answer's headers fails
    with grpc-core's own ExecuteBatchError (what a gone call raised in the 1M soak)."""

    def __init__(self, request_id: str) -> None:
        self._metadata = (("x-request-id", request_id),)

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return None

    async def send_initial_metadata(self, metadata):
        raise cygrpc.ExecuteBatchError("Failed grpc_call_start_batch: 1 with grpc_call_error value: 'GRPC_CALL_ERROR'")

    def set_trailing_metadata(self, metadata):
        raise AssertionError("a gone call has no trailers to set")

    async def abort_with_status(self, status):
        raise AssertionError(f"a gone call is not answered with a status ({status.code})")


async def test_a_call_gone_before_its_answer_headers_is_recorded_as_cancelled(gateway, fake_openai):
    # The upstream answered, but grpc-core could not send the headers: the client left
    # a moment before. It was recorded as an error with reason ExecuteBatchError.
    record, _ = await new_key(gateway)
    request_id = f"gone-{record.id}"
    router = Router(gateway_config(fake_openai.base_url), gateway.providers, upstream_timeout_s=2.0)
    chat = ChatServicer(router, gateway.accounts)
    CURRENT_KEY.set(record)  # what the auth interceptor hands the servicer
    with pytest.raises(asyncio.CancelledError):
        await chat.CreateChatCompletion(chat_request(), _GoneCallContext(request_id))
    [stored] = await gateway.accounts.ledger.records(key_id=record.id)
    assert stored.request_id.startswith(request_id)
    assert (stored.outcome, stored.error_reason) == ("cancelled", "CancelledError")
    assert stored.attempts == 1 and stored.input_tokens > 0


async def test_abandoned_stream_is_recorded_with_what_was_streamed(gateway, bridge, fake_openai):
    record, secret = await new_key(gateway)
    body = {"model": "openai/stream-slow", "messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": True}
    headers = {"authorization": f"Bearer {secret}"}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", f"{bridge.rest_url}/chat/completions", json=body, headers=headers) as response,
    ):
        async for line in response.aiter_lines():
            if '"content":"echo' in line:
                break
    for _ in range(100):
        records = await gateway.accounts.ledger.records(key_id=record.id)
        if records:
            break
        await asyncio.sleep(0.05)
    assert len(records) == 1
    assert records[0].outcome == "cancelled" and records[0].output_tokens > 0


@pytest.fixture(scope="module")
async def billing_gateway(fake_openai, tmp_path_factory):
    settings = Settings(grpc_port=0, billing_enabled=True, data_dir=tmp_path_factory.mktemp("billing"))
    gateway = await start_gateway(settings, gateway_config(fake_openai.base_url))
    await gateway.accounts.credits.set_rate(
        Rate(
            model="openai/*",
            input_per_million_micros=credits_to_micros(1000),
            output_per_million_micros=credits_to_micros(1000),
        )
    )
    yield gateway
    await gateway.stop(0.5)


async def test_concurrent_calls_never_overdraw_a_small_balance(billing_gateway):
    record, secret = await new_key(billing_gateway, owner="user:poor")
    # One call reserves (input bytes/2 + max_tokens 100) tokens at 1000 credits per million.
    await billing_gateway.accounts.credits.grant(record.owner_id, credits_to_micros("0.5"))
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{billing_gateway.port}", interceptors=bearer_interceptors(secret)
    ) as channel:
        chat = chat_grpc.ChatServiceStub(channel)
        results = await asyncio.gather(
            *(chat.CreateChatCompletion(chat_request(max_tokens=100)) for _ in range(30)), return_exceptions=True
        )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert served and refused, "the balance covers some calls, not all"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert info.reason == "INSUFFICIENT_CREDITS"
        assert "available_credits" in info.metadata and "needed_credits" in info.metadata
    balance = await billing_gateway.accounts.credits.balance(record.owner_id)
    assert balance.balance_micros >= 0 and balance.reserved_micros == 0
    charged = sum(u.credits_micros for u in await billing_gateway.accounts.ledger.records(key_id=record.id))
    assert balance.balance_micros == credits_to_micros("0.5") - charged
    assert charged > 0


async def test_out_of_credits_over_rest_is_429_insufficient_credits(billing_gateway, tmp_path):
    from tests.conftest import start_bridge

    _, secret = await new_key(billing_gateway, owner="user:broke")
    bridge = await start_bridge(billing_gateway.port, tmp_path)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk(bridge, secret).chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    finally:
        await bridge.envoy.stop()
    assert caught.value.code == "INSUFFICIENT_CREDITS"
    assert "available" in str(caught.value) and "needs up to" in str(caught.value)


async def test_refused_calls_are_recorded_too(gateway, bridge):
    record, secret = await new_key(gateway, owner="user:refused", allowed_models=["openai/gpt-4o"])
    client = sdk(bridge, secret)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="openai/gpt-4o", messages=[])
    with pytest.raises(openai.PermissionDeniedError):
        await client.embeddings.create(model="openai/text-embedding-3-small", input="x")
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nosuch/model", messages=HELLO, stream=True)
    records = await gateway.accounts.ledger.records(key_id=record.id)
    reasons = sorted((r.operation, r.outcome, r.error_reason) for r in records)
    assert reasons == [
        ("chat", "error", "INVALID_REQUEST"),
        ("chat_stream", "error", "MODEL_NOT_FOUND"),
        ("embedding", "error", "MODEL_NOT_ALLOWED"),
    ]


async def test_rates_from_the_config_file_are_applied_on_start(fake_openai, tmp_path):
    from decimal import Decimal

    from server.config import RateConfig

    config = gateway_config(fake_openai.base_url)
    config.rates["openai/*"] = RateConfig(input_per_million=Decimal("2.5"), per_image=Decimal("0.04"))
    gateway = await start_gateway(Settings(grpc_port=0, data_dir=tmp_path), config)
    try:
        rate = await gateway.accounts.credits.rate_for("openai/gpt-4o")
    finally:
        await gateway.stop(0.2)
    assert rate is not None
    assert rate.input_per_million_micros == 2_500_000 and rate.per_image_micros == 40_000


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
async def test_transcriptions_record_audio_seconds_in_every_format(gateway, bridge, fake_openai, response_format):
    record, secret = await new_key(gateway, owner=f"project:audio-{response_format}")
    audio = io.BytesIO(b"RIFF fake wave bytes")
    audio.name = "speech.wav"
    result = await sdk(bridge, secret).audio.transcriptions.create(
        model="openai/whisper-1", file=audio, response_format=response_format
    )
    sent = fake_openai.requests[-1].form["response_format"]
    # text, srt and vtt are rendered by the gateway from verbose_json, which tells the duration.
    assert sent == ("json" if response_format == "json" else "verbose_json")
    if response_format == "srt":
        assert result.startswith("1\n00:00:00,000 --> 00:00:0") and "\n\n" in result
    if response_format == "vtt":
        assert result.startswith("WEBVTT\n\n00:00:00.000 --> ")
    if response_format == "text":
        assert result.strip() and "-->" not in result
    [usage] = await gateway.accounts.ledger.records(key_id=record.id)
    assert usage.operation == "transcription" and usage.audio_ms > 0


async def test_gpt4o_transcription_text_records_tokens(gateway, bridge, fake_openai):
    record, secret = await new_key(gateway, owner="project:audio-tokens")
    audio = io.BytesIO(b"RIFF fake wave bytes")
    audio.name = "speech.wav"
    text = await sdk(bridge, secret).audio.transcriptions.create(
        model="openai/gpt-4o-mini-transcribe", file=audio, response_format="text"
    )
    assert fake_openai.requests[-1].form["response_format"] == "json" and text.endswith("\n")
    [usage] = await gateway.accounts.ledger.records(key_id=record.id)
    assert usage.operation == "transcription" and usage.input_tokens > 0 and usage.output_tokens > 0
