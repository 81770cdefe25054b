"""A client in a second language, built from the protos alone, calls the real server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

CLIENT = Path(__file__).parent / "polyglot" / "client.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


async def run_node(*args: str) -> tuple[int, dict]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, str(CLIENT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert stdout, stderr.decode()
    return process.returncode or 0, json.loads(stdout)


async def test_node_client_loads_every_service():
    code, output = await run_node("--check")
    assert code == 0
    assert output["services"] == [
        "aigne.hub.v1.AdminService",
        "aigne.hub.v1.AudioService",
        "aigne.hub.v1.ChatService",
        "aigne.hub.v1.EmbeddingService",
        "aigne.hub.v1.ImageService",
        "aigne.hub.v1.StatusService",
    ]


async def test_node_client_calls_status_chat_and_stream(gateway, api_key):
    code, output = await run_node(f"127.0.0.1:{gateway.port}", "--model", "openai/gpt-4o-mini", "--token", api_key)
    assert code == 0, output
    assert output["status"]["available"] is True
    assert "openai/gpt-4o-mini" in output["models"]
    assert output["chat"]["content"] == "echo: hello from node"
    assert output["chat"]["finish_reason"] == "stop"
    assert output["stream"]["content"] == "echo: hello from node"
    assert output["stream"]["chunks"] > 1


async def test_node_client_sees_rich_error_status(gateway, api_key):
    code, output = await run_node(f"127.0.0.1:{gateway.port}", "--model", "openai/error-429", "--token", api_key)
    assert code == 1
    assert output["error"]["code"] == 8  # RESOURCE_EXHAUSTED
