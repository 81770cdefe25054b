"""AWS Bedrock through the gateway, over gRPC and over REST (the official openai SDK),
against a fake Bedrock runtime whose answers, event-stream frames and SigV4 checks are
validated with boto3's own `bedrock-runtime` client and botocore's event-stream parser."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator

import boto3
import pytest
import pytest_asyncio
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server import errors
from server.config import ProviderConfig, config_from_environment
from server.providers.bedrock import BedrockAdapter
from server.providers.registry import build_provider
from server.providers.transport import Transport
from tests.fakes.bedrock_upstream import FakeBedrock, event_frame
from tests.helpers import chat_request
from tests.mistral_ollama_fixtures import Stack, assemble, start_stack
from tests.test_grpc_chat import WEATHER_TOOL

ACCESS_KEY, SECRET_KEY, API_KEY, REGION = "AKIDFAKEBEDROCK", "fake-secret", "bedrock-api-key-1", "eu-west-3"
TRANSPORTS = ["grpc", "rest"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def aws_environment(env: pytest.MonkeyPatch, tmp_path, **extra: str) -> None:
    """Only the variables given: no profile or shared file of the machine leaks in."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK", "AWS_ENDPOINT_URL", "AWS_REGION"):
        env.delenv(name, raising=False)
    env.delenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", raising=False)
    env.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    env.setenv("AWS_DEFAULT_REGION", REGION)
    for name, value in extra.items():
        env.setenv(name, value)


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeBedrock]:
    server = FakeBedrock(access_key=ACCESS_KEY, secret_key=SECRET_KEY, api_key=API_KEY, slow_seconds=5)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeBedrock) -> None:
    fake.reset()


@pytest_asyncio.fixture(scope="module")
async def stack(fake: FakeBedrock, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("envoy-bedrock")
    with pytest.MonkeyPatch.context() as env:
        aws_environment(env, tmp)
        providers = {
            "bedrock": ProviderConfig(base_url=fake.base_url),  # SigV4 with the environment's keys
            "bedrockkey": ProviderConfig(type="bedrock", base_url=fake.base_url, api_key=API_KEY),
            "bedrockbad": ProviderConfig(type="bedrock", base_url=fake.base_url, api_key="not-a-key"),
        }
        running = await start_stack(providers, tmp)
    yield running
    await running.stop()


@pytest.fixture
def boto(fake: FakeBedrock) -> Iterator[object]:
    client = boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=fake.base_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"max_attempts": 1}),
    )
    yield client
    client.close()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ----------------------------------------------------------------- the fake itself


async def test_fake_converse_parses_with_boto3(fake, boto):
    answer = await asyncio.to_thread(
        boto.converse,
        modelId="anthropic.claude-3-5-haiku-20241022-v1:0",
        messages=[{"role": "user", "content": [{"text": "hi there"}]}],
        inferenceConfig={"maxTokens": 10},
    )
    assert answer["output"]["message"]["content"] == [{"text": "echo: hi there"}]
    assert answer["stopReason"] == "end_turn" and answer["usage"]["totalTokens"] == 7
    # boto3 percent-encodes the model id in the path, and the fake checked its signature.
    assert fake.requests[-1].path == "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    assert fake.requests[-1].headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")


