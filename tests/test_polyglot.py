"""Clients in other languages (Node, Go), built from the protos alone, call the real server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLIENT = Path(__file__).parent / "polyglot" / "client.js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


async def run_node(*args: str) -> tuple[int, dict]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, str(CLIENT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert stdout, stderr.decode()
    return process.returncode or 0, json.loads(stdout)


@needs_node
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


@needs_node
async def test_node_client_calls_status_chat_and_stream(gateway, api_key):
    code, output = await run_node(f"127.0.0.1:{gateway.port}", "--model", "openai/gpt-4o-mini", "--token", api_key)
    assert code == 0, output
    assert output["status"]["available"] is True
    assert "openai/gpt-4o-mini" in output["models"]
    assert output["chat"]["content"] == "echo: hello from node"
    assert output["chat"]["finish_reason"] == "stop"
    assert output["stream"]["content"] == "echo: hello from node"
    assert output["stream"]["chunks"] > 1


@needs_node
async def test_node_client_sees_rich_error_status(gateway, api_key):
    code, output = await run_node(f"127.0.0.1:{gateway.port}", "--model", "openai/error-429", "--token", api_key)
    assert code == 1
    assert output["error"]["code"] == 8  # RESOURCE_EXHAUSTED


# The Go client: stubs generated from protos/ with Debian's Go toolchain (`make
# go-client`, which `make test` runs; AIGNE_HUB_REQUIRE_GO=1 there, so a missing
# toolchain fails instead of skipping).
ROOT = Path(__file__).parents[1]
GO_CLIENT = ROOT / ".build" / "go" / "bin" / "hubclient"


@pytest.fixture(scope="session")
def go_client() -> Path:
    if shutil.which("go") is None and not os.environ.get("AIGNE_HUB_REQUIRE_GO"):
        pytest.skip("no Go toolchain: `make go-client` installs Debian's")
    # make rebuilds only when the protos or the client changed.
    built = subprocess.run(["make", "-s", "go-client"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    return GO_CLIENT


async def run_go(client: Path, *args: str) -> tuple[int, dict]:
    process = await asyncio.create_subprocess_exec(
        str(client), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert stdout, stderr.decode()
    return process.returncode or 0, json.loads(stdout)


async def test_go_client_calls_chat_a_stream_and_reads_a_rich_error(go_client, gateway, api_key):
    code, output = await run_go(
        go_client, "-addr", f"127.0.0.1:{gateway.port}", "-token", api_key, "-error-model", "openai/error-429"
    )
    assert code == 0, output
    assert output["status"] == {"available": True}
    assert output["chat"] == {"content": "echo: hello from go", "finish_reason": "stop", "model": "openai/gpt-4o-mini"}
    assert output["stream"]["content"] == "echo: hello from go"
    assert output["stream"]["chunks"] > 1 and output["stream"]["finish_reason"] == "stop"
    error = output["error"]
    assert error["code"] == 8  # RESOURCE_EXHAUSTED
    assert (error["reason"], error["domain"]) == ("UPSTREAM_RATE_LIMITED", "hub.aigne.io")
    assert error["metadata"]["provider"] == "openai"
    assert error["metadata"]["openai_type"] == "rate_limit_error"
    assert error["retry_delay_ms"] > 0


async def test_go_client_is_refused_without_a_key(go_client, gateway):
    code, output = await run_go(go_client, "-addr", f"127.0.0.1:{gateway.port}", "-token", "sk-not-a-key")
    assert code == 1
    assert "Unauthenticated" in output["failure"]
