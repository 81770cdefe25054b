"""The OpenAI-compatible presets (DeepSeek, xAI, OpenRouter, Groq, Together, Fireworks,
Perplexity, vLLM, llama.cpp): their base URLs and key
variables, and the reasoning text their models return, through gRPC and REST.

Each preset gets its own fake: the fake OpenAI upstream, extended with the reasoning
field the provider adds to messages and deltas (`reasoning_content` for DeepSeek and
xAI, `reasoning` for OpenRouter) and, for OpenRouter, the SSE comments it sends while a
model warms up. The fakes' answers are checked with the openai SDK's types.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator

import httpx
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.config import ProviderConfig, config_from_environment
from server.errors import ProviderNotConfigured
from server.providers.openai import OpenAIAdapter
from server.providers.registry import SPECS, build_provider, catalog_models
from server.providers.transport import Transport
from tests.fakes._http import Response
from tests.fakes.openai_upstream import FakeOpenAI, RecordedRequest
from tests.mistral_ollama_fixtures import Stack, assemble, start_stack

TRANSPORTS = ["grpc", "rest"]
REASONING = "The user greets me. I should greet back."


class FakeReasoningUpstream(FakeOpenAI):
    """The fake OpenAI upstream, plus a provider's reasoning field for `reasoning_models`."""

    def __init__(self, *, api_key: str, field: str, reasoning_models: set[str], sse_comment: bytes = b"") -> None:
        super().__init__(api_key=api_key)
        self.field = field
        self.reasoning_models = reasoning_models
        self.sse_comment = sse_comment

    def _chat(self, body: dict, recorded: RecordedRequest) -> Response:
        response = super()._chat(body, recorded)
        if body["model"] not in self.reasoning_models:
            return response
        if response.stream is None:
            completion = json.loads(response.body)
            for choice in completion["choices"]:
                choice["message"][self.field] = REASONING
            completion["usage"]["completion_tokens_details"]["reasoning_tokens"] = len(REASONING.split())
            return Response(200, json.dumps(completion).encode(), headers=response.headers)
        response.stream = self._with_reasoning(response.stream)
        return response

    async def _with_reasoning(self, events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """The upstream's events, with reasoning deltas after the first (role) chunk."""
        if self.sse_comment:
            yield self.sse_comment
        first = True
        async for event in events:
            yield event
            if first and event.startswith(b"data: {"):
                first = False
                chunk = json.loads(event.removeprefix(b"data: "))
                for piece in re.findall(r"\S+\s*", REASONING):
                    chunk["choices"][0]["delta"] = {"content": None, self.field: piece}
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"


# provider -> (key variable, reasoning field, a reasoning model, the preset's base URL)
PROVIDERS = {
    "deepseek": ("DEEPSEEK_API_KEY", "reasoning_content", "deepseek-reasoner", "https://api.deepseek.com"),
    "xai": ("XAI_API_KEY", "reasoning_content", "grok-3-mini", "https://api.x.ai/v1"),
    "openrouter": ("OPENROUTER_API_KEY", "reasoning", "deepseek/deepseek-r1", "https://openrouter.ai/api/v1"),
}
# The providers whose reasoning field the gateway carries through today.
CARRIED = ["deepseek", "xai"]


def key_of(provider: str) -> str:
    return f"sk-{provider}-test"


@pytest_asyncio.fixture(scope="module")
async def fakes() -> AsyncIterator[dict[str, FakeReasoningUpstream]]:
    servers = {
        name: FakeReasoningUpstream(
            api_key=key_of(name),
            field=field,
            reasoning_models={model},
            sse_comment=b": OPENROUTER PROCESSING\n\n" if name == "openrouter" else b"",
        )
        for name, (_, field, model, _) in PROVIDERS.items()
    }
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeReasoningUpstream]) -> None:
    for server in fakes.values():
        server.reset()


@pytest_asyncio.fixture(scope="module")
async def stack(fakes, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # Only the base URL is configured: each key comes from the preset's variable.
    with pytest.MonkeyPatch.context() as env:
        for name, (variable, *_) in PROVIDERS.items():
            env.setenv(variable, key_of(name))
        providers = {name: ProviderConfig(base_url=fake.base_url) for name, fake in fakes.items()}
        running = await start_stack(providers, tmp_path_factory.mktemp("envoy-presets"))
    yield running
    await running.stop()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- the fakes themselves


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_fake_answers_parse_as_openai_sdk_types(fakes, provider):
    _, field, model, _ = PROVIDERS[provider]
    fake = fakes[provider]
    body = {"model": model, "messages": [user("hi")]}
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {key_of(provider)}"}) as client:
        whole = await client.post(f"{fake.base_url}/chat/completions", json=body)
        streamed = await client.post(f"{fake.base_url}/chat/completions", json={**body, "stream": True})
    completion = ChatCompletion.model_validate(whole.json())
    assert completion.choices[0].message.model_extra[field] == REASONING
    events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e.startswith("data: {")]
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events]
    assert "".join((c.choices[0].delta.model_extra or {}).get(field) or "" for c in chunks) == REASONING
    assert streamed.text.startswith(": OPENROUTER") == (provider == "openrouter")