async def test_fake_converse_stream_parses_with_boto3(boto):
    tool = {"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}

    def events() -> list[dict]:
        answer = boto.converse_stream(
            modelId="tools-parallel",
            messages=[{"role": "user", "content": [{"text": "weather?"}]}],
            toolConfig={"tools": [tool]},
        )
        return list(answer["stream"])

    received = await asyncio.to_thread(events)
    kinds = [next(iter(event)) for event in received]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    starts = [e["contentBlockStart"]["start"]["toolUse"] for e in received if "contentBlockStart" in e]
    assert [s["toolUseId"] for s in starts] == ["tooluse_fake0", "tooluse_fake1"]
    pieces = [e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in received if "contentBlockDelta" in e]
    assert "".join(pieces) == '{"city": "Paris"}{"city": "London"}'
    assert received[-2]["messageStop"]["stopReason"] == "tool_use"


async def test_fake_stream_exception_and_errors_parse_with_boto3(boto, fake):
    def stream_failure() -> ClientError | None:
        answer = boto.converse_stream(
            modelId="stream-exception", messages=[{"role": "user", "content": [{"text": "x"}]}]
        )
        try:
            list(answer["stream"])
        except EventStreamError as exc:  # boto3's type for an exception frame
            return exc
        return None

    failure = await asyncio.to_thread(stream_failure)
    assert failure is not None and failure.response["Error"]["Code"] == "throttlingException"
    assert "Too many requests" in str(failure)
    with pytest.raises(boto.exceptions.ServiceUnavailableException):
        await asyncio.to_thread(
            boto.converse,
            modelId="error-ServiceUnavailableException",
            messages=[{"role": "user", "content": [{"text": "x"}]}],
        )


async def test_fake_checks_the_sigv4_signature(fake):
    wrong = boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=fake.base_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key="not-the-secret",
        config=Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as refused:
        await asyncio.to_thread(wrong.converse, modelId="m", messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"
    wrong.close()


def test_event_frames_decode_with_botocore_parser():
    frame = event_frame({":event-type": "messageStart", ":message-type": "event"}, b'{"role":"assistant"}')
    buffer = EventStreamBuffer()
    buffer.add_data(frame[:7])  # a frame split across reads waits for the rest
    assert list(buffer) == []
    buffer.add_data(frame[7:] + frame)
    messages = list(buffer)
    assert len(messages) == 2 and messages[0].headers[":event-type"] == "messageStart"
    assert messages[1].payload == b'{"role":"assistant"}'


# ------------------------------------------------------------------------- chat


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_plain_chat_translates_both_ways(stack, fake, transport):
    answer = await stack.via(transport).chat(
        model="bedrock/amazon.nova-lite-v1:0",
        messages=[{"role": "developer", "content": "be brief"}, user("hello bedrock")],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=64,
        stop=["\n\n"],
    )
    assert answer["model"] == "bedrock/amazon.nova-lite-v1:0" and answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "echo: hello bedrock" and choice["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 3 and answer["usage"]["total_tokens"] == 7
    assert answer["id"].startswith("chatcmpl-fake-")
    sent = fake.requests[-1]
    assert sent.path == "/model/amazon.nova-lite-v1%3A0/converse"
    assert sent.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert f"/{REGION}/bedrock/aws4_request" in sent.headers["authorization"]
    assert sent.json == {
        "messages": [{"role": "user", "content": [{"text": "hello bedrock"}]}],
        "system": [{"text": "be brief"}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.3, "topP": 0.9, "stopSequences": ["\n\n"]},
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bedrock_api_key_goes_as_bearer(stack, fake, transport):
    answer = await stack.via(transport).chat(model="bedrockkey/amazon.nova-micro-v1:0", messages=[user("hi")])
    assert answer["choices"][0]["message"]["content"] == "echo: hi"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_multi_turn_tool_use(stack, fake, transport):
    via = stack.via(transport)
    first = await via.chat(
        model="bedrock/tools", messages=[user("weather in Paris?")], tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert fake.requests[-1].json["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
                    "description": "Weather in a city",
                }
            }
        ],
        "toolChoice": {"any": {}},
    }
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content")
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "tooluse_fake0" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    second = await via.chat(
        model="bedrock/tools",
        messages=[
            user("weather in Paris?"),
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert second["choices"][0]["message"]["content"] == "tool result: sunny, 21C"
    sent = fake.requests[-1].json["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [{"toolUse": {"toolUseId": "tooluse_fake0", "name": "get_weather", "input": {"city": "Paris"}}}],
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"toolResult": {"toolUseId": "tooluse_fake0", "content": [{"text": "sunny, 21C"}]}}],
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_text_and_usage(stack, fake, transport):
    chunks = await stack.via(transport).stream(
        model="bedrock/amazon.nova-lite-v1:0", messages=[user("one two three")], stream_options={"include_usage": True}
    )
    answer = assemble(chunks)
    assert answer.content == "echo: one two three" and answer.roles == ["assistant"]
    assert answer.finish_reasons == ["stop"] and len(answer.ids) == 1
    assert answer.usage["prompt_tokens"] == 4 and answer.usage["completion_tokens"] == 5
    assert not chunks[-1]["choices"] and chunks[-1]["usage"]["total_tokens"] == 9
    assert fake.requests[-1].path.endswith("/converse-stream")
    plain = assemble(await stack.via(transport).stream(model="bedrock/amazon.nova-lite-v1:0", messages=[user("a")]))
    assert plain.usage is None and plain.content == "echo: a"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_parallel_tool_calls(stack, transport):
    answer = assemble(
        await stack.via(transport).stream(model="bedrock/tools-parallel", messages=[user("x")], tools=[WEATHER_TOOL])
    )
    assert answer.finish_reasons == ["tool_calls"] and sorted(answer.tool_calls) == [0, 1]
    first, second = answer.tool_calls[0], answer.tool_calls[1]
    assert first["arguments"] == '{"city": "Paris"}' and second["arguments"] == '{"city": "London"}'
    assert (first["id"], second["id"]) == ("tooluse_fake0", "tooluse_fake1") and first["pieces"] > 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "reason", "content"), [("length", "length", "echo:"), ("guardrail", "content_filter", "")]
)
async def test_finish_reasons(stack, transport, model, reason, content):
    via = stack.via(transport)
    answer = await via.chat(model=f"bedrock/{model}", messages=[user("a b c d")])
    assert answer["choices"][0]["finish_reason"] == reason
    assert (answer["choices"][0]["message"].get("content") or "") == content
    streamed = assemble(await via.stream(model=f"bedrock/{model}", messages=[user("a b c d")]))
    assert streamed.finish_reasons == [reason] and streamed.content == content


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reasoning_content(stack, transport):
    via = stack.via(transport)
    message = (await via.chat(model="bedrock/reasoning", messages=[user("hi")]))["choices"][0]["message"]
    assert message["content"] == "echo: hi" and message["reasoning_content"] == "the user said hi"
    streamed = assemble(await via.stream(model="bedrock/reasoning", messages=[user("hi")]))
    assert streamed.content == "echo: hi" and streamed.reasoning == "the user said hi"


async def test_images_and_json_schema(stack, fake):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await stack.rest.chat(
        model="bedrock/us.anthropic.claude-sonnet-4-20250514-v1:0",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            }
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    sent = fake.requests[-1].json
    assert sent["messages"][0]["content"][1] == {"image": {"format": "png", "source": {"bytes": PNG}}}
    text_format = sent["outputConfig"]["textFormat"]
    json_schema = text_format["structure"]["jsonSchema"]
    assert text_format["type"] == "json_schema" and json_schema["name"] == "n"
    # The schema travels as a JSON string; key order is not part of its meaning.
    assert json.loads(json_schema["schema"]) == schema


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "reason", "message"),
    [
        ("bedrock/error-ValidationException", "UPSTREAM_BAD_REQUEST", "fake ValidationException"),
        ("bedrock/error-AccessDeniedException", "UPSTREAM_AUTH_FAILED", "AccessDeniedException"),
        ("bedrockbad/amazon.nova-lite-v1:0", "UPSTREAM_AUTH_FAILED", "UnrecognizedClientException"),
        ("bedrock/error-ResourceNotFoundException", "UPSTREAM_NOT_FOUND", "ResourceNotFoundException"),
        ("bedrock/error-ThrottlingException", "UPSTREAM_RATE_LIMITED", "ThrottlingException"),
        ("bedrock/error-ModelNotReadyException", "UPSTREAM_UNAVAILABLE", "ModelNotReadyException"),
        ("bedrock/error-ServiceUnavailableException", "UPSTREAM_UNAVAILABLE", "ServiceUnavailableException"),
        ("bedrock/error-InternalServerException", "UPSTREAM_UNAVAILABLE", "InternalServerException"),
        ("bedrock/error-ModelTimeoutException", "UPSTREAM_TIMEOUT", "ModelTimeoutException"),
        ("bedrock/slow", "UPSTREAM_TIMEOUT", "in time"),
    ],
)
async def test_upstream_errors(stack, transport, model, reason, message):
    via = stack.via(transport)
    failure = await via.chat_failure(model=model, messages=[user("x")])
    assert failure.reason == reason and failure.status == failure.expected_status(transport)
    assert message in failure.message
    streamed = await via.stream_failure(model=model, messages=[user("x")])
    assert streamed.reason == reason and message in streamed.message


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_throttling_keeps_the_retry_hint(stack, transport):
    failure = await stack.via(transport).chat_failure(model="bedrock/error-ThrottlingException", messages=[user("x")])
    assert failure.retry_after == "3"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exception_frame_mid_stream(stack, transport):
    failure = await stack.via(transport).stream_failure(model="bedrock/stream-exception", messages=[user("a b c")])
    assert failure.reason == "UPSTREAM_RATE_LIMITED" and "throttlingException" in failure.message
    assert failure.chunks and failure.chunks[0]["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_cut_in_the_middle(stack, transport):
    failure = await stack.via(transport).stream_failure(model="bedrock/stream-cut", messages=[user("a b c d")])
    assert failure.reason == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("extra", "feature"),
    [
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_unsupported_fields_are_refused_before_bedrock(stack, fake, transport, extra, feature):
    failure = await stack.via(transport).chat_failure(
        model="bedrock/amazon.nova-lite-v1:0", messages=[user("x")], **extra
    )
    assert failure.reason == "UNSUPPORTED_FEATURE" and failure.status == failure.expected_status(transport)
    assert feature in failure.message and fake.requests == []


async def test_image_links_are_refused(stack, fake):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    failure = await stack.rest.chat_failure(
        model="bedrock/amazon.nova-lite-v1:0", messages=[{"role": "user", "content": [image]}]
    )
    assert failure.reason == "UNSUPPORTED_FEATURE" and "data URLs" in failure.message and fake.requests == []


async def test_client_cancellation_closes_the_upstream_stream(stack, fake):
    call = chat_grpc.ChatServiceStub(stack.channel).StreamChatCompletion(
        chat_request(model="bedrock/stream-slow", text="one two three four five six seven")
    )
    first = await call.read()
    assert first.choices[0].delta.role == "assistant"
    call.cancel()
    async with asyncio.timeout(5):
        while fake.cancelled_streams == 0:  # noqa: ASYNC110 - the fake counts, nothing to await
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_titan_embeddings(stack, fake, transport):
    result = await stack.via(transport).embed(
        model="bedrock/amazon.titan-embed-text-v2:0", input=["a b", "c"], dimensions=4, encoding_format="float"
    )
    assert [d["index"] for d in result["data"]] == [0, 1] and len(result["data"][0]["embedding"]) == 4
    assert result["usage"]["prompt_tokens"] == 3 and result["model"] == "bedrock/amazon.titan-embed-text-v2:0"
    assert sorted(r.json["inputText"] for r in fake.requests) == ["a b", "c"]
    assert {r.operation for r in fake.requests} == {"invoke"} and fake.requests[0].json["dimensions"] == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cohere_embeddings_in_base64(stack, fake, transport):
    floats = await stack.via(transport).embed(
        model="bedrock/cohere.embed-english-v3", input=["a b c"], encoding_format="float"
    )
    packed = await stack.via(transport).embed(
        model="bedrock/cohere.embed-english-v3", input="a b c", encoding_format="base64"
    )
    assert floats["usage"]["prompt_tokens"] == 3
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)
    assert fake.requests[-1].json == {"texts": ["a b c"], "input_type": "search_document"}


# ----------------------------------------------------------------------- config


async def test_environment_enables_bedrock_with_botocore_endpoint(monkeypatch, tmp_path, fake):
    aws_environment(monkeypatch, tmp_path, AWS_ENDPOINT_URL_BEDROCK_RUNTIME=fake.base_url)
    config = config_from_environment({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_DEFAULT_REGION": REGION})
    assert "bedrock" in config.providers
    assert "bedrock" not in config_from_environment({"AWS_ACCESS_KEY_ID": ACCESS_KEY}).providers  # no region
    async with Transport() as transport:
        adapter = build_provider("bedrock", config.providers["bedrock"], transport)
        assert isinstance(adapter, BedrockAdapter) and adapter._endpoint == fake.base_url
        answer = await adapter.create_chat_completion({"messages": [user("via env")]}, "amazon.nova-lite-v1:0")
    assert answer["choices"][0]["message"]["content"] == "echo: via env"


async def test_default_endpoint_is_the_regional_one(monkeypatch, tmp_path):
    aws_environment(monkeypatch, tmp_path)
    async with Transport() as transport:
        adapter = build_provider("bedrock", ProviderConfig(), transport)
    assert adapter._endpoint == f"https://bedrock-runtime.{REGION}.amazonaws.com"


async def test_bearer_token_variable_and_missing_region(monkeypatch, tmp_path, fake):
    aws_environment(monkeypatch, tmp_path, AWS_BEARER_TOKEN_BEDROCK=API_KEY)
    async with Transport() as transport:
        adapter = build_provider("bedrock", ProviderConfig(base_url=fake.base_url), transport)
        await adapter.create_chat_completion({"messages": [user("x")]}, "m")
        assert fake.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        with pytest.raises(errors.ProviderNotConfigured, match="AWS region"):
            build_provider("bedrock", ProviderConfig(), transport)


async def test_wrong_secret_is_a_rejected_credential(monkeypatch, tmp_path, fake):
    aws_environment(monkeypatch, tmp_path, AWS_SECRET_ACCESS_KEY="wrong")
    async with Transport() as transport:
        adapter = build_provider("bedrock", ProviderConfig(base_url=fake.base_url), transport)
        with pytest.raises(errors.UpstreamCredentialRejected, match="InvalidSignatureException"):
            await adapter.create_chat_completion({"messages": [user("x")]}, "m")


async def test_probe_credential(monkeypatch, tmp_path, fake):
    aws_environment(monkeypatch, tmp_path)
    async with Transport() as transport:
        adapter = build_provider("bedrock", ProviderConfig(base_url=fake.base_url), transport)
        await adapter.probe_credential(API_KEY)  # the empty conversation is refused only after auth
        assert fake.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
        with pytest.raises(errors.UpstreamCredentialRejected):
            await adapter.probe_credential("not-a-key")


async def test_session_token_is_signed_along(monkeypatch, tmp_path, fake):
    aws_environment(monkeypatch, tmp_path, AWS_SESSION_TOKEN="session-token-1")
    async with Transport() as transport:
        adapter = build_provider("bedrock", ProviderConfig(base_url=fake.base_url), transport)
        await adapter.create_chat_completion({"messages": [user("x")]}, "m")
    sent = fake.requests[-1].headers
    assert sent["x-amz-security-token"] == "session-token-1"
    assert "x-amz-security-token" in sent["authorization"].split("SignedHeaders=")[1].split(",")[0]


async def test_models_list_includes_the_bedrock_catalog(stack):
    ids = {model.id async for model in stack.oai.models.list()}
    assert {"bedrock/amazon.nova-lite-v1:0", "bedrock/amazon.titan-embed-text-v2:0"} <= ids
