"""REST answers print only what is set, as OpenAI's do: no `"tool_calls": []` on every
assistant message or chunk, no `"alias_of": ""` in /models, no empty
`error`/`code` in /status, and OpenAI's `"param": null` (see openai_bridge.lua, TRIMS)."""

from __future__ import annotations

import json

import httpx
import pytest

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
# Text that looks like the members the bridge drops: inside a JSON string its quotes are
# escaped, so it must come back untouched.
LOOKALIKE = '{"tool_calls":[],"alias_of":"","created":0,"param":"","code":""}'


@pytest.fixture
async def http(bridge, auth_headers):
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20, headers=auth_headers) as client:
        yield client


def events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


async def test_an_answer_without_tool_calls_has_no_tool_calls_member(http):
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": LOOKALIKE}]}
    answer = (await http.post("/v1/chat/completions", json=body)).json()
    message = answer["choices"][0]["message"]
    assert "tool_calls" not in message
    assert message["content"] == "echo: " + LOOKALIKE
    assert answer["choices"][0]["index"] == 0  # zeros OpenAI prints stay


async def test_a_tool_turn_keeps_its_tool_calls(http):
    body = {"model": "openai/tools", "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    message = (await http.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "weather"


async def test_stream_chunks_have_no_empty_tool_calls(http):
    body = {"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": LOOKALIKE}]}
    response = await http.post("/v1/chat/completions", json=body)
    chunks = events(response)
    assert len(chunks) > 1
    assert all("tool_calls" not in choice["delta"] for chunk in chunks for choice in chunk["choices"])
    assert all(choice["index"] == 0 for chunk in chunks for choice in chunk["choices"])
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert text == "echo: " + LOOKALIKE
    assert response.text.rstrip().endswith("data: [DONE]")


async def test_models_print_alias_of_only_for_aliases(http):
    models = {model["id"]: model for model in (await http.get("/v1/models")).json()["data"]}
    assert models["fast"]["alias_of"] == "openai/gpt-4o-mini"
    plain = models["openai/gpt-4o-mini"]
    assert "alias_of" not in plain
    assert isinstance(plain["created"], int), "OpenAI's Model schema requires created"
    assert plain["object"] == "model" and plain["owned_by"] == "openai"


async def test_status_prints_only_what_is_set(http):
    assert (await http.get("/v1/status")).json() == {"available": True}


async def test_rest_embeddings_keep_openais_shape(http):
    floats = (await http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "a"})).json()
    item = floats["data"][0]
    assert set(item) == {"object", "index", "embedding"}
    assert all(isinstance(number, float) for number in item["embedding"])
    packed = await http.post(
        "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "a", "encoding_format": "base64"}
    )
    assert isinstance(packed.json()["data"][0]["embedding"], str)
