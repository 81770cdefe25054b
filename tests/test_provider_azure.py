"""Azure OpenAI through the gateway, over gRPC and over REST (the official openai SDK),
against a fake Azure resource whose answers are checked with `openai.AsyncAzureOpenAI`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from server import errors
from server.config import ProviderConfig, config_from_environment
from server.providers.azure import AzureOpenAIAdapter
from server.providers.registry import build_provider
from server.providers.transport import Transport
from tests.fakes.azure_upstream import FakeAzureOpenAI
from tests.mistral_ollama_fixtures import Stack, assemble, start_stack
from tests.test_grpc_chat import WEATHER_TOOL

KEY, AD_TOKEN, VERSION = "azure-key-0123", "entra-token-xyz", "2024-10-21"
TRANSPORTS = ["grpc", "rest"]


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeAzureOpenAI]:
    server = FakeAzureOpenAI(api_key=KEY, ad_token=AD_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeAzureOpenAI) -> None:
    fake.reset()


@pytest_asyncio.fixture(scope="module")
async def stack(fake: FakeAzureOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AZURE_OPENAI_ENDPOINT", fake.endpoint)
        env.setenv("AZURE_OPENAI_API_KEY", KEY)
        env.setenv("OPENAI_API_VERSION", VERSION)
        env.setenv("AZURE_OPENAI_AD_TOKEN", AD_TOKEN)
        env.setenv("NO_AZURE_KEY", "")
        providers = {
            "azure": ProviderConfig(),  # everything from the SDK's variables
            "azurev1": ProviderConfig(type="azure", base_url=fake.endpoint + "/openai/v1"),
            "azuread": ProviderConfig(type="azure", api_key_env="NO_AZURE_KEY"),  # the Entra ID token
            "azurebad": ProviderConfig(type="azure", api_key="wrong-key"),
        }
        running = await start_stack(providers, tmp_path_factory.mktemp("envoy-azure"))
    yield running
    await running.stop()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ----------------------------------------------------------------- the fake itself


async def test_fake_answers_parse_with_the_azure_sdk(fake):
    sdk = openai.AsyncAzureOpenAI(azure_endpoint=fake.endpoint, api_key=KEY, api_version=VERSION, max_retries=0)
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=[user("hi there")])
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    assert fake.requests[-1].path == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert fake.requests[-1].query == f"api-version={VERSION}" and fake.requests[-1].headers["api-key"] == KEY
    chunks = [
        c async for c in await sdk.chat.completions.create(model="gpt-4o-mini", messages=[user("a b")], stream=True)
    ]
    assert (
        chunks[0].choices == []
        and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: a b"
    )
    embedded = await sdk.embeddings.create(model="text-embedding-3-small", input="a b")
    assert len(embedded.data[0].embedding) == 16
    with pytest.raises(openai.BadRequestError) as filtered:
        await sdk.chat.completions.create(model="filtered-prompt", messages=[user("x")])
    assert filtered.value.code == "content_filter"
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncAzureOpenAI(
            azure_endpoint=fake.endpoint, api_key="nope", api_version=VERSION, max_retries=0
        ).models.list()
    entra = openai.AsyncAzureOpenAI(
        azure_endpoint=fake.endpoint, azure_ad_token=AD_TOKEN, api_version=VERSION, max_retries=0
    )
    assert (await entra.chat.completions.create(model="gpt-4o", messages=[user("x")])).choices[0].message.content


# ------------------------------------------------------------------------- chat


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_chat_through_a_deployment(stack, fake, transport):
    answer = await stack.via(transport).chat(model="azure/gpt-4o-mini", messages=[user("hello azure")], temperature=0.2)
    assert answer["choices"][0]["message"]["content"] == "echo: hello azure"
    assert answer["model"] == "azure/gpt-4o-mini" and answer["usage"]["total_tokens"] > 0
    sent = fake.requests[-1]
    assert sent.path == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert sent.query == f"api-version={VERSION}" and sent.headers["api-key"] == KEY
    assert "authorization" not in sent.headers and sent.json["temperature"] == 0.2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_chat_through_the_v1_api(stack, fake, transport):
    answer = await stack.via(transport).chat(model="azurev1/gpt-4.1", messages=[user("hi")])
    assert answer["choices"][0]["message"]["content"] == "echo: hi"
    sent = fake.requests[-1]
    assert sent.path == "/openai/v1/chat/completions" and sent.query == "" and sent.json["model"] == "gpt-4.1"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_entra_id_token_goes_as_bearer(stack, fake, transport):
    await stack.via(transport).chat(model="azuread/gpt-4o", messages=[user("hi")])
    sent = fake.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {AD_TOKEN}" and "api-key" not in sent.headers


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_drops_the_prompt_filter_chunk(stack, transport):
    chunks = await stack.via(transport).stream(
        model="azure/gpt-4o-mini", messages=[user("one two")], stream_options={"include_usage": True}
    )
    answer = assemble(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert answer.content == "echo: one two" and answer.finish_reasons == ["stop"]
    assert answer.usage["prompt_tokens"] > 0 and not chunks[-1]["choices"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tools_pass_through(stack, transport):
    via = stack.via(transport)
    answer = await via.chat(model="azure/tools", messages=[user("weather?")], tools=[WEATHER_TOOL])
    call = answer["choices"][0]["message"]["tool_calls"][0]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
    streamed = assemble(await via.stream(model="azure/tools-parallel", messages=[user("x")], tools=[WEATHER_TOOL]))
    assert sorted(streamed.tool_calls) == [0, 1] and streamed.finish_reasons == ["tool_calls"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_content_filter_finish_reason(stack, transport):
    via = stack.via(transport)
    answer = await via.chat(model="azure/content-filter", messages=[user("x")])
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    streamed = assemble(await via.stream(model="azure/content-filter", messages=[user("x")]))
    assert streamed.finish_reasons == ["content_filter"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_filtered_prompt_is_a_clear_error(stack, transport):
    via = stack.via(transport)
    failure = await via.chat_failure(model="azure/filtered-prompt", messages=[user("x")])
    assert failure.reason == "UPSTREAM_BAD_REQUEST" and failure.status == failure.expected_status(transport)
    assert "content filter" in failure.message and "violence: medium" in failure.message
    streamed = await via.stream_failure(model="azure/filtered-prompt", messages=[user("x")])
    assert streamed.reason == "UPSTREAM_BAD_REQUEST" and "violence: medium" in streamed.message


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "reason", "message"),
    [
        ("azurebad/gpt-4o", "UPSTREAM_AUTH_FAILED", "Access denied"),
        ("azure/error-404", "UPSTREAM_NOT_FOUND", "does not exist"),
        ("azure/error-429", "UPSTREAM_RATE_LIMITED", "Rate limit"),
        ("azure/error-503", "UPSTREAM_UNAVAILABLE", "overloaded"),
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
async def test_embeddings_through_a_deployment(stack, fake, transport):
    result = await stack.via(transport).embed(model="azure/text-embedding-3-small", input=["a b", "c"])
    assert len(result["data"]) == 2 and result["usage"]["prompt_tokens"] > 0
    assert fake.requests[-1].path == "/openai/deployments/text-embedding-3-small/embeddings"


# ----------------------------------------------------------------------- config


async def test_environment_enables_azure(monkeypatch, fake):
    variables = {"AZURE_OPENAI_ENDPOINT": fake.endpoint, "AZURE_OPENAI_API_KEY": KEY}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    config = config_from_environment(variables)
    assert "azure" not in config_from_environment({"AZURE_OPENAI_API_KEY": KEY}).providers
    async with Transport() as transport:
        adapter = build_provider("azure", config.providers["azure"], transport)
        assert isinstance(adapter, AzureOpenAIAdapter) and adapter._params == {"api-version": "2024-10-21"}
        monkeypatch.delenv("AZURE_OPENAI_ENDPOINT")
        with pytest.raises(errors.ProviderNotConfigured, match="AZURE_OPENAI_ENDPOINT"):
            build_provider("azure", ProviderConfig(), transport)


async def test_probe_credential(fake):
    async with Transport() as transport:
        adapter = build_provider("azure", ProviderConfig(base_url=fake.endpoint, api_key="configured"), transport)
        await adapter.probe_credential(KEY)
        assert fake.requests[-1].path == "/openai/models" and fake.requests[-1].headers["api-key"] == KEY
        with pytest.raises(errors.UpstreamCredentialRejected):
            await adapter.probe_credential("not-the-key")


async def test_models_list_includes_the_azure_catalog(stack):
    ids = {model.id async for model in stack.oai.models.list()}
    assert {"azure/gpt-4o-mini", "azure/text-embedding-3-small"} <= ids