# ------------------------------------------------------------- base URLs and keys


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_preset_defaults_and_environment(provider, monkeypatch):
    variable, _, model, base_url = PROVIDERS[provider]
    monkeypatch.setenv(variable, "from-env")
    config = config_from_environment({variable: "from-env", "AIGNE_HUB_LOCAL": "false"})
    assert list(config.providers) == [provider]
    async with Transport() as transport:
        adapter = build_provider(provider, config.providers[provider], transport)
    assert isinstance(adapter, OpenAIAdapter)
    assert adapter._base_url == base_url and SPECS[provider].api_key_env == variable
    assert adapter._http.headers["authorization"] == "Bearer from-env"
    assert model in {entry.id for entry in catalog_models(provider, config.providers[provider])}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_key_from_the_preset_variable_reaches_the_upstream(stack, fakes, transport, provider):
    answer = await stack.via(transport).chat(model=f"{provider}/some-model", messages=[user("hello")])
    assert answer["choices"][0]["message"]["content"] == "echo: hello"
    assert answer["model"] == f"{provider}/some-model"
    sent = fakes[provider].requests[-1]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {key_of(provider)}"
    assert sent.json["model"] == "some-model"


# ----------------------------------------------------------------------- reasoning


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", CARRIED)
async def test_reasoning_content_passes_through(stack, transport, provider):
    model = PROVIDERS[provider][2]
    answer = await stack.via(transport).chat(model=f"{provider}/{model}", messages=[user("hi")])
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING and message["content"] == "echo: hi"
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(REASONING.split())


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", CARRIED)
async def test_streamed_reasoning_content_passes_through(stack, fakes, transport, provider):
    model = PROVIDERS[provider][2]
    chunks = await stack.via(transport).stream(
        model=f"{provider}/{model}", messages=[user("hi")], stream_options={"include_usage": True}
    )
    answer = assemble(chunks)
    assert answer.reasoning == REASONING and answer.content == "echo: hi"
    assert answer.finish_reasons == ["stop"] and answer.usage["completion_tokens"] > 0
    # The reasoning comes before the answer, as the provider sent it.
    first_content = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content"))
    last_reasoning = max(
        i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("reasoning_content")
    )
    assert last_reasoning < first_content
    assert fakes[provider].requests[-1].json["stream_options"] == {"include_usage": True}


async def test_openrouter_sse_comments_are_skipped(stack):
    answer = assemble(await stack.rest.stream(model="openrouter/deepseek/deepseek-r1", messages=[user("a b")]))
    assert answer.content == "echo: a b" and answer.finish_reasons == ["stop"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_openrouter_reasoning_reaches_clients(stack, transport):
    answer = await stack.via(transport).chat(model="openrouter/deepseek/deepseek-r1", messages=[user("hi")])
    assert answer["choices"][0]["message"].get("reasoning_content") == REASONING


# ------------------------------------------ the other OpenAI-compatible presets

# provider -> (key variable, the preset's base URL, a catalog model)
HOSTED = {
    "groq": ("GROQ_API_KEY", "https://api.groq.com/openai/v1", "llama-3.3-70b-versatile"),
    "together": ("TOGETHER_API_KEY", "https://api.together.xyz/v1", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    "fireworks": (
        "FIREWORKS_API_KEY",
        "https://api.fireworks.ai/inference/v1",
        "accounts/fireworks/models/llama-v3p3-70b-instruct",
    ),
    "perplexity": ("PERPLEXITY_API_KEY", "https://api.perplexity.ai", "sonar"),
}


@pytest.mark.parametrize("provider", list(HOSTED))
async def test_hosted_preset_defaults_and_environment(provider, monkeypatch):
    variable, base_url, model = HOSTED[provider]
    monkeypatch.setenv(variable, "from-env")
    config = config_from_environment({variable: "from-env", "AIGNE_HUB_LOCAL": "false"})
    assert list(config.providers) == [provider]
    async with Transport() as transport:
        adapter = build_provider(provider, config.providers[provider], transport)
    assert isinstance(adapter, OpenAIAdapter)
    assert adapter._base_url == base_url and adapter._http.headers["authorization"] == "Bearer from-env"
    assert model in {entry.id for entry in catalog_models(provider, config.providers[provider])}


@pytest.mark.parametrize("provider", ["vllm", "llamacpp"])
async def test_self_hosted_presets_need_a_base_url_and_no_key(provider, monkeypatch):
    monkeypatch.delenv(SPECS[provider].api_key_env or "", raising=False)
    async with Transport() as transport:
        with pytest.raises(ProviderNotConfigured, match="needs a base_url"):
            build_provider(provider, ProviderConfig(), transport)
        adapter = build_provider(provider, ProviderConfig(base_url="http://10.0.0.5:8000/v1"), transport)
    assert isinstance(adapter, OpenAIAdapter) and "authorization" not in adapter._http.headers
    assert provider not in config_from_environment({"VLLM_API_KEY": "x", "LLAMA_API_KEY": "x"}).providers


async def test_perplexity_refuses_tools_before_calling(monkeypatch, tmp_path):
    fake = FakeOpenAI(api_key="pplx-key")
    await fake.start()
    monkeypatch.setenv("PERPLEXITY_API_KEY", "pplx-key")
    running = await start_stack(
        {"perplexity": ProviderConfig(base_url=fake.base_url), "vllm": ProviderConfig(base_url=fake.base_url)},
        tmp_path,
    )
    try:
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        failure = await running.rest.chat_failure(model="perplexity/sonar", messages=[user("x")], tools=[tool])
        assert failure.reason == "UNSUPPORTED_FEATURE" and "tools" in failure.message and fake.requests == []
        answer = await running.grpc.chat(model="perplexity/sonar", messages=[user("hi")])
        assert answer["choices"][0]["message"]["content"] == "echo: hi"
        assert fake.requests[-1].headers["authorization"] == "Bearer pplx-key"
    finally:
        await running.stop()
        await fake.stop()
